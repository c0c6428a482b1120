"""``segthenseg-demo``: opens napari with the plugin, runs, saves a full-window screenshot, exits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_tiny_model
from napari_segthenseg.engine import bundled_model_path, save_model
from napari_segthenseg.plugin.demo import build_parser


def _demo(*args: str) -> subprocess.CompletedProcess:
    # pytest-xvfb has set DISPLAY for this process; the child uses the same virtual screen
    return subprocess.run([sys.executable, "-m", "napari_segthenseg.plugin.demo", *args], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_parser():
    a = build_parser().parse_args(["img.png", "--run", "--screenshot", "x.png"])
    assert (a.image, a.run, a.screenshot, a.model) == ("img.png", True, "x.png", "default")


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb)")
def test_demo_runs_and_saves_a_screenshot(dsb_dir, tmp_path):
    from imageio.v3 import imread

    model = save_model(make_tiny_model(size=32), tmp_path / "tiny.pt")
    image = sorted((dsb_dir / "images").glob("*.png"))[0]
    shot = tmp_path / "shot.png"
    out = _demo(str(image), "--model", str(model), "--run", "--screenshot", str(shot))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "boxes" in out.stdout and "Traceback" not in out.stderr
    png = imread(shot)
    assert png.shape[0] >= 400 and png.shape[1] >= 800 and np.ptp(png[..., :3]) > 0


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb)")
@pytest.mark.skipif(bundled_model_path().is_file(), reason="a default model is installed")
def test_demo_without_default_model_says_so(tmp_path):
    out = _demo("--run", "--screenshot", str(tmp_path / "x.png"))
    assert out.returncode == 1
    assert "no default model is installed" in out.stderr and "Traceback" not in out.stderr
