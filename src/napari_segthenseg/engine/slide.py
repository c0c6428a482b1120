"""Whole slides: the fine pass and fusion chunk by chunk, straight into an on-disk array.

:class:`ChunkedOutput` is the walk's output for slides (the in-memory one is
:class:`~.fine.InMemory`). Boxes are global and small; each output chunk is the OR of the fine
results of the boxes that touch it (docs/WHOLE_SLIDES.md). A chunk's task reads the pixels
under its boxes' crop windows (one read per chunk, from the base level), runs the fine net on
those crops and fuses them into the chunk, which is written to the output array. Memory depends
on the chunk and the batch, not on the slide. The tasks run on any ``concurrent.futures``
executor: local threads by default, or a dask.distributed cluster's executor (the same function
on every worker; a worker reopens the image from its path).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core import Core
from .fine import FineResult
from .grid import CHUNK, Region, boxes_by_chunk, tiles
from .image import ImageSource
from .limits import IN_MEMORY_MASK_PX
from .localnorm import Windows
from .memory import release_free_memory
from .modelfile import StSModel
from .progress import Progress, Steps
from .reader import open_image

CHUNK_MEMORY_MB = 256.0  # activation budget of one chunk's fine batch

__all__ = ["CHUNK", "ChunkJob", "ChunkedOutput", "boxes_by_chunk", "core_for", "run_chunk", "run_tasks",
           "segment_chunk"]


@dataclass
class ChunkedOutput:
    """A slide's mask written chunk by chunk (the walk's ``output`` for slides).

    ``array`` is a writable ``(H, W)`` uint8 array chunked by ``chunk`` (e.g. level 0 of an
    OME-Zarr, see :mod:`.omezarr`). ``scratch`` is a folder for the rough mask when it is too
    large for memory. The chunks run on ``threads`` local threads, or on the workers of
    ``client`` (a dask.distributed ``Client``), which reopen the image from ``source_path``.
    ``regions`` limits the work to those parts of the chunks (re-segmenting after edits; by
    default every chunk that boxes touch) and ``overwrite`` writes chunks that come out empty.
    """

    array: object
    chunk: int = CHUNK
    scratch: Path | None = None
    client: object | None = None
    threads: int = 2
    source_path: str | None = None
    overwrite: bool = False
    regions: list[Region] | None = None
    in_memory = False  # the mask stays on disk (no baseline at full resolution)

    def rough_store(self, rough_hw: tuple[int, int]) -> object:
        """An array for the stitched rough mask: in memory, or in ``scratch`` when large."""
        if rough_hw[0] * rough_hw[1] <= IN_MEMORY_MASK_PX or self.scratch is None:
            return np.zeros(rough_hw, dtype=bool)
        import zarr

        return zarr.open_array(str(Path(self.scratch) / "rough_mask.zarr"), mode="w", shape=rough_hw,
                               chunks=(2048, 2048), dtype=bool, fill_value=False)

    def run(self, core: Core, src: ImageSource, boxes: np.ndarray, stats: Windows) -> Steps[FineResult]:
        """Steps 3-4 for a slide: every chunk with boxes (or the given ``regions``), on local
        threads or a cluster. Timings are the summed stage times of the tasks (thread-seconds)."""
        hw, chunk = src.hw, self.chunk
        index = boxes_by_chunk(boxes, hw, chunk)
        regions = self.regions
        if regions is None:
            regions = [r for r in tiles(hw, chunk) if (r[0] // chunk, r[1] // chunk) in index]
        job = ChunkJob(core.model, str(core.device), src, stats, self.array, overwrite=self.overwrite)
        none = np.zeros(0, np.int64)
        items = [(r, boxes[index.get((r[0] // chunk, r[1] // chunk), none)]) for r in regions]
        times, counts = yield from run_tasks(run_chunk, job, items, self.client, self.threads,
                                             self.source_path)
        counts["refined"] = counts.get("chunk_boxes", 0)
        return FineResult(self.array, None, times, counts)


def run_tasks(task: Callable, job: object, items: list[tuple], client: object | None, threads: int,
              source_path: str | None) -> Steps[tuple[dict[str, float], dict[str, int]]]:
    """``task(job, *item)`` for every item, on ``threads`` local threads or the workers of a
    dask.distributed ``client`` (``job`` scattered once, its ``source`` replaced by
    ``source_path`` for workers to reopen). Returns the summed timings and counts of the tasks."""
    shared: object = job
    if client is None:
        executor: Executor = ThreadPoolExecutor(max(1, min(threads, len(items))))
    else:
        if source_path is None:
            raise ValueError("a cluster's workers need the image's path to read it")
        job.source = source_path
        executor = client.get_executor()
        shared = client.scatter(job, broadcast=True)  # the model and windows, sent once
    futures: list[Future] = []
    times: dict[str, float] = {}
    counts: dict[str, int] = {"chunks": len(items)}
    try:
        futures = [executor.submit(task, shared, *item) for item in items]
        yield Progress(f"fine pass: 0/{len(items)} chunks", 0, len(items))
        for done, fut in enumerate(as_completed(futures), start=1):
            t, c = fut.result()
            for k, v in t.items():
                times[k] = times.get(k, 0.0) + v
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            yield Progress(f"fine pass: {done}/{len(items)} chunks", done, len(items))
    finally:
        for fut in futures:
            fut.cancel()
        if client is None:
            executor.shutdown(wait=True, cancel_futures=True)
    return times, counts


def segment_chunk(core: Core, src: ImageSource, boxes: np.ndarray, stats: Windows,
                  region: Region) -> np.ndarray:
    """The fused mask of one output ``region`` from the ``boxes`` that touch it (bool)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    ry0, rx0, ry1, rx1 = region
    if len(boxes) == 0:
        return np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
    probs = core.refine_local(src, boxes, stats)
    return core.fuse(probs, boxes, src.hw, region=region)


