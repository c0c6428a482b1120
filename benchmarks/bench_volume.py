"""Volumes (docs/VOLUMES.md): volume StS against slice-by-slice StS, and large volumes' time and memory.

Three subcommands:

``ct``
    The CT stand-in's val patients stacked into volumes (consecutive slices of one patient, from
    ``manifest.csv``'s ``patient_id`` and ``slice_index``). Each volume is segmented slice by slice
    (``Engine.segment`` on every slice: the paper's way) and as a volume with every variant of the
    3D rules asked for (z padding, objects on one slice only, per-slice or per-volume intensity
    windows), with the same model. Per volume: 3D Dice (all voxels), per-slice DSC (empty truth
    and empty prediction score 1), IoU, precision, recall, and the seconds it took.

``build``
    Large volumes under ``runs/``: a val patient resampled to Z x 512 x 512 (image linear, truth
    nearest) for each ``--depths``, and a 2048 x 2048 microscopy-like stack built from dsb2018
    fields (each field fades in and out over the slices around its own focal slice). ZYX TIFFs,
    one tiled page per slice, so a reader takes slices and tiles one at a time.

``large``
    ``segthenseg-predict`` on such a volume in a child process (OME-Zarr output, chunk by chunk):
    wall and CPU seconds, peak RSS of that process (``wait4``), the stage times from its report,
    and Dice against the truth when there is one (read slab by slab).

    .venv/bin/python benchmarks/bench_volume.py ct --data ../shared/data/ct_segthor_aorta \\
        --model MODEL --json runs/bench/volume_ct.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 32  # slices scored at once


def run_child(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, CPU time and peak RSS (this child only, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_volume: {' '.join(cmd)} failed with exit code {code}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """TP, FP, FN per slice of two (Z, H, W) bool arrays: (Z, 3)."""
    return np.stack([(pred & gt).sum((1, 2)), (pred & ~gt).sum((1, 2)), (~pred & gt).sum((1, 2))], 1)


def scores(c: np.ndarray) -> dict:
    """3D scores from the summed counts, and the mean per-slice DSC (empty vs empty scores 1)."""
    tp, fp, fn = (int(v) for v in c.sum(0))
    per_slice = np.where(c.sum(1) == 0, 1.0, 2 * c[:, 0] / np.maximum(2 * c[:, 0] + c[:, 1] + c[:, 2], 1))
    return {"dice_3d": 2 * tp / max(2 * tp + fp + fn, 1), "iou_3d": tp / max(tp + fp + fn, 1),
            "precision_3d": tp / max(tp + fp, 1), "recall_3d": tp / max(tp + fn, 1),
            "slice_dsc_mean": float(per_slice.mean()), "slice_dsc": per_slice.round(4).tolist(),
            "empty_slices_predicted": int((c[:, 0] + c[:, 1] == 0).sum())}


def ct_volumes(data: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
    """The split's patients as (Z, H, W) image and truth stacks in slice order, with the indices."""
    import imageio.v3 as iio
    import tifffile

    rows = [r for r in csv.DictReader(open(data / "manifest.csv")) if r["split"] == split]
    out = {}
    for pid in sorted({r["patient_id"] for r in rows}):
        mine = sorted((int(r["slice_index"]), r["id"]) for r in rows if r["patient_id"] == pid)
        zs = [z for z, _ in mine]
        if zs != list(range(zs[0], zs[0] + len(zs))):
            raise SystemExit(f"{pid}: slices are not consecutive ({zs})")
        img = np.stack([tifffile.imread(data / "images" / f"{i}.tif") for _, i in mine])
        gt = np.stack([iio.imread(data / "masks" / f"{i}.png") > 0 for _, i in mine])
        out[pid] = (img, gt, zs)
    return out


def variants(spec: list[str]) -> list[dict]:
    """``z_pad:min_slices:norm:growth:z_smooth`` strings (growth ``none``: one window per object)
    -> options."""
    out = []
    for s in spec:
        z, m, n, g, k = s.split(":")
        out.append({"z_pad": int(z), "min_slices": int(m), "norm": n,
                    "growth": None if g == "none" else float(g), "z_smooth": int(k)})
    return out


