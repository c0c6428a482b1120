"""``segthenseg-demo [IMAGE] [--run] [--screenshot PNG]``: napari with the plugin docked.

Opens the image (or the bundled sample), docks the Segment-then-Segment widget with the default
model (or ``--model FILE``) selected, optionally runs it, and with ``--screenshot`` saves a
full-window screenshot after the run and exits (for docs and tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine import DEFAULT_MODEL_NAME, bundled_model_path

PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segthenseg-demo",
        description="Open napari with the Segment-then-Segment panel docked, an image (default: the "
                    "bundled sample) and the default model.")
    p.add_argument("image", nargs="?", help="image file (any format napari opens); default: the sample")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME,
                   help="model file (default: the bundled default model, if installed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--run", action="store_true", help="run the pipeline after opening")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a full-window screenshot after the run and exit")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the run (--screenshot)")
    return p


def open_viewer(image: str | None, model: str, device: str = "auto"):
    """A shown napari viewer with the image and the docked widget; returns (viewer, widget)."""
    import napari

    from .sample import SAMPLE_NAME, load_sample_image

    viewer = napari.Viewer(title="Segment-then-Segment demo")
    viewer.window.resize(1800, 1000)  # a landscape canvas beside the two docks
    if image:
        viewer.open(image)
    else:
        viewer.add_image(load_sample_image(), name=SAMPLE_NAME, rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image.value = viewer.layers[0]
    if device not in widget.device.choices:
        raise SystemExit(f"segthenseg-demo: device {device!r} is not available here "
                         f"(choose from {', '.join(widget.device.choices)})")
    widget.device.value = device
    if model != DEFAULT_MODEL_NAME:
        widget.load_model_file(model)
    return viewer, widget


def wait_idle(widget, timeout: float) -> bool:
    """Process Qt events until the widget's job is done (True) or ``timeout`` passes (False)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if not widget.busy:
            return True
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image and not Path(args.image).exists():
        print(f"segthenseg-demo: image not found: {args.image}", file=sys.stderr)
        return 2
    if args.model == DEFAULT_MODEL_NAME and not bundled_model_path().is_file():
        print("segthenseg-demo: no default model is installed; pass --model FILE or use "
              "'Load model file…' in the panel.", file=sys.stderr)
    import napari

    viewer, widget = open_viewer(args.image, args.model, args.device)
    if args.run or args.screenshot:
        if widget.current_model is None:
            print("segthenseg-demo: no model to run.", file=sys.stderr)
            if args.screenshot:
                viewer.close()
                return 1
        elif args.run:
            widget.run()
    if not args.screenshot:
        napari.run()
        return 0
    done = wait_idle(widget, args.timeout)
    viewer.reset_view()
    wait_idle(widget, 0.5)  # let the layers draw
    out = Path(args.screenshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"segthenseg-demo: {widget.status.value or 'ready'}; screenshot saved to {out}")
    viewer.close()
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
