"""The rough pass (the paper's step 1) and the boxes it gives (step 2), at any image size.

An image the rough net's training covers is squashed to S x S, as in the paper. A larger or more
elongated one is seen at the trained scale instead (docs/WHOLE_SLIDES.md): the image is read at
``scale`` image px per rough px from the nearest pyramid level, in tiles with a margin of context
on each side (the net is fully convolutional, so overlapping tiles whose margins are dropped leave
no seams), batched on accelerators, each tile cut to the bounding box of its cells that are not
flat background (whole flat tiles skipped), and the tiles' masks stitched into one rough mask. The
image is read from the coarsest pyramid level finer than the scale. Components are found on that
stitched mask, so an object is one box whatever tile it falls in: with SciPy when the rough mask
fits in memory, with dask-image when it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import component_boxes, connectivity, finalize_boxes, scale_boxes
from .core import Core
from .grid import Region, tiles
from .image import ImageSource, compute_stats, match_channels
from .limits import IN_MEMORY_MASK_PX
from .localnorm import LocalWindows, Windows, survey
from .memory import release_free_memory
from .progress import Progress, Steps
from .scale import RoughPlan

TILE = 512  # rough px of output per tile side
# Tiles of one shape per forward on accelerators (the core's memory budget still splits a batch); on a
# CPU batching gains nothing and would hold several tiles' activations at once.
ROUGH_BATCH = 8
GLASS_RING = 2  # rough px next to bright-field glass where the rough mask is cleared (see glass_ring)
MARGIN = 64  # rough px of context dropped on each side: tiles then match one pass (docs/WHOLE_SLIDES.md)


@dataclass
class RoughResult:
    """The rough pass: probabilities and mask on the rough grid, and the intensity windows."""

    prob: np.ndarray | None  # float32; None when the rough mask lives on disk (slides)
    mask: object  # bool (S, S) or (H/scale, W/scale): NumPy, or an on-disk zarr array
    stats: Windows  # intensity windows, reused for the crops
    plan: RoughPlan
    tiles_run: int = 1
    tiles_skipped: int = 0


def windows_for(core: Core, src: ImageSource, plan: RoughPlan) -> Steps[Windows]:
    """Intensity windows for ``plan``: the paper's one per image (from the S x S copy), or local
    ones (tiled min-max)."""
    s = core.settings
    if not plan.tiled:
        return compute_stats(core.small(src), s.normalisation, src.dtype)
    if s.normalisation != "minmax":  # fixed windows (dtype range, none) mean the same everywhere
        return compute_stats(torch.zeros(1), s.normalisation, src.dtype)
    return (yield from survey(src, plan.scale, plan.window, plan.rough_hw(src.hw, s.size), core.device))


def rough_pass(core: Core, src: ImageSource, plan: RoughPlan, mask_out: object | None = None
               ) -> Steps[RoughResult]:
    """Step 1 for ``plan``. ``mask_out`` (tiled only) receives the rough mask, e.g. an on-disk
    zarr array for a slide; by default it is kept in memory with the probabilities."""
    s = core.settings
    if not plan.tiled:
        yield Progress("rough pass", 0, 1)
        with core.timed("rough_read"):
            small = core.small(src)
            stats = compute_stats(small, s.normalisation, src.dtype)
            x = stats.apply(small)[None]
        with core.timed("rough_net"):
            prob = core.forward(core.rough_net, x)[0].cpu().numpy()
        return RoughResult(prob, prob >= s.threshold, stats, plan)
    with core.timed("survey"):
        stats = yield from windows_for(core, src, plan)
    rough_hw = plan.rough_hw(src.hw, s.size)
    prob_out = None
    if mask_out is None:
        mask_out = np.zeros(rough_hw, dtype=bool)
        prob_out = np.zeros(rough_hw, dtype=np.float32)
    grid = tiles(rough_hw, TILE)
    run = skipped = 0
    step = 2 ** core.rough_net.depth
    batch: list[tuple[torch.Tensor, Region, np.ndarray | None]] = []
    per_batch = 1 if core.device.type == "cpu" else ROUGH_BATCH
    for i, tile in enumerate(grid):
        yield Progress(f"rough pass: tile {i + 1}/{len(grid)}", i, len(grid))
        part = tile if not isinstance(stats, LocalWindows) else stats.busy_part(*tile, step)
        if part is None:  # only flat cells: nothing to find
            skipped += 1
            continue
        y0, x0, y1, x1 = part
        # Input: the part plus a margin, rounded up to what the U-Net's poolings divide.
        ih = math.ceil((y1 - y0 + 2 * MARGIN) / step) * step
        iw = math.ceil((x1 - x0 + 2 * MARGIN) / step) * step
        ry0, rx0 = y0 - MARGIN, x0 - MARGIN
        with core.timed("rough_read"):
            f = plan.scale
            t = src.read_scaled(ry0 * f, rx0 * f, (ry0 + ih) * f, (rx0 + iw) * f, f, (ih, iw), core.device)
            near_glass = glass_ring(t, stats.glass) if isinstance(stats, LocalWindows) else None
            t = stats.apply_to_region(t, ry0, rx0) if isinstance(stats, LocalWindows) else stats.apply(t)
            x = match_channels(t, s.in_channels)
        if batch and batch[0][0].shape != x.shape:
            _rough_batch(core, batch, mask_out, prob_out)
        batch.append((x, part, near_glass))
        run += 1
        if len(batch) >= per_batch:
            _rough_batch(core, batch, mask_out, prob_out)
    _rough_batch(core, batch, mask_out, prob_out)
    yield Progress("rough pass", len(grid), len(grid))
    return RoughResult(prob_out, mask_out, stats, plan, run, skipped)


def glass_ring(t: torch.Tensor, glass: float | None) -> np.ndarray | None:
    """Where a rough-scale block (C, h, w) is bright-field glass or within ``GLASS_RING`` px of it
    (None without glass). The rough net answers a straight tissue edge against glass with a thin
    line of "objects" along it (no training image held glass); dropped there, that line can no
    longer chain the fields along a tissue edge into one huge box (docs/WHOLE_SLIDES.md)."""
    if glass is None:
        return None
    near = (t.amin(0) >= glass).float()[None, None]
    k = 2 * GLASS_RING + 1
    return F.max_pool2d(near, k, stride=1, padding=GLASS_RING)[0, 0].bool().cpu().numpy()


def _rough_batch(core: Core, batch: list[tuple[torch.Tensor, Region, np.ndarray | None]], mask_out: object,
                 prob_out: np.ndarray | None) -> None:
    """Run the rough net on tiles of one input shape at once and store their parts (the batch is
    emptied). Each tile's margins are dropped, and objects near glass (:func:`glass_ring`)."""
    if not batch:
        return
    with core.timed("rough_net"):
        probs = core.forward(core.rough_net, torch.stack([x for x, _, _ in batch])).cpu().numpy()
    for p, (_, (y0, x0, y1, x1), near) in zip(probs, batch, strict=True):
        p = p[MARGIN:MARGIN + y1 - y0, MARGIN:MARGIN + x1 - x0]
        if near is not None:
            p = np.where(near[MARGIN:MARGIN + y1 - y0, MARGIN:MARGIN + x1 - x0], 0.0, p)
        mask_out[y0:y1, x0:x1] = p >= core.settings.threshold
        if prob_out is not None:
            prob_out[y0:y1, x0:x1] = p
    batch.clear()
    release_free_memory()  # else the heap keeps every batch's peak (see .memory)