@dataclass
class ChunkJob:
    """What every chunk task shares (scattered once to a cluster's workers). ``token`` names the
    job for the per-thread cores: unique, unlike ``id()``, which Python reuses."""

    model: StSModel
    device: str
    source: ImageSource | str  # the image, or its path for workers in other processes
    stats: Windows
    array: object
    memory_mb: float = CHUNK_MEMORY_MB
    overwrite: bool = False
    token: str = field(init=False, default_factory=lambda: uuid.uuid4().hex)


_local = threading.local()
_sources: dict[str, ImageSource] = {}
_sources_lock = threading.Lock()


def core_for(job: ChunkJob) -> Core:
    """One core per thread and job (cores keep per-call timings; the nets are shared). Any job
    with ``token``, ``model``, ``device`` and ``memory_mb`` will do (a volume's chunks too)."""
    cache = _local.__dict__.setdefault("cores", {})
    if job.token not in cache:
        cache.clear()  # a new job: drop the cores of finished ones
        cache[job.token] = Core(job.model, job.device, memory_mb=job.memory_mb)
    return cache[job.token]


def _source_for(job: ChunkJob) -> ImageSource:
    if isinstance(job.source, ImageSource):
        return job.source
    with _sources_lock:  # one open file per worker process and path
        if job.source not in _sources:
            opened = open_image(job.source)
            _sources[job.source] = ImageSource(opened.levels, name=str(job.source))
        return _sources[job.source]


def run_chunk(job: ChunkJob, region: Region, boxes: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
    """Task: segment one output chunk and write it; returns its timings and counts."""
    core = core_for(job)
    core.timings, core.counts = {}, {}
    mask = None
    try:
        mask = segment_chunk(core, _source_for(job), boxes, job.stats, region)
        y0, x0, y1, x1 = region
        with core.timed("write"):
            if job.overwrite or mask.any():  # all-background chunks stay unwritten (the fill value)
                job.array[y0:y1, x0:x1] = mask.astype(np.uint8)
        return dict(core.timings), {**core.counts, "chunk_boxes": len(boxes)}
    finally:
        del mask
        release_free_memory()  # else the heap keeps every chunk's peak (see .memory)
