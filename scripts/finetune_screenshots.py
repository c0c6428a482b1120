"""Correct, then fine-tune, in napari on scikit-image's immunohistochemistry image (docs/PLUGIN.md).

The whole loop as a user does it, driven through the plugin's widget: Run with the bundled model,
correct a few nuclei in the segmentation layer, *Add to training set*, *Fine-tune* (a few minutes on
the CPU), and the image is segmented again with the new model. Screenshots before and after, and a
JSON with the times and counts, go into ``--out``::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/finetune_screenshots.py \\
        --minutes 3 --out runs/ihc_finetune

The corrections stand in for a person's brush strokes. There is no ground truth for this image, so
the nuclei are taken from a classical segmentation of its haematoxylin stain (``rgb2hed``, a local
threshold, an opening, objects of 40 px and more: :func:`haematoxylin_nuclei`); the "user" paints
the nuclei that the model missed and erases the objects it found where there is no nucleus (all of
them, or the ``--add``/``--erase`` largest); what the model found on a nucleus is left as it made it.
The same haematoxylin nuclei are the yardstick for before and after (Dice and the number of nuclei
hit), which says how the segmentation moved, not how right it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "ihc_finetune"


def haematoxylin_nuclei(image: np.ndarray) -> np.ndarray:
    """Nuclei (instance labels) from the haematoxylin channel: a classical stand-in for hand painting."""
    from skimage import filters, measure, morphology
    from skimage.color import rgb2hed

    h = filters.gaussian(rgb2hed(image)[..., 0], 1.5)
    mask = (h > filters.threshold_local(h, 51, offset=-0.005)) & (h > np.percentile(h, 60))
    mask = morphology.remove_small_objects(morphology.opening(mask, morphology.disk(2)), max_size=40)
    return measure.label(mask)


def compare(seg: np.ndarray, nuclei: np.ndarray) -> dict:
    """Dice against the haematoxylin nuclei, objects found, and nuclei with any overlap."""
    from skimage import measure

    fg, ref = seg > 0, nuclei > 0
    hit = np.unique(nuclei[fg & ref])
    return {"objects": int(measure.label(fg).max()), "dice_vs_haematoxylin": round(
        float(2 * (fg & ref).sum() / max(1, fg.sum() + ref.sum())), 3),
        "nuclei_hit": int((hit > 0).sum()), "nuclei": int(nuclei.max())}


def correct(seg: np.ndarray, nuclei: np.ndarray, add: int | None, erase: int | None
            ) -> tuple[np.ndarray, int, int]:
    """The user's corrections: paint the ``add`` largest missed nuclei, erase the ``erase`` largest
    objects that cover no nucleus (None: all of them)."""
    from skimage import measure

    out = seg.copy()
    missed = [r for r in measure.regionprops(nuclei) if not (seg[nuclei == r.label] > 0).any()]
    missed = sorted(missed, key=lambda r: -r.area)[:add]
    nxt = int(out.max()) + 1
    for r in missed:
        out[nuclei == r.label] = nxt
        nxt += 1
    objects = measure.label(seg > 0)
    false = [r for r in measure.regionprops(objects) if not (nuclei[objects == r.label] > 0).any()]
    false = sorted(false, key=lambda r: -r.area)[:erase]
    for r in false:
        out[objects == r.label] = 0
    return out, len(missed), len(false)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model to start from (default: the bundled one)")
    p.add_argument("--minutes", type=float, default=3.0, help="fine-tune time limit")
    p.add_argument("--add", type=int, default=None, help="missed nuclei the user paints (default: all)")
    p.add_argument("--erase", type=int, default=None, help="false objects the user erases (default: all)")
    p.add_argument("--out", type=Path, default=OUT, help="screenshots, training folder, summary")
    args = p.parse_args(argv)
    import imageio.v3 as iio
    import skimage.data

    from napari_segthenseg.plugin.demo import open_viewer, wait_idle

    args.out.mkdir(parents=True, exist_ok=True)
    image = skimage.data.immunohistochemistry()
    path = args.out / "ihc.png"
    iio.imwrite(path, image)
    nuclei = haematoxylin_nuclei(image)
    viewer, widget = open_viewer(str(path), args.model, device="cpu")
    summary: dict = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                     "load_before": [round(v, 2) for v in os.getloadavg()], "model": args.model}

    def shoot(name: str, canvas_only: bool = True) -> None:
        """The image with the segmentation and boxes (the rough mask hidden), or the whole window."""
        wait_idle(widget, 600)
        wait_idle(widget, 0.5)
        session = widget._session
        if session.alive(session.rough_layer):
            session.rough_layer.visible = not canvas_only
        viewer.reset_view()
        viewer.screenshot(str(args.out / name), canvas_only=canvas_only)
        print(f"{args.out / name}: {widget.status.value}", flush=True)

    t0 = time.perf_counter()
    widget.run()
    wait_idle(widget, 600)
    summary["run_s"] = round(time.perf_counter() - t0, 2)
    seg = widget._session.seg_layer
    before = np.asarray(seg.data).reshape(image.shape[:2])
    summary["before"] = compare(before, nuclei)
    shoot("ihc_before.png")

    corrected, painted, erased = correct(before, nuclei, args.add, args.erase)
    seg.data = corrected.reshape(seg.data.shape)  # what the brush and eraser leave in the layer
    summary.update(painted=painted, erased=erased, corrected=compare(corrected, nuclei))
    shoot("ihc_corrected.png")

    widget.training_folder = args.out / "training"
    widget.add_to_training_set()
    old = widget._model_key
    widget.finetune_minutes.value = args.minutes
    t0 = time.perf_counter()
    widget.fine_tune()
    while time.perf_counter() - t0 < args.minutes * 60 + 900:  # the fine-tune, then the Run it starts
        wait_idle(widget, 1)
        if widget._model_key != old and not widget.busy and widget.status.value.endswith(" s"):
            break
    summary["fine_tune_and_rerun_s"] = round(time.perf_counter() - t0, 1)
    notes = widget.current_model.settings.notes
    summary.update(new_model=widget._model_key, train_wall_s=notes["wall_s"],
                   epochs_reached=notes.get("stopped"), status=widget.status.value)
    summary["lineage"] = widget.current_model.lineage()
    after = np.asarray(widget._session.seg_layer.data).reshape(image.shape[:2])
    summary["after"] = compare(after, nuclei)
    shoot("ihc_after.png")
    shoot("ihc_after_window.png", canvas_only=False)
    summary["load_after"] = [round(v, 2) for v in os.getloadavg()]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
