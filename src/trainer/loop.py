"""The training run: data preparation, both stages, validation, checkpoints and the model file."""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from napari_segthenseg.engine import (
    ModelSettings,
    StSModel,
    UNet,
    count_parameters,
    default_pad,
    load_model,
    save_model,
)
from napari_segthenseg.engine.atomic import output_problem, write_bytes
from napari_segthenseg.engine.modelfile import RUN_MODEL_NAME
from napari_segthenseg.engine.progress import Progress, Steps, drive
from napari_segthenseg.engine.scale import TrainedScale

from . import distributed as ddp
from .augment import AugmentSettings, augment_batch
from .checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    check_compatible,
    config_json,
    find_resumable,
    holds_run,
    remove_temporary,
    save_checkpoint,
    set_aside,
    write_failed,
    write_metrics_csv,
)
from .config import (
    FINE_TUNE_MIN_BATCHES,
    FIT_DICE,
    HOLDOUT_FRACTION,
    MIN_HOLDOUT_IMAGES,
    REGIMES,
    RESUME_KEYS,
    TrainConfig,
)
from .data import (
    SPLITS_NAME,
    DataError,
    ImageInfo,
    Sample,
    check_has_both_classes,
    fingerprint,
    fingerprint_changes,
    has_splits_file,
    image_stems,
    load_splits,
    load_stems,
    scan_stems,
    shared_images,
)
from .finetune import Parent, fingerprint_digest, load_parent
from .gtcrops import FineData, Prepared, RoughData, fixed_crops, network_channels, prepare
from .losses import dice_per_item, soft_dice_loss

MODEL_NAME = RUN_MODEL_NAME  # a run folder given as a model means this file (engine.modelfile)
LOG_NAME = "train.log"
METRICS_NAME = "metrics.csv"
# Files of a run folder written through a temporary ``.NAME.*.tmp`` (removed if a kill left one).
WRITTEN = (CHECKPOINT_NAME, PREVIOUS_NAME, MODEL_NAME, METRICS_NAME, SPLITS_NAME)
VAL_BATCH = 64
MIN_STAGE_STEPS = 100  # fewer optimizer steps than this in a stage of one-step epochs: warned about
# A fine-tune's epochs are often one optimizer step, and writing a checkpoint (about 50 MB at width 16)
# after each would take a third of its time: it writes one at most this often, and at the end.
FINE_TUNE_SAVE_EVERY_S = 30.0
BN_BATCHES = 20  # batches that recompute the BatchNorm statistics after a short run (Run.recalibrate)
log = logging.getLogger("trainer")


class _LogFile(logging.FileHandler):
    """``train.log`` that stops quietly (instead of printing a traceback per line) when it cannot be
    written, e.g. on a full disk; stderr keeps logging."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        log.removeHandler(self)
        self.close()
        print(f"segthenseg-train: cannot write {self.baseFilename} any more; logging to stderr only",
              file=sys.stderr)


def setup_logging(out: Path, is_main: bool) -> None:
    """Rank 0 logs to stderr and ``train.log``; other ranks only log warnings."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        handlers.append(_LogFile(out / LOG_NAME))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


@dataclass
class DataPlan:
    """The images of a run: what trains, what chooses checkpoints, and every split (saved with the run)."""

    train: list[Sample]
    select: list[Sample]  # empty when the last epoch is kept
    select_desc: str
    select_name: str  # "holdout", "val" or "last" (no selection set): the key of the selection set
    splits: dict[str, list[str]]  # the run's splits.json: train (trained on), holdout, val, test, ...
    fingerprint: dict[str, dict[str, str]]  # train and selection images: stem -> size and content digest
    checked: dict[str, int]  # images decoded and checked, per split
    warnings: list[str] = field(default_factory=list)  # images shared between splits


def holdout_indices(stems: list[str], seed: int) -> set[int]:
    """Indices (into ``stems``) of the seeded holdout: ``HOLDOUT_FRACTION`` of them, at least one."""
    order = sorted(range(len(stems)), key=lambda i: stems[i])
    perm = np.random.default_rng(seed).permutation(len(order))
    n_hold = max(1, int(round(HOLDOUT_FRACTION * len(order))))
    return {order[i] for i in perm[:n_hold]}


def resolve_select_on(select_on: str, n_train: int) -> str:
    """``auto``: a holdout when the train split has ``MIN_HOLDOUT_IMAGES`` or more images, else the
    last epoch (a holdout of one image of a few costs a large share of them and chooses on noise)."""
    if select_on != "auto":
        return select_on
    return "holdout" if n_train >= MIN_HOLDOUT_IMAGES else "last"


