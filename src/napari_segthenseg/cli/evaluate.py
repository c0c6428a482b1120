"""``segthenseg-eval``: baseline vs. StS metrics of a model file on a data folder.

Per image at original resolution, one rough pass feeds both methods: the **baseline** is the
rough probability map upsampled (the paper's baseline), **StS** boxes the rough mask, refines
the full-resolution crops and fuses them. Prints mean ± std like the paper's tables and writes
per-image rows (CSV) and a summary (JSON).

Which images: a training run's own split (``--run DIR``, or a model file with the run's
``splits.json`` beside it) so that scores never silently include training images; else the data
folder's ``splits.json``; else every image, with a warning. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config import DEFAULT_SEED
from trainer.data import (
    SPLITS_NAME,
    DataError,
    Sample,
    has_splits_file,
    image_stems,
    load_samples,
    load_stems,
    read_splits_file,
)
from trainer.metrics import METRICS, format_table, scores, summarize

from ..engine import DEFAULT_MODEL_NAME, Engine, StSModel
from .common import CliError, CommandProgress, check_output, model_path, open_engine

METHODS = ("baseline", "sts")
TITLES = {"baseline": "baseline", "sts": "StS"}
BASELINE_STAGES = ("rough_read", "rough_net", "upsample")
STS_STAGES = ("survey", "rough_read", "rough_net", "boxes", "crop", "fine_net", "to_host", "paste")


def choose_split(data: Path, split: str | None) -> str | None:
    """Without a run: ``--split`` if given; else ``val`` when ``splits.json`` exists; else every image."""
    if split is not None:
        return split
    return "val" if has_splits_file(data) else None


@dataclass
class Selection:
    """The images to score and where that choice came from."""

    split: str | None  # None: every image of the folder
    samples: list[Sample]
    source: str  # e.g. "run runs/x (runs/x/splits.json)", "DATA/splits.json", "no splits.json"
    warnings: list[str] = field(default_factory=list)


def find_run(model: str, run: Path | None) -> tuple[str, Path | None]:
    """The model file to load and the training run folder whose ``splits.json`` says what is unseen.

    ``--run DIR`` names the run; a run folder given as the model means its ``model.pt``; a model
    file with a ``splits.json`` beside it (as in the run folder ``segthenseg-train`` writes) is one.
    """
    if run is not None:
        if not (run / SPLITS_NAME).is_file():
            raise CliError(f"--run {run}: no {SPLITS_NAME} there (segthenseg-train writes it into its --out "
                           "folder)")
        return model, run
    if model == DEFAULT_MODEL_NAME:
        return model, None
    p = Path(model)
    if p.is_dir():
        model = str(model_path(model))  # a run folder: its model.pt (or a clear error)
        return model, p if (p / SPLITS_NAME).is_file() else None
    if p.is_file() and (p.parent / SPLITS_NAME).is_file():
        return model, p.parent
    return model, None


def select_images(data: Path, split: str | None, seed: int, run: Path | None,
                  selected_on: str | None) -> Selection:
    """The samples to score: the run's unseen split, else the data's split, else all (with a warning).

    ``selected_on`` is the split that chose the model's checkpoints (from its notes), if known.
    """
    if run is None:
        name = choose_split(data, split)
        samples = load_samples(data, name, seed=seed)
        if has_splits_file(data):
            return Selection(name, samples, str(data / SPLITS_NAME))
        if name is None:
            warn = (f"{data} has no {SPLITS_NAME} and no training run was given (--run DIR, or a model file "
                    "inside its run folder): scoring ALL images, which may include the images the model "
                    "was trained on, so the scores may be optimistic")
        else:
            warn = (f"{data} has no {SPLITS_NAME}: split {name!r} is rebuilt from --seed {seed}; it is the "
                    "training run's split only if the model was trained on this folder with that seed (pass "
                    "--run DIR to use the run's own split)")
        return Selection(name, samples, f"no {SPLITS_NAME}", [warn])
    path = run / SPLITS_NAME
    try:
        splits = read_splits_file(path, image_stems(data), data / "images")
    except DataError as exc:
        raise CliError(f"{exc} (is {data} the data the run in {run} was trained on?)") from None
    if split is None:
        order = ("test", "val") if selected_on == "val" else ("val", "test")
        split = next((k for k in (*order, "holdout") if splits.get(k)), None)
        if split is None:
            raise CliError(f"{path}: no images outside training to score (splits: "
                           f"{', '.join(sorted(splits))}); choose one with --split")
    elif split not in splits:
        raise CliError(f"{path}: no split {split!r}; available: {', '.join(sorted(splits))}")
    if not splits[split]:
        raise CliError(f"{path}: split {split!r} is empty")
    warnings = []
    if split == "train":
        warnings.append("split 'train' holds the images the networks were trained on: these scores say "
                        "nothing about new images")
    elif split == "holdout" or split == selected_on:
        warnings.append(f"split {split!r} chose the model's checkpoints: the scores are somewhat optimistic")
    return Selection(split, load_stems(data, splits[split]), f"run {run} ({path})", warnings)


def evaluate_image(engine: Engine, sample: Sample) -> dict[str, object]:
    """One per-image row: both methods' metrics, mask sizes and per-method seconds."""
    hw = sample.mask.shape
    res = engine.segment(sample.image, baseline=True)  # one rough pass feeds both methods
    base, sts, boxes, t = res.baseline, res.mask, res.boxes, res.timings
    row: dict[str, object] = {
        "stem": sample.stem, "height": hw[0], "width": hw[1], "n_boxes": len(boxes),
        "gt_pixels": int(np.count_nonzero(sample.mask)),
        "baseline_pixels": int(np.count_nonzero(base)), "sts_pixels": int(np.count_nonzero(sts)),
        "baseline_ms": 1000 * sum(t.get(k, 0.0) for k in BASELINE_STAGES),
        "sts_ms": 1000 * sum(t.get(k, 0.0) for k in STS_STAGES),
    }
    for method, pred in (("baseline", base), ("sts", sts)):
        for m, v in scores(pred, sample.mask).items():
            row[f"{method}_{m}"] = v
    return row


