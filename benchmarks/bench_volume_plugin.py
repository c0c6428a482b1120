"""Is napari live while the plugin segments a volume? (docs/VOLUMES.md)

Opens napari (use ``xvfb-run -a`` without a screen), adds a ZYX volume, docks the plugin and
presses Run (the whole volume), then moves one box on one slice (an edit of that 3D box), then
scrolls through the slices. A 20 ms QTimer runs all the while; every gap between its ticks beyond
20 ms is a stall of the event loop (what a user feels as a frozen window). Reports per phase the
longest stall, the number over 0.2 s (with where the UI thread was), and the phase's wall time.
Phases: ``idle`` (napari with nothing to do: the machine's own stalls), ``run`` (the job computes
in its worker thread), ``show`` (its layers are put in place), ``edit`` (the moved box is
segmented again and shown), ``scroll`` (50 slices shown in turn).

    xvfb-run -a .venv/bin/python benchmarks/bench_volume_plugin.py --volume runs/volumes/ct512x150.ome.tif \\
        --model default --json runs/bench/volume_plugin.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from qt_loop import loop_until  # benchmarks/ is on the path when run as a script

TICK_MS = 20


class Meter:
    """Gaps between ticks of a 20 ms QTimer, by phase, and where the UI thread was during each gap
    over 0.2 s (its stack sampled every 50 ms by a watcher thread: our code, napari's, or none when
    the thread merely waited for a CPU on a loaded machine)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.phase = "start"
        self.gaps: dict[str, list[float]] = {}
        self.where: dict[str, list[dict]] = {}
        self.samples: list[str] = []
        self._last: float | None = None
        self._ui = threading.get_ident()
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(0.05)
            last = self._last
            if last is not None and time.perf_counter() - last > 0.1:
                frame = sys._current_frames().get(self._ui)
                stack = traceback.extract_stack(frame)[-6:] if frame is not None else []
                self.samples.append(" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                               for f in reversed(stack)))

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            gap = now - self._last - TICK_MS / 1000
            self.gaps.setdefault(self.phase, []).append(gap)
            if gap > 0.2:
                counts: dict[str, int] = {}
                for s in self.samples:
                    counts[s] = counts.get(s, 0) + 1
                top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
                self.where.setdefault(self.phase, []).append({"gap_s": round(gap, 3), "ui_thread_in": top})
        self.samples = []
        self._last = now

    def summary(self, phase: str) -> dict:
        gaps = self.gaps.get(phase, [])
        return {"longest_stall_s": round(max(gaps), 3) if gaps else None,
                "stalls_over_0.2_s": sum(g > 0.2 for g in gaps), "ticks": len(gaps),
                "stalls": self.where.get(phase, [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", required=True, help="a ZYX TIFF/OME-TIFF or OME-Zarr volume")
    p.add_argument("--model", default="default")
    p.add_argument("--rough-scale", type=float, default=0.0, help="the panel's rough scale (0: auto)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--idle", type=float, default=20.0, help="seconds of napari doing nothing, measured first")

    p.add_argument("--json")
    args = p.parse_args(argv)

    import napari
    import torch

    from napari_segthenseg.engine.reader import open_image
    from napari_segthenseg.plugin.volume_session import BOX_ID
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # one core is left to the UI thread
    opened = open_image(args.volume, volume=True)
    data = opened.levels[0]
    viewer = napari.Viewer(show=True)
    layer = viewer.add_image(data, name="volume")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segthenseg", "Segment-then-Segment")
    if args.model != "default" and not widget.load_model_file(args.model):
        raise SystemExit(f"cannot load {args.model}")
    widget.rough_scale.value = args.rough_scale
    meter = Meter()
    loop_until(lambda: False, 1.0)
    out: dict = {"volume": args.volume, "shape": list(layer.data.shape), "lazy": opened.lazy}
    meter.phase = "idle"  # the control: napari with nothing to do, on this machine as loaded as it is
    loop_until(lambda: False, args.idle)
    out["idle"] = {**meter.summary("idle"), "wall_s": args.idle}

    # Run: while the job computes (worker thread), then while its three layers are put in place
    # (one per event-loop turn: napari builds the layer controls and draws the first slice).
    meter.phase = "run"
    t0 = time.perf_counter()
    widget.run()
    loop_until(lambda: widget._installing or not widget.busy, args.timeout)  # noqa: SLF001 (a probe)
    t1 = time.perf_counter()
    meter.phase = "show"
    done = loop_until(lambda: not widget.busy, args.timeout)
    out["run"] = {**meter.summary("run"), "wall_s": round(t1 - t0, 2), "status": widget.status.value,
                  "engine_s": {k: round(v, 2) for k, v in widget.last_timings.items()}}
    out["show"] = {**meter.summary("show"), "wall_s": round(time.perf_counter() - t1, 2), "finished": done}

    boxes = viewer.layers["volume boxes"]
    ids = boxes.features[BOX_ID].to_numpy()
    spans = np.bincount(ids) if len(ids) else np.zeros(0)
    if len(spans):
        k = int(np.argmax(spans))  # the box across most slices
        i = int(np.flatnonzero(ids == k)[len(np.flatnonzero(ids == k)) // 2])
        meter.phase = "edit"
        t0 = time.perf_counter()
        data = list(boxes.data)
        data[i] = data[i] + np.array([0.0, 4.0, 4.0])
        boxes.data = data
        loop_until(lambda: widget.busy, 2.0)
        done = loop_until(lambda: not widget.busy, args.timeout)
        out["edit"] = {**meter.summary("edit"), "wall_s": round(time.perf_counter() - t0, 2),
                       "finished": done, "status": widget.status.value, "box_slices": int(spans[k])}

    meter.phase = "scroll"
    t0 = time.perf_counter()
    depth = layer.data.shape[0]
    for z in range(0, depth, max(1, depth // 50)):
        viewer.dims.set_current_step(0, z)
        loop_until(lambda: False, 0.05)
    out["scroll"] = {**meter.summary("scroll"), "wall_s": round(time.perf_counter() - t0, 2)}
    out["meta"] = {"command": " ".join(["bench_volume_plugin.py", *(argv or sys.argv[1:])]),
                   "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "host": platform.node(), "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
