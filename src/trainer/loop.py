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
from torch.utils.data import DataLoader, DistributedSampler
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
from napari_segthenseg.engine.scale import TrainedScale

from . import distributed as ddp
from .augment import augment_batch
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
from .config import HOLDOUT_FRACTION, RESUME_KEYS, TrainConfig
from .data import (
    SPLITS_NAME,
    DataError,
    ImageInfo,
    Sample,
    check_has_both_classes,
    fingerprint,
    fingerprint_changes,
    load_splits,
    load_stems,
    scan_stems,
    shared_images,
)
from .gtcrops import FineData, Prepared, RoughData, fixed_crops, network_channels, prepare
from .losses import dice_per_item, soft_dice_loss

MODEL_NAME = RUN_MODEL_NAME  # a run folder given as a model means this file (engine.modelfile)
LOG_NAME = "train.log"
METRICS_NAME = "metrics.csv"
# Files of a run folder written through a temporary ``.NAME.*.tmp`` (removed if a kill left one).
WRITTEN = (CHECKPOINT_NAME, PREVIOUS_NAME, MODEL_NAME, METRICS_NAME, SPLITS_NAME)
VAL_BATCH = 64
MIN_STAGE_STEPS = 100  # fewer optimizer steps than this in a stage of one-step epochs: warned about
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
    select: list[Sample]
    select_desc: str
    select_name: str  # "holdout" or "val": the key of the selection set in ``splits``
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


def plan_data(cfg: TrainConfig) -> DataPlan:
    """Decode and check every split; return the training and checkpoint-selection samples.

    ``holdout`` keeps a seeded 10 % of the train split out of training for choosing checkpoints,
    so the val split stays unseen for reporting; ``val`` selects on the val split (the paper's way).
    The other splits (e.g. test) are decoded and checked too, but not kept in memory.
    """
    splits = load_splits(cfg.data, cfg.seed)
    for name in ("train", "val") if cfg.select_on == "val" else ("train",):
        if not splits.get(name):
            what = "no" if name not in splits else "an empty"
            names = ", ".join(sorted(splits)) or "none"
            raise DataError(f"{cfg.data}: {what} {name!r} split (splits: {names})"
                            + ("; use --select-on holdout" if name == "val" else ""))
    train = load_stems(cfg.data, splits["train"])
    if cfg.select_on == "val":
        select, select_name, desc = load_stems(cfg.data, splits["val"]), "val", "the val split"
        kept = train
    else:
        if len(train) < 2:
            raise DataError(f"{cfg.data}: the train split has {len(train)} image(s); a holdout needs at "
                            "least 2 (or use --select-on val)")
        hold = holdout_indices([s.stem for s in train], cfg.seed)
        select = [s for i, s in enumerate(train) if i in hold]
        kept = [s for i, s in enumerate(train) if i not in hold]
        select_name = "holdout"
        desc = f"a {HOLDOUT_FRACTION:.0%} holdout of the train split (seed {cfg.seed})"
    run_splits = {"train": [s.stem for s in kept]}
    if select_name == "holdout":
        run_splits["holdout"] = [s.stem for s in select]
    run_splits.update({k: list(v) for k, v in splits.items() if k not in run_splits})
    infos = {"train": [ImageInfo.of(s) for s in kept], select_name: [ImageInfo.of(s) for s in select]}
    for name, stems in run_splits.items():
        if name not in infos and stems:
            infos[name] = scan_stems(cfg.data, stems)  # decoded and checked now, not at evaluation
    check_has_both_classes(infos["train"], f"the {len(kept)} training images")
    return DataPlan(kept, select, desc, select_name, run_splits,
                    fingerprint({"train": infos["train"], "selection": infos[select_name]}),
                    {k: len(v) for k, v in infos.items()}, shared_images(infos, "train"))


