"""``torchrun --nproc_per_node=2`` (gloo on the CPU): one run, data sharded, only rank 0 writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import copy_subset, first_stems
from napari_segthenseg.engine import load_model


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_torchrun_two_cpu_processes(dsb_dir: Path, tmp_path: Path):
    data = copy_subset(dsb_dir, tmp_path / "data", first_stems(dsb_dir, 6, 1))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", str(data), "--out", str(out), "--device", "cpu", "--size", "32", "--width", "4",
           "--depth", "2", "--batch-size", "2", "--epochs", "2", "--fine-epochs", "2"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 2 x 2 process(es), cpu (DDP, gloo)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "metrics.csv",
                                                     "model.pt", "splits.json", "train.log"]
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("rough", "1"), ("rough", "2"), ("fine", "1"),
                                                         ("fine", "2")]  # one row per epoch, not per rank
    assert all(r["train_items"] == "6" for r in rows)  # 5 training images + 1 sampler pad, over both ranks
    log = (out / "train.log").read_text()
    assert log.count("wrote ") == 1 and log.count("rough epoch 1/2") == 1
    model = load_model(out / "model.pt")
    assert model.rough is not None and model.fine is not None
    assert model.settings.notes["world_size"] == 2
