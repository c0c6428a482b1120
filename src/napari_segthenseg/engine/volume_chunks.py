"""A volume's fine pass and fusion chunk by chunk, straight into an on-disk 3D array (docs/VOLUMES.md).

:class:`VolumeChunked` is the volume walk's output for large volumes: the mask is written chunk by
chunk (``z_chunk`` slices x ``chunk`` px) into level 0 of a 3D OME-Zarr label image, each chunk one
task on local threads or on dask.distributed workers (which reopen the volume from its path),
with the task runner slides use (:func:`.slide.run_tasks`). A chunk's task refines the crops of
the boxes that touch it on its slices (and ``smooth`` slices around them, for the average along
z), fuses and writes the chunk: memory depends on the chunk, not on the number of slices.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core import Core
from .grid import CHUNK
from .image import VolumeSource
from .limits import IN_MEMORY_MASK_PX
from .localnorm import Windows
from .memory import release_free_memory
from .modelfile import StSModel
from .omezarr import Z_CHUNK
from .progress import Steps
from .slide import CHUNK_MEMORY_MB, core_for, run_tasks, source_for
from .volume_out import YX, VolumeFine, refine_slices, smoothed, spanning

Region3 = tuple[int, int, int, int, int, int]  # (z0, y0, x0, z1, y1, x1), half-open


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


def run_volume_chunk(job: VolumeJob, region: Region3, boxes: np.ndarray
                     ) -> tuple[dict[str, float], dict[str, int]]:
    """Task: segment one chunk of a volume and write it; returns its timings and counts."""
    core = core_for(job)
    core.timings, core.counts = {}, {}
    vol = source_for(job.source, VolumeSource)
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
