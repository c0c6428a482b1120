"""The crops' window floor on slides: a share of the slide's range, or of the tissue nearby.

On synthetic slides from ``make_slide.py`` (ground truth known), the rough pass and boxes once with
the engine's windows, then the fine pass with the crops' floor as each variant says: ``slide 0.5``
is the old rule (half the slide's whole range), ``K x K, F`` is F of the widest cell range within
K x K cells (that range taken as at least 0.15 of the slide's), the engine's rule with K = 9,
F = 0.3 (docs/WHOLE_SLIDES.md). Pooled DSC per slide and variant::

    .venv/bin/python benchmarks/bench_crop_floor.py runs/slides/s8k.ome.tif runs/slides/dense4k.ome.tif \\
        --json runs/bench/crop_floor.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import tifffile

from bench_windows import dsc, rough_with
from napari_segthenseg.engine import Engine, ImageSource, load_model
from napari_segthenseg.engine import rough as rough_mod
from napari_segthenseg.engine.progress import drive as run
from napari_segthenseg.engine.reader import open_image

VARIANTS = [(0, 0.5), (3, 0.5), (5, 0.5), (7, 0.5), (3, 0.3), (5, 0.3), (7, 0.3), (9, 0.3)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slides", type=Path, nargs="+")
    p.add_argument("--model", default="default")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    engine = Engine(load_model(args.model), "cpu", memory_mb=2048)
    rows = []
    for slide in args.slides:
        stem = slide.name.split(".")[0]
        gt = tifffile.imread(slide.with_name(f"{stem}_gt.tif")) > 0
        src = ImageSource(open_image(slide).levels, name=str(slide))
        full = (src.full_tensor(engine.device), 0, 0)  # crops cut from memory: rows differ in windows only
        plan = engine.plan(src.hw)
        base = run(rough_mod.windows_for(engine, src, plan))
        boxes = engine.boxes(rough_with(engine, src, plan, base), src.hw)
        for reach, share in VARIANTS:
            crops = dataclasses.replace(base, floors=(base.floors[0], share), crop_reach=reach)
            t = time.perf_counter()
            mask = engine.fuse(engine.refine(src, boxes, crops, full), boxes, src.hw)
            rows.append({"slide": stem, "floor": "slide 0.5" if reach == 0 else f"{reach} x {reach}, {share}",
                         "reach": reach, "share": share, "boxes": len(boxes), "dsc": round(dsc(mask, gt), 4),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.model, "rows": rows, "command": " ".join(["python", *sys.argv])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
