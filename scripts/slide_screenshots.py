"""A whole slide in the napari plugin: open, Run, edit boxes; screenshots and measurements.

Run under a (virtual) screen, e.g.::

    xvfb-run -a -s "-screen 0 1800x1100x24" .venv/bin/python scripts/slide_screenshots.py \\
        SLIDE.ome.tif --out runs/slide_shots [--gt SLIDE_gt.tif] [--model FILE] [--rough-scale F]

Opens the slide with the plugin's reader (a lazy multiscale layer), presses Run (and with ``--save``
saves the segmentation and boxes as ``OUT/NAME.ome.zarr`` + ``OUT/NAME.boxes.csv``), then moves,
resizes and deletes a box and draws one with napari's own mouse handlers (the code paths of a real
drag). ``--continue OUT/NAME`` skips Run: it reopens a saved segmentation and boxes and continues from
them (how a user picks up earlier work). Writes into ``--out`` (never into docs/: copy the PNGs there
yourself):

* ``slide_run.png`` (zoomed out), ``slide_zoom.png`` (close-up after Run), ``slide_edit.png``
  (the same close-up after the edits);
* ``slide_measure.json``: Run wall time, boxes, peak RSS, DSC against ``--gt``, the Qt event loop's
  longest stall per phase (gaps of a 20 ms QTimer, the loop running as in napari) with how much of
  it the plugin's own UI-thread code took, and each edit's latency (mouse release to the
  segmentation layer refreshed) split into napari's handling of the edit and the plugin's job.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from qt_loop import loop_until  # noqa: E402

PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"
TICK_MS = 20
STACK_DEPTH = 9  # frames kept per stall sample


class Meter:
    """Event-loop stalls (gaps between 20 ms QTimer ticks) and the plugin's UI-thread calls."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.phase = "start"
        self.gaps: list[tuple[str, float, float]] = []  # (phase, end time, gap beyond the tick)
        self.calls: list[tuple[str, str, float, float]] = []  # (phase, name, start, seconds)
        self._last: float | None = None
        self.context = None  # what the job was doing (logged with each stall over 0.25 s)
        self.log: list[tuple[str, float, str]] = []
        self.samples: list[str] = []  # where the UI thread was during the current stall
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        self._ui = threading.get_ident()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """Sample the UI thread's stack every 0.1 s while no tick came for 0.25 s: says whose code
        (ours, napari's, vispy's, Qt's) a stall is spent in."""
        while True:
            time.sleep(0.1)
            last = self._last
            if last is not None and time.perf_counter() - last > 0.25:
                frame = sys._current_frames().get(self._ui)
                stack = traceback.extract_stack(frame)[-STACK_DEPTH:] if frame is not None else []
                self.samples.append(" < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:"
                                               f"{f.lineno} {f.name}" for f in reversed(stack)))

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            gap = now - self._last - TICK_MS / 1000
            self.gaps.append((self.phase, now, gap))
            if gap > 0.25 and self.context is not None:
                counts: dict[str, int] = {}
                for sample in self.samples:
                    counts[sample] = counts.get(sample, 0) + 1
                where = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
                self.log.append((self.phase, round(gap, 3), self.context(), where))
        self.samples = []
        self._last = now

    def wrap(self, owner: object, name: str, label: str | None = None) -> None:
        """Time every call of ``owner.name`` (an instance or a class attribute)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((self.phase, label or name, t0, time.perf_counter() - t0))

        setattr(owner, name, timed)

    def longest(self, phase: str) -> dict:
        """The phase's longest stall and the plugin calls inside it (napari's: the rest)."""
        gaps = [(end, gap) for p, end, gap in self.gaps if p == phase]
        if not gaps:
            return {"longest_stall_s": None}
        end, gap = max(gaps, key=lambda g: g[1])
        start = end - gap - TICK_MS / 1000
        inside = {}
        for p, name, t0, dt in self.calls:
            if p == phase and t0 >= start - 1e-3 and t0 + dt <= end + 1e-3:
                inside[name] = round(inside.get(name, 0.0) + dt, 3)
        return {"longest_stall_s": round(gap, 3), "stalls_over_0.5_s": sum(g > 0.5 for _, g in gaps),
                "plugin_calls_in_it_s": inside}

    def total(self, phase: str, name: str) -> float:
        return sum(dt for p, n, _, dt in self.calls if p == phase and n == name)


def screenshot(viewer, meter: Meter, path: Path) -> None:
    """A screenshot, in a phase of its own (encoding the PNG is not a stall of the plugin's)."""
    phase, meter.phase = meter.phase, "screenshot"
    viewer.screenshot(str(path), canvas_only=False)
    settle(0.1)
    meter.phase = phase


def settle(seconds: float = 0.5) -> None:
    end = time.perf_counter() + seconds
    loop_until(lambda: time.perf_counter() >= end, seconds + 1)


@dataclass
class MouseEvent:
    """The fields of a canvas mouse event that napari's layer mouse callbacks read."""

    type: str
    is_dragging: bool = False
    position: tuple = (0.0, 0.0)  # world coordinates
    button: int = 1
    modifiers: list = field(default_factory=list)
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))  # canvas coordinates
    view_direction: list | None = None
    up_direction: list | None = None
    dims_displayed: list = field(default_factory=lambda: [0, 1])
    delta: tuple | None = None
    native: object = None
    handled: bool = False


