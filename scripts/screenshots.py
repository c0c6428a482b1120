"""Screenshots of the plugin for docs/: run on the sample, edit boxes, save full-window PNGs.

Run under a (virtual) screen, e.g.::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py \
        --out runs/screenshots [--model FILE]

Writes ``plugin_run.png`` (after Run), ``plugin_zoom.png`` (close-up: rough mask, boxes,
segmentation) and ``plugin_edit.png`` (after deleting the box nearest the centre and drawing a
tighter one by hand around the object it held; the new box is selected) into ``--out`` (default
``runs/screenshots``, git-ignored); copy them into docs/ to update the documentation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_segthenseg.plugin.demo import open_viewer, wait_idle
from napari_segthenseg.plugin.widget import DEBOUNCE_MS

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "screenshots"


def shoot(viewer, widget, name: str, out: Path = OUT) -> Path:
    wait_idle(widget, 120)
    wait_idle(widget, 0.5)
    path = out / name
    viewer.screenshot(str(path), canvas_only=False)
    print(f"{path}: {widget.status.value}")
    return path


def missed_object_box(image: np.ndarray, boxes: np.ndarray, near: np.ndarray, margin: int = 3
                      ) -> np.ndarray | None:
    """Box around the Otsu-bright object nearest ``near`` that no box touches (what a user would add)."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    grey = image.mean(axis=-1) if image.ndim == 3 else image
    covered = np.zeros(grey.shape, bool)
    for y0, x0, y1, x1 in boxes:
        covered[y0:y1, x0:x1] = True
    regions = [r for r in regionprops(label(grey > threshold_otsu(grey)))
               if not covered[r.slice].any() and r.area >= 30]
    if not regions:
        return None
    y0, x0, y1, x1 = min(regions, key=lambda r: float(np.sum((np.asarray(r.centroid) - near) ** 2))).bbox
    return np.array([max(0, y0 - margin), max(0, x0 - margin),
                     min(grey.shape[0], y1 + margin), min(grey.shape[1], x1 + margin)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model file (default: the bundled model)")
    p.add_argument("--image", default=None, help="image file (default: the bundled sample)")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (default: runs/screenshots)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    viewer, widget = open_viewer(args.image, args.model)
    if widget.current_model is None:
        print("no model: pass --model FILE", file=sys.stderr)
        return 1
    image = widget.image.value
    widget.run()
    wait_idle(widget, 300)
    viewer.reset_view()
    shoot(viewer, widget, "plugin_run.png", args.out)

    boxes_layer = widget._session.boxes_layer
    boxes = widget.current_boxes()
    # close-up on the box nearest the image centre, with its neighbours
    h, w = widget._session.plane.hw
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    k = int(np.argmin(((centres - (h / 2, w / 2)) ** 2).sum(1)))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    camera.center = tuple(np.asarray(image.data_to_world(tuple(centres[k]))))
    camera.zoom = camera.zoom * 3
    shoot(viewer, widget, "plugin_zoom.png", args.out)

    # the user deletes that box, and draws a tighter one by hand around the object it held
    boxes_layer.selected_data = {k}
    t0 = time.perf_counter()
    boxes_layer.remove_selected()
    wait_idle(widget, 120)
    print(f"one box deleted -> segmentation updated after {time.perf_counter() - t0:.2f} s wall "
          f"(includes the {DEBOUNCE_MS} ms edit debounce): {widget.status.value}")
    new = missed_object_box(np.asarray(widget._session.data), widget.current_boxes(), near=centres[k])
    if new is not None:
        y0, x0, y1, x1 = new - 0.5
        t0 = time.perf_counter()
        boxes_layer.add_rectangles([np.array([[y0, x0], [y1, x1]])])
        wait_idle(widget, 120)
        print(f"one box drawn -> segmentation updated after {time.perf_counter() - t0:.2f} s wall: "
              f"{widget.status.value}")
        boxes_layer.selected_data = {len(boxes_layer.data) - 1}
    viewer.layers.selection.active = boxes_layer
    shoot(viewer, widget, "plugin_edit.png", args.out)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
