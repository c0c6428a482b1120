"""Training settings: one dataclass, the single source of the defaults and of the command line.

``segthenseg-train``'s options are built from the fields of :class:`TrainConfig` and the help
texts in :data:`OPTIONS` (see ``train.build_parser``), so a default is written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from napari_segthenseg.engine.boxes import MIN_BOX
from napari_segthenseg.engine.device import resolve_device
from napari_segthenseg.engine.image import NORMALISATIONS

DEFAULT_SEED = 2022  # the paper's seed: weights, splits, holdout, sampling, jitter, augmentation
STAGES = ("rough", "fine", "both")
SELECT_ON = ("holdout", "val")
HOLDOUT_FRACTION = 0.1
# Settings a resumed run must share with its checkpoint (epochs may grow, device may change).
RESUME_KEYS = ("data", "size", "width", "depth", "batch_size", "lr", "stage", "seed", "select_on",
               "pad", "min_box", "normalisation", "augment", "init", "val_crops_per_image")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    size: int = 64
    width: int = 16
    depth: int = 4
    epochs: int = 100
    fine_epochs: int | None = None  # None: same as ``epochs``
    batch_size: int = 16
    lr: float = 5e-4
    stage: str = "both"
    init: Path | None = None  # model file whose rough net starts the fine stage (``--stage fine``)
    select_on: str = "holdout"
    device: str = "auto"
    workers: int = 0
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    seed: int = DEFAULT_SEED
    pad: int | None = None  # None: S/8
    min_box: int = MIN_BOX
    normalisation: str = "minmax"
    val_crops_per_image: int = 8
    pixel_size: float | None = None  # µm per pixel of the training images (recorded in the model)
    augment: bool = True
    resume: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.init = Path(self.init) if self.init is not None else None
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"--select-on must be one of {', '.join(SELECT_ON)}, not {self.select_on!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"--normalisation must be one of {', '.join(NORMALISATIONS)}, "
                             f"not {self.normalisation!r}")
        if self.size < 8 or self.size % 2**self.depth:
            raise ValueError(f"--size {self.size} must be >= 8 and divisible by 2**depth = {2**self.depth}")
        for name in ("width", "depth", "epochs", "batch_size", "val_crops_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.fine_epochs is not None and self.fine_epochs < 1:
            raise ValueError("--fine-epochs must be at least 1")
        if not self.lr > 0:
            raise ValueError("--lr must be positive")
        if self.workers < 0 or self.threads < 0:
            raise ValueError("--workers and --threads cannot be negative")
        if self.pad is not None and self.pad < 0:
            raise ValueError("--pad cannot be negative")
        if self.pixel_size is not None and not 0 < self.pixel_size < float("inf"):
            raise ValueError("--pixel-size must be a positive number of µm per pixel")
        try:
            resolve_device(self.device)  # "cuda:1" is fine; an unknown or absent device is not
        except ValueError as exc:
            raise ValueError(f"--device: {exc}") from None

    @property
    def stages(self) -> tuple[str, ...]:
        return ("rough", "fine") if self.stage == "both" else (self.stage,)

    def epochs_for(self, stage: str) -> int:
        return self.fine_epochs if stage == "fine" and self.fine_epochs else self.epochs

    def as_dict(self) -> dict:
        """Plain values; paths resolved so a resumed run started from another folder still matches."""
        return {k: (str(v.resolve()) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Option:
    """How a :class:`TrainConfig` field appears on the command line."""

    help: str
    default_text: str | None = None  # shown instead of the field's default (e.g. for None)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


# One entry per field the user sets (``command`` is filled in by ``segthenseg-train`` itself).
OPTIONS: dict[str, Option] = {
    "data": Option("data folder: images/, masks/ and optionally splits.json"),
    "out": Option("output folder: model.pt, metrics.csv, train.log, splits.json, checkpoint.pt",
                  metavar="DIR"),
    "size": Option("network input size S x S (both stages); divisible by 2**depth", metavar="S"),
    "width": Option("U-Net base features; the paper: 32", metavar="N"),
    "depth": Option("U-Net poolings", metavar="N"),
    "epochs": Option("epochs per stage", metavar="N"),
    "fine_epochs": Option("epochs of the fine stage", default_text="same as --epochs", metavar="N"),
    "batch_size": Option("batch size per process", metavar="N"),
    "lr": Option("Adam learning rate"),
    "stage": Option("which network(s) to train", choices=STAGES),
    "init": Option("with --stage fine: model file whose rough net starts the fine net (and ships with it)",
                   default_text="none", metavar="MODEL"),
    "select_on": Option(f"checkpoint choice: a seeded {HOLDOUT_FRACTION:.0%} holdout of the train split "
                        "(val stays unseen) or the val split", choices=SELECT_ON),
    "device": Option("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", metavar="NAME"),
    "workers": Option("DataLoader processes cutting fine-stage crops", metavar="N"),
    "threads": Option("CPU threads per process; 1 is fastest on a busy shared CPU",
                      default_text="0 = torch's default", metavar="N"),
    "seed": Option("seed of the weights, the split without splits.json, the holdout, sampling, jitter and "
                   "augmentation", metavar="N"),
    "pad": Option("box padding in full-resolution px", default_text="S/8", metavar="PX"),
    "min_box": Option("objects whose box has a side under this many px are noise (dropped), as at inference",
                      metavar="PX"),
    "normalisation": Option("intensity normalisation (stored in the model)", choices=NORMALISATIONS),
    "val_crops_per_image": Option("fixed objects per selection image for the fine stage's validation Dice",
                                  metavar="N"),
    "pixel_size": Option("µm per pixel of the training images; recorded in the model, so that slides of "
                         "another resolution get the rough pass at the same physical scale "
                         "(docs/WHOLE_SLIDES.md)",
                         default_text="unknown", metavar="UM"),
    "augment": Option("turn the paper's augmentation off (it is on by default)"),
    "resume": Option("continue the run in --out from its last good checkpoint"),
}
