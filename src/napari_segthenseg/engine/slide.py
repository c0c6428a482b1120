"""Whole slides: the fine pass and fusion chunk by chunk, straight into an on-disk array.

:class:`ChunkedOutput` is the walk's output for slides (the in-memory one is
:class:`~.fine.InMemory`). Boxes are global and small; each output chunk is the OR of the fine
results of the boxes that touch it (docs/WHOLE_SLIDES.md). Every box is refined exactly once, by
the task of the chunk that owns it (:func:`~.grid.box_owners`: the chunk of its centre): that task
reads the pixels under its boxes' crop windows (one read, from the base level), runs the fine net
on those crops, fuses them into its chunk and writes it, and hands back the parts of its boxes'
results that fall in neighbouring chunks (packed bits). Once a chunk's own task and those of its
neighbours are done, a small task ORs those parts into it. Memory depends on the chunk and the
batch, not on the slide. The tasks run on any ``concurrent.futures`` executor: local threads by
default, or a dask.distributed cluster's executor (the same functions on every worker; a worker
reopens the image from its path). Each chunk is written by one task at a time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core import Core
from .fine import FineResult
from .grid import CHUNK, Region, box_owners, boxes_by_chunk, boxes_touching, tiles
from .groups import group_boxes
from .image import ImageSource
from .journal import SlideJournal
from .limits import IN_MEMORY_MASK_PX
from .localnorm import Windows
from .memory import release_free_memory
from .modelfile import StSModel
from .progress import Progress, Steps
from .reader import open_image

CHUNK_MEMORY_MB = 256.0  # activation budget of one chunk's fine batch
IN_FLIGHT_PER_THREAD = 2  # chunk tasks submitted ahead per thread (one running, one queued)

__all__ = ["CHUNK", "ChunkJob", "ChunkedOutput", "boxes_by_chunk", "core_for", "merge_parts", "open_executor",
           "run_chunk", "run_tasks", "segment_chunk", "source_for"]


@dataclass
class ChunkedOutput:
    """A slide's mask written chunk by chunk (the walk's ``output`` for slides).

    ``array`` is a writable ``(H, W)`` uint8 array chunked by ``chunk`` (e.g. level 0 of an
    OME-Zarr, see :mod:`.omezarr`). ``scratch`` is a folder for the rough mask when it is too
    large for memory. The chunks run on ``threads`` local threads, or on the workers of
    ``client`` (a dask.distributed ``Client``), which reopen the image from ``source_path``.
    ``regions`` limits the work to those parts of the chunks (re-segmenting after edits; by
    default every chunk that boxes touch) and ``overwrite`` writes chunks that come out empty.
    A ``journal`` records the boxes, the windows and each chunk once it is final, so that a killed
    run can go on (:mod:`.journal`). ``group_zoom`` lets small neighbouring boxes share crops
    (:mod:`.groups`; dense tissue).
    """

    array: object
    chunk: int = CHUNK
    scratch: Path | None = None
    client: object | None = None
    threads: int = 2
    source_path: str | None = None
    overwrite: bool = False
    regions: list[Region] | None = None
    journal: SlideJournal | None = None
    group_zoom: float | None = None  # small neighbouring boxes share crops at this zoom (.groups)
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
        regions = self.regions
        if regions is None:
            index = boxes_by_chunk(boxes, hw, chunk)
            regions = [r for r in tiles(hw, chunk) if (r[0] // chunk, r[1] // chunk) in index]
        windows = groups = None
        if self.group_zoom is not None and len(boxes):
            crops, groups = group_boxes(boxes, hw, core.settings.size, self.group_zoom)
            windows = crops[groups]  # each box's crop window (its group's), computed once for all
        owned, spills = box_owners(boxes, regions, chunk, groups)
        if self.journal is not None:
            self.journal.started(boxes, stats, hw, chunk)
        # A region is final when its own task and every task spilling into it are done, and then
        # the spilled parts are OR-ed in (a merge task): no two tasks ever write one chunk at once.
        waits: list[set[int]] = [set() for _ in regions]
        for k, targets in enumerate(spills):
            for t in targets:
                waits[t].add(k)
        todo = [k for k in range(len(regions)) if len(owned[k]) or self.overwrite]
        for k in todo:
            waits[k].add(k)
        job = ChunkJob(core.model, str(core.device), src, stats, self.array, overwrite=self.overwrite)
        executor, shared = open_executor(job, self.client, self.threads, len(todo), self.source_path)
        futures: dict[Future, tuple[bool, int]] = {}  # (is a merge, region)
        inbox: list[list[Part]] = [[] for _ in regions]
        times: dict[str, float] = {}
        counts: dict[str, int] = {"chunks": len(regions), "merges": 0}
        done = 0
        for k, w in enumerate(waits):
            if not w:  # nothing to write there
                done += self._final(regions[k])
        # Chunk tasks go in a few at a time, so that a merge runs as soon as its region is ready
        # (all at once, merges would queue behind every chunk task: a killed run would have no
        # region final for its journal, and finished tasks' parts would pile up in memory).
        queue = iter(todo)
        limit = IN_FLIGHT_PER_THREAD * (self.threads if self.client is None else cluster_threads(self.client))
        in_flight = 0
        pending: set[Future] = set()

        def top_up() -> None:
            nonlocal in_flight
            while in_flight < limit and (k := next(queue, None)) is not None:
                args = [shared, regions[k], boxes[owned[k]], [regions[t] for t in spills[k]]]
                if windows is not None:
                    args.append(windows[owned[k]])
                fut = executor.submit(run_chunk, *args)
                futures[fut], in_flight = (False, k), in_flight + 1
                pending.add(fut)

        try:
            top_up()
            yield Progress(f"fine pass: 0/{len(todo)} chunks", 0, len(todo))
            segmented = 0
            while pending:
                finished, rest = wait(pending, return_when=FIRST_COMPLETED)
                pending.intersection_update(rest)
                failed = [f for f in finished if f.exception() is not None]
                for fut in finished:
                    merge, k = futures.pop(fut)
                    in_flight -= not merge
                    if fut in failed:
                        continue
                    t, c, parts = fut.result()
                    for key, v in t.items():
                        times[key] = times.get(key, 0.0) + v
                    for key, v in c.items():
                        counts[key] = counts.get(key, 0) + v
                    if merge:
                        done += self._final(regions[k])
                        continue
                    segmented += 1
                    for target, part in zip(spills[k], parts, strict=True):
                        if part is not None:
                            inbox[target].append(part)
                    for target in (k, *spills[k]):
                        waits[target].discard(k)
                        if waits[target]:
                            continue
                        if inbox[target]:
                            nxt = executor.submit(merge_parts, shared, inbox[target])
                            futures[nxt], inbox[target] = (True, target), []
                            pending.add(nxt)
                        else:
                            done += self._final(regions[target])
                if failed:  # after the others that finished are recorded (a journal keeps them)
                    failed[0].result()
                top_up()
                # progress: chunks segmented (a chunk is final a row of chunks later, when its
                # neighbours below have handed it their parts)
                yield Progress(f"fine pass: {segmented}/{len(todo)} chunks", segmented, len(todo))
        finally:
            for fut in futures:
                fut.cancel()
            if self.client is None:
                executor.shutdown(wait=True, cancel_futures=True)
        counts["refined"] = counts.get("chunk_boxes", 0)
        assert done == len(regions), (done, len(regions))  # every region written and final
        return FineResult(self.array, None, times, counts)

    def _final(self, region: Region) -> int:
        if self.journal is not None:
            self.journal.finished(region)
        return 1


def cluster_threads(client: object) -> int:
    """How many tasks a dask.distributed cluster runs at once (its workers' threads)."""
    try:
        return max(1, sum(client.nthreads().values()))
    except (AttributeError, TypeError):  # an executor-like client without nthreads: a modest window
        return 8


def open_executor(job: object, client: object | None, threads: int, tasks: int,
                  source_path: str | None) -> tuple[Executor, object]:
    """The executor for ``tasks`` tasks of ``job`` (``threads`` local threads, or the workers of a
    dask.distributed ``client``) and what to pass them as the job: on a cluster it is scattered
    once, its ``source`` replaced by ``source_path`` for workers to reopen."""
    if client is None:
        return ThreadPoolExecutor(max(1, min(threads, tasks))), job
    if source_path is None:
        raise ValueError("a cluster's workers need the image's path to read it")
    job.source = source_path
    return client.get_executor(), client.scatter(job, broadcast=True)  # the model and windows, sent once


def run_tasks(task: Callable, job: object, items: list[tuple], client: object | None, threads: int,
              source_path: str | None) -> Steps[tuple[dict[str, float], dict[str, int]]]:
    """``task(job, *item)`` for every item, on ``threads`` local threads or the workers of a
    dask.distributed ``client`` (``job`` scattered once, its ``source`` replaced by
    ``source_path`` for workers to reopen). Returns the summed timings and counts of the tasks."""
    executor, shared = open_executor(job, client, threads, len(items), source_path)
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
                  region: Region, windows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fused mask of one output ``region`` from ``boxes`` (bool), and their fine results.
    ``windows``: each box's crop window when crops are shared (:mod:`.groups`); each distinct
    window is one crop."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    ry0, rx0, ry1, rx1 = region
    s = core.settings.size
    if len(boxes) == 0:
        return np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool), np.zeros((0, s, s), np.float32)
    if windows is None:
        core.counts["crops"] = core.counts.get("crops", 0) + len(boxes)
        probs = core.refine_local(src, boxes, stats)
    else:
        crops, member = np.unique(windows, axis=0, return_inverse=True)
        squares = np.round(np.concatenate([crops[:, :2], crops[:, :2] + crops[:, 2:]], 1)).astype(np.int64)
        core.counts["crops"] = core.counts.get("crops", 0) + len(crops)
        probs = core.refine_local(src, squares, stats, crops)[member.reshape(-1)]
    return core.fuse(probs, boxes, src.hw, region=region, windows=windows), probs


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
_sources: dict[tuple[str, type], object] = {}
_sources_lock = threading.Lock()


