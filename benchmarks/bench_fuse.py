"""Fusion speed: the box-by-box CPU paste against the all-boxes-at-once fusion on a device.

Random boxes and S=64 probability maps on square images from 256 px (a dsb2018 image) to 8000 px;
median of 15 timed calls after 2 warm-ups, side by side in one run.

    python benchmarks/bench_fuse.py --device cuda --out benchmarks/results/fuse_gpu_h100.txt

(On a CPU, ``--device cpu`` compares the two ways of fusing there.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_segthenseg.engine import fuse
from napari_segthenseg.engine.device import synchronize

CASES = [(256, 28, 20, 50), (1024, 100, 20, 80), (4000, 200, 50, 400), (8000, 1000, 30, 300)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the lines here")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)

    def med(*args: object, k: int = 15, **kw: object) -> float:
        fuse(*args, **kw), fuse(*args, **kw)
        ts = []
        for _ in range(k):
            synchronize(dev)
            t = time.perf_counter()
            fuse(*args, **kw)
            synchronize(dev)
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    lines = []
    for h, nb, lo, hi in CASES:
        y0, x0 = rng.integers(0, h - hi, nb), rng.integers(0, h - hi, nb)
        sz = rng.integers(lo, hi, nb)
        boxes, probs = np.stack([y0, x0, y0 + sz, x0 + sz], 1), rng.random((nb, 64, 64), dtype=np.float32)
        a = med(probs, boxes, (h, h), batched=False)
        b = med(probs, boxes, (h, h), device=dev, batched=True)
        c = med(torch.as_tensor(probs, device=dev), boxes, (h, h), batched=True)
        lines.append(f"{h}x{h}, {nb} boxes: cpu box-by-box {a:.2f} ms, {dev.type} batched {b:.2f} ms "
                     f"(probs on {dev.type} {c:.2f}), ratio {a / b:.1f}")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
