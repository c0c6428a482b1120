"""Where a volume's fine pass and fusion go (docs/VOLUMES.md): the in-memory output, and the steps
both outputs share.

The 3D twin of :mod:`.fine`. Both outputs cut the crops of several slices and send them through
the fine net together (:func:`refine_slices`), average each box's results along z
(:func:`smoothed`), then fuse each slice with :meth:`.Core.fuse` (OR where boxes overlap):

* :class:`VolumeInMemory` (here): the 3D mask as a NumPy array, each box's per-slice results
  kept, so an edit refines only the new boxes and re-fuses only the slices and windows that
  changed;
* :class:`~.volume_chunks.VolumeChunked`: the mask written chunk by chunk to disk, on threads or
  dask.distributed (the 3D twin of :mod:`.slide`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .boxes import crop_windows
from .core import Core
from .image import ImageSource, VolumeSource
from .localnorm import Windows
from .progress import Progress, Steps

YX = [1, 2, 4, 5]  # the y/x columns of a 3D box (z0, y0, x0, z1, y1, x1)
FINE_BATCH = 256  # crops (of any slices) per fine-net call
SLAB = 16  # slices between progress reports of the in-memory fine pass


@dataclass
class VolumeFine:
    """What an output made of a volume's boxes."""

    mask: object  # (Z, H, W) bool NumPy, or the on-disk array it was written to
    probs: list[np.ndarray] | None  # per box (z1 - z0, S, S) (in memory only)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def box_key(box: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in box)


def spanning(boxes: np.ndarray, z: int) -> np.ndarray:
    """Indices of the 3D boxes whose z-range holds slice ``z``."""
    return np.flatnonzero((boxes[:, 0] <= z) & (boxes[:, 3] > z))


def smoothed(probs: np.ndarray, j: int, k: int, threshold: float = 0.5) -> np.ndarray:
    """Slice ``j`` of one box's ``(nz, S, S)`` fine probabilities, averaged with up to ``k`` of its
    slices on each side. A 3D box has one window on all its slices, so its maps are aligned pixel
    to pixel: the average is along z at each place of the object (docs/VOLUMES.md). Only slices
    where the fine net found something in the box (a pixel over ``threshold``) take part: an
    empty slice stays empty (an object is not extended past its end) and does not erase an
    object next to it (one on a single slice)."""
    if k <= 0:
        return probs[j]
    lo = max(0, j - k)
    window = probs[lo:j + k + 1]
    found = window.reshape(len(window), -1).max(axis=1) >= threshold
    if not found[j - lo]:
        return probs[j]
    return window[found].mean(axis=0)


def slice_crops(core: Core, src: ImageSource, boxes: np.ndarray, stats: Windows) -> torch.Tensor:
    """Normalised crops of the 2D ``boxes`` of one slice, from one read of the pixels under them."""
    if core.fits(src):
        return core.crops(src, boxes, stats, (src.full_tensor(core.device), 0, 0))
    w = crop_windows(boxes, src.hw)
    y0, x0 = max(0, math.floor(w[:, 0].min()) - 1), max(0, math.floor(w[:, 1].min()) - 1)
    y1 = min(src.height, math.ceil((w[:, 0] + w[:, 2]).max()) + 1)
    x1 = min(src.width, math.ceil((w[:, 1] + w[:, 2]).max()) + 1)
    return core.crops(src, boxes, stats, (src.read_region(y0, x0, y1, x1, core.device), y0, x0))


def refine_slices(core: Core, vol: VolumeSource, jobs: list[tuple[int, np.ndarray]],
                  stats: list[Windows]) -> Iterator[tuple[int, np.ndarray]]:
    """Step 3 for ``(z, boxes)`` of several slices: crops cut slice by slice, the fine net run
    on up to ``FINE_BATCH`` crops of any slices at once. Yields ``(job index, (n, S, S) probs)``
    as each batch is done (memory: one batch)."""
    crops: list[torch.Tensor] = []
    waiting: list[tuple[int, int]] = []
    for i, (z, boxes) in enumerate(jobs):
        with core.timed("crop"):
            crops.append(slice_crops(core, vol.plane(z), boxes, stats[z]))
        waiting.append((i, len(boxes)))
        if sum(n for _, n in waiting) >= FINE_BATCH or i == len(jobs) - 1:
            with core.timed("fine_net"):
                probs = core.forward(core.fine_net, torch.cat(crops))
            with core.timed("to_host"):
                probs = probs.cpu().numpy()
            start = 0
            for j, n in waiting:
                yield j, probs[start:start + n]
                start += n
            crops, waiting = [], []


