"""Square tiles over an image, and which boxes fall in which tile (one grid for rough tiles and
output chunks). Tiles are ``(y0, x0, y1, x1)``, half-open, row by row; edge tiles are cut short."""

from __future__ import annotations

import numpy as np

Region = tuple[int, int, int, int]
CHUNK = 1024  # px: a slide's output chunk, and the group of boxes read at once from a lazy image


def tiles(hw: tuple[int, int], side: int) -> list[Region]:
    """The tiles of ``side`` px covering an image of ``hw``, row by row."""
    return [(y, x, min(y + side, hw[0]), min(x + side, hw[1]))
            for y in range(0, hw[0], side) for x in range(0, hw[1], side)]


def boxes_by_chunk(boxes: np.ndarray, hw: tuple[int, int], chunk: int) -> dict[tuple[int, int], np.ndarray]:
    """Indices of the boxes that touch each tile ``(row, col)`` of side ``chunk`` (tiles without any
    left out)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out: dict[tuple[int, int], list[int]] = {}
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                out.setdefault((cy, cx), []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def regions_for(footprints: np.ndarray, hw: tuple[int, int], chunk: int) -> list[Region]:
    """One region per tile the ``footprints`` touch: the bounding box of their parts in that tile
    (clipped to the image). Fusing a region needs only the boxes that overlap it."""
    fp = np.asarray(footprints, dtype=np.int64).reshape(-1, 4)
    fp = np.clip(fp, 0, [hw[0], hw[1], hw[0], hw[1]])
    fp = fp[(fp[:, 2] > fp[:, 0]) & (fp[:, 3] > fp[:, 1])]
    parts: dict[tuple[int, int], list[int]] = {}
    for y0, x0, y1, x1 in fp.tolist():
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                cy0, cx0 = cy * chunk, cx * chunk
                piece = (max(y0, cy0), max(x0, cx0), min(y1, cy0 + chunk), min(x1, cx0 + chunk))
                cur = parts.get((cy, cx))
                parts[(cy, cx)] = list(piece) if cur is None else [
                    *np.minimum(cur[:2], piece[:2]).tolist(), *np.maximum(cur[2:], piece[2:]).tolist()]
    return [tuple(parts[k]) for k in sorted(parts)]  # type: ignore[misc]


def boxes_touching(boxes: np.ndarray, regions: list[Region]) -> np.ndarray:
    """Indices of the boxes that overlap any of ``regions`` (vectorised over the boxes)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    hit = np.zeros(len(boxes), dtype=bool)
    for y0, x0, y1, x1 in regions:
        hit |= (boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0)
    return np.flatnonzero(hit)


def box_owners(boxes: np.ndarray, regions: list[Region], chunk: int, groups: np.ndarray | None = None
               ) -> tuple[list[np.ndarray], list[list[int]]]:
    """Give each box that overlaps ``regions`` to exactly one of them, so that it is refined once.

    ``regions`` lie one per tile of side ``chunk`` at most (whole tiles, or parts of them). A box is
    owned by the region of the tile holding its centre when it overlaps that region, else by the
    first region it overlaps. Boxes of one group (``groups``: an id per box, boxes sharing a crop)
    go together, to the owner their first box would have among the regions any of them overlaps.
    Returns per region the indices of the boxes it owns, and the other regions its boxes overlap
    (where it sends the parts of their results that fall there).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    at: dict[tuple[int, int], int] = {}
    for k, (y0, x0, y1, x1) in enumerate(regions):
        key = (y0 // chunk, x0 // chunk)
        if key in at or (y1 - 1) // chunk != key[0] or (x1 - 1) // chunk != key[1]:
            raise ValueError(f"region {(y0, x0, y1, x1)} is not alone inside one {chunk} px tile")
        at[key] = k
    ids = np.arange(len(boxes)) if groups is None else np.asarray(groups, dtype=np.int64)
    hits: dict[int, set[int]] = {}  # group -> regions its boxes overlap
    first: dict[int, int] = {}  # group -> its first box
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        g = int(ids[i])
        first.setdefault(g, i)
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                k = at.get((cy, cx))
                if k is not None:
                    ry0, rx0, ry1, rx1 = regions[k]
                    if y0 < ry1 and y1 > ry0 and x0 < rx1 and x1 > rx0:
                        hits.setdefault(g, set()).add(k)
    owner_of: dict[int, int] = {}
    for g, hit in hits.items():
        y0, x0, y1, x1 = boxes[first[g]].tolist()
        owner = at.get(((y0 + y1) // 2 // chunk, (x0 + x1) // 2 // chunk))
        owner_of[g] = owner if owner in hit else min(hit)
    owned: list[list[int]] = [[] for _ in regions]
    spills: list[set[int]] = [set() for _ in regions]
    for i in range(len(boxes)):
        g = int(ids[i])
        if g in owner_of:
            owned[owner_of[g]].append(i)
            spills[owner_of[g]].update(hits[g] - {owner_of[g]})
    return [np.asarray(o, dtype=np.int64) for o in owned], [sorted(s) for s in spills]
