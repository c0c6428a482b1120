"""``segthenseg-train``: train the rough and fine networks and write one model file.

Runs as one process (``segthenseg-train DATA --out DIR``) or as one rank per GPU/CPU process
under ``torchrun --nproc_per_node=N -m trainer DATA --out DIR``. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from napari_segthenseg.engine.device import DEVICE_CHOICES

from .checkpoint import CheckpointError
from .config import SELECT_ON, STAGES, TrainConfig
from .data import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segthenseg-train",
        description="Train Segment-then-Segment networks (rough on whole images at SxS, fine on "
                    "ground-truth crops) from a folder with images/ and masks/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", type=Path, help="data folder: images/, masks/ and optionally splits.json")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.pt, metrics.csv, train.log, "
                   "checkpoint.pt)")
    p.add_argument("--size", type=int, default=64, help="network input size S (both stages)")
    p.add_argument("--width", type=int, default=16, help="U-Net base features (the paper: 32)")
    p.add_argument("--depth", type=int, default=4, help="U-Net poolings")
    p.add_argument("--epochs", type=int, default=100, help="epochs per stage")
    p.add_argument("--fine-epochs", type=int, default=None,
                   help="epochs of the fine stage (default: --epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size per process")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    p.add_argument("--stage", choices=STAGES, default="both", help="which network(s) to train")
    p.add_argument("--init", type=Path, default=None,
                   help="model file whose rough net starts the fine net (with --stage fine)")
    p.add_argument("--select-on", choices=SELECT_ON, default="holdout",
                   help="checkpoint choice on a seeded 10%% holdout of train (val stays unseen) or on val")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--workers", type=int, default=0, help="processes cutting fine-stage crops")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default); 1 is fastest on a busy shared CPU")
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--pad", type=int, default=None, help="box padding in full-res px (default S/8)")
    p.add_argument("--normalisation", choices=("minmax", "dtype", "none"), default="minmax")
    p.add_argument("--val-crops-per-image", type=int, default=8,
                   help="fixed objects per selection image for the fine stage's validation Dice")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="turn augmentation off")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = "segthenseg-train " + " ".join(shlex.quote(w) for w in words)
    try:
        cfg = TrainConfig(**vars(args), command=command)
        from .loop import train  # torch-heavy import after the arguments are known to be valid

        train(cfg)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"segthenseg-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segthenseg-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
