"""``segthenseg-demo``: opens napari with the plugin, runs, saves a full-window screenshot, exits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_tiny_model
from napari_segthenseg.engine import save_model
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


# The bundled model, as a clone without one (e.g. a package built without it) would see it: gone.
WITHOUT_BUNDLED_MODEL = """
import sys
from pathlib import Path
import napari_segthenseg.engine as engine
import napari_segthenseg.engine.modelfile as modelfile
absent = lambda: Path(sys.argv[1]) / "absent.pt"
modelfile.bundled_model_path = engine.bundled_model_path = absent
from napari_segthenseg.plugin import demo
sys.exit(demo.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb)")
def test_demo_without_default_model_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-c", WITHOUT_BUNDLED_MODEL, str(tmp_path), "--run", "--screenshot",
                          str(tmp_path / "x.png")], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 1
    assert "no default model is installed" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x.png").exists()


def test_what_the_user_named_is_checked_before_napari_starts(tmp_path):
    """A folder without model.pt, a screenshot under a file, a missing device or image: one line, exit 2,
    no other model, nothing written (no X server needed: napari never starts)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--model", str(tmp_path)], f"cannot load model {tmp_path}: {tmp_path} is a folder without a "),
        (["--model", str(tmp_path / "gone.pt")], "model file not found"),
        (["--screenshot", str(a_file / "x.png")], f"--screenshot: {a_file} is a file, not a folder"),
        (["--device", "tpu"], "device 'tpu' is not available here"),
        ([str(tmp_path / "gone.png")], "image not found"),
    ]
    for args, message in cases:
        shot = [] if "--screenshot" in args else ["--screenshot", str(tmp_path / "shot.png")]
        out = _demo(*args, "--run", *shot)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segthenseg-demo: error: "), args
        assert message in lines[0], args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and a_file.read_text() == "x"


def test_a_run_folder_is_its_model(tmp_path):
    from napari_segthenseg.plugin.demo import check_args

    run = tmp_path / "run"
    run.mkdir()
    save_model(make_tiny_model(size=32), run / "model.pt")
    key, model = check_args(build_parser().parse_args(["--model", str(run)]))
    assert key == str(run / "model.pt") and model.settings.size == 32


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb)")
def test_an_unreadable_image_is_one_line_and_no_window(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a PNG")
    out = _demo(str(fake), "--run", "--screenshot", str(tmp_path / "shot.png"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"segthenseg-demo: error: napari cannot open {fake}: ")
    assert "Traceback" not in out.stderr and not (tmp_path / "shot.png").exists()


def test_help_shows_defaults():
    text = " ".join(build_parser().format_help().split())
    assert "(default: auto)" in text and "(default: 300)" in text
