"""Smoke test of the inference benchmark on one real dsb2018 val image with tiny networks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_inference  # noqa: E402

KEYS = {"baseline_ms", "sts_ms", "loop_ms", "sts_over_baseline", "loop_over_sts", "boxes_per_image",
        "outside_networks_frac", "peak_rss_mb", "n_images", "device"}


def test_bench_runs_on_real_data_and_writes_the_keys(dsb_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    res = bench_inference.main(["--data", str(dsb_dir), "--size", "32", "--width", "4", "--depth", "2",
                                "--limit", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
                                "--json", str(out)])
    saved = json.loads(out.read_text())
    assert KEYS <= set(saved) and saved["n_images"] == 1 and saved["device"].startswith("cpu")
    assert saved["baseline_ms"] > 0 and saved["sts_ms"] > 0 and saved["loop_ms"] > 0
    assert saved["boxes_per_image"] >= 1  # ground-truth boxes of a real image with nuclei
    assert 0 <= saved["outside_networks_frac"] < 1
    assert saved["sts_over_baseline"] == pytest.approx(saved["sts_ms"] / saved["baseline_ms"])
    assert res["boxes_from"].startswith("ground truth")
    assert "| (c) StS, per-crop loop" in capsys.readouterr().out


def test_loop_matches_batched_engine_where_the_resampling_agrees(dsb_image):
    """The per-crop loop is the same method: crops at S pixels need no resize, so masks agree."""
    img = dsb_image[0]
    eng = bench_inference.Engine(make_tiny_model(size=32), "cpu")
    boxes = np.array([[0, 0, 32, 32], [40, 60, 72, 92]])  # 32 px squares at S=32: exact copies
    stats = eng.image_stats(img)
    probs = eng.refine(img, boxes, stats)
    eng.settings.threshold = _split_threshold(probs)  # a random net's output is near-constant
    batched = eng.fuse(probs, boxes, img.shape[:2])
    loop = bench_inference.loop_fine(eng, bench_inference.paper_net(eng), img, boxes, stats, [0.0])
    inside = np.zeros(img.shape[:2], bool)
    for y0, x0, y1, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    assert 0.05 < batched[inside].mean() < 0.95 and not (batched | loop)[~inside].any()
    assert (loop[inside] == batched[inside]).mean() > 0.99  # only fp32 rounding at the threshold


def _split_threshold(probs: np.ndarray) -> float:
    """A threshold in the widest gap between output values that leaves 10-90 % above it."""
    values = np.sort(probs.ravel())
    lo, hi = int(0.1 * len(values)), int(0.9 * len(values))
    i = lo + int(np.argmax(np.diff(values[lo:hi])))
    return float(values[i] + values[i + 1]) / 2


def test_missing_model_is_a_clear_error(dsb_dir, tmp_path):
    with pytest.raises(SystemExit, match="model file not found"):
        bench_inference.main(["--data", str(dsb_dir), "--model", str(tmp_path / "nope.pt"),
                              "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
