"""A slide's boxes as a table: every box with a stable id, found by region, edits kept for undo.

A slide holds 10^5-10^6 boxes, far more than napari's Shapes layer can carry (docs/PLUGIN.md), so the
boxes live here and the Shapes layer shows only those near the view. The index is the table itself:
rows are kept sorted by the boxes' top edge, so a region query is a binary search for the band of rows
whose top edge can reach the region (no box is taller than the tallest one seen) followed by one
vectorised test; 10^6 boxes answer in milliseconds (benchmarks/bench_plugin_slide.py). No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.boxes import NO_BOXES
from ..engine.grid import Region

NO_IDS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Edit:
    """One change of the table: the boxes it took away and the ones it put in (ids and boxes)."""

    removed_ids: np.ndarray
    removed: np.ndarray
    added_ids: np.ndarray
    added: np.ndarray

    @property
    def footprints(self) -> np.ndarray:
        """Where the segmentation must be made again: the old and the new places."""
        return np.concatenate([self.removed, self.added])

    def __bool__(self) -> bool:
        return bool(len(self.removed_ids) or len(self.added_ids))


class BoxTable:
    """Boxes ``(y0, x0, y1, x1)`` (image px, half-open) with ids; ``history`` holds the edits."""

    def __init__(self, boxes: np.ndarray = NO_BOXES, history_size: int = 100):
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        order = np.argsort(boxes[:, 0], kind="stable")
        self.boxes = boxes[order]
        self.ids = np.arange(len(boxes), dtype=np.int64)[order]
        self.next_id = len(boxes)
        self._rows = np.empty(0, dtype=np.int64)  # row of each id (-1: not in the table)
        self._index()
        self.tallest = int((boxes[:, 2] - boxes[:, 0]).max()) if len(boxes) else 0
        self.history: list[Edit] = []
        self.history_size = history_size

    def __len__(self) -> int:
        return len(self.boxes)

    def all(self) -> np.ndarray:
        """Every box, in id order (the order they were found or drawn in)."""
        return self.boxes[np.argsort(self.ids, kind="stable")]

    def in_region(self, region: Region) -> tuple[np.ndarray, np.ndarray]:
        """Ids and boxes of the boxes overlapping ``region``."""
        y0, x0, y1, x1 = region
        top = self.boxes[:, 0]
        lo = int(np.searchsorted(top, y0 - self.tallest, side="left"))
        hi = int(np.searchsorted(top, y1, side="left"))
        band = self.boxes[lo:hi]
        hit = lo + np.flatnonzero((band[:, 2] > y0) & (band[:, 1] < x1) & (band[:, 3] > x0))
        return self.ids[hit], self.boxes[hit]

    def count_in(self, region: Region) -> int:
        return len(self.in_region(region)[0])

    def boxes_of(self, ids: np.ndarray) -> np.ndarray:
        """The boxes of ``ids`` (in that order); ids not in the table are an error."""
        rows = self._rows_of(ids)
        return self.boxes[rows].reshape(-1, 4)

    def has(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is in the table (a lookup per id, not a pass over the table)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = (ids >= 0) & (ids < len(self._rows))
        out = np.zeros(len(ids), bool)
        out[known] = self._rows[ids[known]] >= 0
        return out

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = (ids >= 0) & (ids < len(self._rows))
        rows = np.where(known, self._rows[np.where(known, ids, 0)] if len(self._rows) else -1, -1)
        if (rows < 0).any():
            raise KeyError(f"box ids not in the table: {ids[rows < 0][:5].tolist()}")
        return rows

    def _index(self) -> None:
        """Rebuild the id -> row map (one vectorised pass; after every edit)."""
        self._rows = np.full(max(self.next_id, int(self.ids.max()) + 1 if len(self.ids) else 0), -1, np.int64)
        self._rows[self.ids] = np.arange(len(self.ids))

    # -- edits -------------------------------------------------------------------------------
    def edit(self, removed: np.ndarray = NO_IDS, changed: dict[int, np.ndarray] | None = None,
             added: np.ndarray = NO_BOXES) -> Edit:
        """Remove boxes by id, move/resize boxes (``changed``: id -> new box, same id) and add new
        boxes (new ids). Recorded for :meth:`undo`; returns the edit (empty if nothing changed)."""
        changed = changed or {}
        moved = {int(i): np.asarray(b, dtype=np.int64) for i, b in changed.items()}
        old = self.boxes_of(np.fromiter(moved, dtype=np.int64, count=len(moved)))
        moved = {i: b for (i, b), o in zip(moved.items(), old, strict=True) if not np.array_equal(b, o)}
        out_ids = np.unique(np.concatenate([np.asarray(removed, dtype=np.int64).reshape(-1),
                                            np.fromiter(moved, dtype=np.int64, count=len(moved))]))
        added = np.asarray(added, dtype=np.int64).reshape(-1, 4)
        new_ids = np.arange(self.next_id, self.next_id + len(added), dtype=np.int64)
        in_ids = np.concatenate([np.fromiter(moved, dtype=np.int64, count=len(moved)), new_ids])
        in_boxes = np.concatenate([np.stack(list(moved.values())) if moved else NO_BOXES, added])
        change = Edit(out_ids, self.boxes_of(out_ids), in_ids, in_boxes)
        if change:
            self._apply(change.removed_ids, change.added_ids, change.added)
            self.history = [*self.history, change][-self.history_size:]
        return change

    def undo(self) -> Edit | None:
        """Take back the last edit; returns what it changed (None: nothing to undo)."""
        if not self.history:
            return None
        last = self.history.pop()
        self._apply(last.added_ids, last.removed_ids, last.removed)
        return Edit(last.added_ids, last.added, last.removed_ids, last.removed)

    def _apply(self, out_ids: np.ndarray, in_ids: np.ndarray, in_boxes: np.ndarray) -> None:
        """Take rows out and put rows in at their sorted places: one copy of the table (not one per
        row), as edits change few boxes of many."""
        boxes, ids = self.boxes, self.ids
        if len(out_ids):
            rows = self._rows_of(out_ids)
            boxes, ids = np.delete(boxes, rows, axis=0), np.delete(ids, rows)
        if len(in_ids):
            order = np.argsort(in_boxes[:, 0], kind="stable")
            in_boxes, in_ids = in_boxes[order], in_ids[order]
            at = np.searchsorted(boxes[:, 0], in_boxes[:, 0], side="right").tolist()
            cuts = [0, *at, len(boxes)]
            box_parts, id_parts = [], []
            for k in range(len(at) + 1):
                box_parts.append(boxes[cuts[k]:cuts[k + 1]])
                id_parts.append(ids[cuts[k]:cuts[k + 1]])
                if k < len(at):
                    box_parts.append(in_boxes[k:k + 1])
                    id_parts.append(in_ids[k:k + 1])
            boxes, ids = np.concatenate(box_parts), np.concatenate(id_parts)
            self.tallest = max(self.tallest, int((in_boxes[:, 2] - in_boxes[:, 0]).max()))
            self.next_id = max(self.next_id, int(in_ids.max()) + 1)
        self.boxes, self.ids = boxes, ids
        self._index()
