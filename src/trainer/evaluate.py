"""``segthenseg-eval``: baseline vs. StS metrics of a model file on a data folder.

Per image at original resolution, one rough pass feeds both methods: the **baseline** is the
rough probability map upsampled (the paper's baseline), **StS** boxes the rough mask, refines
the full-resolution crops and fuses them. Prints mean ± std like the paper's tables and writes
per-image rows (CSV) and a summary (JSON).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from napari_segthenseg.engine import Engine, ModelFileError, StSModel, load_model
from napari_segthenseg.engine.device import DEVICE_CHOICES

from .data import DataError, Sample, has_splits_file, load_samples
from .metrics import METRICS, format_table, scores, summarize

METHODS = ("baseline", "sts")
TITLES = {"baseline": "baseline", "sts": "StS"}
BASELINE_STAGES = ("rough_read", "rough_net", "upsample")
STS_STAGES = ("rough_read", "rough_net", "boxes", "crop", "fine_net", "to_host", "paste")


class CliError(Exception):
    """A problem the user can fix (bad model, data or device); printed without a traceback."""


def open_engine(model: str, device: str) -> Engine:
    """Load a model file (or ``default``) onto a device, turning every failure into :class:`CliError`."""
    try:
        return Engine(load_model(model), device=device)
    except (ModelFileError, FileNotFoundError) as exc:
        hint = " (no bundled model yet: pass a model file)" if model == "default" else ""
        raise CliError(f"{exc}{hint}") from exc
    except ValueError as exc:  # unknown or unavailable device
        raise CliError(str(exc)) from exc


def choose_split(data: Path, split: str | None) -> str | None:
    """``--split`` if given; else ``val`` when ``splits.json`` exists; else every image (``None``)."""
    if split is not None:
        return split
    return "val" if has_splits_file(data) else None


def evaluate_image(engine: Engine, sample: Sample) -> dict[str, object]:
    """One per-image row: both methods' metrics, mask sizes and per-method seconds."""
    hw = sample.mask.shape
    engine.timings = {}
    rough = engine.rough(sample.image)
    base = engine.baseline(rough, hw)
    boxes = engine.boxes(rough.mask, hw)
    probs = engine.refine(sample.image, boxes, rough.stats)
    sts = engine.fuse(probs, boxes, hw)
    t = engine.timings
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
    """Rows and summary for ``samples``; ``progress=None`` shows a bar only on a terminal."""
    check_model(engine.model)
    if samples:  # warm-up, so the first image's timing is not the one-off start-up cost
        evaluate_image(engine, samples[0])
    disable = None if progress is None else not progress  # None: tqdm shows a bar only on a terminal
    bar = tqdm(samples, desc="evaluating", unit="image", disable=disable, file=sys.stderr)
    rows = [evaluate_image(engine, s) for s in bar]
    return rows, summarize_rows(rows)


def empty_note(summary: dict[str, object]) -> str:
    """The SPEC's report of empty cases (empty GT and empty prediction score 1)."""
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
    p.add_argument("model", help="model file, or 'default' for the bundled model")
    p.add_argument("data", type=Path, help="data folder with images/ and masks/ (and optional splits.json)")
    p.add_argument("--split", help="split to evaluate (default: 'val' with splits.json, else all images)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary here")
    p.add_argument("--csv", type=Path, metavar="OUT", help="write per-image rows here")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} (default auto)")
    p.add_argument("--seed", type=int, default=2022, help="seed of the 80/10/10 split without splits.json")
    return p


def run(args: argparse.Namespace) -> dict[str, object]:
    engine = open_engine(args.model, args.device)
    check_model(engine.model)
    split = choose_split(args.data, args.split)
    t0 = time.perf_counter()
    try:
        samples = load_samples(args.data, split, seed=args.seed)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    where = f"split {split!r}" if split is not None else "all images (no splits.json)"
    print(f"{args.data}: {where}, {len(samples)} image(s); model {args.model}, S={engine.settings.size}, "
          f"on {engine.device.type}", flush=True)
    rows, summary = evaluate_samples(engine, samples)
    summary.update({"size": engine.settings.size, "split": split, "model": str(args.model),
                    "data": str(args.data), "device": engine.device.type,
                    "wall_s": time.perf_counter() - t0})
    print(format_table({TITLES[m]: summary[m] for m in METHODS}))
    print(empty_note(summary))
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
