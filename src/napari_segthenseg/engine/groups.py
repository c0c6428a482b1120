"""Shared crops for small neighbouring boxes on dense tissue (docs/WHOLE_SLIDES.md).

The paper gives every box its own S x S crop, so a small box is *enlarged*: a nucleus box of 40 px
becomes 64 x 64 network pixels, and on tissue packed with nuclei the fine net then sees more pixels
than the image has. Here boxes smaller than ``side = S / zoom`` image px share crops instead: they
are gathered greedily, row by row, into square windows of that side (each box whole inside one
window), and each window is one S x S crop at ``zoom`` network px per image px. A box keeps its own
window when it is at least that large or has no neighbour to share with. Fusion pastes each box's
part of its window's result inside the box, as for single crops.

The fine net learned crops of one object padded by S/8 and jittered by 16 px, with every object in
the crop as foreground, so a window of up to ``S`` image px (``zoom`` >= 1, the scale of its largest
training objects) holding a few nuclei is within what it saw. Measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np

from .boxes import crop_windows


def group_boxes(boxes: np.ndarray, hw: tuple[int, int], size: int, zoom: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows ``(G, 3)`` (float ``y0, x0, side``) and each box's window index ``(N,)``.

    Boxes of a side below ``size / zoom`` px are grouped into windows of that side; the others, and
    boxes left alone, get their own window (:func:`~.boxes.crop_windows`).
    """
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    n = len(b)
    side = int(round(size / zoom))
    own = crop_windows(b, hw)
    member = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return own, member
    small = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < side
    # Neighbours by a grid of cells of the window side: candidates are in the 3 x 3 cells around.
    cells: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(small):
        cells.setdefault((int(b[i, 0]) // side, int(b[i, 1]) // side), []).append(int(i))
    order = np.lexsort((b[:, 1], b[:, 0]))  # row by row: top-left boxes open windows
    windows: list[tuple[float, float, float]] = []
    for i in order.tolist():
        if member[i] >= 0:
            continue
        if not small[i]:
            member[i] = len(windows)
            windows.append(tuple(own[i]))
            continue
        y0, x0, y1, x1 = (int(v) for v in b[i])
        cy, cx = y0 // side, x0 // side
        near = [j for dy in (-1, 0, 1) for dx in (-1, 0, 1) for j in cells.get((cy + dy, cx + dx), ())
                if j != i and member[j] < 0]
        near.sort(key=lambda j: (abs(b[j, 0] - y0) + abs(b[j, 1] - x0), j))
        group = [i]
        for j in near:  # greedy: add the nearest while the group still fits in one window
            ny0, nx0 = min(y0, b[j, 0]), min(x0, b[j, 1])
            ny1, nx1 = max(y1, b[j, 2]), max(x1, b[j, 3])
            if ny1 - ny0 <= side and nx1 - nx0 <= side:
                group.append(j)
                y0, x0, y1, x1 = int(ny0), int(nx0), int(ny1), int(nx1)
        member[group] = len(windows)
        if len(group) == 1:
            windows.append(tuple(own[i]))
            continue
        # The window centred on the group, shifted inside the image (as crop_windows places one).
        windows.append(tuple(crop_windows(np.array([[(y0 + y1 - side) // 2, (x0 + x1 - side) // 2,
                                                     (y0 + y1 - side) // 2 + side,
                                                     (x0 + x1 - side) // 2 + side]]), hw)[0]))
    return np.asarray(windows, dtype=np.float64).reshape(-1, 3), member