def epoch_seed(cfg: TrainConfig, stage: str, epoch: int, rank: int) -> int:
    """Every epoch draws from its own seed, so a resumed run repeats exactly what was lost."""
    return (cfg.seed * 1_000_003 + (0 if stage == "rough" else 500_009) + epoch * 1009 + rank) % 2**63


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
        self.saved: tuple[str, int] | None = None  # stage and epoch of the last checkpoint on disk
        self.warnings: list[str] = []  # repeated in the final summary line

    # -- data ----------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        self.plan = plan = plan_data(cfg)
        train, select, self.select_desc = plan.train, plan.select, plan.select_desc
        self.channels = network_channels(train + select)
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
        notes = {
            "command": cfg.command, "select_on": cfg.select_on, "selection_set": self.select_desc,
            "train_images": len(self.train_items), "selection_images": len(self.select_items),
            "width": cfg.width, "depth": cfg.depth, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "epochs": {s: cfg.epochs_for(s) for s in cfg.stages}, "seed": cfg.seed,
            "augment": cfg.augment, "wall_s": round(self.wall(), 1), "world_size": self.info.world,
            "best": {s: {"epoch": b["epoch"], "dice": b["dice"]} for s, b in self.best.items() if b},
        }
        settings = ModelSettings(size=cfg.size, in_channels=self.channels, pad=self.pad, min_box=cfg.min_box,
                                 normalisation=cfg.normalisation, trained_on=f"{cfg.data.name} train split",
                                 trained_scale=self.trained_scale(), pixel_size=cfg.pixel_size, notes=notes)
        model = StSModel(settings, self.best_or_current("rough"), self.best_or_current("fine"))
        path = self.out / MODEL_NAME
        try:
            return save_model(model, path)
        except OSError as exc:
            raise self.write_error(exc, path) from None

    def trained_scale(self) -> TrainedScale:
        """The scale the shipped rough net learned: of this run's training images (the train split
        minus the holdout), or ``--init``'s when its rough net ships and it recorded one."""
        if self.init_scale is not None and "rough" not in self.cfg.stages:
            return self.init_scale
        return TrainedScale.from_sizes([it.source.hw for it in self.train_items], self.cfg.size)

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
        total = steps * cfg.epochs_for(stage)
        if steps == 1 and total < MIN_STAGE_STEPS:
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

    def train_epoch(self, stage: str, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    loader: DataLoader, sampler: DistributedSampler) -> dict:
        cfg, dev = self.cfg, self.info.device
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(cfg, stage, epoch, self.info.rank))
        model.train()
        loss_sum, items, data_s, net_s = 0.0, 0, 0.0, 0.0
        bar = tqdm(total=len(loader), desc=f"{stage} {epoch}/{cfg.epochs_for(stage)}", leave=False,
                   disable=not (self.info.is_main and sys.stderr.isatty()), unit="batch")
        t = time.perf_counter()
        for x, y in loader:
            # Augment where the network runs: on a GPU the warp is cheap, on the host it was the
            # largest part of a step (benchmarks/results/train_gpu_*.json).
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if cfg.augment:
                x, y = augment_batch(x, y)
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
        bar.close()
        loss_sum, n = ddp.all_sum([loss_sum, float(items)], self.info)
        return {"train_loss": loss_sum / max(n, 1), "train_items": int(n), "data_s": data_s, "net_s": net_s}

    def run_stage(self, stage: str, start: int, opt_state: dict | None) -> None:
        cfg, info = self.cfg, self.info
        epochs = cfg.epochs_for(stage)
        if start >= epochs:
            return
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
        for epoch in range(start + 1, epochs + 1):
            t = time.perf_counter()
            row = self.train_epoch(stage, epoch, model, opt, loader, sampler)
            row["val_loss"], row["val_dice"] = self.validate(net, vx, vy)
            seconds = time.perf_counter() - t
            best = self.best[stage]
            improved = best is None or row["val_dice"] > best["dice"]
            if improved:
                state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                self.best[stage] = best = {"epoch": epoch, "dice": row["val_dice"], "state": state}
            self.metrics.append({
                "stage": stage, "epoch": epoch, "train_loss": round(row["train_loss"], 6),
                "val_loss": round(row["val_loss"], 6), "val_dice": round(row["val_dice"], 6),
                "best_dice": round(best["dice"], 6), "best_epoch": best["epoch"], "lr": cfg.lr,
                "train_items": row["train_items"], "seconds": round(seconds, 3),
                "data_s": round(row["data_s"], 3), "net_s": round(row["net_s"], 3),
                "items_per_s": round(row["train_items"] / max(row["net_s"] + row["data_s"], 1e-9), 2),
            })
            if info.is_main:
                if improved:
                    self.write_model()
                self.checkpoint(stage, epoch, opt)
            ddp.barrier(info)
            log.info("%s epoch %d/%d: loss %.4f, val loss %.4f, val Dice %.4f%s (best %.4f @ %d), %.1f s",
                     stage, epoch, epochs, row["train_loss"], row["val_loss"], row["val_dice"],
                     " *" if improved else "", best["dice"], best["epoch"], seconds)
        net.cpu()
        self.check_learning(stage)

    def check_learning(self, stage: str) -> None:
        """Warn when the validation Dice stayed 0 in every epoch of ``stage``: nothing was learned."""
        rows = [r for r in self.metrics if r["stage"] == stage]
        if rows and all(r["val_dice"] == 0 for r in rows):
            self.warn(f"validation Dice stayed 0 through all {len(rows)} epoch(s) of the {stage} stage: the "
                      "network found no foreground on the selection images. Check the masks (anything > 0 is "
                      "foreground), try another --lr, or train longer")


def train(cfg: TrainConfig) -> Path:
    """Run ``segthenseg-train``; returns the path of the written model file."""
    problem = output_problem(cfg.out, folder=True)  # e.g. an existing file: said now, not as a traceback
    if problem is not None:
        raise ValueError(f"--out {cfg.out}: {problem}")
    info = ddp.setup(cfg.device)
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
            run.run_stage(stage, done_epoch if same else 0, opt_state if same else None)
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
        ddp.cleanup(info)
