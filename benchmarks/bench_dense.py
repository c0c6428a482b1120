"""Dense tissue: StS fine pass with single crops vs shared crops vs a full-resolution sliding window.

On a slide from ``benchmarks/make_slide.py`` (or a square part of one, read into memory), the rough
pass runs once (tiled, as ``segthenseg-predict`` runs it); then, side by side in this process on the
same boxes and intensity windows:

* **StS** fine pass and fusion through ``ChunkedOutput`` (chunk tasks on 2 threads, each box once),
  with the paper's one crop per box and with small neighbouring boxes sharing crops at each
  ``--zooms`` value (``engine/groups.py``);
* **sliding window**: the same fine net over the whole image at full resolution (S x S tiles at
  1 network px per image px, normalised like crops, by the window at the tile's centre), without
  overlap and with 50 % overlap keeping each tile's central half (no seams: every pixel comes from
  the tile it is most central in).

For each: pooled DSC against the slide's ground truth, network pixels (fine net only; the rough
pass is the same for all and reported once), wall time.

    .venv/bin/python benchmarks/bench_dense.py --slide runs/slides/dense4k.ome.tif \
        --json runs/bench/dense4k.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_segthenseg.engine import Engine, ImageSource, load_model
from napari_segthenseg.engine.progress import drive
from napari_segthenseg.engine.slide import ChunkedOutput

BATCH = 256  # sliding-window tiles per forward


def dsc(pred: np.ndarray, gt: np.ndarray) -> float:
    tp = np.count_nonzero(pred & gt)
    return 2 * tp / max(1, 2 * tp + np.count_nonzero(pred & ~gt) + np.count_nonzero(~pred & gt))


def sliding_window(engine: Engine, src: ImageSource, stats, overlap: float) -> tuple[np.ndarray, int]:
    """The fine net over every pixel: S x S tiles at stride ``S * (1 - overlap)``, each tile's central
    stride x stride part kept. Returns the mask and the network pixels."""
    s = engine.settings.size
    step = max(1, int(round(s * (1 - overlap))))
    m = (s - step) // 2
    h, w = src.hw
    starts = [(y - m, x - m) for y in range(0, h, step) for x in range(0, w, step)]
    mask = np.zeros((h, w), dtype=bool)
    region = (src.full_tensor(engine.device), 0, 0)
    for i in range(0, len(starts), BATCH):
        part = np.asarray(starts[i:i + BATCH], dtype=np.float64)
        windows = np.concatenate([part, np.full((len(part), 1), float(s))], 1)
        boxes = np.concatenate([part, part + s], 1).astype(np.int64)
        probs = engine.refine(src, boxes, stats, region, windows) >= engine.settings.threshold
        for (y0, x0), p in zip(part.astype(int).tolist(), probs, strict=True):
            ky, kx = y0 + m, x0 + m
            mask[ky:ky + step, kx:kx + step] = p[m:m + step, m:m + step][:h - ky, :w - kx]
    return mask, len(starts) * s * s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, required=True,
                   help="NAME.ome.tif from make_slide.py (with NAME_gt.tif)")
    p.add_argument("--region", type=int, nargs=3, metavar=("Y", "X", "SIDE"),
                   help="segment only this square of the slide (read into memory); default: all of it")
    p.add_argument("--model", default="default")
    p.add_argument("--zooms", type=float, nargs="*", default=[1.0], help="shared-crop zooms to try")
    p.add_argument("--overlaps", type=float, nargs="*", default=[0.0, 0.5], help="sliding-window overlaps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, and chunk threads for StS (0: torch's default and 2 chunk threads)")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tifffile
    import zarr

    from napari_segthenseg.engine.reader import open_image

    stem = args.slide.name.split(".")[0]
    with open_image(args.slide) as opened:
        base = opened.levels[0]
        with tifffile.TiffFile(args.slide.with_name(f"{stem}_gt.tif")) as tf:
            gt_all = zarr.open(tf.series[0].aszarr(), mode="r")
            if args.region:
                y, x, side = args.region
                img = np.asarray(base[y:y + side, x:x + side])
                gt = np.asarray(gt_all[y:y + side, x:x + side]) > 0
            else:
                img, gt = np.asarray(base), np.asarray(gt_all) > 0
    engine = Engine(load_model(args.model), "cpu")
    src = ImageSource(img, name=str(args.slide))
    plan = engine.plan_for(src)
    t0 = time.perf_counter()
    rough = engine.rough(src)
    boxes = engine.boxes(rough, src.hw)
    rough_s = time.perf_counter() - t0
    result: dict = {
        "slide": str(args.slide), "region": args.region, "hw": list(src.hw), "model": args.model,
        "rough": plan.describe(), "rough_s": rough_s, "rough_px": engine.counts.get("rough_px", 0),
        "boxes": len(boxes), "foreground": float(gt.mean()),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads, "load_before": os.getloadavg()[0],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": []}
    pixels = src.height * src.width
    for zoom in [None, *args.zooms]:
        out = np.zeros(src.hw, dtype=np.uint8)
        t0 = time.perf_counter()
        res = drive(engine.walk(src, boxes, stats=rough.stats,
                                output=ChunkedOutput(out, threads=args.threads or 2, group_zoom=zoom)))
        wall = time.perf_counter() - t0
        fine_px = int(res.counts.get("fine_px", 0))
        result["runs"].append({"method": "StS" if zoom is None else f"StS, shared crops at zoom {zoom:g}",
                               "zoom": zoom, "dsc": dsc(out > 0, gt), "fine_px": fine_px,
                               "fine_px_per_image_px": fine_px / pixels, "crops": res.counts.get(
                                   "crops", len(boxes)), "wall_s": wall})
        print(json.dumps(result["runs"][-1]), flush=True)
    for overlap in args.overlaps:
        t0 = time.perf_counter()
        engine.timings, engine.counts = {}, {}
        mask, px = sliding_window(engine, src, rough.stats, overlap)
        wall = time.perf_counter() - t0
        result["runs"].append({"method": f"sliding window, {overlap:.0%} overlap", "overlap": overlap,
                               "dsc": dsc(mask, gt), "fine_px": px, "fine_px_per_image_px": px / pixels,
                               "wall_s": wall})
        print(json.dumps(result["runs"][-1]), flush=True)
    result["load_after"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
