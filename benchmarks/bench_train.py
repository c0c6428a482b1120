"""Training throughput of ``segthenseg-train`` per stage, and where the time goes.

For each stage it runs ``--batches`` training steps exactly as the trainer does (same datasets,
augmentation, loss and optimiser) and times each part of a step separately:

* ``data``: getting the batch (rough: indexing the cached S x S tensors; fine: cutting one random
  jittered ground-truth crop per image from the cached full-resolution image, image and mask);
* ``augment``: the copy to the training device and the batched affine/flip warp there;
* ``forward`` and ``backward`` (backward includes the Adam step).

The one-off preparation (PNG decoding and the S x S cache) is timed too. Images/s counts
training images (rough) or crops (fine) per second of the step total. First batches are warm-up.

    python benchmarks/bench_train.py --data ../shared/data/dsb2018 --size 64 --threads 1 \
        --json benchmarks/results/train_cpu_s64.json
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

import torch
from torch.utils.data import DataLoader, RandomSampler

from napari_segthenseg.engine import UNet, count_parameters, default_pad, resolve_device
from trainer.augment import augment_batch
from trainer.data import Sample, list_images, load_splits, read_image, read_mask
from trainer.gtcrops import FineData, RoughData, network_channels, prepare
from trainer.losses import soft_dice_loss

PARTS = ("data", "augment", "forward", "backward")


def load_first(root: Path, n: int) -> list[Sample]:
    """The first ``n`` train images (decoding only those)."""
    stems = set(load_splits(root)["train"][:n])
    masks = {p.stem: p for p in list_images([root / "masks"])}
    return [Sample(p.stem, read_image(p), read_mask(masks[p.stem]))
            for p in list_images([root / "images"]) if p.stem in stems]


def time_stage(data, net: UNet, args: argparse.Namespace, device: torch.device) -> dict:
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers,
                        sampler=RandomSampler(data, replacement=True,
                                              num_samples=args.batch_size * (args.batches + args.warmup)))
    totals = dict.fromkeys(PARTS, 0.0)
    items = 0
    it = iter(loader)
    net.train()
    for step in range(args.batches + args.warmup):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        x, y = augment_batch(x, y)  # on the training device, as segthenseg-train does
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        loss = soft_dice_loss(net(x), y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t4 = time.perf_counter()
        if step >= args.warmup:
            for part, dt_ in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[part] += dt_
            items += len(x)
    total = sum(totals.values())
    return {"images_per_s": round(items / total, 2), "items": items, "seconds": round(total, 3),
            "share": {k: round(v / total, 3) for k, v in totals.items()},
            "ms_per_batch": {k: round(1000 * v / args.batches, 2) for k, v in totals.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="data folder (images/, masks/)")
    p.add_argument("--images", type=int, default=128, help="train images to load")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="timed batches per stage")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the fine crops")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(2022)

    t = time.perf_counter()
    samples = load_first(args.data, args.images)
    t_decode = time.perf_counter() - t
    channels = network_channels(samples)
    t = time.perf_counter()
    items = [prepare(s, args.size, channels, "minmax") for s in samples]
    t_prepare = time.perf_counter() - t
    net = UNet(channels, args.width, args.depth).to(device)
    stages = {
        "rough": RoughData(items),
        "fine": FineData(items, args.size, channels, default_pad(args.size)),
    }
    result = {
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                    "cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": count_parameters(net),
        "one_off": {"images": len(samples), "decode_s": round(t_decode, 3), "prepare_s": round(t_prepare, 3)},
        "stages": {name: time_stage(data, net, args, device) for name, data in stages.items()},
    }
    print(f"{len(samples)} images decoded in {t_decode:.2f} s, S x S cache built in {t_prepare:.2f} s")
    for name, r in result["stages"].items():
        parts = ", ".join(f"{k} {v:.0%}" for k, v in r["share"].items())
        print(f"{name:5s}: {r['images_per_s']:7.1f} images/s  ({parts})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
