"""napari discovers the plugin through its npe2 manifest, and the manifest validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_manifest_is_one_regular_file_in_the_package():
    """A symlink would be a text file in a Windows checkout, and napari would find no plugin."""
    manifest = REPO / "src" / "napari_segthenseg" / "napari.yaml"
    assert manifest.is_file() and not manifest.is_symlink()
    assert not (REPO / "napari.yaml").exists()
    mode = subprocess.run(["git", "ls-files", "-s", "src/napari_segthenseg/napari.yaml"], cwd=REPO,
                          capture_output=True, text=True).stdout.split()
    assert not mode or mode[0] == "100644"  # tracked as a plain file (120000 would be a link)


def test_napari_plugin_manager_finds_the_contributions():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-segthenseg")
    contrib = mf.contributions
    assert [w.display_name for w in contrib.widgets] == ["Segment-then-Segment"]
    assert [s.key for s in contrib.sample_data] == ["nuclei"]
    from napari_segthenseg.engine.reader import TIFF_EXTENSIONS
    from napari_segthenseg.plugin.fileio import LABEL_SUFFIXES

    assert [r.filename_patterns for r in contrib.readers] == [["*.boxes.csv"],
                                                              [f"*{s}" for s in LABEL_SUFFIXES],
                                                              ["*.geojson"],
                                                              [f"*{e}" for e in TIFF_EXTENSIONS]]
    assert [w.filename_extensions for w in contrib.writers] == [[".boxes.csv"], [".ome.zarr", ".zarr"],
                                                                [".geojson"], [".geojson"]]
    assert [w.layer_types for w in contrib.writers] == [["shapes"], ["labels"], ["shapes"], ["labels"]]


def test_npe2_validate_passes():
    npe2_cli = Path(sys.executable).with_name("npe2")
    cmd = [str(npe2_cli)] if npe2_cli.exists() else [sys.executable, "-m", "npe2"]
    out = subprocess.run([*cmd, "validate", "napari-segthenseg"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_widget_and_sample_open_through_the_manifest(make_napari_viewer):
    from napari_segthenseg.plugin.widget import SegThenSegWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segthenseg", "Segment-then-Segment")
    assert isinstance(widget, SegThenSegWidget) and widget.image.value is None
    [layer] = viewer.open_sample("napari-segthenseg", "nuclei")
    assert layer.rgb and layer.data.shape == (520, 696, 3) and layer.data.dtype == "uint8"
    assert widget.image.value is layer  # the panel follows the layer list