@dataclass
class VolumeInMemory:
    """The 3D mask in memory. ``known`` holds the fine results of boxes segmented before (by
    :func:`box_key`): they are not refined again. With ``base`` (the previous mask) only the
    ``changed`` footprints (3D boxes: old and new places of edited boxes) are fused again."""

    known: Mapping[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    base: np.ndarray | None = None
    changed: np.ndarray | None = None
    in_memory = True

    def rough_store(self, shape: tuple[int, int, int]) -> None:
        return None

    def _regions(self, shape: tuple[int, int, int]) -> dict[int, tuple[int, int, int, int]] | None:
        """Per slice the y/x window to fuse again; None: every slice whole."""
        if self.base is None or self.changed is None:
            return None
        out: dict[int, list[int]] = {}
        for z0, y0, x0, z1, y1, x1 in np.asarray(self.changed, dtype=np.int64).reshape(-1, 6).tolist():
            for z in range(max(z0, 0), min(z1, shape[0])):
                cur = out.get(z)
                out[z] = [y0, x0, y1, x1] if cur is None else [
                    min(cur[0], y0), min(cur[1], x0), max(cur[2], y1), max(cur[3], x1)]
        hw = shape[1:]
        return {z: (max(r[0], 0), max(r[1], 0), min(r[2], hw[0]), min(r[3], hw[1])) for z, r in out.items()}

    def run(self, core: Core, vol: VolumeSource, boxes: np.ndarray, stats: list[Windows], smooth: int = 0
            ) -> Steps[VolumeFine]:
        """Refine the boxes without a known result (each distinct box once), then fuse (each box's
        probabilities averaged over ``smooth`` slices on each side, :func:`smoothed`)."""
        s, depth, hw = core.settings.size, vol.depth, vol.hw
        probs: list[np.ndarray] = []
        first: dict[tuple[int, ...], int] = {}
        todo: list[int] = []
        for i, b in enumerate(boxes):
            k = box_key(b)
            if k in self.known:
                probs.append(self.known[k])
            elif k in first:
                probs.append(probs[first[k]])  # the same array, filled once
            else:
                first[k] = i
                todo.append(i)
                probs.append(np.zeros((b[3] - b[0], s, s), dtype=np.float32))
        new = np.asarray(todo, dtype=np.int64)
        mask = np.zeros(vol.shape, dtype=bool) if self.base is None else self.base.copy()
        regions = self._regions(vol.shape)
        crops = fused = 0
        for z0 in range(0, depth, SLAB):
            z1 = min(z0 + SLAB, depth)
            yield Progress(f"fine pass: slice {z0 + 1}/{depth}", z0, depth)
            jobs = [(z, new[(boxes[new, 0] <= z) & (boxes[new, 3] > z)]) for z in range(z0, z1)]
            jobs = [(z, idx) for z, idx in jobs if len(idx)]
            for j, p in refine_slices(core, vol, [(z, boxes[idx][:, YX]) for z, idx in jobs], stats):
                z, idx = jobs[j]
                for i, prob in zip(idx, p, strict=True):
                    probs[i][z - boxes[i, 0]] = prob
                crops += len(idx)
            ready = depth if z1 == depth else max(z1 - smooth, 0)  # slices whose neighbours are refined
            for z in range(fused, ready):
                region = (0, 0, *hw) if regions is None else regions.get(z)
                if region is None:
                    continue
                on = spanning(boxes, z)
                p = np.stack([smoothed(probs[i], z - boxes[i, 0], smooth, core.settings.threshold)
                              for i in on]) if len(on) else np.zeros((0, s, s))
                mask[z, region[0]:region[2], region[1]:region[3]] = core.fuse(
                    p, boxes[on][:, YX], hw, region=region)
            fused = ready
        yield Progress("fine pass", depth, depth)
        return VolumeFine(mask, probs, counts={"refined": len(new), "slice_crops": crops})
