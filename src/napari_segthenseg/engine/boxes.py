"""Box rules (the paper's step 2, Benčević et al. 2023), shared by inference and training.

A box is ``(y0, x0, y1, x1)`` in full-resolution pixels, half-open, always inside the image.
Boxes are kept in an ``int64`` array of shape ``(N, 4)``. A volume's box (docs/VOLUMES.md) is
``(z0, y0, x0, z1, y1, x1)``: a z-range and one y/x window made by the same 2D rules, ``(N, 6)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_BOX = 5  # components narrower or shorter than this (full-res px) are noise
NO_BOXES = np.zeros((0, 4), dtype=np.int64)
NO_BOXES.setflags(write=False)  # shared: never written to
NO_BOXES_3D = np.zeros((0, 6), dtype=np.int64)
NO_BOXES_3D.setflags(write=False)
MIN_SLICES = 1  # a volume's objects on fewer slices than this are dropped (docs/VOLUMES.md: keep all)


def connectivity(ndim: int) -> np.ndarray:
    """Full connectivity in ``ndim`` dimensions: 8 neighbours in 2D, 26 in 3D."""
    return np.ones((3,) * ndim, dtype=bool)


# Objects are 8-connected everywhere (26-connected in volumes): boxes, instance labels in the
# plugin, predict and eval.
CONNECTIVITY = connectivity(2)
CONNECTIVITY_3D = connectivity(3)


def default_pad(size: int) -> int:
    """The paper's padding: S/8 full-resolution pixels."""
    return max(0, int(round(size / 8)))


def _place(lo: float, side: int, limit: int) -> tuple[int, int]:
    """Place a 1D interval of ``side`` starting near ``lo`` inside [0, limit); clamp if too long."""
    if side >= limit:
        return 0, limit
    start = int(round(lo))
    start = min(max(start, 0), limit - side)
    return start, start + side


def square_pad_shift(box: np.ndarray, hw: tuple[int, int], pad: int) -> np.ndarray:
    """Make a box square (keeping its centre), pad it by ``pad`` and shift it inside the image.

    If the padded side exceeds an image side, the box is clamped to that side; the crop window
    (:func:`crop_windows`) then pads the crop so the object is kept, never dropped.
    """
    y0, x0, y1, x1 = (float(v) for v in box)
    side = int(max(y1 - y0, x1 - x0)) + 2 * int(pad)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    ya, yb = _place(cy - side / 2.0, side, hw[0])
    xa, xb = _place(cx - side / 2.0, side, hw[1])
    return np.array([ya, xa, yb, xb], dtype=np.int64)


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes (in ``mask`` pixels) of its fully connected components (8-connected in 2D,
    26 in 3D), in label order: ``(y0, x0, y1, x1)``, or ``(z0, y0, x0, z1, y1, x1)`` for a volume."""
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=connectivity(mask.ndim))
    out = np.zeros((n, 2 * mask.ndim), dtype=np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        out[i] = [s.start for s in sl] + [s.stop for s in sl]
    return out


def label_objects(mask: np.ndarray) -> np.ndarray:
    """Instance labels: one id per 8-connected object (26-connected in a volume), uint16 when the
    ids fit, else uint32."""
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=connectivity(mask.ndim))
    return labels.astype(np.uint16 if n < 2**16 else np.uint32)


def scale_boxes(boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Scale boxes between resolutions, rounding outwards so the object stays inside."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    fy, fx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    out = np.empty_like(b)
    out[:, 0], out[:, 2] = np.floor(b[:, 0] * fy), np.ceil(b[:, 2] * fy)
    out[:, 1], out[:, 3] = np.floor(b[:, 1] * fx), np.ceil(b[:, 3] * fx)
    out[:, 0::2] = out[:, 0::2].clip(0, to_hw[0])
    out[:, 1::2] = out[:, 1::2].clip(0, to_hw[1])
    return out.astype(np.int64)


def large_enough(raw: np.ndarray, min_box: int = MIN_BOX) -> np.ndarray:
    """The boxes whose width and height are both at least ``min_box`` px (the noise rule)."""
    raw = np.asarray(raw, dtype=np.int64).reshape(-1, 4)
    return raw[((raw[:, 2] - raw[:, 0]) >= min_box) & ((raw[:, 3] - raw[:, 1]) >= min_box)]


def finalize_boxes(
    raw: np.ndarray, hw: tuple[int, int], pad: int, min_box: int = MIN_BOX
) -> np.ndarray:
    """Full-res component boxes -> StS boxes: drop small ones, then square, pad and shift."""
    out = [square_pad_shift(b, hw, pad) for b in large_enough(raw, min_box)]
    return np.stack(out) if out else np.zeros((0, 4), dtype=np.int64)


def boxes_from_mask(
    mask: np.ndarray, hw: tuple[int, int], pad: int, min_box: int = MIN_BOX
) -> np.ndarray:
    """StS boxes for an image of size ``hw`` from a (possibly smaller) binary mask.

    Components are found on ``mask`` itself (the S x S rough mask: cheap), then scaled to
    full resolution, which is equivalent to the paper's upsample-then-label Algorithm 1.
    """
    mask = np.asarray(mask)
    raw = scale_boxes(component_boxes(mask), mask.shape[:2], hw)
    return finalize_boxes(raw, hw, pad, min_box)


def clip_boxes(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Clip any (e.g. hand-drawn) boxes to the image; empty results are removed.

    Coordinates are rounded outwards; corners may come in either order.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lo = np.floor(np.minimum(b[:, :2], b[:, 2:]))
    hi = np.ceil(np.maximum(b[:, :2], b[:, 2:]))
    lo = np.clip(lo, 0, hw)
    hi = np.clip(hi, 0, hw)
    out = np.concatenate([lo, hi], axis=1).astype(np.int64)
    return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]


def crop_windows(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The square window each box is sampled from (float ``y0, x0, side``).

    The window is the box made square around its centre and shifted inside the image; where
    the side exceeds the image it is centred on the image and the crop is zero-padded. For
    StS boxes (already square) the window is the box itself.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    out = np.empty((len(b), 3), dtype=np.float64)
    for axis, limit in enumerate(hw):
        centre = (b[:, axis] + b[:, axis + 2]) / 2.0
        start = np.clip(np.round(centre - side / 2.0), 0, np.maximum(limit - side, 0))
        start = np.where(side > limit, (limit - side) / 2.0, start)
        out[:, axis] = start
    out[:, 2] = side
    return out


def changed_boxes(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The boxes whose count differs between ``old`` and ``new`` (moved, resized, deleted or
    drawn), each once: where a segmentation fused from ``old`` must be fused again. Works for
    2D ``(N, 4)`` and 3D ``(N, 6)`` boxes alike."""
    width = next((a.shape[-1] for a in map(np.asarray, (new, old)) if a.size), 4)
    old = np.asarray(old, dtype=np.int64).reshape(-1, width)
    new = np.asarray(new, dtype=np.int64).reshape(-1, width)
    both = np.concatenate([old, new])
    if len(both) == 0:
        return NO_BOXES if width == 4 else NO_BOXES_3D
    # One 64-bit key per 2D box: a 1D sort (ms for 30,000 boxes).
    if width == 4 and both.min() >= 0 and both.max() < 2**16:
        keys = np.zeros(len(both), dtype=np.uint64)
        for j in range(4):
            keys |= both[:, j].astype(np.uint64) << np.uint64(48 - 16 * j)
        uniq, inverse = np.unique(keys, return_inverse=True)
        rows = np.stack([(uniq >> np.uint64(48 - 16 * j)) & np.uint64(0xFFFF) for j in range(4)], 1)
        rows = rows.astype(np.int64)
    else:
        rows, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_old = np.bincount(inverse[:len(old)], minlength=len(rows))
    n_new = np.bincount(inverse[len(old):], minlength=len(rows))
    return rows[n_old != n_new]


