"""The wheel carries the npe2 manifest and console scripts, and a wheel install is discoverable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # No build isolation: nothing is downloaded; setuptools comes from the [dev] extra.
    env = dict(os.environ, TMPDIR=str(build))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, env=env, cwd=build)
    return next(out.glob("napari_segthenseg-*.whl"))


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = z.read("napari_segthenseg/napari.yaml").decode()
        manifest_mode = z.getinfo("napari_segthenseg/napari.yaml").external_attr >> 16
        eps = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert manifest == (REPO / "src" / "napari_segthenseg" / "napari.yaml").read_text()
    assert not stat.S_ISLNK(manifest_mode)  # a regular file in the wheel, not a link
    assert "napari_segthenseg/engine/pipeline.py" in names and "trainer/__init__.py" in names
    assert "napari-segthenseg = napari_segthenseg:napari.yaml" in eps
    for script in ("segthenseg-train", "segthenseg-eval", "segthenseg-predict", "segthenseg-demo"):
        assert script in eps


def test_wheel_install_is_found_by_npe2(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True)
    code = (
        "import napari_segthenseg, npe2; from importlib.metadata import distribution;"
        f"assert napari_segthenseg.__file__.startswith({str(site)!r}), napari_segthenseg.__file__;"
        "m = npe2.PluginManifest.from_distribution('napari-segthenseg');"
        "print(m.name, len(m.contributions.widgets or []))"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    name, n_widgets = out.stdout.split()
    assert name == "napari-segthenseg" and int(n_widgets) >= 1


def test_engine_and_trainer_import_no_gui():
    """The engine and the trainer stay usable on headless servers: no napari or Qt import."""
    code = ("import sys, napari_segthenseg.engine, trainer.train, napari_segthenseg.cli.evaluate,"
            " napari_segthenseg.cli.predict;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'napari', 'qtpy', 'PyQt6', 'PySide6', 'magicgui', 'vispy'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
