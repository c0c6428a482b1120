"""segthenseg-predict goes on with a slide killed during its fine pass: same model and options only,
finished chunks kept, the rest done, the result the one an uninterrupted run writes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_segthenseg.cli.predict import main
from napari_segthenseg.engine import omezarr
from napari_segthenseg.engine import slide as engine_slide
from napari_segthenseg.engine.journal import load_journal
from test_slide import fields_canvas

ARGS = ["--model", "default", "--format", "ome-zarr", "--chunk", "256", "--rough-scale", "4",
        "--threads", "1"]


@pytest.fixture(scope="module")
def slide(dsb_dir, tmp_path_factory, default_model):
    path = tmp_path_factory.mktemp("resume") / "canvas.ome.tif"
    canvas = fields_canvas(dsb_dir)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(canvas, tile=(128, 128), metadata={"axes": "YX"}, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def uninterrupted(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main([str(slide), "--out", str(out), *ARGS]) == 0
    return np.asarray(omezarr.open_label_image(out / "canvas_mask.ome.zarr").levels[0][:])


class Killed(Exception):
    pass


def chunk_tasks(monkeypatch, fail_after: int | None = None) -> list[tuple]:
    """The regions the chunk tasks ran for; with ``fail_after`` the next task raises (a kill)."""
    calls: list[tuple] = []
    task = engine_slide.run_chunk

    def spy(job, region, *args):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed(f"killed after {fail_after} chunks")
        calls.append(tuple(region))
        return task(job, region, *args)

    monkeypatch.setattr(engine_slide, "run_chunk", spy)
    return calls


def kill(slide, out, monkeypatch, after: int, *extra: str):
    chunk_tasks(monkeypatch, fail_after=after)
    with pytest.raises(Killed):
        main([str(slide), "--out", str(out), *ARGS, *extra])
    monkeypatch.undo()
    journal = load_journal(out / ".canvas_mask.ome.zarr.scratch" / "journal")
    assert journal is not None and (out / ".canvas_mask.ome.zarr.partial").is_dir()
    return journal


def test_a_killed_slide_goes_on_where_it_stopped(slide, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    journal = kill(slide, out, monkeypatch, 10)
    remaining = journal.remaining()
    assert 0 < len(journal.done) and len(remaining) > 0
    calls = chunk_tasks(monkeypatch)
    assert main([str(slide), "--out", str(out), *ARGS]) == 0
    err = capsys.readouterr().err
    done, total = len(journal.done), len(journal.done) + len(remaining)
    assert f"going on where an interrupted run stopped with the same model and options ({done} of {total} " \
           "chunks done)" in err
    assert "removed unfinished" not in err
    assert sorted(calls) == sorted(remaining)  # only the chunks that were not final, each once
    seg = np.asarray(omezarr.open_label_image(out / "canvas_mask.ome.zarr").levels[0][:])
    assert np.array_equal(seg, uninterrupted)
    assert not list(out.glob(".*"))  # the journal and scratch folder went with the run


def test_a_killed_slide_with_other_options_starts_over(slide, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    kill(slide, out, monkeypatch, 3)
    calls = chunk_tasks(monkeypatch)
    assert main([str(slide), "--out", str(out), *ARGS[:-4], "--rough-scale", "5", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "removed unfinished outputs of an interrupted run" in err and "going on" not in err
    assert len(calls) > 3 and not list(out.glob(".*"))
    kill(slide, out, monkeypatch, 3, "--overwrite")  # --overwrite starts over too
    calls = chunk_tasks(monkeypatch)
    assert main([str(slide), "--out", str(out), *ARGS, "--overwrite"]) == 0
    assert "going on" not in capsys.readouterr().err
    seg = np.asarray(omezarr.open_label_image(out / "canvas_mask.ome.zarr").levels[0][:])
    assert np.array_equal(seg, uninterrupted)