def rough_boxes(rough: RoughResult, hw: tuple[int, int], pad: int, min_box: int) -> np.ndarray:
    """Step 2: StS boxes at full resolution from the rough mask.

    Components are labelled on the rough grid (cheap) and their boxes scaled up: for the
    whole-image pass that is the equivalent of the paper's upsample-then-label Algorithm 1;
    tiled, a rough pixel is exactly ``scale`` image pixels.
    """
    mask = rough.mask
    if isinstance(mask, np.ndarray) or int(np.prod(mask.shape)) <= IN_MEMORY_MASK_PX:
        raw = component_boxes(np.asarray(mask[...]))
    else:
        raw = lazy_component_boxes(mask)
    rh, rw = (int(v) for v in mask.shape)
    if rough.plan.tiled:
        f = rough.plan.scale
        raw = scale_boxes(raw, (rh, rw), (rh * f, rw * f))
        raw = np.minimum(raw, (hw[0], hw[1], hw[0], hw[1]))
    else:
        raw = scale_boxes(raw, (rh, rw), hw)
    return finalize_boxes(raw, hw, pad, min_box)


def lazy_component_boxes(mask: object, chunk: int = 2048) -> np.ndarray:
    """Bounding boxes of the fully connected components (8 in 2D, 26 in 3D) of an array too
    large for memory, as :func:`~.boxes.component_boxes` gives them.

    dask-image labels the array chunk by chunk and merges labels across chunk borders; each
    labelled chunk then reports its labels' extents, and the extents of one label are joined.
    """
    import dask
    import dask.array as da
    from dask_image.ndmeasure import label

    arr = da.from_array(mask, chunks=chunk) if not isinstance(mask, da.Array) else mask
    nd = arr.ndim
    labels, n = label(arr > 0, structure=connectivity(nd))
    n = int(n)
    offsets = [np.cumsum((0,) + c) for c in labels.chunks]
    blocks = labels.to_delayed()
    parts = dask.compute(*[
        dask.delayed(_block_extents)(blocks[idx], tuple(int(offsets[d][i]) for d, i in enumerate(idx)))
        for idx in np.ndindex(*blocks.shape)])
    ext = np.concatenate(parts) if parts else np.zeros((0, 1 + 2 * nd), np.int64)
    big = np.iinfo(np.int64).max
    out = np.tile(np.array([big] * nd + [-1] * nd, dtype=np.int64), (n + 1, 1))
    for d in range(nd):
        np.minimum.at(out[:, d], ext[:, 0], ext[:, 1 + d])
        np.maximum.at(out[:, nd + d], ext[:, 0], ext[:, 1 + nd + d])
    out = out[1:][out[1:, nd] >= 0]
    return out[np.lexsort(tuple(out[:, d] for d in reversed(range(nd))))]


def _block_extents(block: np.ndarray, origin: tuple[int, ...]) -> np.ndarray:
    """``(label, starts..., stops...)`` of every label in one labelled chunk (global coordinates)."""
    from scipy import ndimage

    nd = block.ndim
    ids, compact = np.unique(block, return_inverse=True)
    compact = compact.reshape(block.shape)
    rows = []
    for k, sl in enumerate(ndimage.find_objects(compact), start=1):
        if sl is not None and ids[k] != 0:
            rows.append((ids[k], *(s.start + o for s, o in zip(sl, origin, strict=True)),
                         *(s.stop + o for s, o in zip(sl, origin, strict=True))))
    if ids[0] != 0:  # no background in this chunk: label 0 of `compact` is a real object
        where = np.nonzero(compact == 0)
        rows.append((ids[0], *(int(w.min()) + o for w, o in zip(where, origin, strict=True)),
                     *(int(w.max()) + 1 + o for w, o in zip(where, origin, strict=True))))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 1 + 2 * nd)