def plan_data(cfg: TrainConfig) -> DataPlan:
    """Decode and check every split; return the training and checkpoint-selection samples.

    ``holdout`` keeps a seeded 10 % of the train split out of training for choosing checkpoints,
    so the val split stays unseen for reporting; ``val`` selects on the val split (the paper's way);
    ``last`` trains on the whole train split and keeps the last epoch. A fine-tune of a folder
    without ``splits.json`` trains on all its images. The other splits (e.g. test) are decoded and
    checked too, but not kept in memory.
    """
    if cfg.fine_tune and not has_splits_file(cfg.data):
        splits = {"train": image_stems(cfg.data)}  # the images a user corrected are there to train on
    else:
        splits = load_splits(cfg.data, cfg.seed)
    select_on = resolve_select_on(cfg.select_on, len(splits.get("train") or []))
    for name in ("train", "val") if select_on == "val" else ("train",):
        if not splits.get(name):
            what = "no" if name not in splits else "an empty"
            names = ", ".join(sorted(splits)) or "none"
            raise DataError(f"{cfg.data}: {what} {name!r} split (splits: {names})"
                            + ("; use --select-on holdout" if name == "val" else ""))
    train = load_stems(cfg.data, splits["train"])
    if select_on == "val":
        select, select_name, desc = load_stems(cfg.data, splits["val"]), "val", "the val split"
        kept = train
    elif select_on == "last":
        select, select_name, kept = [], "last", train
        desc = f"none (the last epoch is kept; all {len(train)} train image(s) train)"
    else:
        if len(train) < 2:
            raise DataError(f"{cfg.data}: the train split has {len(train)} image(s); a holdout needs at "
                            "least 2 (or use --select-on last or val)")
        hold = holdout_indices([s.stem for s in train], cfg.seed)
        select = [s for i, s in enumerate(train) if i in hold]
        kept = [s for i, s in enumerate(train) if i not in hold]
        select_name = "holdout"
        desc = f"a {HOLDOUT_FRACTION:.0%} holdout of the train split (seed {cfg.seed})"
    run_splits = {"train": [s.stem for s in kept]}
    if select_name == "holdout":
        run_splits["holdout"] = [s.stem for s in select]
    run_splits.update({k: list(v) for k, v in splits.items() if k not in run_splits})
    infos = {"train": [ImageInfo.of(s) for s in kept]}
    if select_name != "last":
        infos[select_name] = [ImageInfo.of(s) for s in select]
    for name, stems in run_splits.items():
        if name not in infos and stems:
            infos[name] = scan_stems(cfg.data, stems)  # decoded and checked now, not at evaluation
    check_has_both_classes(infos["train"], f"the {len(kept)} training images")
    return DataPlan(kept, select, desc, select_name, run_splits,
                    fingerprint({"train": infos["train"], "selection": infos.get(select_name, [])}),
                    {k: len(v) for k, v in infos.items()}, shared_images(infos, "train"))


def epoch_seed(cfg: TrainConfig, stage: str, epoch: int, rank: int) -> int:
    """Every epoch draws from its own seed, so a resumed run repeats exactly what was lost."""
    return (cfg.seed * 1_000_003 + (0 if stage == "rough" else 500_009) + epoch * 1009 + rank) % 2**63


class Cycled(Dataset):
    """``data`` repeated to ``length`` items (item ``i`` is ``data[i % len(data)]``): a fine-tune on
    fewer images than a batch still trains on full batches, each repeat a fresh crop and augmentation."""

    def __init__(self, data: Dataset, length: int):
        self.data, self.length = data, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i % len(self.data)]