def cmd_ct(args: argparse.Namespace) -> dict:
    import torch

    from napari_segthenseg.engine import Engine, load_model
    from napari_segthenseg.engine.boxes import component_boxes
    from napari_segthenseg.engine.volume import VolumeOptions, segment_volume

    torch.set_num_threads(args.threads)
    engine = Engine(load_model(args.model), args.device)
    vols = ct_volumes(Path(args.data), args.split)
    methods: dict[str, dict] = {"slice_baseline": {}, "slice_sts": {}}
    for v in variants(args.variants):
        methods[f"volume z_pad={v['z_pad']} min_slices={v['min_slices']} norm={v['norm']} "
                f"growth={v['growth']} z_smooth={v['z_smooth']}"] = v
    per_volume: dict[str, dict] = {m: {} for m in methods}
    for pid, (img, gt, zs) in vols.items():
        t0 = time.perf_counter()
        flat = [engine.segment(s) for s in img]
        t_slice = time.perf_counter() - t0
        base = np.stack([engine.baseline(r.rough, r.hw) for r in flat])  # outside the timing
        sts = np.stack([r.mask for r in flat])
        per_volume["slice_baseline"][pid] = {**scores(counts(base, gt)), "seconds": None}
        per_volume["slice_sts"][pid] = {**scores(counts(sts, gt)), "seconds": t_slice,
                                        "boxes": int(sum(len(r.boxes) for r in flat))}
        for name, v in methods.items():
            if not name.startswith("volume"):
                continue
            t0 = time.perf_counter()
            res = segment_volume(engine, img, options=VolumeOptions(**v))
            seconds = time.perf_counter() - t0
            comps = component_boxes(res.rough.mask)  # 26-connected rough objects
            one = int(((comps[:, 3] - comps[:, 0]) == 1).sum())  # those on one slice only
            per_volume[name][pid] = {**scores(counts(res.mask, gt)), "seconds": seconds,
                                     "boxes": len(res.boxes), "rough_objects": len(comps),
                                     "rough_objects_on_one_slice": one,
                                     "slice_crops": res.counts.get("slice_crops", 0),
                                     "timings": {k: round(t, 4) for k, t in res.timings.items()}}
        dice = {k: round(v[pid]["dice_3d"], 4) for k, v in per_volume.items()}
        print(f"{pid}: {len(zs)} slices, 3D Dice {dice}", file=sys.stderr)
    summary = {}
    for name, rows in per_volume.items():
        slices = np.concatenate([r["slice_dsc"] for r in rows.values()])
        secs = [r["seconds"] for r in rows.values() if r["seconds"] is not None]
        summary[name] = {"dice_3d_mean": float(np.mean([r["dice_3d"] for r in rows.values()])),
                         "dice_3d_std": float(np.std([r["dice_3d"] for r in rows.values()])),
                         "slice_dsc_mean": float(slices.mean()), "slice_dsc_std": float(slices.std()),
                         "precision_3d_mean": float(np.mean([r["precision_3d"] for r in rows.values()])),
                         "recall_3d_mean": float(np.mean([r["recall_3d"] for r in rows.values()])),
                         "seconds_per_volume": float(np.mean(secs)) if secs else None}
    return {"volumes": {p: {"slices": len(v[2]), "first_slice": v[2][0], "shape": list(v[0].shape)}
                        for p, v in vols.items()},
            "summary": summary, "per_volume": per_volume}


# -- building large volumes ---------------------------------------------------------------------
def write_stack(path: Path, slices, shape: tuple[int, int, int], tile: int) -> None:
    """A ZYX TIFF written slice by slice (tiled pages), from an iterator of (H, W) uint8 arrays."""
    import tifffile

    def tiles():  # tifffile takes an iterator of tiles, page after page, row by row
        for plane in slices:
            for y in range(0, shape[1], tile):
                for x in range(0, shape[2], tile):
                    yield plane[y:y + tile, x:x + tile]

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, tiles(), shape=shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="minisblack", metadata={"axes": "ZYX"}, bigtiff=True)


