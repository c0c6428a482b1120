"""Correct, then fine-tune in the widget (under Xvfb): paint a correction, add the image to a training
folder in the trainer's layout, fine-tune a tiny model for a few steps in a worker; the new model is
selected and the image segmented with it. Slide windows and the training folder without Qt."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import make_tiny_model
from napari_segthenseg.engine import Engine, save_model
from napari_segthenseg.engine.integrity import file_sha256
from napari_segthenseg.plugin.boxtable import BoxTable
from napari_segthenseg.plugin.training import (
    MAX_WINDOW,
    Piece,
    TrainingSet,
    TrainingSetError,
    join_windows,
    slide_pieces,
)
from napari_segthenseg.plugin.widget import SegThenSegWidget
from trainer.data import load_samples

PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return save_model(make_tiny_model(size=32), tmp_path / "tiny.pt")


def test_paint_add_fine_tune_and_the_new_model_is_used(make_napari_viewer, qtbot, dsb_image, tiny_file,
                                                      tmp_path):
    img, _ = dsb_image
    viewer = make_napari_viewer()
    viewer.add_image(img, name="cells")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, SegThenSegWidget) and widget.load_model_file(tiny_file)
    used: list[object] = []

    def spying_engine(model, device):
        used.append(model)
        return Engine(model, device)

    widget.make_engine = spying_engine
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60000)
    seg = widget._session.seg_layer
    # the user's correction: paint one nucleus as a new object, erase another spot
    seg.brush_size = 9
    seg.paint((40, 60), 77)
    seg.paint((200, 150), 0)
    painted = np.asarray(seg.data).copy()
    assert (painted == 77).sum() > 20

    widget.training_folder = tmp_path / "training"
    assert widget.add_to_training_set() == ["cells"]
    folder = tmp_path / "training"
    assert json.loads((folder / "splits.json").read_text()) == {"train": ["cells"]}
    assert np.array_equal(iio.imread(folder / "images" / "cells.png"), img)
    assert np.array_equal(iio.imread(folder / "masks" / "cells.png"), painted)
    (sample,) = load_samples(folder, "train")  # the trainer reads it back as it was written
    assert np.array_equal(sample.mask, painted > 0)
    assert "1 image(s)" in widget.training_info.value

    old_key = widget._model_key
    used.clear()
    widget.fine_tune_options = {"epochs": 2, "fine_epochs": 1, "batch_size": 2}
    widget.finetune_minutes.value = 1.0
    widget.fine_tune()
    assert widget.busy and widget.status.value.startswith("fine-tune")
    qtbot.waitUntil(lambda: widget._model_key != old_key and bool(used) and not widget.busy, timeout=120000)
    new_key = widget._model_key
    run = Path(new_key).parent
    assert run.parent == tmp_path / "training-models" and (run / "train.log").is_file()
    model = widget.current_model
    assert model.settings.notes["parent"]["sha256"] == file_sha256(tiny_file)
    assert model.settings.notes["images"] == 1 and "fine-tuned from" in widget.model_info.value
    assert used == [model]  # the image was segmented again, with the new model
    choices = widget.model.choices
    assert old_key in choices and new_key in choices  # the previous model stays selectable
    assert widget._session.alive(widget._session.seg_layer)


def test_fine_tune_without_a_training_set_says_what_to_do(make_napari_viewer, dsb_image, tiny_file, capsys):
    viewer = make_napari_viewer()
    viewer.add_image(dsb_image[0], name="cells")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert widget.load_model_file(tiny_file)
    widget.fine_tune()
    assert not widget.busy and widget._session is None
    assert "training set is empty" in capsys.readouterr().out
    widget._ask_training_folder = lambda: pytest.fail("asked for a folder with nothing to add")
    widget._prepare()
    assert widget.add_to_training_set() is None  # no Run yet: nothing to add
    assert "nothing to add yet" in capsys.readouterr().out


def test_training_set_grows_and_a_readded_image_replaces_itself(tmp_path):
    ts = TrainingSet(tmp_path / "t")
    image = np.zeros((40, 50, 3), np.uint8)
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 5:15] = 3
    assert ts.add([Piece("a", image, labels)]) == (["a"], [])
    assert ts.add([Piece("b", image.astype(np.float32), labels)]) == (["b"], [])  # float: TIFF
    assert ts.add([Piece("a", image, labels * 0)]) == ([], ["a"])
    assert ts.stems() == ["a", "b"] and len(ts) == 2
    assert sorted(p.name for p in (tmp_path / "t" / "images").iterdir()) == ["a.png", "b.tif"]
    assert ts.models_folder() == tmp_path / "t-models"
    assert ts.new_run("default").parent == tmp_path / "t-models"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TrainingSetError, match="holds other files"):
        TrainingSet(other).add([Piece("a", image, labels)])


def test_slide_windows_surround_the_edited_boxes_and_never_the_whole_slide():
    hw = (5000, 6000)
    table = BoxTable(np.array([[100, 100, 120, 130], [3000, 3000, 3040, 3030], [4000, 10, 4010, 20]]))
    table.edit(changed={1: np.array([3010, 3000, 3050, 3030])}, added=np.array([[3100, 3100, 3130, 3120]]))
    edited = table.edited()
    assert sorted(map(tuple, edited.tolist())) == [(3010, 3000, 3050, 3030), (3100, 3100, 3130, 3120)]
    windows = join_windows(edited, hw)
    assert windows == [(2946, 2936, 3194, 3184)]  # 64 px of context, the two joined
    assert join_windows(np.array([[0, 0, 10, 10], [0, 2100, 10, 2110]]), hw) == [
        (0, 0, 74, 74), (0, 2036, 74, 2174)]  # apart: two windows
    far = join_windows(np.array([[0, 0, 10, 10], [0, 100, 10, 110], [0, 2000, 10, 2010]]), hw, max_side=500)
    assert all(max(y1 - y0, x1 - x0) <= MAX_WINDOW for y0, x0, y1, x1 in far)

    label = np.zeros(hw, np.uint32)
    label[3012:3048, 3002:3028] = 5
    image = np.arange(hw[0] * hw[1], dtype=np.uint32).reshape(hw).astype(np.uint16)
    session = SimpleNamespace(slide=SimpleNamespace(label=SimpleNamespace(levels=[label])), table=table,
                              plane=SimpleNamespace(hw=hw, lead=()), data=[image],
                              image_layer=SimpleNamespace(name="slide"), view_of=lambda: (0, 0, 5000, 6000))
    (piece,) = slide_pieces(session)
    assert piece.stem == "slide_y2946_x2936_248x248"
    assert np.array_equal(piece.image, image[2946:3194, 2936:3184])
    assert np.array_equal(piece.labels, label[2946:3194, 2936:3184]) and piece.labels.max() == 5
    session.table = BoxTable(table.all())  # nothing edited, and the whole slide on screen
    with pytest.raises(TrainingSetError, match="zoom in"):
        slide_pieces(session)
    session.view_of = lambda: (1000, 1000, 1500, 1600)  # zoomed in: the view is the window
    (piece,) = slide_pieces(session)
    assert piece.image.shape == (500, 600)
