"""Per-image segmentation metrics (DSC, IoU, precision, recall) and their mean ± std.

Empty masks follow docs/TRAINING.md ("Evaluating"): an empty prediction of an empty ground truth is perfect
(every metric 1). Any other 0/0 ratio scores 0 (as scikit-learn's ``zero_division=0``): when
exactly one of the two masks is empty, all four metrics are 0, so nothing rewards predicting
nothing or everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

METRICS = ("dsc", "iou", "precision", "recall")
LABELS = {"dsc": "DSC", "iou": "IoU", "precision": "precision", "recall": "recall"}


def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """True positive, false positive and false negative pixel counts of two same-shape masks."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """``{"dsc", "iou", "precision", "recall"}`` of one image, as fractions in [0, 1]."""
    tp, fp, fn = confusion(pred, gt)
    both_empty = tp + fp + fn == 0
    return {
        "dsc": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


def summarize(rows: Sequence[Mapping[str, float]], metrics: Iterable[str] = METRICS) -> dict[str, float]:
    """Mean and population std (``ddof=0``) of each metric over per-image rows.

    Keys: ``<metric>`` (mean) and ``<metric>_std``.
    """
    if not rows:
        raise ValueError("no images to summarize")
    out: dict[str, float] = {}
    for m in metrics:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        out[m] = float(values.mean())
        out[f"{m}_std"] = float(values.std())
    return out


def format_table(summaries: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = METRICS) -> str:
    """A paper-style text table, one row per method: mean ± std in percent."""
    name_w = max(8, *(len(n) for n in summaries))
    cell_w = 13
    head = "method".ljust(name_w) + "".join(f"{LABELS[m] + ' %':>{cell_w + 2}}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        texts = [f"{100 * s[m]:.1f} ± {100 * s[m + '_std']:.1f}" for m in metrics]
        cells = "".join(f"{t:>{cell_w + 2}}" for t in texts)
        lines.append(name.ljust(name_w) + cells)
    return "\n".join(lines)
