"""The slide's box table: region queries, edits by id, undo."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segthenseg.plugin.boxtable import BoxTable


def random_boxes(n=2000, hw=(5000, 6000), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, hw[0] - 100, n), rng.integers(0, hw[1] - 100, n)
    side = rng.integers(8, 90, n)
    return np.stack([y0, x0, y0 + side, x0 + side + rng.integers(0, 9, n)], 1)


def brute(boxes, region):
    y0, x0, y1, x1 = region
    return np.flatnonzero((boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0))


def test_region_queries_find_exactly_the_overlapping_boxes():
    boxes = random_boxes()
    table = BoxTable(boxes)
    np.testing.assert_array_equal(table.all(), boxes)
    for region in [(0, 0, 5000, 6000), (1000, 2000, 1300, 2400), (4990, 0, 5000, 50), (0, 0, 1, 1)]:
        ids, got = table.in_region(region)
        assert sorted(ids.tolist()) == brute(boxes, region).tolist()
        np.testing.assert_array_equal(got, boxes[ids])


def test_edits_keep_ids_and_undo_restores():
    boxes = random_boxes(50)
    table = BoxTable(boxes)
    edit = table.edit(removed=[3, 7], changed={10: [100, 100, 150, 150], 11: boxes[11]},
                      added=[[0, 0, 20, 20]])
    assert edit.removed_ids.tolist() == [3, 7, 10] and edit.added_ids.tolist() == [10, 50]
    assert len(table) == 49 and table.next_id == 51
    expected = [[100, 100, 150, 150], [0, 0, 20, 20], boxes[11]]
    np.testing.assert_array_equal(table.boxes_of([10, 50, 11]), expected)
    fp = edit.footprints.tolist()
    assert boxes[3].tolist() in fp and [100, 100, 150, 150] in fp and [0, 0, 20, 20] in fp
    with pytest.raises(KeyError):
        table.boxes_of([3])
    undone = table.undo()
    assert sorted(undone.added_ids.tolist()) == [3, 7, 10] and table.undo() is None
    np.testing.assert_array_equal(table.all(), boxes)
    assert not table.edit(changed={5: boxes[5]})  # nothing changed: no edit recorded
    assert table.history == []
