"""Inference speed: the baseline, batched StS and the paper's per-crop loop, side by side.

Per image (loaded into memory before any timing; disk reads are excluded) it times:

(a) baseline: the rough net on the S x S copy, upsampled to full resolution (the paper's baseline);
(b) StS with the engine: rough pass, boxes, all crops cut and resized in one batch, one batched
    fine forward, fusion;
(c) StS the way the authors' code does it (the paper's Algorithm 1 and its timing setup): the same rough pass
    and boxes, then for every box a NumPy crop on the host, a per-crop resize (nearest, as the
    paper's code), a copy to the device, a batch-1 forward, a copy back, a resize back and a paste.

With ``--model`` (a file, or ``default`` for the bundled one) the boxes come from the rough net.
Without it, both nets are random U-Nets of the paper's shape (timing does not depend on weights)
and the boxes come from the ground-truth mask with the engine's box rules, so box counts are realistic.

    python benchmarks/bench_inference.py --data ../shared/data/dsb2018 --size 64 \
        --json benchmarks/results/inference_cpu_s64.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from napari_segthenseg.engine import (
    Engine,
    ImageSource,
    ModelFileError,
    ModelSettings,
    NormStats,
    StSModel,
    UNet,
    boxes_from_mask,
    count_parameters,
    load_model,
)
from napari_segthenseg.engine.device import synchronize
from trainer.data import DataError, has_splits_file, list_images, load_samples, read_image

NET_STAGES = ("rough_net", "fine_net")
STAGES = ("rough_read", "rough_net", "boxes", "crop", "fine_net", "to_host", "paste")


@dataclass
class Item:
    """One benchmark image; ``box_mask`` is the full-res ground truth when boxes come from it."""

    name: str
    image: np.ndarray
    box_mask: np.ndarray | None


# -- inputs ----------------------------------------------------------------------------------
def load_items(data: Path, need_masks: bool, limit: int | None) -> list[Item]:
    """The ``val`` split of a data folder with ``splits.json``, else every image in ``data``."""
    if (data / "images").is_dir():
        split = "val" if has_splits_file(data) else None
        samples = load_samples(data, split)[:limit]
        return [Item(s.stem, s.image, s.mask if need_masks else None) for s in samples]
    if need_masks:
        raise DataError(f"{data}: without --model the boxes come from ground-truth masks, so the folder "
                        "must hold images/ and masks/ (or pass --model)")
    paths = list_images([data])[:limit]
    if not paths:
        raise DataError(f"{data}: no images found")
    return [Item(p.stem, read_image(p), None) for p in paths]


def random_model(size: int, width: int, depth: int, channels: int, seed: int = 2022) -> StSModel:
    """Untrained rough and fine U-Nets: the same compute as trained ones, for timing only."""
    torch.manual_seed(seed)
    nets = [UNet(channels, width, depth).eval() for _ in range(2)]
    return StSModel(ModelSettings(size=size, in_channels=channels, trained_on="random weights (timing only)"),
                    *nets)


def get_model(args: argparse.Namespace, channels: int) -> StSModel:
    if args.model is None:
        return random_model(args.size or 64, args.width, args.depth, channels)
    try:
        model = load_model(args.model)
    except FileNotFoundError as exc:
        hint = (" (the bundled model is not installed yet: pass a model file, or leave --model out to "
                "time random networks on ground-truth boxes)") if args.model == "default" else ""
        raise SystemExit(f"bench_inference: {exc}{hint}") from exc
    except ModelFileError as exc:
        raise SystemExit(f"bench_inference: {exc}") from exc
    if args.size is not None and args.size != model.settings.size:
        raise SystemExit(f"bench_inference: --size {args.size} differs from the model's S="
                         f"{model.settings.size}; leave --size out or pass the model's")
    if model.rough is None or model.fine is None:
        raise SystemExit("bench_inference: the model needs both a rough and a fine network")
    return model


# -- the three methods -----------------------------------------------------------------------
def run_baseline(engine: Engine, src: ImageSource, item: Item) -> np.ndarray:
    return engine.baseline(engine.rough(src), src.hw)


def gt_boxes(engine: Engine, item: Item, hw: tuple[int, int]) -> np.ndarray:
    """StS boxes from the ground truth (standing in for a trained rough net's mask)."""
    return boxes_from_mask(item.box_mask, hw, engine.settings.pad, engine.settings.min_box)


def run_sts(engine: Engine, src: ImageSource, item: Item) -> tuple[np.ndarray, np.ndarray, dict]:
    """The engine's walk; returns the mask, the boxes and the stage times."""
    if item.box_mask is None:
        res = engine.segment(src)
        return res.mask, res.boxes, res.timings
    engine.timings = {}
    engine.rough(src)  # still timed: the rough pass is part of StS
    rough_t = dict(engine.timings)
    # The ground truth stands in for the rough mask; labelling it at full resolution costs more
    # than labelling the S x S rough mask, so this overstates the boxes step, never understates it.
    with engine.timed("boxes"):
        boxes = gt_boxes(engine, item, src.hw)
    boxes_t = engine.timings["boxes"]
    res = engine.segment(src, boxes)
    timings = {**res.timings, **rough_t, "boxes": boxes_t}
    return res.mask, boxes, timings


def paper_net(engine: Engine) -> torch.nn.Module:
    """The fine net as the authors' code runs it: fp32, default (NCHW) memory layout."""
    return copy.deepcopy(engine.fine_net).to(memory_format=torch.contiguous_format).eval()


@torch.inference_mode()
def loop_fine(engine: Engine, net: torch.nn.Module, image: np.ndarray, boxes: np.ndarray,
              stats: NormStats, net_time: list[float]) -> np.ndarray:
    """The authors' fine stage: one crop at a time, host <-> device round trip for each."""
    s, dev, channels = engine.settings.size, engine.device, engine.settings.in_channels
    thr = engine.settings.threshold
    img = image if image.ndim == 3 else image[..., None]
    out = np.zeros(image.shape[:2], dtype=bool)
    for y0, x0, y1, x1 in boxes.tolist():
        crop = img[y0:y1, x0:x1, :3].astype(np.float32)
        crop = (crop - stats.lo) / max(stats.hi - stats.lo, 1e-8)
        if crop.shape[2] != channels:
            crop = np.repeat(crop, channels, axis=2) if crop.shape[2] == 1 else crop.mean(2, keepdims=True)
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None]
        x = F.interpolate(x, size=(s, s), mode="nearest").to(dev)
        synchronize(dev)
        t0 = time.perf_counter()
        y = torch.sigmoid(net(x))
        synchronize(dev)
        net_time[0] += time.perf_counter() - t0
        y = F.interpolate(y.cpu(), size=(y1 - y0, x1 - x0), mode="nearest")[0, 0].numpy()
        out[y0:y1, x0:x1] |= y >= thr
    return out