class Swappable:
    """A proxy whose ``__wrapped__`` event napari replaces during a drag (as with its canvas events)."""

    def __init__(self, event: MouseEvent) -> None:
        object.__setattr__(self, "__wrapped__", event)

    def __getattr__(self, name: str):
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "__wrapped__":
            object.__setattr__(self, name, value)
        else:
            setattr(self.__wrapped__, name, value)


def mouse(layer, kind: str, world: tuple[float, float], dragging: bool = False) -> float:
    """One napari mouse event on ``layer`` at ``world``; returns the seconds napari took."""
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    call = {"mouse_press": mouse_press_callbacks, "mouse_move": mouse_move_callbacks,
            "mouse_release": mouse_release_callbacks}[kind]
    t0 = time.perf_counter()
    # wrapped as napari wraps canvas events: a drag's generator keeps the press event, and napari swaps
    # the event inside it for each move and for the release
    call(layer, Swappable(MouseEvent(type=kind, is_dragging=dragging, position=tuple(world))))
    return time.perf_counter() - t0


def drag(layer, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """Press, move and release like a user's drag; returns (napari's seconds before the release,
    the release's perf_counter time)."""
    t = mouse(layer, "mouse_press", start, dragging=True)
    mid = tuple((np.asarray(start) + np.asarray(end)) / 2)
    t += mouse(layer, "mouse_move", start, dragging=True)
    t += mouse(layer, "mouse_move", mid, dragging=True)
    t += mouse(layer, "mouse_move", end, dragging=True)
    return t, time.perf_counter()


def dice(store_level, gt_path: Path) -> float:
    """Pooled DSC of the on-disk mask against a ground-truth TIFF, scored as bench_slide.py scores."""
    import tifffile
    import zarr

    from bench_slide import dsc, score_blocks

    with tifffile.TiffFile(gt_path) as tif:
        tot = score_blocks(store_level, zarr.open(tif.series[0].aszarr(), mode="r"))
    return dsc(tot["tp"], tot["fp"], tot["fn"])


def lazy_image(viewer):
    """A 100,000 x 80,000 px multiscale image of zeros that is never held in memory (dask), as a
    40x whole-slide image is large: for the box table at a real slide's scale."""
    import dask.array as da

    levels, shape = [], (100_000, 80_000)
    while max(shape) > 1024:
        levels.append(da.zeros(shape, dtype=np.uint8, chunks=4096))
        shape = (shape[0] // 2, shape[1] // 2)
    return viewer.add_image(levels, multiscale=True, name="lazy", contrast_limits=(0, 255))


def random_boxes(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` nucleus-sized boxes (24-64 px) spread over an image of ``hw``."""
    rng = np.random.default_rng(seed)
    side = rng.integers(24, 65, n)
    y0, x0 = rng.integers(0, hw[0] - 64, n), rng.integers(0, hw[1] - 64, n)
    return np.stack([y0, x0, y0 + side, x0 + side], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slide", nargs="?",
                   help="a pyramidal OME-TIFF/SVS/NDPI (e.g. from benchmarks/make_slide.py)")
    p.add_argument("--out", required=True, help="folder for the PNGs and slide_measure.json")
    p.add_argument("--gt", help="ground-truth mask TIFF of the slide (make_slide.py's NAME_gt.tif)")
    p.add_argument("--model", default="default", help="model file (default: the bundled model)")
    p.add_argument("--rough-scale", type=float, default=0.0, help="image px per rough px (0: the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for Run")
    p.add_argument("--save", action="store_true", help="save the result as OUT/NAME.ome.zarr + .boxes.csv")
    p.add_argument("--continue", dest="resume", metavar="STEM",
                   help="instead of Run: continue from STEM.ome.zarr and STEM.boxes.csv (saved with --save)")
    p.add_argument("--table", metavar="N", type=int,
                   help="instead of a slide and Run: a lazy 100,000 x 80,000 px image (zeros) and a boxes "
                        "file of N random boxes, opened and picked as the boxes layer (a real slide's scale)")
    p.add_argument("--async-slicing", action="store_true",
                   help="turn on napari's experimental asynchronous slicing (Preferences > Experimental): "
                        "layers' tiles are read off the UI thread")
    args = p.parse_args(argv)
    if not args.slide and not args.table:
        p.error("give a slide, or --table N")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_segthenseg.engine.boxio import write_boxes_csv
    from napari_segthenseg.plugin.slide_session import SlideSession

    if args.async_slicing:  # napari saves its settings: put the user's own value back at exit
        import atexit

        from napari.settings import get_settings

        experimental = get_settings().experimental
        atexit.register(setattr, experimental, "async_", experimental.async_)
        experimental.async_ = True
    viewer = napari.Viewer(title="Segment-then-Segment: whole slide")
    viewer.window.resize(1800, 1100)
    QApplication.processEvents()
    meter = Meter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meter.phase = "open"
    t0 = time.perf_counter()
    if args.table:
        image = lazy_image(viewer)
        args.slide = "lazy 100000 x 80000 zeros"
    else:
        [image] = viewer.open(args.slide, plugin=PLUGIN)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    t_dock = time.perf_counter() - t0
    settle(1.0)
    widget.image.value = image
    widget.device.value = args.device
    if args.model != "default":
        widget.load_model_file(args.model)
    widget.rough_scale.value = args.rough_scale
    meter.context = lambda: widget.status.value
    for name in ("_on_done", "_on_progress", "_start"):
        meter.wrap(widget, name)
    for name in ("read_boxes", "show_seg", "install", "update_job"):
        meter.wrap(SlideSession, name)

    meter.phase = "run"
    t0 = time.perf_counter()
    t_read = 0.0
    if args.table:  # what a user does with a saved boxes file: open it, pick it as the boxes layer
        csv_path = out / "table.boxes.csv"
        meter.phase = "prepare"  # making the file is not the user's wait
        write_boxes_csv(csv_path, random_boxes(args.table, image.data[0].shape))
        settle(0.2)
        meter.phase = "run"
        t0 = time.perf_counter()
        [boxes_read] = viewer.open(str(csv_path), plugin=PLUGIN)
        t_read = time.perf_counter() - t0
        widget.boxes.reset_choices()
        widget.boxes.value = boxes_read
    elif args.resume:  # what a user does to continue: open the boxes and the segmentation, pick them
        [boxes_read] = viewer.open(args.resume + ".boxes.csv", plugin=PLUGIN)
        [seg_read] = viewer.open(args.resume + ".ome.zarr", plugin="napari-ome-zarr")
        t_read = time.perf_counter() - t0
        widget.segmentation.reset_choices()
        widget.segmentation.value = seg_read
        widget.boxes.reset_choices()
        widget.boxes.value = boxes_read
    else:
        widget.run()
    if not loop_until(lambda: not widget.busy, args.timeout):
        print("Run did not finish in time", file=sys.stderr)
        return 1
    t_run = time.perf_counter() - t0
    run_status, run_timings = widget.status.value, dict(widget.last_timings)
    settle(2.0)  # the layers' first draws belong to the run
    if args.save:
        stem = out / Path(args.slide).name.split(".")[0]
        t0 = time.perf_counter()
        widget.save(str(stem) + ".ome.zarr")
        print(f"saved {stem}.ome.zarr and .boxes.csv in {time.perf_counter() - t0:.1f} s")
    session = widget._session
    boxes_layer = session.boxes_layer
    boxes = session.table.all()
    print(f"run: {widget.status.value}; {t_run:.1f} s wall")
    meter.phase = "view"
    viewer.reset_view()
    settle(1.0)
    screenshot(viewer, meter, out / "slide_run.png")

    # zoom in and pan around the boxes' median centre, as a user looks around; the boxes layer follows
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    k = int(np.argmin(((centres - np.median(centres, 0)) ** 2).sum(1)))
    cy, cx = centres[k]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    tour = [(0.2, (0, 0)), (1.0, (0, 0)), (1.0, (0, 600)), (1.0, (600, 600)), (1.0, (600, 0)),
            (1.0, (600, -600)), (0.5, (0, 0)), (3.0, (0, 0))]

    def look_around(phase: str) -> list[dict]:
        meter.phase = phase
        seen = []
        for zoom, (dy, dx) in tour:
            t_move = time.perf_counter()
            camera.center = tuple(image.data_to_world((cy + dy, cx + dx)))
            camera.zoom = zoom
            settle(0.3)  # the camera rests: the boxes layer follows (debounced)
            caught_up = loop_until(lambda: not widget.busy, 60)
            seen.append({"zoom": zoom, "offset_px": [dy, dx], "caught_up": caught_up,
                         "s_to_boxes_shown": round(time.perf_counter() - t_move, 2),
                         "rectangles": len(boxes_layer.data),
                         "in_view": session.view.in_view if session.view else None,
                         "note": session.view_note()})
        return seen

    # napari alone first (the boxes layer hidden, not following): what drawing the slide costs
    view, session.view = session.view, None
    boxes_layer.visible = False
    look_around("navigate_napari_only")
    session.view = view
    boxes_layer.visible = True
    navigation = look_around("navigate")
    print("navigate", json.dumps(navigation))
    settle(1.0)
    screenshot(viewer, meter, out / "slide_zoom.png")

    # edits with napari's own mouse handlers, on the boxes layer in select mode
    edits = {}
    viewer.layers.selection.active = boxes_layer
    boxes_layer.mode = "select"

    def to_world(y, x):
        return tuple(boxes_layer.data_to_world((y, x)))

    def finish(name: str, napari_s: float, t_release: float) -> None:
        meter.phase = name
        t_napari = mouse(boxes_layer, "mouse_release", edit_at[name][-1]) if edit_at[name] else 0.0
        ok = loop_until(lambda: not widget.busy, 120)
        t_done = time.perf_counter()
        settle(0.6)
        # _on_done runs the layer refresh (the first of the result's UI steps) itself
        ours = {n: round(meter.total(name, n), 3) for n in ("read_boxes", "update_job", "_start", "_on_done")}
        edits[name] = {"latency_s": round(t_done - t_release, 3), "ok": ok,
                       "napari_before_release_s": round(napari_s, 3),
                       "napari_release_s": round(t_napari, 3),
                       "job_s (worker start to layer refreshed)": round(widget.last_seconds, 3),
                       "job_stages_s": {k: round(v, 3) for k, v in widget.last_timings.items()},
                       "debounce_s": widget._debounce.interval() / 1000, "plugin_ui_thread_s": ours,
                       "status": widget.status.value, **meter.longest(name)}
        print(name, json.dumps(edits[name]))

    y0, x0, y1, x1 = boxes[k]
    edit_at: dict[str, list] = {}
    # move: select the box, then drag it 40 px right and 30 px down
    meter.phase = "move"
    mid = to_world((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5)
    mouse(boxes_layer, "mouse_press", mid)
    mouse(boxes_layer, "mouse_release", mid)
    target = to_world((y0 + y1) / 2 - 0.5 + 30, (x0 + x1) / 2 - 0.5 + 40)
    napari_s, t_rel = drag(boxes_layer, mid, target)
    edit_at["move"] = [target]
    finish("move", napari_s, t_rel)
    # resize: drag the selected box's bottom-right handle 20 px further out
    meter.phase = "resize"
    corner = to_world(y1 + 30 - 0.5, x1 + 40 - 0.5)
    farther = to_world(y1 + 50 - 0.5, x1 + 60 - 0.5)
    napari_s, t_rel = drag(boxes_layer, corner, farther)
    edit_at["resize"] = [farther]
    finish("resize", napari_s, t_rel)
    # delete the box (what the Delete key does)
    meter.phase = "delete"
    t_rel = time.perf_counter()
    boxes_layer.remove_selected()
    napari_s = time.perf_counter() - t_rel
    edit_at["delete"] = []
    finish("delete", napari_s, t_rel)
    # draw a new box where the deleted one was
    meter.phase = "draw"
    boxes_layer.mode = "add_rectangle"
    napari_s, t_rel = drag(boxes_layer, to_world(y0 - 0.5, x0 - 0.5), to_world(y1 - 0.5, x1 - 0.5))
    edit_at["draw"] = [to_world(y1 - 0.5, x1 - 0.5)]
    finish("draw", napari_s, t_rel)
    boxes_layer.mode = "select"
    if len(boxes_layer.data):
        boxes_layer.selected_data = {len(boxes_layer.data) - 1}
    settle(1.0)
    screenshot(viewer, meter, out / "slide_edit.png")

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    label = session.slide.label
    result = {
        "slide": str(args.slide), "hw": list(session.plane.hw), "kind": image.metadata.get("segthenseg_kind"),
        "levels": [list(map(int, lv.shape[:2])) for lv in image.data],
        "open_s (viewer.open with the plugin's reader)": round(t_open, 2),
        "dock_s (the widget, with the default model)": round(t_dock, 2),
        "run_wall_s": round(t_run, 1), "run_status": run_status, "run_stages_s": run_timings,
        "continued_from": args.resume,
        "read_boxes_and_segmentation_s": round(t_read, 2) if args.resume else None,
        "boxes": int(len(boxes)), "seg_levels": [list(lv.shape) for lv in label.levels],
        "navigation": navigation, "boxes_file_read_s": round(t_read, 2) if args.table else None,
        "seg_level0_type": type(label.levels[0]).__module__ + "." + type(label.levels[0]).__name__,
        "rough_layer": None if session.rough_layer is None else {
            "shape": list(np.shape(session.rough_layer.data[0] if session.rough_layer.multiscale
                                   else session.rough_layer.data)),
            "scale": list(map(float, session.rough_layer.scale))},
        "peak_rss_mb": round(rss, 1), "rss_before_open_mb": round(rss0, 1),
        "stalls": {ph: meter.longest(ph)
                   for ph in ("open", "run", "view", "navigate_napari_only", "navigate")},
        "run_ui_thread_s": {n: round(meter.total("run", n), 3)
                            for n in ("_on_done", "install", "_on_progress")},
        "edits": edits, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stalls_over_0.25_s": meter.log, "async_slicing": args.async_slicing,
    }
    if args.gt and not args.table:
        result["dsc"] = round(dice(label.levels[0], Path(args.gt)), 4)
    (out / "slide_measure.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "edits"}, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
