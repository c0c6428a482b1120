"""``segthenseg-demo [IMAGE] [--run] [--screenshot PNG]``: napari with the plugin docked.

Opens the image (or the bundled sample), docks the Segment-then-Segment widget with the default
model (or ``--model FILE``/a training run's folder) selected, optionally runs it, and with
``--screenshot`` saves a full-window screenshot after the run and exits (for docs and tests).

Everything the user named is checked before the window shows: a model that cannot be loaded,
an image napari cannot read, a device that is not there or a screenshot path that cannot be
written is one line on stderr and exit status 2 (never another model, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine import (
    DEFAULT_MODEL_NAME,
    ModelFileError,
    StSModel,
    available_devices,
    bundled_model_path,
    load_model,
    resolve_model_path,
)
from ..engine.atomic import output_problem

PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"
TIMEOUT_S = 300.0


class DemoError(Exception):
    """Something the user named cannot be used; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segthenseg-demo",
        description="Open napari with the Segment-then-Segment panel docked, an image (default: the "
                    "bundled sample) and the default model.")
    p.add_argument("image", nargs="?", help="image file (any format napari opens); default: the sample")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME,
                   help="model file or training run folder (its model.pt); default: the bundled default "
                        "model, if installed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--run", action="store_true", help="run the pipeline after opening")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a full-window screenshot after the run and exit")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
                   help="seconds to wait for the run with --screenshot (default: %(default)g)")
    return p


def check_args(args: argparse.Namespace) -> tuple[str, StSModel] | None:
    """Check what the user named before napari starts; return the model to select (key, model),
    or None for no model (no bundled one installed, which is said). Raises :class:`DemoError`."""
    if args.image and not Path(args.image).exists():
        raise DemoError(f"image not found: {args.image}")
    if args.screenshot and (problem := output_problem(args.screenshot)):
        raise DemoError(f"--screenshot: {problem}")
    devices = ("auto", *available_devices())
    if args.device not in devices:
        raise DemoError(f"device {args.device!r} is not available here (choose from {', '.join(devices)})")
    if args.model == DEFAULT_MODEL_NAME and not bundled_model_path().is_file():
        print("segthenseg-demo: no default model is installed; pass --model FILE or use "
              "'Load model file…' in the panel.", file=sys.stderr)
        return None
    try:
        key = DEFAULT_MODEL_NAME if args.model == DEFAULT_MODEL_NAME else str(resolve_model_path(args.model))
        return key, load_model(key)
    except (ModelFileError, OSError) as exc:
        raise DemoError(f"cannot load model {args.model}: {exc}") from None


def root_message(exc: BaseException) -> str:
    """The first line of the innermost cause (a reader plugin's own error, not napari's wrapper)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_viewer(image: str | None, model: str | None = DEFAULT_MODEL_NAME, device: str = "auto",
                loaded: StSModel | None = None):
    """A napari viewer with the image and the docked widget, shown only once the image has been
    read (a file napari cannot read raises :class:`DemoError` and no window appears), with
    ``model`` selected (``loaded``: that model, already loaded); returns (viewer, widget)."""
    import napari

    from .sample import SAMPLE_NAME, load_sample_image

    viewer = napari.Viewer(title="Segment-then-Segment demo", show=False)
    try:
        if image:
            viewer.open(image)
        else:
            viewer.add_image(load_sample_image(), name=SAMPLE_NAME, rgb=True)
    except Exception as exc:  # napari's readers raise many kinds; all mean "cannot read this file"
        viewer.close()
        raise DemoError(f"napari cannot open {image}: {root_message(exc)}") from None
    viewer.window.show()
    viewer.window.resize(1800, 1000)  # a landscape canvas beside the two docks (once shown)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image.value = viewer.layers[0]
    widget.device.value = device
    if model is not None and model != DEFAULT_MODEL_NAME:
        if loaded is not None:
            widget.use_model(model, loaded)
        elif not widget.load_model_file(model):
            viewer.close()
            raise DemoError(f"cannot load model {model}")
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
    try:
        model = check_args(args)
        if model is None and args.screenshot:
            return 1  # nothing to run: said above
        import napari

        key, loaded = model if model is not None else (None, None)
        viewer, widget = open_viewer(args.image, key, args.device, loaded)
    except DemoError as exc:
        print(f"segthenseg-demo: error: {exc}", file=sys.stderr)
        return 2
    if args.run or args.screenshot:
        if widget.current_model is None:
            print("segthenseg-demo: no model to run.", file=sys.stderr)
        else:
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