def run_loop(engine: Engine, net: torch.nn.Module, src: ImageSource, item: Item,
             net_time: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(c): the engine's rough pass and boxes (the same as (b)), then the per-crop loop."""
    rough = engine.rough(src)
    boxes = engine.boxes(rough, src.hw) if item.box_mask is None else gt_boxes(engine, item, src.hw)
    return loop_fine(engine, net, item.image, boxes, rough.stats, net_time), boxes


# -- timing ----------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def bench_image(engine: Engine, loop_net: torch.nn.Module, item: Item, repeats: int) -> dict:
    """Median over ``repeats`` of each method on one image, methods interleaved."""
    src = ImageSource(item.image)
    times: dict[str, list[float]] = {"baseline": [], "sts": [], "loop": [], "loop_net": []}
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    for _ in range(repeats):
        t, _ = timed(lambda: run_baseline(engine, src, item), engine.device)
        times["baseline"].append(t)
        t, (sts_mask, boxes, stage_t) = timed(lambda: run_sts(engine, src, item), engine.device)
        times["sts"].append(t)
        for k in STAGES:
            stages[k].append(stage_t.get(k, 0.0))
        net = [0.0]
        t, (loop_mask, _) = timed(lambda: run_loop(engine, loop_net, src, item, net), engine.device)  # noqa: B023
        times["loop"].append(t)
        times["loop_net"].append(net[0])
    row = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row.update({f"stage_{k}": 1e3 * statistics.median(v) for k, v in stages.items()})
    row.update(name=item.name, hw=list(src.hw), boxes=len(boxes), loop_vs_sts_dice=dice(loop_mask, sts_mask))
    return row


def amp_agreement(engine: Engine, items: list[Item]) -> list[float]:
    """Dice between the engine's mixed-precision StS masks and fp32 ones, per image (untimed)."""
    m = engine.model
    fp32 = StSModel(m.settings, copy.deepcopy(m.rough), copy.deepcopy(m.fine))
    ref = Engine(fp32, engine.device, amp=False)
    out = []
    for it in items:
        src = ImageSource(it.image)
        out.append(dice(run_sts(engine, src, it)[0], run_sts(ref, src, it)[0]))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type} ({cpu}, {torch.get_num_threads()} torch threads)"


