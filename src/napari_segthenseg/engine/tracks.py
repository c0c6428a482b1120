"""Which rough objects of a volume share a 3D box (docs/VOLUMES.md).

One sweep over the stacked rough masks, two slices at a time (so an on-disk stack is read slice
by slice): the 8-connected objects of each slice are linked to the objects of the slice before
that they touch, which is 26-connectivity, and the links join them into 3D objects (union-find).
The same links chain them into *tracks*: a track follows an object from slice to slice while its
y/x window (the union over its slices) stays within ``growth`` times the largest extent the object
has on one of them. Where the object drifts further (a curving vessel) or splits (a branch), a
new track begins. Each track becomes one 3D box: a z-range and one y/x window for its slices.

``growth=None`` makes one track of every 3D object: one window for all its slices, the rule as
SPEC 2d states it. Measured on CT (docs/VOLUMES.md), that window grows with an aorta that moves
across 100 slices until the fine net sees it at a fraction of the resolution it was trained at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .boxes import CONNECTIVITY

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # the 3 x 3 pixels under a pixel


@dataclass
class Tracks:
    """Raw 3D boxes (full resolution, before the box rules) and the depth of their objects."""

    boxes: np.ndarray  # (N, 6) int64 (z0, y0, x0, z1, y1, x1): a track's slices and y/x extent
    objects: np.ndarray  # (N, 2) z0, z1 of the 26-connected object each track belongs to

    @property
    def depth(self) -> np.ndarray:
        """Slices spanned by each track's object."""
        return self.objects[:, 1] - self.objects[:, 0]


def _links(prev: np.ndarray, cur: np.ndarray, n_prev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (object on ``cur``, object on ``prev``) that touch in 26-connectivity, with the
    number of touching pixel pairs, largest first."""
    h, w = cur.shape
    padded = np.pad(prev, 1)
    keys = []
    for dy, dx in NEIGHBOURS:
        p = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        hit = (cur > 0) & (p > 0)
        keys.append(cur[hit].astype(np.int64) * (n_prev + 1) + p[hit])
    uniq, count = np.unique(np.concatenate(keys), return_counts=True)
    order = np.argsort(-count, kind="stable")
    return uniq[order] // (n_prev + 1), uniq[order] % (n_prev + 1), count[order]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def track_boxes(mask: object, to_full: Callable[[np.ndarray], np.ndarray], growth: float | None
                ) -> Tracks:
    """Tracks of the ``(Z, h, w)`` rough masks (any array read one slice at a time); ``to_full``
    maps rough-grid boxes ``(N, 4)`` to full-resolution ones."""
    depth = int(mask.shape[0])
    windows: list[list[int]] = []  # per track: y0, x0, y1, x1 (full res), union over its slices
    sides: list[int] = []  # per track: the largest extent of its object on one slice
    spans: list[list[int]] = []  # per track: z0, z1
    parent: list[int] = []  # union-find over tracks: tracks of one 3D object end in one root
    prev = np.zeros(mask.shape[1:], dtype=np.int32)
    prev_track = np.zeros(1, dtype=np.int64)  # track of each object on the previous slice (0: none)
    for z in range(depth):
        cur, n = ndimage.label(np.asarray(mask[z]) > 0, structure=CONNECTIVITY)
        rough = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop]
                          for s in ndimage.find_objects(cur)], dtype=np.int64).reshape(-1, 4)
        full = to_full(rough)
        side = np.maximum(full[:, 2] - full[:, 0], full[:, 3] - full[:, 1])
        track = np.full(n + 1, -1, dtype=np.int64)
        taken: set[int] = set()
        if z and n and prev.any():
            for b, a, _ in zip(*_links(prev, cur, int(prev_track.shape[0]) - 1), strict=True):
                t = int(prev_track[a])
                root = _find(parent, t)
                if track[b] >= 0:  # already placed: the link only joins the 3D objects
                    other = _find(parent, int(track[b]))
                    if other != root:
                        parent[other] = root
                    continue
                win = windows[t]
                union = [min(win[0], full[b - 1, 0]), min(win[1], full[b - 1, 1]),
                         max(win[2], full[b - 1, 2]), max(win[3], full[b - 1, 3])]
                largest = max(sides[t], int(side[b - 1]))
                fits = growth is None or max(union[2] - union[0], union[3] - union[1]) <= growth * largest
                if t not in taken and fits:  # the track goes on through this object
                    windows[t], sides[t], spans[t][1] = union, largest, z + 1
                    track[b] = t
                    taken.add(t)
                else:  # a new track (drifted, or a branch), of the same 3D object
                    track[b] = len(windows)
                    windows.append(list(full[b - 1]))
                    sides.append(int(side[b - 1]))
                    spans.append([z, z + 1])
                    parent.append(root)
        for b in range(1, n + 1):
            if track[b] < 0:
                track[b] = len(windows)
                windows.append(list(full[b - 1]))
                sides.append(int(side[b - 1]))
                spans.append([z, z + 1])
                parent.append(len(parent))
        prev, prev_track = cur, track
    if not windows:
        return Tracks(np.zeros((0, 6), np.int64), np.zeros((0, 2), np.int64))
    roots = np.array([_find(parent, i) for i in range(len(parent))])
    span = np.asarray(spans, dtype=np.int64)
    lo = np.full(len(parent), depth, np.int64)
    hi = np.zeros(len(parent), np.int64)
    np.minimum.at(lo, roots, span[:, 0])
    np.maximum.at(hi, roots, span[:, 1])
    win = np.asarray(windows, dtype=np.int64)
    if growth is None:  # one box per 3D object: join its tracks
        keep = np.unique(roots)
        boxes = np.zeros((len(keep), 6), np.int64)
        for i, r in enumerate(keep):
            mine = win[roots == r]
            boxes[i] = [lo[r], *mine[:, :2].min(0), hi[r], *mine[:, 2:].max(0)]
        return Tracks(boxes, np.stack([lo[keep], hi[keep]], 1))
    boxes = np.concatenate([span[:, :1], win[:, :2], span[:, 1:], win[:, 2:]], axis=1)
    return Tracks(boxes, np.stack([lo[roots], hi[roots]], 1))
