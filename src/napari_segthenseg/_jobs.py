"""The plugin's background work, as generators that ``thread_worker`` runs (no Qt here).

Each job yields ``Progress`` between steps, so a Cancel takes effect at the next step and the
progress bar moves; its return value is what the widget turns into layers. A job builds and
owns one :class:`~napari_segthenseg.engine.Engine` (engines are not thread-safe).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field

import numpy as np

from ._layers import labels_from_mask
from .engine import Engine, RoughResult, StSModel
from .engine.pipeline import REFINE_CHUNK, Stats
from .engine.progress import Progress
from .engine.scale import plan_rough

Box = tuple[int, int, int, int]
EngineFactory = Callable[[StSModel, str], Engine]


@dataclass
class JobResult:
    """What a finished job hands back to the UI thread."""

    boxes: np.ndarray  # (N, 4) the boxes the segmentation was fused from
    labels: np.ndarray  # (H, W) label image of the fused mask
    new_probs: dict[Box, np.ndarray]  # fine results computed by this job (to cache)
    stats: Stats
    rough: RoughResult | None = None
    refined: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    """An expected failure (bad image for this model, out of memory): shown as a notification."""

    message: str


CANCELLED = JobFailed("cancelled")


def guarded(job: Callable[..., Generator[Progress, None, object]], *args,
            cancel: threading.Event | None = None) -> Generator[Progress, None, object]:
    """Run ``job``, turning expected errors into :class:`JobFailed` (bugs still raise).

    When ``cancel`` is set, the job is closed at its next step *in this thread* (its ``finally``
    blocks run here: a slide job stops its chunk threads and removes its unfinished store) and
    :data:`CANCELLED` is returned.
    """
    steps = job(*args)
    try:
        while True:
            if cancel is not None and cancel.is_set():
                steps.close()
                return CANCELLED
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value
            yield step
    except (ValueError, RuntimeError, MemoryError, OSError) as exc:  # torch OOM is a RuntimeError
        return JobFailed(str(exc))
    finally:
        steps.close()


def use_rough_scale(engine: Engine, rough_scale: float | None) -> Engine:
    """The user's rough scale (image px per rough px) on an engine made by a factory; None keeps
    the model's (``Engine(rough_scale=...)`` for factories that take only the model and device)."""
    if rough_scale is not None:
        plan_rough((64, 64), engine.settings.size, None, rough_scale)  # validates it
        engine.rough_scale = float(rough_scale)
    return engine


def box_key(box: np.ndarray) -> Box:
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def _refine_missing(engine: Engine, image: object, boxes: np.ndarray, cache: Mapping[Box, np.ndarray],
                    stats: Stats) -> Generator[Progress, None, dict[Box, np.ndarray]]:
    """Fine-net results for the boxes not in ``cache``, in cancellable chunks."""
    seen: set[Box] = set()
    todo = []
    for b in boxes:
        k = box_key(b)
        if k not in cache and k not in seen:
            seen.add(k)
            todo.append(b)
    todo_arr = np.asarray(todo, dtype=np.int64).reshape(-1, 4)
    new: dict[Box, np.ndarray] = {}
    for i in range(0, len(todo_arr), REFINE_CHUNK):
        yield Progress(f"fine pass: {i}/{len(todo_arr)} boxes", i, len(todo_arr))
        chunk = todo_arr[i:i + REFINE_CHUNK]
        for b, p in zip(chunk, engine.refine(image, chunk, stats), strict=True):
            new[box_key(b)] = p
    return new


def _fuse(engine: Engine, boxes: np.ndarray, probs: Mapping[Box, np.ndarray],
          hw: tuple[int, int]) -> np.ndarray:
    s = engine.settings.size
    stack = np.stack([probs[box_key(b)] for b in boxes]) if len(boxes) else np.zeros((0, s, s), np.float32)
    return engine.fuse(stack, boxes, hw)


def run_job(make_engine: EngineFactory, model: StSModel, device: str, image: object,
            rough_scale: float | None = None) -> Generator[Progress, None, JobResult]:
    """The automatic pipeline (the engine's walk): rough pass -> boxes -> fine pass -> fuse."""
    engine = use_rough_scale(make_engine(model, device), rough_scale)
    res = yield from engine.walk(image)
    if engine.fine_net is None or res.probs is None:  # rough-only: the mask is the upsampled rough mask
        new = {}
    else:
        new = {box_key(b): p for b, p in zip(res.boxes, res.probs, strict=True)}
    refined = res.boxes.copy() if new else np.zeros((0, 4), dtype=np.int64)
    return JobResult(res.boxes, labels_from_mask(res.mask), new, res.stats, res.rough, refined, res.timings)


def update_job(make_engine: EngineFactory, model: StSModel, device: str, image: object,
               boxes: np.ndarray, cache: Mapping[Box, np.ndarray], stats: Stats | None,
               rough_scale: float | None = None) -> Generator[Progress, None, JobResult]:
    """Segment ``boxes``, refining only those not in ``cache``; re-fuse all of them."""
    engine = use_rough_scale(make_engine(model, device), rough_scale)
    src = engine.source(image)
    if stats is None:
        yield Progress("image statistics", 0, 2)
        stats = engine.image_stats(src)
    new = yield from _refine_missing(engine, src, boxes, cache, stats)
    yield Progress(f"fusing {len(boxes)} boxes", 1, 2)
    mask = _fuse(engine, boxes, {**cache, **new}, src.hw)
    refined = np.asarray(list(new), dtype=np.int64).reshape(-1, 4)
    return JobResult(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), labels_from_mask(mask), new, stats,
                     refined=refined, timings=engine.timings)