class Run:
    """One ``segthenseg-train`` run (single process or one rank of a torchrun job)."""

    def __init__(self, cfg: TrainConfig, info: ddp.DistInfo):
        self.cfg, self.info = cfg, info
        self.out = cfg.out
        self.pad = cfg.pad if cfg.pad is not None else default_pad(cfg.size)
        self.metrics: list[dict] = []
        self.best: dict[str, dict | None] = {"rough": None, "fine": None}
        self.nets: dict[str, UNet | None] = {"rough": None, "fine": None}
        self.wall_before = 0.0
        self.t0 = time.perf_counter()
        self.init_scale: TrainedScale | None = None  # --init's recorded scale (its rough net ships)
        self.parent: Parent | None = None  # --from-model: the model this run fine-tunes
        self.saved: tuple[str, int] | None = None  # stage and epoch of the last checkpoint on disk
        self.warnings: list[str] = []  # repeated in the final summary line
        self.augment = AugmentSettings(p_stain=cfg.stain_jitter, p_colour=cfg.colour_jitter or 0.0,
                                       p_invert=cfg.invert)
        self.tune: str | None = None  # a fine-tune's regime (config.REGIMES), once the data are known
        self.parent_dice: float | None = None  # the parent's Dice on the tuned images
        self.save_every = FINE_TUNE_SAVE_EVERY_S if cfg.fine_tune else 0.0
        self.last_save = -math.inf  # perf_counter of the last checkpoint
        self.model_stale = False  # a stage improved since model.pt was written
        self.deadline: float | None = None  # perf_counter at which the running stage stops (--minutes)
        self.stopped: dict[str, int] = {}  # stage -> the epoch after which --minutes stopped it
        self.epochs_done = 0  # over all stages, for progress
        self.last_line = ""  # the last epoch's summary, for progress

    # -- data ----------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        self.plan = plan = plan_data(cfg)
        train, select, self.select_desc = plan.train, plan.select, plan.select_desc
        # A fine-tune keeps its parent's channels (gray is repeated to RGB, RGB averaged to gray).
        self.channels = (self.parent.model.settings.in_channels if self.parent is not None
                         else network_channels(train + select))
        prep = lambda s: prepare(s, cfg.size, self.channels, cfg.normalisation, cfg.min_box)  # noqa: E731
        self.train_items: list[Prepared] = [prep(s) for s in train]
        self.select_items: list[Prepared] = [prep(s) for s in select]
        checked = ", ".join(f"{n} {k}" for k, n in plan.checked.items())
        log.info("data %s: %d training images, selection on %s (%d images), %d channel(s); "
                 "decoded and checked %s; prepared in %.1f s", cfg.data, len(train), self.select_desc,
                 len(select), self.channels, checked, time.perf_counter() - t)
        for note in plan.warnings:
            self.warn(f"training images also appear elsewhere: {note}; scores on those splits will be "
                      "optimistic")
        if self.parent is not None:
            self.choose_regime()

    @torch.no_grad()
    def fit_of_parent(self) -> float:
        """The parent's mean Dice on the training images: its rough net at S x S, or (no rough net, or
        only the fine stage tuned) its fine net on their ground-truth crops."""
        cfg, model = self.cfg, self.parent.model
        if model.rough is not None and "rough" in cfg.stages:
            net, x, y = model.rough, torch.stack([it.small for it in self.train_items]), \
                torch.stack([it.small_mask for it in self.train_items])
        else:
            net = model.fine or model.rough
            x, y = fixed_crops(self.train_items, cfg.size, self.channels, self.pad, cfg.min_box,
                               cfg.val_crops_per_image, cfg.seed)
        net.eval()
        dice = torch.cat([dice_per_item(net(x[i:i + VAL_BATCH]) >= 0, y[i:i + VAL_BATCH] >= 0.5)
                          for i in range(0, len(x), VAL_BATCH)])
        return float(dice.mean())

    def choose_regime(self) -> None:
        """A fine-tune's regime (``--tune``; auto: by the parent's fit) and what it sets that was not
        given (``--lr``, ``--colour-jitter``)."""
        cfg = self.cfg
        self.parent_dice = fit = self.fit_of_parent()
        self.tune = cfg.tune if cfg.tune != "auto" else ("refine" if fit >= FIT_DICE else "adapt")
        for name, value in REGIMES[self.tune].items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        self.augment = AugmentSettings(p_stain=cfg.stain_jitter, p_colour=cfg.colour_jitter,
                                       p_invert=cfg.invert)
        why = f"--tune {cfg.tune}" if cfg.tune != "auto" else (
            f"its Dice on the {len(self.train_items)} training image(s) is {fit:.3f}, "
            + ("at least" if fit >= FIT_DICE else "under") + f" {FIT_DICE:g}")
        log.info("fine-tune regime %s (%s): --lr %g, --colour-jitter %g, BatchNorm statistics %s", self.tune,
                 why, cfg.lr, cfg.colour_jitter, "kept" if self.tune == "refine" else "relearned")

    def warn(self, text: str) -> None:
        """A warning logged now (by rank 0) and repeated in the final summary line."""
        if self.info.is_main:
            log.warning("%s", text)
        self.warnings.append(text)

    def write_splits(self) -> None:
        """The split this run actually uses, in ``--out/splits.json`` (``segthenseg-eval`` reads it)."""
        text = json.dumps(self.plan.splits, indent=1) + "\n"
        path = self.out / SPLITS_NAME
        try:
            write_bytes(path, text.encode())
        except OSError as exc:
            raise self.write_error(exc, path) from None

    def write_error(self, exc: OSError, path: Path) -> Exception:
        """The message for a file that could not be written: what failed and what is still safe."""
        if self.saved is None:
            kept = "No checkpoint was written yet: make room (or fix the folder) and start again."
        else:
            stage, epoch = self.saved
            kept = (f"The last checkpoint ({self.out / CHECKPOINT_NAME}, after {stage} epoch {epoch}) is "
                    "intact: make room and continue with --resume.")
        return write_failed(exc, path, kept)

    def validation_set(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of the selection set for ``stage`` (S x S images or fixed crops)."""
        cfg = self.cfg
        if not self.select_items:  # --select-on last
            empty = torch.zeros(0, self.channels, cfg.size, cfg.size)
            return empty, empty[:, :1]
        if stage == "rough":
            data = RoughData(self.select_items)
            x, y = data.x, data.y
        else:
            x, y = fixed_crops(self.select_items, cfg.size, self.channels, self.pad, cfg.min_box,
                               cfg.val_crops_per_image, cfg.seed)
        r, w = self.info.rank, self.info.world
        return x[r::w], y[r::w]

    # -- networks and files --------------------------------------------------------------
    def new_net(self) -> UNet:
        return UNet(self.channels, self.cfg.width, self.cfg.depth)

    def init_fine(self) -> UNet:
        """The fine net starts from the best rough weights (transfer), else from ``--init``."""
        if self.best["rough"] is not None:
            net = self.new_net()
            net.load_state_dict(self.best["rough"]["state"])
            return net
        if self.nets["rough"] is not None:
            return copy.deepcopy(self.nets["rough"])
        log.warning("no rough net to start the fine net from (give --init MODEL); random start")
        return self.new_net()

    def load_parent(self) -> None:
        """``--from-model MODEL``: its networks start the stages this run trains, and those it does
        not train ship as they are (before the data: its channels decide how images are read)."""
        cfg = self.cfg
        if cfg.from_model is None:
            return
        self.parent = parent = load_parent(cfg.from_model)
        model = parent.model
        if "rough" in cfg.stages and model.rough is None:
            raise ValueError(f"--from-model {parent.name} has no rough network to fine-tune; "
                             "use --stage fine")
        if model.fine is None and "fine" in cfg.stages:
            log.info("--from-model %s has no fine network: the fine stage starts from the rough net",
                     parent.name)
        self.nets = {"rough": model.rough, "fine": model.fine}
        self.init_scale = model.settings.trained_scale
        log.info("fine-tuning %s (%s, SHA-256 %s): %s", ", ".join(cfg.stages), parent.name,
                 parent.sha256[:16], model.describe())

    def load_init(self) -> None:
        """``--init MODEL``: its rough net starts the fine stage and ships in the output model."""
        if self.cfg.init is None:
            return
        model = load_model(self.cfg.init)
        s = model.settings
        if s.size != self.cfg.size or s.in_channels != self.channels:
            raise ValueError(f"--init {self.cfg.init}: S={s.size}, {s.in_channels} channels; this run needs "
                             f"S={self.cfg.size}, {self.channels} channels")
        self.nets["rough"] = model.rough or model.fine
        self.init_scale = s.trained_scale
        if self.nets["rough"] is not None and (self.nets["rough"].width, self.nets["rough"].depth) != (
                self.cfg.width, self.cfg.depth):
            raise ValueError(f"--init {self.cfg.init}: network width/depth differ from --width/--depth")

    def best_or_current(self, stage: str) -> UNet | None:
        b = self.best[stage]
        if b is None:
            return self.nets[stage]
        net = self.new_net()
        net.load_state_dict(b["state"])
        return net.eval()

    def write_model(self) -> Path:
        cfg = self.cfg
        images = len(self.train_items) + len(self.select_items)
        notes = {
            "command": cfg.command, "select_on": self.plan.select_name, "selection_set": self.select_desc,
            "train_images": len(self.train_items), "selection_images": len(self.select_items),
            "images": images, "data_fingerprint": fingerprint_digest(self.plan.fingerprint),
            "width": cfg.width, "depth": cfg.depth, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "epochs": {s: cfg.epochs_for(s) for s in cfg.stages}, "seed": cfg.seed,
            "augment": cfg.augment, "wall_s": round(self.wall(), 1), "world_size": self.info.world,
            "best": {s: {"epoch": b["epoch"], "dice": b["dice"]} for s, b in self.best.items() if b},
        }
        if cfg.augment and (cfg.stain_jitter or cfg.colour_jitter or cfg.invert):
            notes["colour_augment"] = {"stain_jitter": cfg.stain_jitter, "colour_jitter": cfg.colour_jitter,
                                       "invert": cfg.invert}
        if cfg.minutes is not None:
            notes["minutes"] = cfg.minutes
            notes["stopped"] = dict(self.stopped)  # stage -> epoch after which the time was up
        trained_on, threshold, pixel_size = f"{cfg.data.name} train split", 0.5, cfg.pixel_size
        if self.parent is not None:
            notes["parent"] = self.parent.record()
            notes["tuned"] = list(cfg.stages)
            notes["regime"] = {"tune": self.tune, "parent_dice": round(self.parent_dice, 4),
                               "colour_jitter": cfg.colour_jitter}
            s = self.parent.model.settings
            threshold = s.threshold
            pixel_size = s.pixel_size if pixel_size is None else pixel_size
            trained_on = (f"{s.trained_on or self.parent.name}; fine-tuned on {images} image(s) of "
                          f"{cfg.data.name}")
        settings = ModelSettings(size=cfg.size, in_channels=self.channels, pad=self.pad, min_box=cfg.min_box,
                                 normalisation=cfg.normalisation, threshold=threshold, trained_on=trained_on,
                                 trained_scale=self.trained_scale(), pixel_size=pixel_size, notes=notes)
        model = StSModel(settings, self.best_or_current("rough"), self.best_or_current("fine"))
        path = self.out / MODEL_NAME
        try:
            return save_model(model, path)
        except OSError as exc:
            raise self.write_error(exc, path) from None

    def trained_scale(self) -> TrainedScale | None:
        """The scale the shipped rough net learned: of this run's training images (the train split
        minus the holdout), or ``--init``'s when its rough net ships and it recorded one; a fine-tune
        keeps its parent's, widened to the range of the images it was tuned on."""
        mine = TrainedScale.from_sizes([it.source.hw for it in self.train_items], self.cfg.size)
        if self.parent is not None and self.init_scale is not None:
            return self.init_scale.covering(mine) if "rough" in self.cfg.stages else self.init_scale
        if self.init_scale is not None and "rough" not in self.cfg.stages:
            return self.init_scale
        return mine

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def checkpoint(self, stage: str, epoch: int, opt: torch.optim.Optimizer) -> None:
        state = {
            "config": config_json(self.cfg.as_dict()), "channels": self.channels,
            "stage": stage, "epoch": epoch, "optimizer": opt.state_dict(),
            "nets": {k: (n.state_dict() if n is not None else None) for k, n in self.nets.items()},
            "best": self.best, "metrics": json.dumps(self.metrics), "wall_s": self.wall(),
            "data_fingerprint": json.dumps(self.plan.fingerprint, sort_keys=True),
        }
        try:
            save_checkpoint(self.out, state)
        except OSError as exc:
            raise self.write_error(exc, self.out / CHECKPOINT_NAME) from None
        self.saved = (stage, epoch)
        try:
            write_metrics_csv(self.out / METRICS_NAME, self.metrics)
        except OSError as exc:
            raise self.write_error(exc, self.out / METRICS_NAME) from None

    def restore(self, ckpt: dict) -> tuple[str, int, dict]:
        """Load nets, best weights and metrics; return (stage, finished epoch, optimizer state)."""
        saved = json.loads(ckpt["config"])
        check_compatible(saved, self.cfg.as_dict(), RESUME_KEYS)
        if "data_fingerprint" in ckpt:
            changes = fingerprint_changes(json.loads(ckpt["data_fingerprint"]), self.plan.fingerprint)
            if changes:
                raise CheckpointError(
                    f"cannot resume: the data in {self.cfg.data} changed since the checkpoint was written ("
                    + "; ".join(changes) + "). Put the data back as it was to continue this run, or train "
                    "on the new data with a new --out (this run's files are left as they are).")
        else:
            log.warning("the checkpoint (version 1) records no checksum and no data fingerprint: damage "
                        "and data changed since then cannot be detected")
        if ckpt["channels"] != self.channels:
            raise CheckpointError(f"checkpoint has {ckpt['channels']} channels, the data {self.channels}")
        for k, state in ckpt["nets"].items():
            if state is not None:
                self.nets[k] = self.new_net() if self.nets[k] is None else self.nets[k]
                self.nets[k].load_state_dict(state)
        self.best = ckpt["best"]
        self.metrics = json.loads(ckpt["metrics"])
        self.wall_before = float(ckpt["wall_s"])
        self.saved = (ckpt["stage"], int(ckpt["epoch"]))
        return ckpt["stage"], int(ckpt["epoch"]), ckpt["optimizer"]

    # -- one stage -----------------------------------------------------------------------
    def loader(self, stage: str) -> tuple[DataLoader, DistributedSampler]:
        cfg = self.cfg
        if stage == "rough":
            data, workers = RoughData(self.train_items), 0  # cached tensors: nothing to parallelise
        else:
            data, workers = FineData(self.train_items, cfg.size, self.channels, self.pad), cfg.workers
        enough = FINE_TUNE_MIN_BATCHES * cfg.batch_size * self.info.world
        if cfg.fine_tune and len(data) < enough:
            data = Cycled(data, enough)  # a few images: an epoch of FINE_TUNE_MIN_BATCHES batches
        sampler = DistributedSampler(data, num_replicas=self.info.world, rank=self.info.rank, shuffle=True,
                                     seed=cfg.seed)
        return DataLoader(data, batch_size=self.batch_size(len(data)), sampler=sampler, num_workers=workers,
                          persistent_workers=False), sampler

    def batch_size(self, items: int) -> int:
        """``--batch-size``, capped at the items each process has (a batch cannot hold more)."""
        return max(1, min(self.cfg.batch_size, math.ceil(items / self.info.world)))

    def check_steps(self, stage: str, items: int, steps: int) -> None:
        """Say so when the batch was capped, and warn when an epoch is a single optimizer step and
        the stage too short to learn: a small data set at the default batch size (10 epochs of 5
        images at batch 16 are 10 steps, and the network learns nothing)."""
        cfg, batch = self.cfg, self.batch_size(items)
        if batch < cfg.batch_size:
            log.info("%s stage: batch %d: --batch-size %d capped at the %d training item(s) per process",
                     stage, batch, cfg.batch_size, batch)
        elif cfg.fine_tune and len(self.train_items) < items:
            log.info("%s stage: the %d training image(s) repeat to fill %d batches of %d an epoch (new crops "
                     "and augmentation each time)", stage, len(self.train_items), steps, batch)
        total = steps * cfg.epochs_for(stage)
        if steps == 1 and total < MIN_STAGE_STEPS and not cfg.fine_tune:  # a fine-tune starts trained
            flag = "--fine-epochs" if stage == "fine" and cfg.fine_epochs else "--epochs"
            epochs = cfg.epochs_for(stage)
            self.warn(f"an epoch of the {stage} stage is one optimizer step ({items} training item(s), "
                      f"batch {batch}), so its {epochs} epoch(s) are only {total} step(s): too few to learn; "
                      f"give at least {MIN_STAGE_STEPS} epochs ({flag}; docs/TRAINING.md, Quick start)")

    @torch.no_grad()
    def validate(self, net: UNet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean soft-Dice loss and mean hard Dice (threshold 0.5) over the whole selection set."""
        net.eval()
        loss_sum, dice_sum = 0.0, 0.0
        for i in range(0, len(x), VAL_BATCH):
            xb, yb = x[i:i + VAL_BATCH].to(self.info.device), y[i:i + VAL_BATCH].to(self.info.device)
            logits = net(xb)
            loss_sum += float(soft_dice_loss(logits, yb)) * len(xb)
            dice_sum += float(dice_per_item(logits >= 0, yb >= 0.5).sum())
        loss_sum, dice_sum, n = ddp.all_sum([loss_sum, dice_sum, float(len(x))], self.info)
        return loss_sum / max(n, 1), dice_sum / max(n, 1)

    # -- the time limit (--minutes) ------------------------------------------------------------
    def set_deadline(self, stage: str, start: int) -> None:
        """The running stage's share of the time left: in proportion to the epochs it and the later
        stages have left (a stage that finishes early leaves its time to the next)."""
        cfg = self.cfg
        if cfg.minutes is None:
            return
        left = cfg.minutes * 60.0 - self.wall()
        later = cfg.stages[cfg.stages.index(stage):]
        epochs = {s: cfg.epochs_for(s) - (start if s == stage else 0) for s in later}
        share = epochs[stage] / max(1, sum(epochs.values()))
        self.deadline = time.perf_counter() + max(0.0, left) * share
        log.info("%s stage: %.0f s of --minutes %g left, %.0f s for this stage", stage, max(0.0, left),
                 cfg.minutes, max(0.0, left) * share)

    def out_of_time(self) -> bool:
        """Whether the running stage's time is up (every rank agrees, so none waits for another)."""
        if self.deadline is None:
            return False
        late = time.perf_counter() >= self.deadline
        if self.info.joined:
            late = ddp.all_sum([float(late)], self.info)[0] > 0
        return late

    def progress(self, stage: str, epoch: int) -> Progress:
        """Where the run is, for a progress bar: seconds of --minutes, else epochs of both stages."""
        cfg = self.cfg
        text = f"{stage} epoch {epoch}/{cfg.epochs_for(stage)}"
        text += f"; {self.last_line}" if self.last_line else ""
        if cfg.minutes is not None:
            total = int(cfg.minutes * 60)
            return Progress(text, min(int(self.wall()), total), total)
        return Progress(text, self.epochs_done, sum(cfg.epochs_for(s) for s in cfg.stages))

    # -- one stage -----------------------------------------------------------------------
    def train_epoch(self, stage: str, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    loader: DataLoader, sampler: DistributedSampler) -> Steps[dict]:
        """One epoch, a progress step after each batch; cut short (after at least one batch) when the
        stage's time is up."""
        cfg, dev = self.cfg, self.info.device
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(cfg, stage, epoch, self.info.rank))
        model.train()
        if self.tune == "refine":
            freeze_statistics(model)
        loss_sum, items, data_s, net_s, late = 0.0, 0, 0.0, 0.0, False
        bar = tqdm(total=len(loader), desc=f"{stage} {epoch}/{cfg.epochs_for(stage)}", leave=False,
                   disable=not (self.info.is_main and sys.stderr.isatty()), unit="batch")
        t = time.perf_counter()
        try:
            for x, y in loader:
                # Augment where the network runs: on a GPU the warp is cheap, on the host it was the
                # largest part of a step (benchmarks/results/train_gpu_*.json).
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if cfg.augment:
                    x, y = augment_batch(x, y, self.augment)
                t_net = time.perf_counter()
                data_s += t_net - t
                loss = soft_dice_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(x)
                items += len(x)
                t = time.perf_counter()
                net_s += t - t_net
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                yield self.progress(stage, epoch)
                if self.out_of_time():
                    late = True
                    break
        finally:
            bar.close()
        loss_sum, n = ddp.all_sum([loss_sum, float(items)], self.info)
        return {"train_loss": loss_sum / max(n, 1), "train_items": int(n), "data_s": data_s, "net_s": net_s,
                "late": late}

    def run_stage(self, stage: str, start: int, opt_state: dict | None) -> Steps[None]:
        if start < self.cfg.epochs_for(stage):
            yield from self.train_stage(stage, start, opt_state)
        if self.recalibrates:
            yield from self.recalibrate(stage)

    @property
    def recalibrates(self) -> bool:
        """Whether the kept weights get their BatchNorm statistics recomputed after each stage: when a
        run from scratch keeps its last epoch (a short run on few images), and in an adapting fine-tune
        (a refining one keeps its parent's statistics, see ``freeze_statistics``)."""
        return self.tune == "adapt" or (not self.cfg.fine_tune and self.plan.select_name == "last")

    def recalibrate(self, stage: str) -> Steps[None]:
        """Recompute the BatchNorm statistics of the kept weights of ``stage`` over BN_BATCHES batches of
        the training images, without augmentation (``torch.optim.swa_utils.update_bn``).

        BatchNorm keeps running averages with momentum 0.1, so after a short run they follow the last
        ten or so noisy batches of weights that were still moving: a fine net trained for 300 + 150
        steps on 10 CT slices with its statistics free scored crop Dice 0.82 with batch statistics and
        0.37 with its running averages; recomputed, 0.53 on new patients' ground-truth boxes against
        0.16 (docs/TRAINING.md, Fine-tuning). Done once per stage (a resumed run does it again, the same).
        """
        best = self.best[stage]
        if best is None or best.get("bn"):
            return
        cfg, dev = self.cfg, self.info.device
        net = self.new_net()
        net.load_state_dict(best["state"])
        data = RoughData(self.train_items) if stage == "rough" else FineData(
            self.train_items, cfg.size, self.channels, self.pad)
        n = BN_BATCHES * cfg.batch_size
        torch.manual_seed(epoch_seed(cfg, stage, 0, 0))  # the fine crops draw from torch's generator
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=RandomSampler(data, replacement=True,
                                                                                    num_samples=n))
        yield Progress(f"{stage}: BatchNorm statistics", 0, 1)
        update_bn(loader, net.to(dev), device=dev)
        best["state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        best["bn"] = True
        self.model_stale = True
        log.info("%s stage: BatchNorm statistics of the kept weights (epoch %d) recomputed over %d batches "
                 "of the training images", stage, best["epoch"], BN_BATCHES)

    def train_stage(self, stage: str, start: int, opt_state: dict | None) -> Steps[None]:
        cfg, info = self.cfg, self.info
        epochs = cfg.epochs_for(stage)
        if self.nets[stage] is None:
            self.nets[stage] = self.new_net() if stage == "rough" else self.init_fine()
        net = self.nets[stage].to(info.device)
        model = DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda"
                                        else None) if info.joined else net
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        loader, sampler = self.loader(stage)
        vx, vy = self.validation_set(stage)
        n_val = int(ddp.all_sum([float(len(vx))], info)[0])
        log.info("%s stage: epochs %d..%d, %d parameters, %d selection items, "
                 "batch %d x %d process(es), %s%s",
                 stage, start + 1, epochs, count_parameters(net), n_val, loader.batch_size, info.world,
                 info.device, f" (DDP, {dist.get_backend()})" if info.joined else "")
        self.check_steps(stage, len(loader.dataset), len(loader))
        self.set_deadline(stage, start)
        for epoch in range(start + 1, epochs + 1):
            if epoch > start + 1 and self.out_of_time():  # every stage trains at least one epoch
                self.stopped[stage] = epoch - 1
                break
            t = time.perf_counter()
            row = yield from self.train_epoch(stage, epoch, model, opt, loader, sampler)
            if n_val:
                row["val_loss"], row["val_dice"] = self.validate(net, vx, vy)
            else:  # --select-on last: nothing to choose on; the latest epoch is the one kept
                row["val_loss"] = row["val_dice"] = None
            seconds = time.perf_counter() - t
            best = self.best[stage]
            improved = best is None or row["val_dice"] is None or row["val_dice"] > best["dice"]
            if improved:
                state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                self.best[stage] = best = {"epoch": epoch, "dice": row["val_dice"], "state": state}
                self.model_stale = True
            self.metrics.append({
                "stage": stage, "epoch": epoch, "train_loss": round(row["train_loss"], 6),
                "val_loss": _rounded(row["val_loss"]), "val_dice": _rounded(row["val_dice"]),
                "best_dice": _rounded(best["dice"]), "best_epoch": best["epoch"], "lr": cfg.lr,
                "train_items": row["train_items"], "seconds": round(seconds, 3),
                "data_s": round(row["data_s"], 3), "net_s": round(row["net_s"], 3),
                "items_per_s": round(row["train_items"] / max(row["net_s"] + row["data_s"], 1e-9), 2),
            })
            self.epochs_done += 1
            last = epoch == epochs or row["late"]
            if info.is_main and (last or time.perf_counter() - self.last_save >= self.save_every):
                if self.model_stale:
                    self.write_model()
                    self.model_stale = False
                self.checkpoint(stage, epoch, opt)
                self.last_save = time.perf_counter()
            ddp.barrier(info)
            dice = _shown(row["val_dice"])
            self.last_line = f"loss {row['train_loss']:.4f}" + (f", val Dice {dice}" if n_val else "")
            if n_val:
                log.info("%s epoch %d/%d: loss %.4f, val loss %.4f, val Dice %.4f%s (best %.4f @ %d), %.1f s",
                         stage, epoch, epochs, row["train_loss"], row["val_loss"], row["val_dice"],
                         " *" if improved else "", best["dice"], best["epoch"], seconds)
            else:
                log.info("%s epoch %d/%d: loss %.4f, %.1f s", stage, epoch, epochs, row["train_loss"],
                         seconds)
            yield self.progress(stage, epoch)
            if row["late"]:
                self.stopped[stage] = epoch
                break
        if stage in self.stopped:
            log.info("%s stage: its time of --minutes %g was up after epoch %d of %d", stage, cfg.minutes,
                     self.stopped[stage], epochs)
            if info.is_main and self.saved != (stage, self.stopped[stage]):
                if self.model_stale:
                    self.write_model()
                    self.model_stale = False
                self.checkpoint(stage, self.stopped[stage], opt)
        self.deadline = None
        net.cpu()
        self.check_learning(stage)

    def check_learning(self, stage: str) -> None:
        """Warn when the validation Dice stayed 0 in every epoch of ``stage``: nothing was learned."""
        rows = [r for r in self.metrics if r["stage"] == stage]
        if rows and all(r["val_dice"] == 0 for r in rows):
            self.warn(f"validation Dice stayed 0 through all {len(rows)} epoch(s) of the {stage} stage: the "
                      "network found no foreground on the selection images. Check the masks (anything > 0 is "
                      "foreground), try another --lr, or train longer")


