"""Data folders: reading, splits, up-front validation with errors that name the file, and content checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from trainer.data import (
    DataError,
    check_has_both_classes,
    fingerprint,
    fingerprint_changes,
    image_stems,
    list_images,
    load_samples,
    load_splits,
    load_stems,
    read_image,
    read_mask,
    scan_stems,
    shared_images,
)


def make_folder(root: Path, n: int = 4, size: tuple[int, int] = (24, 30)) -> Path:
    """``n`` RGB png images with instance-label masks (label 0..2)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        iio.imwrite(root / "images" / f"im{i:02d}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        iio.imwrite(root / "masks" / f"im{i:02d}.png", rng.integers(0, 3, size, dtype=np.uint8))
    return root


def test_formats_and_dtypes(tmp_path):
    g16 = np.arange(20 * 25, dtype=np.uint16).reshape(20, 25) * 50
    tifffile.imwrite(tmp_path / "a.tif", g16)
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0] = 200
    iio.imwrite(tmp_path / "b.png", rgba)
    iio.imwrite(tmp_path / "c.jpg", np.full((16, 16, 3), 128, np.uint8))
    a = read_image(tmp_path / "a.tif")
    assert a.dtype == np.uint16 and np.array_equal(a, g16)
    b = read_image(tmp_path / "b.png")
    assert b.shape == (8, 9, 3) and b[0, 0, 0] == 200  # alpha dropped
    assert read_image(tmp_path / "c.jpg").shape == (16, 16, 3)
    labels = np.array([[0, 5], [300, 0]], np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", labels)
    assert np.array_equal(read_mask(tmp_path / "m.tif"), labels > 0)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 5, 8, 8), np.uint8))
    with pytest.raises(DataError, match="stack.tif: a stack"):
        read_image(tmp_path / "stack.tif")


def test_load_all_samples(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    samples = load_samples(root, None)
    assert [s.stem for s in samples] == ["im00", "im01", "im02"]
    s = samples[1]
    assert s.image.shape == (24, 30, 3) and s.image.dtype == np.uint8
    assert s.mask.dtype == bool and s.mask.shape == (24, 30)
    raw = iio.imread(root / "masks" / "im01.png")
    assert np.array_equal(s.mask, raw > 0)


def test_seeded_split_without_splits_json(tmp_path):
    root = make_folder(tmp_path / "d", n=20, size=(8, 8))
    sp = load_splits(root)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [16, 2, 2]
    everything = sp["train"] + sp["val"] + sp["test"]
    assert sorted(everything) == [f"im{i:02d}" for i in range(20)]
    assert load_splits(root) == sp  # same seed, same split
    assert load_splits(root, seed=1) != sp
    assert [s.stem for s in load_samples(root, "val")] == sp["val"]


def test_splits_json_subset_and_errors(tmp_path):
    root = make_folder(tmp_path / "d", n=4, size=(8, 8))
    (root / "splits.json").write_text(json.dumps({"train": ["im00", "im01"], "val": ["im03"]}))
    assert load_splits(root) == {"train": ["im00", "im01"], "val": ["im03"]}
    assert [s.stem for s in load_samples(root, "val")] == ["im03"]
    with pytest.raises(DataError, match="no split 'test'; available: train, val"):
        load_samples(root, "test")
    (root / "splits.json").write_text(json.dumps({"val": ["im03", "nope"]}))
    with pytest.raises(DataError, match="splits.json.*'nope'"):
        load_splits(root)
    (root / "splits.json").write_text("{train: ")
    with pytest.raises(DataError, match="splits.json.*JSON"):
        load_splits(root)


def test_problems_name_the_files_before_anything_loads(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    (root / "masks" / "im01.png").unlink()
    iio.imwrite(root / "masks" / "im02.png", np.zeros((10, 10), np.uint8))
    (root / "images" / "im03.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        load_samples(root, None)
    msg = str(info.value)
    assert msg.startswith("3 problem(s)")
    assert "im01.png: no mask" in msg
    assert "im02.png: mask is 10x10 but image im02.png is 24x30" in msg
    assert "im03.png: cannot read image" in msg


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="images"):
        load_samples(tmp_path, None)
    root = make_folder(tmp_path / "d", n=1)
    tifffile.imwrite(root / "images" / "im00.tif", np.zeros((24, 30), np.uint8))
    with pytest.raises(DataError, match="im00.tif.*same name"):
        load_samples(root, None)


def test_list_images(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    (root / "images" / "notes.txt").write_text("x")
    one = root / "masks" / "im00.png"
    assert list_images([root / "images", one]) == [root / "images" / "im00.png",
                                                   root / "images" / "im01.png", one]
    with pytest.raises(DataError, match="missing.png: no such file"):
        list_images([tmp_path / "missing.png"])


def test_real_dsb2018_val(dsb_dir):
    ids = json.loads((dsb_dir / "splits.json").read_text())["val"]
    samples = load_samples(dsb_dir, "val")
    assert [s.stem for s in samples] == ids
    for s in samples[:5]:
        assert s.mask.dtype == bool and s.mask.shape == s.image.shape[:2] and s.mask.any()


def test_content_checks_and_fingerprints(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    (root / "images" / "im03.png").write_bytes((root / "images" / "im00.png").read_bytes())
    assert image_stems(root) == ["im00", "im01", "im02", "im03"]
    infos = scan_stems(root, ["im00", "im01", "im02", "im03"])
    assert [i.stem for i in infos] == ["im00", "im01", "im02", "im03"] and infos[0].hw == (24, 30)
    assert infos[3].image == infos[0].image and infos[1].image != infos[0].image  # same pixels
    notes = shared_images({"train": infos[:2], "val": infos[1:]}, "train")
    assert notes == ["1 image(s) of 'val' are also in 'train' (same stem), e.g. im01",
                     "1 image(s) of 'val' have the same pixels as one in 'train', e.g. im03 = im00"]
    check_has_both_classes(infos, "x")
    empty = [dataclasses.replace(i, foreground=0) for i in infos]
    with pytest.raises(DataError, match="all 4 masks of the training images are empty"):
        check_has_both_classes(empty, "the training images")
    full = [dataclasses.replace(i, foreground=i.hw[0] * i.hw[1]) for i in infos]
    with pytest.raises(DataError, match="completely foreground"):
        check_has_both_classes(full, "x")
    fp = fingerprint({"train": infos[:3], "select": infos[3:]})
    assert fingerprint_changes(fp, fingerprint({"train": infos[:3], "select": infos[3:]})) == []
    changed = dataclasses.replace(infos[1], mask="0" * 64)
    now = fingerprint({"train": [infos[0], changed], "select": infos[3:]})
    assert fingerprint_changes(fp, now) == ["train images (3 then, 2 now): 1 gone (e.g. im02), "
                                            "1 changed (e.g. im01)"]


def test_scan_reports_bad_files_like_load(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    (root / "images" / "im02.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"(?s)1 problem.*im02.png: cannot read image"):
        scan_stems(root, ["im00", "im02"])
    with pytest.raises(DataError, match="no image for 1 stem"):
        load_stems(root, ["im00", "nope"])
