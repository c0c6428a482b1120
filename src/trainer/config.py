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
SELECT_ON = ("holdout", "val", "last", "auto")
HOLDOUT_FRACTION = 0.1
# A fine-tune (``--from-model``) starts from a trained model: fewer epochs, unless given (docs/TRAINING.md,
# Fine-tuning). Its epochs hold at least FINE_TUNE_MIN_BATCHES full batches (few images repeat). None: set
# by its regime (REGIMES), chosen by how well the model fits the tuned images (--tune auto).
FINE_TUNE_DEFAULTS = {"epochs": 30, "fine_epochs": 15, "select_on": "auto", "tune": "auto", "lr": None,
                      "colour_jitter": None}
FINE_TUNE_MIN_BATCHES = 10
TUNES = ("auto", "refine", "adapt")
# refine: the model already fits (its own task on other-looking images): a low learning rate and its
# BatchNorm statistics kept, so little is forgotten. adapt: it does not (a structure it does not know):
# a higher learning rate, statistics relearned, and intensity jitter for images from other sources.
REGIMES = {"refine": {"lr": 3e-5, "colour_jitter": 0.0}, "adapt": {"lr": 1e-3, "colour_jitter": 0.8}}
FIT_DICE = 0.5  # --tune auto: refine when the model's Dice on the tuned images is at least this
MIN_HOLDOUT_IMAGES = 20  # --select-on auto: a holdout from this many train images on, else the last epoch
# Settings a resumed run must share with its checkpoint (epochs may grow, device may change).
RESUME_KEYS = ("data", "size", "width", "depth", "batch_size", "lr", "stage", "seed", "select_on",
               "pad", "min_box", "normalisation", "augment", "init", "val_crops_per_image", "from_model",
               "stain_jitter", "colour_jitter", "invert", "tune")


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
    lr: float | None = 5e-4  # None (a fine-tune): its regime's
    stage: str = "both"
    init: Path | None = None  # model file whose rough net starts the fine stage (``--stage fine``)
    from_model: str | None = None  # fine-tune: a model file, run folder or "default" starts the nets
    tune: str = "auto"  # a fine-tune's regime (REGIMES), or auto
    minutes: float | None = None  # stop after this many minutes of training, keeping the best so far
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
    stain_jitter: float = 0.0  # probabilities of the colour augmentations (augment.py), 0 = off
    colour_jitter: float | None = 0.0  # None (a fine-tune): its regime's
    invert: float = 0.0
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
        if self.tune not in TUNES:
            raise ValueError(f"--tune must be one of {', '.join(TUNES)}, not {self.tune!r}")
        for name in ("lr", "colour_jitter"):
            if getattr(self, name) is None and self.from_model is None:
                raise ValueError(f"--{name.replace('_', '-')} needs a value (a fine-tune's regime sets it)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("--lr must be positive")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError("--minutes must be positive")
        if self.init is not None and self.from_model is not None:
            raise ValueError("--init and --from-model exclude each other: --from-model starts both networks")
        for name in ("stain_jitter", "colour_jitter", "invert"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a probability: between 0 and 1")
        if self.normalisation == "none" and (self.stain_jitter or self.colour_jitter or self.invert):
            raise ValueError("the colour augmentations need intensities in [0, 1]: use --normalisation "
                             "minmax or dtype")
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
    def fine_tune(self) -> bool:
        """Whether the networks start from a model file (``--from-model``)."""
        return self.from_model is not None

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
    "from_model": Option("fine-tune: start the network(s) of --stage from this model file, run folder or "
                         "'default' (the bundled model), keeping its S, padding, channels, normalisation, "
                         "width, depth and trained scale; fine-tune defaults "
                         + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in FINE_TUNE_DEFAULTS.items()
                                     if v is not None)
                         + ", --lr and --colour-jitter by --tune (docs/TRAINING.md)",
                         default_text="none: from scratch", metavar="MODEL"),
    "tune": Option("a fine-tune's regime: refine (--lr {refine[lr]:g}, BatchNorm statistics kept) for a "
                   "model that fits the tuned images, adapt (--lr {adapt[lr]:g}, statistics relearned, "
                   "--colour-jitter {adapt[colour_jitter]:g}) for one that does not; auto: refine when the "
                   "model's Dice on them is at least {fit:g}".format(**REGIMES, fit=FIT_DICE),
                   choices=TUNES),
    "minutes": Option("stop after this many minutes of training (the stages share them by their epochs) "
                      "and keep the best model so far", default_text="no limit", metavar="N"),
    "select_on": Option(f"checkpoint choice: a seeded {HOLDOUT_FRACTION:.0%} holdout of the train split "
                        "(val stays unseen), the val split, the last epoch (every train image trains), or "
                        f"auto: a holdout from {MIN_HOLDOUT_IMAGES} train images on, else the last epoch",
                        choices=SELECT_ON),
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
                         "(docs/WHOLE_SLIDES.md; a fine-tune keeps its parent's unless given)",
                         default_text="unknown", metavar="UM"),
    "augment": Option("turn the paper's augmentation off (it is on by default; also turns off the colour "
                      "augmentations)"),
    "stain_jitter": Option("probability of an H&E/DAB stain jitter per image (brightfield colour)",
                           metavar="P"),
    "colour_jitter": Option("probability of a brightness/contrast/saturation/hue jitter per image",
                            metavar="P"),
    "invert": Option("probability of inverting an image (dark nuclei on light ground and the reverse)",
                     metavar="P"),
    "resume": Option("continue the run in --out from its last good checkpoint"),
}