def freeze_statistics(model: torch.nn.Module) -> None:
    """A refining fine-tune trains the weights but keeps its parent's BatchNorm statistics (those layers
    stay in eval mode): statistics of a few images of one kind would replace what the parent learned of
    all the others. Let free (and then recomputed on them), 3 minutes on 5 colour dsb2018 images took the
    fluorescence val images from StS DSC 0.907 to 0.016 (docs/TRAINING.md, Fine-tuning)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def train_steps(cfg: TrainConfig) -> Steps[Path]:
    """``segthenseg-train`` as steps (a progress step after each batch and epoch); returns the path
    of the written model file. Closing the steps (the plugin's Cancel) stops after the batch in
    flight; the last checkpoint stays for ``--resume``."""
    problem = output_problem(cfg.out, folder=True)  # e.g. an existing file: said now, not as a traceback
    if problem is not None:
        raise ValueError(f"--out {cfg.out}: {problem}")
    info = ddp.setup(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        removed: list[Path] = []
        if info.is_main:
            cfg.out.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and holds_run(cfg.out):
                raise CheckpointError(f"{cfg.out} already holds a training run; add --resume to continue it "
                                      "or choose another --out")
            removed = remove_temporary(cfg.out, WRITTEN)
        ddp.barrier(info)
        setup_logging(cfg.out, info.is_main)
        run = Run(cfg, info)
        torch.manual_seed(cfg.seed)  # initial weights; every epoch then reseeds (epoch_seed)
        log.info("segthenseg-train: %s", cfg.command or cfg.as_dict())
        if removed:
            log.info("removed %d temporary file(s) an interrupted run left: %s", len(removed),
                     ", ".join(p.name for p in removed))
        run.load_parent()
        run.load_data()
        run.load_init()
        found = find_resumable(cfg.out) if cfg.resume else None
        done_stage, done_epoch, opt_state = None, 0, None
        if cfg.resume and found is None:
            log.warning("--resume: no checkpoint in %s; starting from the beginning", cfg.out)
        elif found is not None:
            if found.problem:
                log.warning("%s; resuming from the previous checkpoint %s instead (one epoch earlier)",
                            found.problem, found.path.name)
            done_stage, done_epoch, opt_state = run.restore(found.state)
            log.info("resuming after %s epoch %d (%.0f s trained so far)", done_stage, done_epoch,
                     run.wall_before)
            ddp.barrier(info)  # every rank has read it before the damaged one is moved
            if found.problem and info.is_main and (cfg.out / CHECKPOINT_NAME).exists():
                log.warning("kept the unusable checkpoint as %s", set_aside(cfg.out).name)
        if info.is_main:
            run.write_splits()
        stages = cfg.stages
        for i, stage in enumerate(stages):
            if done_stage is not None and i < stages.index(done_stage):
                continue
            same = stage == done_stage
            yield from run.run_stage(stage, done_epoch if same else 0, opt_state if same else None)
        path = cfg.out / MODEL_NAME
        if info.is_main:
            path = run.write_model()
            summary = f"wrote {path} ({run.wall():.0f} s of training); metrics in {cfg.out / METRICS_NAME}"
            if run.warnings:
                log.warning("%s; finished with %d warning(s): %s", summary, len(run.warnings),
                            " | ".join(run.warnings))
            else:
                log.info("%s", summary)
        ddp.barrier(info)
        return path
    finally:
        torch.set_num_threads(threads)  # the plugin's process goes on with its own
        ddp.cleanup(info)


def train(cfg: TrainConfig) -> Path:
    """Run ``segthenseg-train`` to its end; returns the path of the written model file."""
    return drive(train_steps(cfg))
