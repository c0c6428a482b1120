"""Where a volume's fine pass and fusion go (docs/VOLUMES.md): in memory, or chunk by chunk to disk.

The 3D twins of :mod:`.fine` and :mod:`.slide`. Both cut the crops of several slices and send
them through the fine net together (:func:`refine_slices`), then fuse each slice with
:meth:`.Core.fuse` (OR where boxes overlap):

* :class:`VolumeInMemory`: the 3D mask as a NumPy array, each box's per-slice results kept, so
  an edit refines only the new boxes and re-fuses only the slices and windows that changed;
* :class:`VolumeChunked`: the mask written chunk by chunk (``z_chunk`` slices x ``chunk`` px)
  to an on-disk array, each chunk one task on local threads or on dask.distributed workers
  (which reopen the volume from its path): the same tasks runner as slides
  (:func:`.slide.run_tasks`). Memory depends on the chunk, not on the number of slices.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .boxes import crop_windows
from .core import Core
from .grid import CHUNK
from .image import ImageSource, VolumeSource
from .limits import IN_MEMORY_MASK_PX
from .localnorm import Windows
from .memory import release_free_memory
from .modelfile import StSModel
from .omezarr import Z_CHUNK
from .progress import Progress, Steps
from .reader import open_image
from .slide import CHUNK_MEMORY_MB, core_for, run_tasks

YX = [1, 2, 4, 5]  # the y/x columns of a 3D box (z0, y0, x0, z1, y1, x1)
FINE_BATCH = 256  # crops (of any slices) per fine-net call
SLAB = 16  # slices between progress reports of the in-memory fine pass
Region3 = tuple[int, int, int, int, int, int]  # (z0, y0, x0, z1, y1, x1), half-open


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


@dataclass
class VolumeChunked:
    """A volume's mask written chunk by chunk (the walk's ``output`` for large volumes).

    ``array`` is a writable ``(Z, H, W)`` uint8 array (level 0 of a 3D OME-Zarr, see
    :mod:`.omezarr`); ``scratch`` a folder for the rough masks when they are too large for
    memory. As :class:`~.slide.ChunkedOutput`: ``threads`` local threads or a dask.distributed
    ``client`` (workers reopen ``source_path``), ``regions`` (3D) to redo only those parts, and
    ``overwrite`` to write chunks that come out empty.
    """

    array: object
    chunk: int = CHUNK
    z_chunk: int = Z_CHUNK
    scratch: Path | None = None
    client: object | None = None
    threads: int = 2
    source_path: str | None = None
    overwrite: bool = False
    regions: list[Region3] | None = None
    in_memory = False

    def rough_store(self, shape: tuple[int, int, int]) -> object:
        """An array for the stacked rough masks: in memory, or in ``scratch`` when large."""
        if int(np.prod(shape)) <= IN_MEMORY_MASK_PX or self.scratch is None:
            return np.zeros(shape, dtype=bool)
        import zarr

        return zarr.open_array(str(Path(self.scratch) / "rough_masks.zarr"), mode="w", shape=shape,
                               chunks=(self.z_chunk, 2048, 2048), dtype=bool, fill_value=False)

    def run(self, core: Core, vol: VolumeSource, boxes: np.ndarray, stats: list[Windows], smooth: int = 0
            ) -> Steps[VolumeFine]:
        """Steps 3-4 chunk by chunk: every chunk with boxes (or the given ``regions``)."""
        regions = self.regions if self.regions is not None else chunk_regions(
            boxes, vol.shape, self.z_chunk, self.chunk)
        items = [(r, boxes[boxes_touching_3d(boxes, r)]) for r in regions]
        job = VolumeJob(core.model, str(core.device), vol, stats, self.array, overwrite=self.overwrite,
                        smooth=smooth)
        times, counts = yield from run_tasks(run_volume_chunk, job, items, self.client, self.threads,
                                             self.source_path)
        counts["refined"] = len(boxes)
        return VolumeFine(self.array, None, times, counts)


def chunk_regions(boxes: np.ndarray, shape: tuple[int, int, int], z_chunk: int, chunk: int
                  ) -> list[Region3]:
    """The output chunks (``z_chunk`` slices x ``chunk`` px) that any box touches, in order."""
    hit: set[tuple[int, int, int]] = set()
    for z0, y0, x0, z1, y1, x1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 6).tolist():
        for cz in range(z0 // z_chunk, (z1 - 1) // z_chunk + 1):
            for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
                for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                    hit.add((cz, cy, cx))
    return [(cz * z_chunk, cy * chunk, cx * chunk, min((cz + 1) * z_chunk, shape[0]),
             min((cy + 1) * chunk, shape[1]), min((cx + 1) * chunk, shape[2])) for cz, cy, cx in sorted(hit)]


def boxes_touching_3d(boxes: np.ndarray, region: Region3) -> np.ndarray:
    """Indices of the 3D boxes that overlap ``region``."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
    lo, hi = np.asarray(region[:3]), np.asarray(region[3:])
    return np.flatnonzero(np.all((b[:, :3] < hi) & (b[:, 3:] > lo), axis=1))