def resample_patient(img: np.ndarray, gt: np.ndarray, shape: tuple[int, int, int]):
    """Slices of ``img``/``gt`` resampled to ``shape``: image trilinear, truth nearest, one at a time."""
    from scipy import ndimage

    z_in = np.linspace(0, img.shape[0] - 1, shape[0])
    fy, fx = shape[1] / img.shape[1], shape[2] / img.shape[2]
    for z in z_in:
        lo = int(np.floor(z))
        hi, w = min(lo + 1, img.shape[0] - 1), z - np.floor(z)
        plane = (1 - w) * img[lo].astype(np.float32) + w * img[hi].astype(np.float32)
        mask = gt[int(np.round(z))]
        yield (np.clip(ndimage.zoom(plane, (fy, fx), order=1), 0, 255).astype(np.uint8),
               ndimage.zoom(mask.astype(np.uint8), (fy, fx), order=0))


def field_stack(data: Path, shape: tuple[int, int, int], seed: int = 2022):
    """A microscopy-like stack: dsb2018 fields (gray) packed into one plane; each field is in
    focus around its own slice and fades (Gaussian, sigma = Z/10) away from it."""
    import imageio.v3 as iio

    rng = np.random.default_rng(seed)
    h, w = shape[1:]
    plane = np.zeros((h, w), np.float32)
    owner = np.full((h, w), -1, np.int32)
    files = sorted((data / "images").glob("*.png"))
    rng.shuffle(files)
    y = x = row_h = 0
    n = 0
    for f in files:
        im = np.asarray(iio.imread(f))
        im = im[..., :3].mean(-1) if im.ndim == 3 else im.astype(np.float32)
        if im.mean() > 100:  # brightfield / H&E fields: not fluorescence
            continue
        fh, fw = im.shape
        if x + fw > w:
            y, x, row_h = y + row_h, 0, 0
        if y + fh > h:
            break
        plane[y:y + fh, x:x + fw] = im
        owner[y:y + fh, x:x + fw] = n
        x, row_h, n = x + fw, max(row_h, fh), n + 1
    focus = rng.uniform(0.2, 0.8, n) * shape[0]
    sigma = shape[0] / 10
    for z in range(shape[0]):
        gain = np.exp(-0.5 * ((z - focus) / sigma) ** 2)
        yield np.clip(plane * np.where(owner >= 0, gain[np.maximum(owner, 0)], 0), 0, 255).astype(np.uint8)


