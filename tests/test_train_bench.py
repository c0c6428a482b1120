"""``benchmarks/bench_train.py`` runs and reports a time split that adds up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_smoke(dsb_dir: Path, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--data", str(dsb_dir), "--images", "4", "--size", "32", "--width", "4",
                       "--depth", "2", "--batch-size", "2", "--batches", "2", "--warmup", "1",
                       "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["one_off"]["images"] == 4
    for stage in ("rough", "fine"):
        s = r["stages"][stage]
        assert s["items"] == 4 and s["images_per_s"] > 0
        assert sum(s["share"].values()) == pytest.approx(1.0, abs=0.01)
