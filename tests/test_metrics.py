"""Metrics against hand-computed cases, empty masks included (docs/TRAINING.md, "Evaluating")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from trainer.metrics import confusion, format_table, scores, summarize


def m(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


def test_partial_overlap_hand_computed():
    pred = m(["##..", "##..", "...."])  # 4 pixels
    gt = m([".##.", ".##.", ".##."])  # 6 pixels, overlap 2
    assert confusion(pred, gt) == (2, 2, 4)
    s = scores(pred, gt)
    assert s["dsc"] == pytest.approx(4 / 10)
    assert s["iou"] == pytest.approx(2 / 8)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 6)


def test_one_pixel_each_way():
    s = scores(m(["##.."]), m(["#.#."]))
    assert s == pytest.approx({"dsc": 0.5, "iou": 1 / 3, "precision": 0.5, "recall": 0.5})


def test_perfect_and_disjoint():
    gt = m([".#.", "##."])
    assert scores(gt, gt) == {"dsc": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores(~gt, gt) == {"dsc": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


def test_both_empty_scores_one():
    empty = np.zeros((4, 5), bool)
    assert scores(empty, empty) == {"dsc": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}


def test_one_side_empty_scores_zero():
    empty, some = np.zeros((3, 3), bool), m(["#..", "...", "..#"])
    assert scores(empty, some) == {"dsc": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    assert scores(some, empty) == {"dsc": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


def test_accepts_labels_and_rejects_shape_mismatch():
    labels = np.array([[0, 3], [7, 0]], dtype=np.uint16)
    assert scores(labels, labels > 0)["dsc"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        scores(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summarize_mean_and_population_std():
    rows = [{"dsc": 0.5, "iou": 0.2}, {"dsc": 1.0, "iou": 0.4}]
    s = summarize(rows, metrics=("dsc", "iou"))
    assert s == pytest.approx({"dsc": 0.75, "dsc_std": 0.25, "iou": 0.3, "iou_std": 0.1})
    with pytest.raises(ValueError):
        summarize([])


def test_format_table_shows_percent_mean_and_std():
    s = {"dsc": 0.75, "dsc_std": 0.25, "iou": 0.5, "iou_std": 0.0, "precision": 1.0,
         "precision_std": 0.0, "recall": 0.123, "recall_std": 0.01}
    text = format_table({"baseline": s, "StS": s})
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["method", "DSC"]
    assert lines[2].startswith("baseline") and "75.0 ± 25.0" in lines[2] and "12.3 ± 1.0" in lines[2]
    assert lines[3].startswith("StS")


@settings(max_examples=60, deadline=None)
@given(arrays(bool, (6, 7)), arrays(bool, (6, 7)))
def test_identities(pred, gt):
    s = scores(pred, gt)
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert s["dsc"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]))
    assert scores(gt, pred)["precision"] == pytest.approx(s["recall"])