def summarise(rows: list[dict], engine: Engine, args: argparse.Namespace, boxes_from: str) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in ("baseline", "sts", "loop", "loop_net")}
    total = sum(r["sts"] for r in rows)
    stage_sum = {k: sum(r[f"stage_{k}"] for r in rows) for k in STAGES}
    outside = total - sum(stage_sum[k] for k in NET_STAGES)
    model = engine.model
    result = {
        "baseline_ms": med["baseline"],
        "sts_ms": med["sts"],
        "loop_ms": med["loop"],
        "sts_over_baseline": med["sts"] / med["baseline"],
        "loop_over_sts": med["loop"] / med["sts"],
        "boxes_per_image": float(np.mean([r["boxes"] for r in rows])),
        "outside_networks_frac": outside / total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "n_images": len(rows),
        "device": device_name(engine.device),
        # Where StS time goes: share of the summed StS time per stage ("other" = untimed glue).
        "sts_stage_frac": {**{k: v / total for k, v in stage_sum.items()},
                           "other": (total - sum(stage_sum.values())) / total},
        "sts_stage_median_ms": {k: statistics.median(r[f"stage_{k}"] for r in rows) for k in STAGES},
        "loop_net_frac": sum(r["loop_net"] for r in rows) / sum(r["loop"] for r in rows),
        "boxes_median": float(np.median([r["boxes"] for r in rows])),
        "boxes_max": int(max(r["boxes"] for r in rows)),
        "loop_vs_sts_dice_median": statistics.median(r["loop_vs_sts_dice"] for r in rows),
        "boxes_from": boxes_from,
        "size": engine.settings.size,
        "nets": {"width": model.fine.width, "depth": model.fine.depth,
                 "parameters_each": count_parameters(model.fine)},
        "amp": engine.amp,
        "repeats": args.repeats,
        "data": str(args.data),
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.argv]),
        "per_image": rows,
    }
    if engine.device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return result


def markdown(res: dict) -> str:
    lines = [
        f"Device: {res['device']}; S={res['size']}; U-Net width {res['nets']['width']}, depth "
        f"{res['nets']['depth']}; {res['n_images']} images; boxes from {res['boxes_from']}; "
        f"{res['boxes_per_image']:.1f} boxes per image (median {res['boxes_median']:.0f}, "
        f"max {res['boxes_max']}); engine mixed precision {'on' if res['amp'] else 'off'}.",
        "",
        "| method | median ms / image | ratio |",
        "|---|---|---|",
        f"| (a) baseline: rough net + upsample | {res['baseline_ms']:.1f} | 1 |",
        f"| (b) StS, batched engine | {res['sts_ms']:.1f} | b/a = {res['sts_over_baseline']:.2f} |",
        f"| (c) StS, per-crop loop (paper's code) | {res['loop_ms']:.1f} | "
        f"c/b = {res['loop_over_sts']:.2f} |",
        "",
        "| StS stage | share of StS time | median ms / image |",
        "|---|---|---|",
    ]
    for k, frac in res["sts_stage_frac"].items():
        ms = res["sts_stage_median_ms"].get(k)
        lines.append(f"| {k} | {100 * frac:.1f} % | {'' if ms is None else f'{ms:.2f}'} |")
    lines += [
        "",
        f"Outside the two networks: {100 * res['outside_networks_frac']:.1f} % of StS time. "
        f"Per-crop loop: {100 * res['loop_net_frac']:.1f} % of its time in the fine net. "
        f"Peak RSS {res['peak_rss_mb']:.0f} MB"
        + (f", peak GPU memory {res['peak_gpu_mb']:.0f} MB." if "peak_gpu_mb" in res else "."),
    ]
    if "amp_vs_fp32_dice_median" in res:
        lines.append(f"Mixed-precision vs fp32 StS masks: Dice median {res['amp_vs_fp32_dice_median']:.4f}, "
                     f"min {res['amp_vs_fp32_dice_min']:.4f}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="data folder (images/ + masks/, val split if splits.json) or a folder of images")
    p.add_argument("--size", type=int, default=None, help="S; default: the model's, or 64 without --model")
    p.add_argument("--model", default=None, help="model file, or 'default' for the bundled model")
    p.add_argument("--width", type=int, default=32, help="random U-Net base features (without --model)")
    p.add_argument("--depth", type=int, default=4, help="random U-Net poolings (without --model)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="engine mixed precision: auto = float16 on GPUs only; on = also bfloat16 on CPUs")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per image and method (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of every method before timing")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    args = p.parse_args(argv)
    for name in ("limit", "threads", "repeats", "size", "width", "depth"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        items = load_items(args.data, need_masks=args.model is None, limit=args.limit)
    except DataError as exc:
        raise SystemExit(f"bench_inference: {exc}") from exc
    channels = 1 if all(it.image.ndim == 2 for it in items) else 3
    model = get_model(args, channels)
    engine = Engine(model, args.device, amp={"auto": None, "on": True, "off": False}[args.amp])
    loop_net = paper_net(engine)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    boxes_from = ("the rough net" if args.model else
                  "ground truth (random-weight nets: boxes = the engine's box rules on the GT components)")
    for _ in range(args.warmup):  # allocator, oneDNN/cuDNN kernel choice, lazy inits
        bench_image(engine, loop_net, items[0], 1)
    progress = tqdm(items, desc="images", file=sys.stderr)
    rows = [bench_image(engine, loop_net, it, args.repeats) for it in progress]
    res = summarise(rows, engine, args, boxes_from)
    if engine.amp:
        agree = amp_agreement(engine, items)
        res.update(amp_vs_fp32_dice_median=statistics.median(agree), amp_vs_fp32_dice_min=min(agree))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
