"""The CUDA path: same results as the CPU, batched equals per-crop, training and NCCL run.

Skipped on machines without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_subset, first_stems, make_tiny_model, random_boxes
from napari_segthenseg.engine import Engine, ImageSource, fuse, load_model
from trainer.metrics import scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return scores(a, b)["dsc"]


def test_cuda_fp32_matches_cpu(default_model, dsb_image):
    image, labels = dsb_image
    cpu = Engine(default_model, device="cpu").segment(image)
    gpu = Engine(default_model, device="cuda", amp=False).segment(image)
    assert gpu.mask.shape == cpu.mask.shape
    # Convolution algorithms differ between devices, so allow float noise, not different results.
    assert np.abs(gpu.probs.shape[0] - cpu.probs.shape[0]) <= 1
    assert _dice(gpu.mask, cpu.mask) > 0.995


def test_cuda_half_precision_holds_accuracy(default_model, dsb_image):
    image, labels = dsb_image
    gt = labels > 0
    fp32 = Engine(default_model, device="cuda", amp=False).segment(image)
    half = Engine(default_model, device="cuda").segment(image)  # amp is the GPU default
    assert _dice(half.mask, fp32.mask) > 0.99
    assert abs(_dice(half.mask, gt) - _dice(fp32.mask, gt)) < 0.01


def test_cuda_batched_refine_equals_per_crop_and_lazy(dsb_image):
    image, _ = dsb_image
    engine = Engine(make_tiny_model(size=32), device="cuda", amp=False)
    res = engine.segment(image)
    assert len(res.boxes) > 0
    one_by_one = np.concatenate([engine.refine(image, b[None], res.stats) for b in res.boxes])
    np.testing.assert_allclose(res.probs, one_by_one, atol=1e-4)

    class Lazy:  # an array-like that is not an ndarray: read window by window
        shape, dtype, ndim = image.shape, image.dtype, image.ndim

        def __getitem__(self, key):
            return image[key]

    src = ImageSource(Lazy())
    assert src.lazy
    lazy = engine.segment(src)
    np.testing.assert_array_equal(lazy.boxes, res.boxes)
    np.testing.assert_allclose(lazy.probs, res.probs, atol=1e-4)


@pytest.mark.parametrize("launcher", ["plain", "torchrun-nccl"])
def test_cuda_training_runs_and_loads(dsb_dir: Path, tmp_path: Path, launcher: str):
    data = copy_subset(dsb_dir, tmp_path / "data", first_stems(dsb_dir, 6, 2))
    out = tmp_path / "run"
    args = ["-m", "trainer", str(data), "--out", str(out), "--device", "cuda", "--size", "32",
            "--width", "4", "--depth", "2", "--batch-size", "2", "--epochs", "2", "--fine-epochs", "2"]
    if launcher == "torchrun-nccl":  # one GPU here: a world of one still goes through NCCL and DDP
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]
    res = subprocess.run([sys.executable, *args], env={**os.environ}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cuda" in res.stderr
    if launcher == "torchrun-nccl":
        assert "(DDP, nccl)" in res.stderr
    model = load_model(out / "model.pt")
    assert model.rough is not None and model.fine is not None
    assert model.settings.notes["world_size"] == 1


def test_cuda_batched_fusion_equals_cpu_box_by_box():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(20, 700, 2))
        nb = int(rng.integers(1, 60))
        boxes = random_boxes(rng, h, w, nb)
        probs = rng.random((nb, 64, 64), dtype=np.float32)
        gpu = fuse(probs, boxes, (h, w), device="cuda")
        cpu = fuse(probs, boxes, (h, w), batched=False)
        assert (gpu != cpu).sum() <= 2