def core_for(job: ChunkJob) -> Core:
    """One core per thread and job (cores keep per-call timings; the nets are shared). Any job
    with ``token``, ``model``, ``device`` and ``memory_mb`` will do (a volume's chunks too)."""
    cache = _local.__dict__.setdefault("cores", {})
    if job.token not in cache:
        cache.clear()  # a new job: drop the cores of finished ones
        cache[job.token] = Core(job.model, job.device, memory_mb=job.memory_mb)
    return cache[job.token]


def source_for(source: object, kind: type = ImageSource) -> object:
    """A task's image: ``source`` itself when it is one (a ``kind``: ImageSource, or VolumeSource
    for a volume's tasks), else the file at that path, opened once per worker process."""
    if isinstance(source, kind):
        return source
    with _sources_lock:  # one open file per worker process, path and kind
        key = (str(source), kind)
        if key not in _sources:
            opened = open_image(source, volume=kind is not ImageSource)
            _sources[key] = kind(opened.levels, name=str(source))
        return _sources[key]


Part = tuple[Region, np.ndarray]  # part of a box's result in another task's region: area, packed bits
TaskResult = tuple[dict[str, float], dict[str, int], list[Part | None]]


def run_chunk(job: ChunkJob, region: Region, boxes: np.ndarray, targets: list[Region] | None = None,
              windows: np.ndarray | None = None) -> TaskResult:
    """Task: refine the ``boxes`` this region owns (in their shared crop ``windows``, if any), write
    the region, and return the parts of their results that fall in the ``targets`` (other regions;
    None where nothing is foreground there)."""
    core = core_for(job)
    core.timings, core.counts = {}, {}
    mask = probs = None
    try:
        src = source_for(job.source)
        mask, probs = segment_chunk(core, src, boxes, job.stats, region, windows)
        y0, x0, y1, x1 = region
        with core.timed("write"):
            if job.overwrite or mask.any():  # all-background chunks stay unwritten (the fill value)
                job.array[y0:y1, x0:x1] = mask.astype(np.uint8)
        parts: list[Part | None] = []
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        for t in targets or []:
            sel = boxes_touching(boxes, [t])
            b = boxes[sel]
            area = (max(t[0], int(b[:, 0].min())), max(t[1], int(b[:, 1].min())),
                    min(t[2], int(b[:, 2].max())), min(t[3], int(b[:, 3].max())))
            patch = core.fuse(probs[sel], b, src.hw, region=area,
                              windows=None if windows is None else windows[sel])
            parts.append((area, np.packbits(patch)) if patch.any() else None)
        return dict(core.timings), {**core.counts, "chunk_boxes": len(boxes)}, parts
    finally:
        del mask, probs
        release_free_memory()  # else the heap keeps every chunk's peak (see .memory)


def merge_parts(job: ChunkJob, parts: list[Part]) -> TaskResult:
    """Task: OR the parts other regions' boxes left in one region into the array (after that
    region's own task wrote it). One read and one write of their common extent."""
    t0 = time.perf_counter()
    areas = np.array([a for a, _ in parts], dtype=np.int64)
    y0, x0 = areas[:, :2].min(0).tolist()
    y1, x1 = areas[:, 2:].max(0).tolist()
    block = np.asarray(job.array[y0:y1, x0:x1]) > 0
    for (ay0, ax0, ay1, ax1), bits in parts:
        n = (ay1 - ay0) * (ax1 - ax0)
        block[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] |= np.unpackbits(bits, count=n).reshape(
            ay1 - ay0, ax1 - ax0).astype(bool)
    job.array[y0:y1, x0:x1] = block.astype(np.uint8)
    return {"merge": time.perf_counter() - t0}, {"merges": 1}, []
