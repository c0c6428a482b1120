"""Whole slides: the fine pass and fusion chunk by chunk, straight into an on-disk array.

Boxes are global and small; each output chunk is the OR of the fine results of the boxes that
touch it (docs/WHOLE_SLIDES.md). A chunk's work reads the pixels under its boxes' crop
windows (one read per chunk, from the base level), runs the fine net on those crops and fuses
them into the chunk, which is written to the output array. Memory depends on the chunk and
the batch, not on the slide. The chunks run on any ``concurrent.futures`` executor: local
threads by default, or a dask.distributed cluster's executor (the same function on every
worker; a worker reopens the image from its path).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .boxes import crop_windows
from .image import ImageSource
from .memory import release_free_memory
from .progress import Progress

if TYPE_CHECKING:
    from .modelfile import StSModel
    from .pipeline import Engine, Stats

CHUNK = 1024  # output chunk side (px)
LARGE_WINDOW = 2048  # crop windows above this side are read one by one, from a pyramid level
ROUGH_IN_MEMORY_PX = 32 * 2**20  # larger rough masks of a slide go to disk
CHUNK_MEMORY_MB = 256.0  # activation budget of one chunk's fine batch


@dataclass
class ChunkedOutput:
    """Where and how :meth:`Engine.walk` writes a slide's mask.

    ``array`` is a writable ``(H, W)`` uint8 array chunked by ``chunk`` (e.g. level 0 of an
    OME-Zarr, see :mod:`.omezarr`). ``scratch`` is a folder for the rough mask when it is too
    large for memory. The chunks run on ``threads`` local threads, or on the workers of
    ``client`` (a dask.distributed ``Client``), which reopen the image from ``source_path``.
    """

    array: object
    chunk: int = CHUNK
    scratch: Path | None = None
    client: object | None = None
    threads: int = 2
    source_path: str | None = None
    overwrite: bool = False  # write chunks that come out empty too (re-segmenting after edits)

    def rough_store(self, rough_hw: tuple[int, int]) -> object:
        """An array for the stitched rough mask: in memory, or in ``scratch`` when large."""
        if rough_hw[0] * rough_hw[1] <= ROUGH_IN_MEMORY_PX or self.scratch is None:
            return np.zeros(rough_hw, dtype=bool)
        import zarr

        return zarr.open_array(str(Path(self.scratch) / "rough_mask.zarr"), mode="w", shape=rough_hw,
                               chunks=(2048, 2048), dtype=bool, fill_value=False)


def chunk_regions(hw: tuple[int, int], chunk: int) -> list[tuple[int, int, int, int]]:
    return [(y, x, min(y + chunk, hw[0]), min(x + chunk, hw[1]))
            for y in range(0, hw[0], chunk) for x in range(0, hw[1], chunk)]


def boxes_by_chunk(boxes: np.ndarray, hw: tuple[int, int], chunk: int) -> dict[tuple[int, int], np.ndarray]:
    """Indices of the boxes that touch each output chunk ``(row, col)`` (chunks without none left out)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out: dict[tuple[int, int], list[int]] = {}
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                out.setdefault((cy, cx), []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def refine_nearby(engine: Engine, src: ImageSource, boxes: np.ndarray, stats: Stats) -> np.ndarray:
    """Fine-net probabilities of boxes that lie close together, from one read of the image.

    The read covers every crop window (+1 px for the bilinear samples at their edges); windows
    larger than ``LARGE_WINDOW`` are read one by one instead, so one huge box never makes the
    read huge.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    windows = crop_windows(boxes, src.hw)
    large = windows[:, 2] > LARGE_WINDOW
    probs = np.zeros((len(boxes), engine.settings.size, engine.settings.size), dtype=np.float32)
    small = np.flatnonzero(~large)
    if len(small):
        w = windows[small]
        y0 = max(0, math.floor(w[:, 0].min()) - 1)
        x0 = max(0, math.floor(w[:, 1].min()) - 1)
        y1 = min(src.height, math.ceil((w[:, 0] + w[:, 2]).max()) + 1)
        x1 = min(src.width, math.ceil((w[:, 1] + w[:, 2]).max()) + 1)
        with engine.timed("crop"):
            tensor = src.read_region(y0, x0, y1, x1, engine.device)
        probs[small] = engine.refine(src, boxes[small], stats, (tensor, y0, x0))
        del tensor
    for i in np.flatnonzero(large):
        probs[i] = engine.refine(src, boxes[i:i + 1], stats)[0]
    return probs


def segment_chunk(engine: Engine, src: ImageSource, boxes: np.ndarray, stats: Stats,
                  region: tuple[int, int, int, int]) -> np.ndarray:
    """The fused mask of one output ``region`` from the ``boxes`` that touch it (bool)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    ry0, rx0, ry1, rx1 = region
    if len(boxes) == 0:
        return np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
    probs = refine_nearby(engine, src, boxes, stats)
    return engine.fuse(probs, boxes, src.hw, region=region)


@dataclass
class ChunkJob:
    """What every chunk task shares (scattered once to a cluster's workers)."""

    model: StSModel
    device: str
    source: ImageSource | str  # the image, or its path for workers in other processes
    stats: object
    array: object
    memory_mb: float = CHUNK_MEMORY_MB
    overwrite: bool = False


_local = threading.local()
_sources: dict[str, ImageSource] = {}
_sources_lock = threading.Lock()


def _engine_for(job: ChunkJob) -> Engine:
    """One engine per thread and job (engines keep per-call timings; the nets are shared)."""
    from .pipeline import Engine

    cache = _local.__dict__.setdefault("engines", {})
    key = id(job)
    if key not in cache:
        cache.clear()  # a new job: drop engines of finished ones
        cache[key] = Engine(job.model, job.device, memory_mb=job.memory_mb)
    return cache[key]


def _source_for(job: ChunkJob) -> ImageSource:
    if isinstance(job.source, ImageSource):
        return job.source
    with _sources_lock:  # one open file per worker process and path
        if job.source not in _sources:
            from .reader import open_image

            opened = open_image(job.source)
            _sources[job.source] = ImageSource(opened.levels, name=str(job.source))
        return _sources[job.source]


def run_chunk(job: ChunkJob, region: tuple[int, int, int, int], boxes: np.ndarray
              ) -> tuple[dict[str, float], dict[str, int]]:
    """Task: segment one output chunk and write it; returns its timings and counts."""
    engine = _engine_for(job)
    engine.timings, engine.counts = {}, {}
    mask = segment_chunk(engine, _source_for(job), boxes, job.stats, region)
    y0, x0, y1, x1 = region
    with engine.timed("write"):
        if job.overwrite or mask.any():  # all-background chunks stay unwritten (the fill value)
            job.array[y0:y1, x0:x1] = mask.astype(np.uint8)
    del mask
    release_free_memory()  # else the heap keeps every chunk's peak (see .memory)
    return dict(engine.timings), {**engine.counts, "chunk_boxes": len(boxes)}


def fine_by_chunks(engine: Engine, src: ImageSource, boxes: np.ndarray, stats: Stats,
                   output: ChunkedOutput, regions: list[tuple[int, int, int, int]] | None = None
                   ) -> Generator[Progress, None, tuple[dict[str, float], dict[str, int]]]:
    """Steps 3-4 for a slide: every chunk with boxes (or the given ``regions``), on local threads
    or a cluster. Returns the summed stage times (thread-seconds) and counts."""
    hw, chunk = src.hw, output.chunk
    index = boxes_by_chunk(boxes, hw, chunk)
    if regions is None:
        regions = [r for r in chunk_regions(hw, chunk) if (r[0] // chunk, r[1] // chunk) in index]
    job = ChunkJob(engine.model, str(engine.device), src, stats, output.array, overwrite=output.overwrite)
    shared: object = job
    if output.client is None:
        executor: Executor = ThreadPoolExecutor(max(1, output.threads))
    else:
        if output.source_path is None:
            raise ValueError("a cluster's workers need the image's path to read it")
        job.source = output.source_path
        executor = output.client.get_executor()
        shared = output.client.scatter(job, broadcast=True)  # the model and windows, sent once
    futures: dict[Future, tuple[int, int, int, int]] = {}
    times: dict[str, float] = {}
    counts: dict[str, int] = {"chunks": len(regions)}
    try:
        for r in regions:
            idx = index.get((r[0] // chunk, r[1] // chunk), np.zeros(0, np.int64))
            futures[executor.submit(run_chunk, shared, r, boxes[idx])] = r
        yield Progress(f"fine pass: 0/{len(regions)} chunks", 0, len(regions))
        for done, fut in enumerate(as_completed(futures), start=1):
            t, c = fut.result()
            for k, v in t.items():
                times[k] = times.get(k, 0.0) + v
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            yield Progress(f"fine pass: {done}/{len(regions)} chunks", done, len(regions))
    finally:
        for fut in futures:
            fut.cancel()
        if output.client is None:
            executor.shutdown(wait=True, cancel_futures=True)
    return times, counts
