"""Whole slides: StS on a synthetic slide vs the same fields segmented one by one, side by side.

The slide comes from ``benchmarks/make_slide.py`` (real dsb2018 fluorescence fields with their
ground truth, packed into a pyramidal OME-TIFF). In one run this script measures:

1. **slide**: ``segthenseg-predict SLIDE`` in a child process (OME-Zarr output, chunk by chunk):
   wall time, peak RSS (of that process), boxes, network pixels (rough + fine) from its report;
2. **fields**: the placed fields, each read and segmented on its own (the paper's whole-image
   rough pass) in a second child process: wall time, peak RSS;
3. **accuracy**: pooled DSC (all pixels' TP/FP/FN summed) of the slide's mask against the slide's
   ground truth, over the whole slide and inside the fields only, and of the fields one by one;
4. network pixels of a full-resolution sliding window with the same net (S x S tiles, no overlap
   and nnU-Net's default 50 % overlap) for comparison.

    python benchmarks/bench_slide.py --slide /tmp/slides/s20k.ome.tif --model default \\
        --json runs/bench/slide_20k.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK = 4096  # rows scored at once


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time and peak RSS (this child only, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_slide: {' '.join(cmd)} failed with exit code {code}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def score_blocks(pred, gt, fields_mask=None) -> dict:
    """Pooled TP/FP/FN of two (H, W) arrays read in row blocks (both may be on disk)."""
    tot = {"tp": 0, "fp": 0, "fn": 0, "tp_in": 0, "fp_in": 0, "fn_in": 0}
    for y in range(0, gt.shape[0], BLOCK):
        p = np.asarray(pred[y:y + BLOCK]) > 0
        g = np.asarray(gt[y:y + BLOCK]) > 0
        tot["tp"] += int(np.count_nonzero(p & g))
        tot["fp"] += int(np.count_nonzero(p & ~g))
        tot["fn"] += int(np.count_nonzero(~p & g))
        if fields_mask is not None:
            inside = fields_mask[y:y + BLOCK]
            tot["tp_in"] += int(np.count_nonzero(p & g & inside))
            tot["fp_in"] += int(np.count_nonzero(p & ~g & inside))
            tot["fn_in"] += int(np.count_nonzero(~p & g & inside))
    return tot


def dsc(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(1, 2 * tp + fp + fn)


def placements(slide: Path) -> list[dict]:
    stem = slide.name.split(".")[0]
    with open(slide.with_name(f"{stem}_fields.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


class FieldsMask:
    """Row blocks of "inside a placed field", without a full-size array."""

    def __init__(self, rows: list[dict], hw: tuple[int, int]):
        self.rows, self.hw = rows, hw

    def __getitem__(self, sl: slice) -> np.ndarray:
        y0, y1 = sl.start, min(sl.stop, self.hw[0])
        out = np.zeros((y1 - y0, self.hw[1]), dtype=bool)
        for r in self.rows:
            y, x, h, w = (int(r[k]) for k in "yxhw")
            a, b = max(y, y0), min(y + h, y1)
            if a < b:
                out[a - y0:b - y0, x:x + w] = True
        return out


def fields_one_by_one(args: argparse.Namespace) -> None:
    """Child process: segment each placed field alone; write pooled counts and time to --json."""
    sys.path.insert(0, str(HERE))
    import tifffile
    import torch

    from make_slide import field_image, transformed
    from napari_segthenseg.engine import Engine, load_model
    from napari_segthenseg.engine.image import MIN_SIDE
    from napari_segthenseg.engine.reader import read_image

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(load_model(args.model), args.device)
    rows = placements(args.slide)
    data = Path(args.data)
    with tifffile.TiffFile(args.slide) as tf:
        stain = "brightfield" if len(tf.series[0].shape) == 3 else "fluorescence"  # RGB: bright-field
    tot = {"tp": 0, "fp": 0, "fn": 0, "boxes": 0, "fine_px": 0, "rough_px": 0, "too_small": 0}
    t0 = time.perf_counter()
    for r in rows:
        img = read_image(data / "images" / f"{r['stem']}.png")  # decoding is part of the job
        gt = read_image(data / "masks" / f"{r['stem']}.png") > 0
        field = field_image(img, stain)  # as make_slide placed it (gray, or RGB for bright-field)
        im, m = transformed(type("F", (), {"image": field, "mask": gt})(), int(r["rot90"]), r["flip"] == "1")
        oy, ox, h, w = (int(r.get(k, 0)) for k in ("oy", "ox", "h", "w"))  # a field cut to fit (dense slides)
        im, m = im[oy:oy + h, ox:ox + w], m[oy:oy + h, ox:ox + w]
        if min(im.shape[:2]) < MIN_SIDE:  # a sliver cut by the slide's edge: no image to segment alone
            tot["fn"] += int(np.count_nonzero(m))
            tot["too_small"] += 1
            continue
        res = engine.segment(im)
        p = res.mask
        tot["tp"] += int(np.count_nonzero(p & m))
        tot["fp"] += int(np.count_nonzero(p & ~m))
        tot["fn"] += int(np.count_nonzero(~p & m))
        tot["boxes"] += len(res.boxes)
        for k in ("fine_px", "rough_px"):
            tot[k] += int(res.counts.get(k, 0))
    tot["seconds"] = time.perf_counter() - t0
    tot["fields"] = len(rows)
    Path(args.json).write_text(json.dumps(tot))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, required=True, help="NAME.ome.tif from make_slide.py")
    p.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="the fields' source")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both runs (0: torch's default)")
    p.add_argument("--chunk-threads", type=int, default=2, help="segthenseg-predict --threads")
    p.add_argument("--workers", type=int, default=None, help="segthenseg-predict --workers (dask cluster)")
    p.add_argument("--skip-fields", action="store_true", help="only the slide (e.g. for the largest one)")
    p.add_argument("--predict-args", default="", metavar="ARGS",
                   help="more segthenseg-predict options for the slide, e.g. '--group-zoom 0'")
    p.add_argument("--no-heap-fix", action="store_true",
                   help="keep the free heap after chunks (SEGTHENSEG_HEAP_FIX=0): compare peak RSS")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--fields-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fields_only:
        fields_one_by_one(args)
        return 0
    import tifffile
    import torch

    from napari_segthenseg.engine import load_model
    from napari_segthenseg.engine.omezarr import open_label_image

    model = load_model(args.model)
    size = model.settings.size
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.no_heap_fix:
        env["SEGTHENSEG_HEAP_FIX"] = "0"
    result: dict = {"slide": str(args.slide), "model": args.model, "device": args.device,
                    "heap_fix": not args.no_heap_fix,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                    "command": " ".join([Path(sys.executable).name, *sys.argv])}
    with tempfile.TemporaryDirectory(dir=args.json.parent if args.json.parent.exists() else None) as tmp:
        out, report = Path(tmp) / "out", Path(tmp) / "report.jsonl"
        cmd = [str(Path(sys.executable).with_name("segthenseg-predict")), str(args.slide), "--out",
               str(out), "--model", args.model, "--device", args.device, "--format", "ome-zarr",
               "--report", str(report), "--threads", str(args.chunk_threads)]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        cmd += args.predict_args.split()
        result["load_before"] = os.getloadavg()
        slide = run_child(cmd, env)
        rep = json.loads(report.read_text().splitlines()[-1])
        h, w = rep["hw"]
        stem = args.slide.name.split(".")[0]
        seg = open_label_image(out / f"{stem}_mask.ome.zarr").levels[0]
        with tifffile.TiffFile(args.slide.with_name(f"{stem}_gt.tif")) as tf:
            import zarr

            gt = zarr.open(tf.series[0].aszarr(), mode="r")
            tot = score_blocks(seg, gt, FieldsMask(placements(args.slide), (h, w)))
        slide.update(boxes=rep["boxes"], rough=rep["rough"], counts=rep["counts"], timings=rep["timings"],
                     dsc=dsc(tot["tp"], tot["fp"], tot["fn"]),
                     dsc_inside_fields=dsc(tot["tp_in"], tot["fp_in"], tot["fn_in"]), **tot,
                     megapixels_per_s=h * w / slide["wall_s"] / 1e6)
        result.update(hw=[h, w], slide=slide)
        if not args.skip_fields:
            fjson = Path(tmp) / "fields.json"
            cmd = [sys.executable, __file__, "--fields-only", "--slide", str(args.slide), "--data",
                   str(args.data), "--model", args.model, "--device", args.device, "--threads",
                   str(args.threads), "--json", str(fjson)]
            fields = run_child(cmd, env)
            fields.update(json.loads(fjson.read_text()))
            fields["dsc"] = dsc(fields["tp"], fields["fp"], fields["fn"])
            result["fields"] = fields
            result["slide_vs_fields"] = {"dsc_difference": slide["dsc"] - fields["dsc"],
                                         "time_ratio": slide["wall_s"] / fields["wall_s"]}
    result["load_after"] = os.getloadavg()
    net_px = slide["counts"].get("rough_px", 0) + slide["counts"].get("fine_px", 0)
    tiles = math.ceil(h / size) * math.ceil(w / size)
    half = (math.ceil((h - size) / (size / 2)) + 1) * (math.ceil((w - size) / (size / 2)) + 1)
    result["network_pixels"] = {"sts": net_px, "sliding_window": tiles * size * size,
                                "sliding_window_50pc_overlap": half * size * size,
                                "ratio": net_px / (tiles * size * size),
                                "ratio_50pc_overlap": net_px / (half * size * size)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in result if k in ("slide_vs_fields", "network_pixels")}, indent=1))
    print(f"slide: DSC {slide['dsc']:.4f}, {slide['wall_s']:.0f} s, peak RSS {slide['peak_rss_mb']:.0f} MB"
          + (f"; fields: DSC {result['fields']['dsc']:.4f}, {result['fields']['wall_s']:.0f} s, peak RSS "
             f"{result['fields']['peak_rss_mb']:.0f} MB" if "fields" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
