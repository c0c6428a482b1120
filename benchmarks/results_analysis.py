"""Where does a trained StS model lose DSC? Per-image diagnostics for docs/RESULTS.md.

For every image of a split (default: val of the data's splits.json) this records, besides the
baseline and StS scores of ``segthenseg-eval``:

- the image's shape and how much the rough net's S x S input squashes it (``squash`` = long side /
  short side: the S x S input distorts the aspect ratio by that factor), and the rough net's scale
  (full-res px per rough px along the long side);
- the ground truth's size (foreground fraction) and its largest object's padded square box as a fraction
  of the image's long side (``gt_box_frac``): near 1 the fine crop is (almost) the whole image, so StS
  cannot see more detail than the baseline; ``crop_scale`` = that box's side / S (full-res px per fine
  px) against the rough ``scale``;
- **oracle StS**: the fine net run on boxes from the ground-truth mask (``engine.segment(image, boxes=...)``),
  which separates what the fine net can do from what the rough net's localisation allows;
- recall of the rough mask (baseline recall) and whether the rough net missed every object.

Writes a per-image CSV and a JSON summary (means, and the same split by groups of images). Also, with
``--metrics``, a summary of the learning curves of a training run's ``metrics.csv`` (best epoch, Dice of
the last 10 epochs against the 10 before: still rising or flat).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results_analysis.py \
        runs/x/model.pt ../shared/data/kvasir_seg \
        --metrics runs/x/metrics.csv --csv runs/x/analysis.csv --json runs/x/analysis.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from napari_segthenseg.engine import Engine, load_model
from napari_segthenseg.engine.boxes import boxes_from_mask, component_boxes, square_pad_shift
from trainer.data import image_stems, load_samples, load_stems, read_splits_file
from trainer.metrics import scores


def curves(path: Path) -> dict[str, object]:
    rows = list(csv.DictReader(open(path)))
    out: dict[str, object] = {}
    for stage in ("rough", "fine"):
        r = [x for x in rows if x["stage"] == stage]
        if not r:
            continue
        d = np.array([float(x["val_dice"]) for x in r])
        loss = np.array([float(x["train_loss"]) for x in r])
        best = int(np.argmax(d))
        out[stage] = {
            "epochs": len(r), "best_epoch": best + 1, "best_dice": float(d[best]),
            "val_dice_last10": float(d[-10:].mean()),
            "val_dice_prev10": float(d[-20:-10].mean()) if len(d) >= 20 else None,
            "train_loss_last10": float(loss[-10:].mean()),
            "train_loss_prev10": float(loss[-20:-10].mean()) if len(loss) >= 20 else None,
            "val_dice_at": {str(e): float(d[e - 1]) for e in (10, 25, 35, 50, 75, 100, 125, 150, 175)
                            if e <= len(d)},
            "seconds_mean": float(np.mean([float(x["seconds"]) for x in r])),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--split", default="val")
    ap.add_argument("--run", help="run folder whose splits.json to use (default: the model's folder)")
    ap.add_argument("--metrics")
    ap.add_argument("--limit", type=int, help="only the first N images (a smoke test)")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = load_model(args.model)
    engine = Engine(model, device="cpu")
    s, pad, min_box = model.settings.size, model.settings.pad, model.settings.min_box
    run = Path(args.run) if args.run else Path(args.model).parent
    if (run / "splits.json").is_file():
        data = Path(args.data)
        splits = read_splits_file(run / "splits.json", image_stems(data), data / "images")
        samples = load_stems(args.data, splits[args.split])
    else:
        samples = load_samples(args.data, args.split)
    samples = samples[:args.limit] if args.limit else samples

    rows = []
    for smp in samples:
        h, w = smp.mask.shape
        gt = smp.mask
        res = engine.segment(smp.image, baseline=True)
        gt_boxes = boxes_from_mask(gt, (h, w), pad, min_box)
        oracle = engine.segment(smp.image, boxes=gt_boxes).mask if len(gt_boxes) else np.zeros_like(gt)
        raw = component_boxes(gt)
        if len(raw):
            big = raw[np.argmax((raw[:, 2] - raw[:, 0]) * (raw[:, 3] - raw[:, 1]))]
            side = int(np.diff(square_pad_shift(big, (h, w), pad)[[0, 2]])[0])
        else:
            side = 0
        row = {"stem": smp.stem, "height": h, "width": w, "squash": max(h, w) / min(h, w),
               "scale": max(h, w) / s, "gt_frac": float(gt.mean()), "gt_components": len(raw),
               "gt_box_frac": side / max(h, w), "crop_scale": side / s,
               "n_boxes": len(res.boxes), "n_gt_boxes": len(gt_boxes)}
        for name, pred in (("baseline", res.baseline), ("sts", res.mask), ("oracle", oracle)):
            for m, v in scores(pred, gt).items():
                row[f"{name}_{m}"] = float(v)
        rows.append(row)

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)

    def mean(rs, key):
        return float(np.mean([r[key] for r in rs])) if rs else None

    def group(rs):
        return {"n": len(rs), **{f"{k}_dsc": mean(rs, f"{k}_dsc") for k in ("baseline", "sts", "oracle")},
                "baseline_recall": mean(rs, "baseline_recall"), "sts_recall": mean(rs, "sts_recall")}

    groups = {
        "all": rows,
        "rough net found nothing (n_boxes 0)": [r for r in rows if r["n_boxes"] == 0],
        "sts_dsc < 0.5": [r for r in rows if r["sts_dsc"] < 0.5],
        "sts_dsc >= 0.5": [r for r in rows if r["sts_dsc"] >= 0.5],
        "largest object's crop >= 0.8 of the long side": [r for r in rows if r["gt_box_frac"] >= 0.8],
        "largest object's crop < 0.8 of the long side": [r for r in rows if r["gt_box_frac"] < 0.8],
        "gt_frac >= 0.3 (large objects)": [r for r in rows if r["gt_frac"] >= 0.3],
        "gt_frac < 0.05 (small objects)": [r for r in rows if r["gt_frac"] < 0.05],
        "squash >= 1.3 (aspect distorted by >= 30 %)": [r for r in rows if r["squash"] >= 1.3],
        "squash < 1.3": [r for r in rows if r["squash"] < 1.3],
    }
    worst = sorted(rows, key=lambda r: r["sts_dsc"])[:10]
    summary = {
        "model": args.model, "data": args.data, "split": args.split, "size": s,
        "groups": {k: group(v) for k, v in groups.items()},
        "worst10": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("stem", "height", "width", "gt_frac", "gt_components", "gt_box_frac", "n_boxes",
                              "baseline_dsc", "baseline_recall", "sts_dsc", "sts_recall", "oracle_dsc")}
                    for r in worst],
        "median_gt_box_frac": float(np.median([r["gt_box_frac"] for r in rows])),
        "median_crop_scale_vs_rough_scale": [float(np.median([r["crop_scale"] for r in rows])),
                                             float(np.median([r["scale"] for r in rows]))],
    }
    if args.metrics:
        summary["curves"] = curves(Path(args.metrics))
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["groups"], indent=1))
    print(json.dumps(summary["worst10"], indent=1))
    if "curves" in summary:
        print(json.dumps(summary["curves"], indent=1))


if __name__ == "__main__":
    main()