@dataclass
class VolumeJob:
    """What every chunk task of a volume shares (scattered once to a cluster's workers)."""

    model: StSModel
    device: str
    source: VolumeSource | str  # the volume, or its path for workers in other processes
    stats: list[Windows]
    array: object
    memory_mb: float = CHUNK_MEMORY_MB
    overwrite: bool = False
    smooth: int = 0  # slices each side that a box's probabilities are averaged over
    token: str = field(init=False, default_factory=lambda: uuid.uuid4().hex)


_volumes: dict[str, VolumeSource] = {}
_volumes_lock = threading.Lock()


def _volume_for(job: VolumeJob) -> VolumeSource:
    if isinstance(job.source, VolumeSource):
        return job.source
    with _volumes_lock:  # one open file per worker process and path
        if job.source not in _volumes:
            opened = open_image(job.source, volume=True)
            _volumes[job.source] = VolumeSource(opened.levels, name=str(job.source))
        return _volumes[job.source]


def run_volume_chunk(job: VolumeJob, region: Region3, boxes: np.ndarray
                     ) -> tuple[dict[str, float], dict[str, int]]:
    """Task: segment one chunk of a volume and write it; returns its timings and counts."""
    core = core_for(job)
    core.timings, core.counts = {}, {}
    vol = _volume_for(job)
    z0, y0, x0, z1, y1, x1 = region
    out = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=bool)
    k = job.smooth
    try:
        # the chunk's slices and, for the average along z, up to k more on each side
        jobs = [(z, spanning(boxes, z)) for z in range(max(z0 - k, 0), min(z1 + k, vol.depth))]
        jobs = [(z, idx) for z, idx in jobs if len(idx)]
        got: dict[int, dict[int, np.ndarray]] = {}  # box -> slice -> probabilities
        for j, probs in refine_slices(core, vol, [(z, boxes[idx][:, YX]) for z, idx in jobs], job.stats):
            z, idx = jobs[j]
            for i, p in zip(idx, probs, strict=True):
                got.setdefault(int(i), {})[z] = p
        for z in range(z0, z1):
            on = spanning(boxes, z)
            if len(on) == 0:
                continue
            p = np.stack([smoothed(np.stack([got[int(i)][w] for w in range(max(z - k, boxes[i, 0]),
                                                                            min(z + k + 1, boxes[i, 3]))]),
                                   z - max(z - k, boxes[i, 0]), k, core.settings.threshold) for i in on])
            out[z - z0] = core.fuse(p, boxes[on][:, YX], vol.hw, region=(y0, x0, y1, x1))
        with core.timed("write"):
            if job.overwrite or out.any():  # all-background chunks stay unwritten (the fill value)
                job.array[z0:z1, y0:y1, x0:x1] = out.astype(np.uint8)
        return dict(core.timings), {**core.counts, "slice_crops": sum(len(b) for _, b in jobs)}
    finally:
        del out
        release_free_memory()  # else the heap keeps every chunk's peak (see .memory)
