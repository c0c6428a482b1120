"""Does napari stay live while the plugin fine-tunes? The longest stall of the UI thread.

Opens napari with the plugin on an image, presses Run, paints a correction into the segmentation,
adds the image to a training folder and presses Fine-tune (the trainer's steps in the widget's
worker thread, then the new model is selected and the image segmented again). A 10 ms QTimer on the
UI thread notes when it fires; a gap much longer than 10 ms is time the UI could not react (a
stall). Reports the longest gap and the 99th percentile per phase (the fine-tune; the re-run and
putting its result in place), with the CPU load average. Needs a (virtual) screen::

    xvfb-run -a .venv/bin/python benchmarks/bench_finetune_ui.py --minutes 1 \
        --json runs/bench/finetune_ui.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TICK_MS = 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model to run and fine-tune (default: the bundled one)")
    p.add_argument("--image", default=None, help="image file (default: the bundled sample)")
    p.add_argument("--minutes", type=float, default=1.0, help="fine-tune time limit")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)

    import torch
    from qtpy.QtCore import QTimer

    from napari_segthenseg.plugin.demo import open_viewer, wait_idle

    viewer, widget = open_viewer(args.image, args.model, device="cpu")
    widget.run()
    wait_idle(widget, 600)
    seg = widget._session.seg_layer
    seg.brush_size = 9
    h, w = widget._session.plane.hw
    seg.paint((h // 3, w // 3), int(np.asarray(seg.data).max()) + 1)  # a correction
    widget.training_folder = Path(tempfile.mkdtemp(prefix="segthenseg-bench-")) / "training"
    widget.add_to_training_set()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    old_key = widget._model_key
    load = os.getloadavg()
    t0 = time.perf_counter()
    widget.finetune_minutes.value = args.minutes
    widget.fine_tune()
    wait_idle(widget, args.minutes * 60 + 600)  # the fine-tune job
    t_tuned = time.perf_counter()
    while time.perf_counter() - t_tuned < 600:  # then the Run with the new model (its line ends in " s")
        wait_idle(widget, 1)
        if widget._model_key != old_key and not widget.busy and widget.status.value.endswith(" s"):
            break
    t_end = time.perf_counter()
    timer.stop()
    stamps = np.asarray(ticks)

    def phase(a: float, b: float) -> dict:
        inside = stamps[(stamps >= a) & (stamps <= b)]
        gaps = np.diff(np.concatenate([[a], inside, [b]]))
        return {"seconds": round(b - a, 2), "ticks": int(len(inside)),
                "max_gap_s": round(float(gaps.max()), 4),
                "p99_gap_s": round(float(np.percentile(gaps, 99)), 4),
                "gaps_over_0.2s": int((gaps > 0.2).sum())}

    notes = widget.current_model.settings.notes
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()],
        "tick_ms": TICK_MS, "fine_tune": phase(t0, t_tuned), "rerun": phase(t_tuned, t_end),
        "model": widget._model_key, "epochs": notes.get("stopped") or notes.get("epochs"),
        "train_wall_s": notes.get("wall_s"), "status": widget.status.value,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