def cmd_build(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    made = {}
    if args.ct:
        vols = ct_volumes(Path(args.ct), "val")
        pid = args.patient or max(vols, key=lambda p: len(vols[p][2]))
        img, gt, _ = vols[pid]
        for depth in args.depths:
            shape = (depth, args.side, args.side)
            pairs = list(resample_patient(img, gt, shape)) if depth * args.side ** 2 <= 2**28 else None
            if pairs is None:
                raise SystemExit("volume too large to resample in memory here")
            name = f"ct{args.side}x{depth}"
            write_stack(out / f"{name}.ome.tif", (p[0] for p in pairs), shape, 256)
            write_stack(out / f"{name}_gt.ome.tif", (p[1] for p in pairs), shape, 256)
            made[name] = {"patient": pid, "shape": list(shape)}
            print(f"wrote {out / name}.ome.tif", file=sys.stderr)
    if args.fields:
        shape = (args.fields_depth, args.fields_side, args.fields_side)
        name = f"fields{args.fields_side}x{args.fields_depth}"
        write_stack(out / f"{name}.ome.tif", field_stack(Path(args.fields), shape), shape, 512)
        made[name] = {"shape": list(shape)}
        print(f"wrote {out / name}.ome.tif", file=sys.stderr)
    return made


# -- large volumes through segthenseg-predict ------------------------------------------------------
def cmd_large(args: argparse.Namespace) -> dict:
    import shutil

    import tifffile

    from napari_segthenseg.engine import omezarr

    vol = Path(args.volume)
    work = Path(args.work) / vol.name.split(".")[0]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = work / "report.jsonl"
    cmd = [str(Path(sys.executable).with_name("segthenseg-predict")), str(vol), "--out", str(work / "out"),
           "--model", args.model, "--format", "ome-zarr", "--threads", str(args.threads),
           "--report", str(report)] + (["--rough-scale", str(args.rough_scale)] if args.rough_scale else [])
    env_threads = os.environ.get("OMP_NUM_THREADS")
    run = run_child(cmd)
    line = json.loads(report.read_text().splitlines()[-1])
    out = {"volume": str(vol), "shape": line["shape"], "command": " ".join(cmd),
           "omp_num_threads": env_threads, **run, "boxes": line["boxes"], "rough": line["rough"],
           "timings": line["timings"], "counts": line["counts"]}
    if args.gt:
        seg = omezarr.open_label_image(Path(line["output"])).levels[0]
        with tifffile.TiffFile(args.gt) as tif:
            gt = tif.series[0].aszarr()
            import zarr

            gt_arr = zarr.open(gt, mode="r")
            c = np.concatenate([counts(np.asarray(seg[z:z + BLOCK]) > 0, np.asarray(gt_arr[z:z + BLOCK]) > 0)
                                for z in range(0, seg.shape[0], BLOCK)])
            gt.close()
        out["scores"] = {k: v for k, v in scores(c).items() if k != "slice_dsc"}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ct = sub.add_parser("ct", help="volume vs slice-by-slice StS on the CT stand-in's patients")
    ct.add_argument("--data", required=True)
    ct.add_argument("--model", required=True)
    ct.add_argument("--split", default="val")
    ct.add_argument("--device", default="cpu")
    ct.add_argument("--threads", type=int, default=1)
    ct.add_argument("--variants", nargs="+", metavar="Z_PAD:MIN_SLICES:NORM:GROWTH:Z_SMOOTH",
                    default=["1:1:slice:1.0:2",  # the defaults, then one change at a time
                             "1:1:slice:none:2", "1:1:slice:1.25:2", "1:1:slice:1.5:2",
                             "1:1:slice:1.0:0", "1:1:slice:1.0:1", "1:1:slice:1.0:3",
                             "0:1:slice:1.0:2", "2:1:slice:1.0:2", "1:2:slice:1.0:2", "1:1:volume:1.0:2"])
    build = sub.add_parser("build", help="large volumes under runs/")
    build.add_argument("--out", required=True)
    build.add_argument("--ct", help="the CT stand-in's folder: resample its largest val patient")
    build.add_argument("--patient")
    build.add_argument("--side", type=int, default=512)
    build.add_argument("--depths", type=int, nargs="+", default=[150, 300, 600])
    build.add_argument("--fields", help="dsb2018's folder: build the microscopy-like stack")
    build.add_argument("--fields-side", type=int, default=2048)
    build.add_argument("--fields-depth", type=int, default=200)
    large = sub.add_parser("large", help="segthenseg-predict on a large volume: time, peak RSS, Dice")
    large.add_argument("--volume", required=True)
    large.add_argument("--gt")
    large.add_argument("--model", required=True)
    large.add_argument("--threads", type=int, default=2)
    large.add_argument("--rough-scale", type=float,
                       help="passed on: image px per rough px (a volume resampled finer than the training "
                            "images needs the training's scale times the resampling)")
    large.add_argument("--work", default="runs/bench/volumes")
    large.add_argument("--keep", action="store_true")
    for sp in (ct, build, large):
        sp.add_argument("--json", help="write the result here (JSON)")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"ct": cmd_ct, "build": cmd_build, "large": cmd_large}[args.cmd](args)
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "started_utc": started, "host": platform.node(), "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg()}
    text = json.dumps({"meta": meta, **result}, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