def finalize_boxes_3d(raw: np.ndarray, shape: tuple[int, int, int], pad: int, z_pad: int,
                      min_box: int = MIN_BOX, min_slices: int = MIN_SLICES,
                      objects: np.ndarray | None = None) -> np.ndarray:
    """Full-res 3D object boxes -> a volume's StS boxes (docs/VOLUMES.md).

    The y/x window is the 2D rule on the object's extent over all its slices (dropped under
    ``min_box`` px, made square, padded by ``pad``, shifted inside, clamped); the z-range is
    padded by ``z_pad`` slices at the object's ends and clamped to the volume's ends. Objects on
    fewer than ``min_slices`` slices are dropped. ``objects`` (N, 2): the z-range of the whole
    object each box is a part of (a track, :mod:`.tracks`; default: the box's own), so that the
    parts of one object are not padded into one another. Every slice of a box shares one window.
    """
    raw = np.asarray(raw, dtype=np.int64).reshape(-1, 6)
    objects = raw[:, [0, 3]] if objects is None else np.asarray(objects, dtype=np.int64).reshape(-1, 2)
    keep = (objects[:, 1] - objects[:, 0]) >= max(1, int(min_slices))
    raw, objects = raw[keep], objects[keep]
    yx = raw[:, [1, 2, 4, 5]]
    keep = ((yx[:, 2] - yx[:, 0]) >= min_box) & ((yx[:, 3] - yx[:, 1]) >= min_box)
    raw, yx, objects = raw[keep], yx[keep], objects[keep]
    if len(raw) == 0:
        return NO_BOXES_3D.copy()
    win = np.stack([square_pad_shift(b, shape[1:], pad) for b in yx])
    z0 = np.clip(raw[:, 0] - np.where(raw[:, 0] <= objects[:, 0], int(z_pad), 0), 0, shape[0])
    z1 = np.clip(raw[:, 3] + np.where(raw[:, 3] >= objects[:, 1], int(z_pad), 0), 0, shape[0])
    return np.stack([z0, win[:, 0], win[:, 1], z1, win[:, 2], win[:, 3]], 1).astype(np.int64)


def clip_boxes_3d(boxes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Clip (e.g. hand-drawn or edited) 3D boxes to the volume; empty ones are removed."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    yx = clip_boxes(b[:, [1, 2, 4, 5]], shape[1:]) if len(b) else NO_BOXES.copy()
    if len(yx) != len(b):  # some were empty in y/x: clip one by one to know which
        rows = [(i, clip_boxes(b[i, [1, 2, 4, 5]], shape[1:])) for i in range(len(b))]
        keep = [i for i, r in rows if len(r)]
        b = b[keep]
        yx = np.concatenate([r for _, r in rows if len(r)]) if keep else NO_BOXES.copy()
    z0 = np.clip(np.floor(np.minimum(b[:, 0], b[:, 3])), 0, shape[0])
    z1 = np.clip(np.ceil(np.maximum(b[:, 0], b[:, 3])), 0, shape[0])
    out = np.stack([z0, yx[:, 0], yx[:, 1], z1, yx[:, 2], yx[:, 3]], 1).astype(np.int64).reshape(-1, 6)
    return out[out[:, 3] > out[:, 0]]
