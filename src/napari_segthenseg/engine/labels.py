"""Instance labels of masks too large for memory: one id per 8-connected object, chunk by chunk.

A slide's segmentation is written chunk by chunk as 0/1 into a uint32 array; :func:`relabel_chunked`
then turns it into ids in place in two streaming passes, holding one chunk (and one row of chunk
borders) at a time: each chunk is labelled on its own with provisional ids, the ids that touch across
chunk borders (8-connectivity, diagonals included) are joined as a graph, and a second pass writes the
final ids. The result is the same partition into objects as labelling the whole mask at once
(:func:`~.boxes.label_objects`), ids numbered in the order their objects are first met, row by row.

After an edit changed the mask inside a region, :func:`relabel_region` labels only around it: the
objects that touch the region get ids again (kept where an object continues outside the region, new
ones otherwise), everything else keeps its id.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from .boxes import CONNECTIVITY
from .grid import Region, tiles
from .progress import Progress, Steps

LABEL_DTYPE = np.uint32
LOCAL_MARGIN = 64  # px around an edited region first read to find the objects that cross it


def _border_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ids of touching pixels across a border: ``a`` and ``b`` are the two facing lines of pixels
    (8-connectivity: straight and diagonal neighbours)."""
    pairs = [np.stack([a, b], 1), np.stack([a[1:], b[:-1]], 1), np.stack([a[:-1], b[1:]], 1)]
    p = np.concatenate(pairs)
    return p[(p[:, 0] > 0) & (p[:, 1] > 0)]


def relabel_chunked(array: object, chunk: int) -> Steps[int]:
    """Turn a mask array (values > 0 are foreground) into instance ids in place, ``chunk`` px at a
    time (the array's chunk side); returns the number of objects. A step generator (progress per
    chunk, two passes)."""
    h, w = (int(s) for s in array.shape)
    regions = tiles((h, w), chunk)
    offset = 0
    filled: list[Region] = []
    pairs: list[np.ndarray] = []
    prev_bottom = np.zeros(w, dtype=np.int64)  # the last row of the chunk row above
    top = np.zeros(w, dtype=np.int64)
    bottom = np.zeros(w, dtype=np.int64)
    left_col: np.ndarray | None = None  # the right column of the chunk to the left
    for i, (y0, x0, y1, x1) in enumerate(regions):
        yield Progress(f"labelling objects: {i}/{len(regions)} chunks", i, len(regions))
        if x0 == 0:  # a new row of chunks: join it to the one above, then start its borders
            if y0 > 0:
                pairs.append(_border_pairs(prev_bottom, top))
                prev_bottom = bottom
            top, bottom, left_col = np.zeros(w, np.int64), np.zeros(w, np.int64), None
        block = np.asarray(array[y0:y1, x0:x1]) > 0
        if not block.any():
            left_col = np.zeros(y1 - y0, np.int64)
            continue
        lab, n = ndimage.label(block, structure=CONNECTIVITY)
        lab = lab.astype(np.int64)
        lab[lab > 0] += offset
        offset += n
        array[y0:y1, x0:x1] = lab.astype(LABEL_DTYPE)
        filled.append((y0, x0, y1, x1))
        top[x0:x1], bottom[x0:x1] = lab[0], lab[-1]
        if left_col is not None:
            pairs.append(_border_pairs(left_col, lab[:, 0]))
        left_col = lab[:, -1]
    pairs.append(_border_pairs(prev_bottom, top))  # the last row of chunks and the one above
    final = _final_ids(offset, np.concatenate(pairs))
    for k, (y0, x0, y1, x1) in enumerate(filled):
        yield Progress(f"numbering objects: {k}/{len(filled)} chunks", k, len(filled))
        array[y0:y1, x0:x1] = final[np.asarray(array[y0:y1, x0:x1])]
    yield Progress("numbering objects", len(filled), len(filled))
    return int(final.max())


