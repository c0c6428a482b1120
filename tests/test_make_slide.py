"""benchmarks/make_slide.py: the asked coverage is reached with the bundled fields (reused as often as
needed) or refused; the defaults stay inside the repository; every option says what it does."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tifffile

from conftest import BUNDLED_DSB, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import make_slide  # noqa: E402


@pytest.fixture(scope="module")
def fields() -> list[make_slide.Field]:
    return make_slide.load_fields(BUNDLED_DSB)


@pytest.mark.parametrize("size", [10240, 20480])
def test_a_handful_of_fields_reaches_the_asked_coverage(fields, size):
    assert len(fields) == 7  # the bundled fluorescence fields
    placed = make_slide.layout(fields, size, 0.3, 16, 2022)
    covered = sum(p[5] * p[6] for p in placed) / size**2
    assert covered >= make_slide.REACHED * 0.3
    y, x, h, w = np.array([p[3:7] for p in placed]).T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= size).all() and (x + w <= size).all()
    apart = ((y[:, None] + h[:, None] <= y) | (y + h <= y[:, None]) |
             (x[:, None] + w[:, None] <= x) | (x + w <= x[:, None]))
    np.fill_diagonal(apart, True)
    assert apart.all()  # no two fields overlap


def test_dense_tissue_packs_touching_fields_cut_to_their_rows(fields):
    placed = make_slide.layout(fields, 4096, 0.95, 0, 2022, tissue="full")
    y, x, h, w, oy, ox = np.array([p[3:9] for p in placed]).T
    assert (h * w).sum() / 4096**2 >= 0.95
    assert (x + w <= 4096).all() and (y + h <= 4096).all() and (oy >= 0).all() and (ox >= 0).all()
    shapes = np.array([fields[i].image.shape[::(-1 if k % 2 else 1)] for i, k, *_ in placed])
    assert (oy + h <= shapes[:, 0]).all() and (ox + w <= shapes[:, 1]).all()
    canvas = np.zeros((4096, 4096), np.uint8)
    for yy, xx, hh, ww in zip(y, x, h, w, strict=True):
        canvas[yy:yy + hh, xx:xx + ww] += 1
    assert canvas.max() == 1  # touching, never overlapping


def test_a_small_slide_is_written_at_the_asked_coverage(tmp_path, capsys):
    out = tmp_path / "s.ome.tif"
    assert make_slide.main(["--size", "2048", "--coverage", "0.3", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["coverage"] >= make_slide.REACHED * 0.3 and info["size"] == 2048
    gt = tifffile.imread(tmp_path / "s_gt.tif")
    assert gt.shape == (2048, 2048) and gt.any()
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].shape == (2048, 2048)


def test_a_coverage_out_of_reach_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "s.ome.tif"
    assert make_slide.main(["--size", "4096", "--coverage", "0.9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "coverage 0.9 cannot be reached on a 4096 px slide" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_defaults_stay_in_the_repository_and_every_option_has_help():
    parser = make_slide.build_parser()
    data = parser.parse_args(["--out", "x.ome.tif"]).data
    assert data.resolve().is_relative_to(REPO) and (data / "manifest.csv").is_file()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