def summarize_rows(rows: Sequence[dict[str, object]]) -> dict[str, object]:
    """Summary with keys ``baseline`` and ``sts`` (metric means as fractions, ``*_std``, empty counts)."""
    gt_empty = [r["gt_pixels"] == 0 for r in rows]
    out: dict[str, object] = {"n_images": len(rows), "empty_gt": int(sum(gt_empty))}
    for method in METHODS:
        per_image = [{m: float(r[f"{method}_{m}"]) for m in METRICS} for r in rows]
        s: dict[str, object] = dict(summarize(per_image))
        pred_empty = [r[f"{method}_pixels"] == 0 for r in rows]
        s["empty_pred"] = int(sum(pred_empty))
        s["both_empty"] = int(sum(g and p for g, p in zip(gt_empty, pred_empty, strict=True)))
        s["mean_ms"] = float(np.mean([float(r[f"{method}_ms"]) for r in rows]))
        out[method] = s
    return out


def check_model(model: StSModel) -> None:
    if model.rough is None or model.fine is None:
        missing = "rough" if model.rough is None else "fine"
        raise CliError(f"evaluation needs a rough and a fine network; this model has no {missing} network")


def evaluate_samples(engine: Engine, samples: Sequence[Sample],
                     progress: bool | None = None) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Rows and summary for ``samples``; ``progress=None``: a bar on a terminal, plain lines
    otherwise; ``False``: nothing."""
    check_model(engine.model)
    if samples:  # warm-up, so the first image's timing is not the one-off start-up cost
        evaluate_image(engine, samples[0])
    # None: a bar on a terminal, else a plain line every few seconds (CommandProgress)
    bar = CommandProgress(samples, "evaluating", "image", name=lambda s: s.stem,
                          enabled=progress is not False, terminal=True if progress else None)
    rows = [evaluate_image(engine, s) for s in bar]
    return rows, summarize_rows(rows)


def empty_note(summary: dict[str, object]) -> str:
    """The report of empty cases (empty GT and empty prediction score 1; see ``metrics``)."""
    parts = [f"{summary['empty_gt']} image(s) with empty ground truth"]
    for m in METHODS:
        s = summary[m]
        parts.append(f"{TITLES[m]}: {s['empty_pred']} empty prediction(s), "
                     f"{s['both_empty']} scored 1 as both empty")
    return "; ".join(parts)


def write_csv(rows: Sequence[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segthenseg-eval",
        description="Per-image DSC, IoU, precision and recall of the baseline (rough output upsampled) "
                    "and of StS, at original resolution; prints mean ± std.")
    p.add_argument("model", help="model file, a training run's folder (its model.pt), or 'default' for the "
                   "bundled model")
    p.add_argument("data", type=Path, help="data folder with images/ and masks/ (and optional splits.json)")
    p.add_argument("--run", type=Path, metavar="DIR",
                   help="training run folder whose splits.json says which images were not trained on "
                        "(default: the model file's folder, when it holds one)")
    p.add_argument("--split", help="split to evaluate (default: with a run, its 'val', else 'test', else "
                   "'holdout'; else 'val' of the data's splits.json; else all images, with a warning)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary here")
    p.add_argument("--csv", type=Path, metavar="OUT", help="write per-image rows here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the 80/10/10 split without splits.json (default: {DEFAULT_SEED})")
    return p


def run(args: argparse.Namespace) -> dict[str, object]:
    check_output(args.json, "--json")  # before the evaluation, not after it
    check_output(args.csv, "--csv")
    model, run_dir = find_run(args.model, args.run)
    engine = open_engine(model, args.device)
    check_model(engine.model)
    t0 = time.perf_counter()
    try:
        chosen = select_images(args.data, args.split, args.seed, run_dir,
                               engine.settings.notes.get("select_on"))
    except DataError as exc:
        raise CliError(str(exc)) from exc
    for w in chosen.warnings:
        print(f"segthenseg-eval: WARNING: {w}", file=sys.stderr, flush=True)
    where = f"split {chosen.split!r}" if chosen.split is not None else "all images (no splits.json)"
    print(f"{args.data}: {where}, {len(chosen.samples)} image(s) [{chosen.source}]; model {model}, "
          f"S={engine.settings.size}, on {engine.device.type}", flush=True)
    lineage = engine.model.lineage()
    if lineage:
        print(f"model {model}: {lineage}", flush=True)
    rows, summary = evaluate_samples(engine, chosen.samples)
    summary.update({"size": engine.settings.size, "split": chosen.split, "splits_from": chosen.source,
                    "lineage": lineage or None,
                    "warnings": chosen.warnings, "model": str(model), "data": str(args.data),
                    "device": engine.device.type, "wall_s": time.perf_counter() - t0})
    print(format_table({TITLES[m]: summary[m] for m in METHODS}))
    print(empty_note(summary))
    for w in chosen.warnings:  # again under the table, where the numbers are read
        print(f"WARNING: {w}")
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CliError as exc:
        print(f"segthenseg-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
