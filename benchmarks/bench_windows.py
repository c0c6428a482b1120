"""How the rough pass and the intensity windows change a slide's DSC (docs/WHOLE_SLIDES.md).

On one synthetic slide from ``make_slide.py`` (ground truth known), pooled DSC of:

* ``paper``: the whole slide squashed to S x S (the paper's rough pass, what happened before);
* ``global``: tiled at the trained scale, one min-max window for the whole slide;
* ``local``: tiled, local windows as the engine uses them, with other settings of the crops' window
  (its neighbourhood and the floor on its width) for comparison.

The rough mask is computed once per rough setting and reused; each row runs the fine pass.

    python benchmarks/bench_windows.py --slide /tmp/slides/s8k.ome.tif --json runs/bench/windows_8k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_segthenseg.engine import Engine, ImageSource, NormStats, load_model
from napari_segthenseg.engine import rough as rough_mod
from napari_segthenseg.engine.localnorm import (
    CROP_MIN_CONTRAST,
    CROP_NEIGHBOURHOOD,
    MIN_CONTRAST,
    NEIGHBOURHOOD,
    LocalWindows,
)
from napari_segthenseg.engine.progress import drive as run
from napari_segthenseg.engine.reader import open_image
from napari_segthenseg.engine.scale import RoughPlan


def dsc(pred: np.ndarray, gt: np.ndarray) -> float:
    return 2 * int(np.count_nonzero(pred & gt)) / max(1, int(pred.sum()) + int(gt.sum()))


def rough_with(engine: Engine, src: ImageSource, plan: RoughPlan, stats) -> rough_mod.RoughResult:
    """The rough pass with the given windows instead of the engine's own."""
    real = rough_mod.windows_for

    def given(*_):
        return stats
        yield  # a generator, as windows_for is

    rough_mod.windows_for = given
    try:
        return run(rough_mod.rough_pass(engine, src, plan))
    finally:
        rough_mod.windows_for = real


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    stem = args.slide.name.split(".")[0]
    gt = tifffile.imread(args.slide.with_name(f"{stem}_gt.tif")) > 0
    src = ImageSource(open_image(args.slide).levels, name=str(args.slide))
    engine = Engine(load_model(args.model), "cpu", memory_mb=2048)
    full = (src.full_tensor(engine.device), 0, 0)  # crops cut from memory: rows differ only in windows
    rows = []

    def score(name: str, rough, crop_stats, **extra) -> None:
        t = time.perf_counter()
        boxes = engine.boxes(rough, src.hw)
        mask = engine.fuse(engine.refine(src, boxes, crop_stats, full), boxes, src.hw)
        rows.append({"name": name, "boxes": len(boxes), "dsc": dsc(mask, gt),
                     "seconds": time.perf_counter() - t, **extra})
        print(json.dumps(rows[-1]), flush=True)

    paper = RoughPlan(False)
    r = run(rough_mod.rough_pass(engine, src, paper))
    score("paper: whole slide at S x S", r, r.stats)
    plan = engine.plan(src.hw)
    base = run(rough_mod.windows_for(engine, src, plan))  # the survey: cell ranges of the slide
    glob = NormStats(float(base.cmin.min()), float(base.cmax.max()))
    r = rough_with(engine, src, plan, glob)
    score("tiled, one window for the slide", r, glob)
    r = rough_with(engine, src, plan, base)
    engine_crops = (CROP_NEIGHBOURHOOD, CROP_MIN_CONTRAST)
    for nb, floor in (engine_crops, (1, 0.15), (1, 0.3), (1, 0.7), (3, 0.15), (3, 0.5), (5, 0.15)):
        crops = LocalWindows(base.scale, base.cell, base.cmin, base.cmax, base.flat,
                             (NEIGHBOURHOOD, nb), (MIN_CONTRAST, floor))
        label = "engine" if (nb, floor) == engine_crops else "variant"
        score(f"tiled, local windows ({label}): crops {nb}x{nb} cells, floor {floor}", r, crops,
              crop_neighbourhood=nb, crop_floor=floor)
    out = {"slide": str(args.slide), "hw": list(src.hw), "model": args.model, "rows": rows,
           "command": " ".join(["python", *sys.argv])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