def _final_ids(n: int, pairs: np.ndarray) -> np.ndarray:
    """Map provisional ids 0..n to final ids: provisional ids joined by ``pairs`` share one, numbered
    by their smallest provisional id; 0 stays 0."""
    graph = sparse.coo_matrix((np.ones(len(pairs), bool), (pairs[:, 0], pairs[:, 1])), shape=(n + 1, n + 1))
    _, comp = connected_components(graph, directed=False)
    # number the components in the order of their smallest provisional id (id 0 is background)
    first = np.full(comp.max() + 1, n + 1, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n + 1))
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[comp].astype(LABEL_DTYPE)  # background's component has rank 0


def _grow(region: Region, by: int, hw: tuple[int, int]) -> Region:
    y0, x0, y1, x1 = region
    return max(0, y0 - by), max(0, x0 - by), min(hw[0], y1 + by), min(hw[1], x1 + by)


def relabel_region(array: object, region: Region, next_id: int, margin: int = LOCAL_MARGIN
                   ) -> tuple[int, Region]:
    """Ids for the objects touching ``region`` after the mask changed there (its pixels 0/1, the
    rest of ``array`` still the old ids). Pixels outside the region keep their ids: an object that
    continues outside keeps the id it has there (a split object's outside parts each keep theirs as
    far as they differ, the largest first), objects joined by the edit take the id of their largest
    outside part, and pieces with no outside part get ``next_id``, ``next_id + 1``, ...

    The window read grows until no object touching the region reaches its edge, so objects of any
    size are handled whole. Returns the next free id and the window that was rewritten.
    """
    hw = (int(array.shape[0]), int(array.shape[1]))
    near = _grow(region, 1, hw)  # pixels next to the region are connected to it
    by = margin
    while True:
        win = _grow(region, by, hw)
        old = np.asarray(array[win[0]:win[2], win[1]:win[3]]).astype(np.int64)
        lab, _ = ndimage.label(old > 0, structure=CONNECTIVITY)
        touching = np.unique(lab[near[0] - win[0]:near[2] - win[0], near[1] - win[1]:near[3] - win[1]])
        touching = touching[touching > 0]
        edge = np.zeros(lab.shape, bool)
        edge[0, :] |= win[0] > 0
        edge[-1, :] |= win[2] < hw[0]
        edge[:, 0] |= win[1] > 0
        edge[:, -1] |= win[3] < hw[1]
        if not np.isin(lab[edge], touching).any():
            break
        by *= 2
    inside = np.zeros(lab.shape, bool)  # the edited region, in window coordinates
    inside[region[0] - win[0]:region[2] - win[0], region[1] - win[1]:region[3] - win[1]] = True
    # (pixel count, component, old id) of every old id's outside pixels in each touching component
    out = np.isin(lab, touching) & ~inside & (old > 0)
    pairs, counts = np.unique(np.stack([lab[out], old[out]], 1), axis=0, return_counts=True) \
        if out.any() else (np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    chosen: dict[int, int] = {}
    used: set[int] = set()
    for k in np.argsort(-counts, kind="stable"):
        comp, old_id = int(pairs[k, 0]), int(pairs[k, 1])
        if comp not in chosen and old_id not in used:
            chosen[comp] = old_id
            used.add(old_id)
    lut = np.zeros(int(lab.max()) + 1, dtype=np.int64)
    for comp in touching.tolist():
        if comp not in chosen:
            chosen[comp], next_id = next_id, next_id + 1
        lut[comp] = chosen[comp]
    new = np.where(np.isin(lab, touching), lut[lab], old)
    if not np.array_equal(new, old):
        array[win[0]:win[2], win[1]:win[3]] = new.astype(LABEL_DTYPE)
    return next_id, win


def max_label(array: object, chunk: int) -> Steps[int]:
    """The largest id in an on-disk label array, chunk by chunk."""
    regions = tiles((int(array.shape[0]), int(array.shape[1])), chunk)
    top = 0
    for i, (y0, x0, y1, x1) in enumerate(regions):
        yield Progress(f"reading object ids: {i}/{len(regions)} chunks", i, len(regions))
        top = max(top, int(np.asarray(array[y0:y1, x0:x1]).max()))
    return top
