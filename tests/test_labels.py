"""Instance labels chunk by chunk (slides): the same objects as labelling the whole mask at once, and local
relabelling after an edit that keeps every other object's id."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from napari_segthenseg.engine.boxes import label_objects
from napari_segthenseg.engine.labels import relabel_chunked, relabel_region
from napari_segthenseg.engine.progress import drive


def blobs(shape=(300, 340), n=60, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for y, x, h, w in zip(rng.integers(0, shape[0] - 10, n), rng.integers(0, shape[1] - 10, n),
                          rng.integers(1, 40, n), rng.integers(1, 30, n), strict=True):
        mask[y:y + h, x:x + w] = True
    mask[50, 99], mask[51, 100] = True, True  # touch diagonally across a 100 px chunk corner
    mask[49, 98] = mask[52, 101] = False
    return mask


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the foreground into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


@pytest.mark.parametrize("chunk", [64, 100, 1000])
def test_chunked_labels_are_the_objects_of_the_whole_mask(chunk):
    mask = blobs()
    store = zarr.zeros(mask.shape, chunks=(chunk, chunk), dtype=np.uint32)
    store[:] = mask.astype(np.uint32)
    n = drive(relabel_chunked(store, chunk))
    got = np.asarray(store[:])
    ref = label_objects(mask)
    assert n == ref.max() > 20 and got.max() == n
    assert same_objects(got, ref)
    assert set(np.unique(got)) == set(range(n + 1))  # ids 1..n, no gaps


def test_an_edit_relabels_only_what_it_touches():
    mask = blobs(seed=3)
    labels = label_objects(mask).astype(np.uint32)
    edited = mask.copy()
    region = (100, 120, 180, 220)
    y0, x0, y1, x1 = region
    rng = np.random.default_rng(0)
    edited[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.7  # split, join, remove and add objects
    store = labels.copy()
    store[y0:y1, x0:x1] = edited[y0:y1, x0:x1]  # what the chunked output writes: 0/1
    next_id, _ = relabel_region(store, region, int(labels.max()) + 1, margin=4)
    assert same_objects(store, label_objects(edited))
    # objects away from the region keep their ids
    near = np.zeros(mask.shape, bool)
    near[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = True
    touched = np.unique(label_objects(edited)[near])
    away = ~np.isin(label_objects(edited), touched) & edited
    np.testing.assert_array_equal(store[away], labels[away])
    assert next_id > labels.max() and store.max() < next_id


def test_a_long_object_through_the_region_keeps_one_id():
    mask = np.zeros((100, 400), bool)
    mask[40:45, 5:395] = True  # much longer than the margin
    labels = label_objects(mask).astype(np.uint32)
    store = labels.copy()
    store[30:60, 200:210] = 0  # cut it in two
    relabel_region(store, (30, 200, 60, 210), 2, margin=8)
    left, right = store[42, 100], store[42, 300]
    assert left != right and {int(left), int(right)} == {1, 2}
    store[30:60, 200:210] = 0
    store[42, 200:210] = 1  # join it again
    relabel_region(store, (30, 200, 60, 210), 3, margin=8)
    assert len(np.unique(store[store > 0])) == 1 and ndimage.label(store > 0)[1] == 1
