"""Training settings (one object, filled by the command line or by code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from napari_segthenseg.engine.boxes import MIN_BOX

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
    device: str = "auto"
    workers: int = 0
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    seed: int = 2022
    select_on: str = "holdout"
    pad: int | None = None  # None: S/8
    min_box: int = MIN_BOX
    normalisation: str = "minmax"
    augment: bool = True
    val_crops_per_image: int = 8
    init: Path | None = None  # model file whose rough net starts the fine stage (``--stage fine``)
    resume: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.init = Path(self.init) if self.init is not None else None
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"--select-on must be one of {', '.join(SELECT_ON)}, not {self.select_on!r}")
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

    @property
    def stages(self) -> tuple[str, ...]:
        return ("rough", "fine") if self.stage == "both" else (self.stage,)

    def epochs_for(self, stage: str) -> int:
        return self.fine_epochs if stage == "fine" and self.fine_epochs else self.epochs

    def as_dict(self) -> dict:
        """Plain values; paths resolved so a resumed run started from another folder still matches."""
        return {k: (str(v.resolve()) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self).items()}
