"""Whole slides in the plugin: lazy layers in, the engine's chunked path, edits that touch chunks.

A slide (a multiscale image layer, or one over ``SLIDE_MIN_PIXELS``) is never held at full
resolution. Run walks the engine with a :class:`~.engine.slide.ChunkedOutput` into an OME-Zarr
label image in the widget's session folder (:class:`Workdir`); the segmentation layer is a
multiscale Labels layer whose levels *are* that store's zarr arrays, so napari reads only the
tiles on screen. An edit of the boxes re-segments only where the set of boxes changed: the old
and new footprints of every changed box, cut at the output chunk borders (one region per touched
chunk), with the boxes that overlap those regions (:func:`~.engine.slide.fine_by_chunks` with
``overwrite``), then the pyramid above them (:func:`~.engine.omezarr.update_pyramid`).

Heavy layer work is done in the job (worker thread) so the Qt event loop stays live: the rough
mask's pyramid and the boxes' Shapes layer (napari builds 15,000 rectangles in about 4 s; adding
the prebuilt layer costs the UI thread well under a second) are made there and handed over.
No Qt here; napari layers are only constructed, never added.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._jobs import EngineFactory, use_rough_scale
from ._session import STORE_KEY
from .engine import ImageSource, StSModel, omezarr
from .engine.progress import Progress
from .engine.slide import CHUNK, ChunkedOutput, fine_by_chunks

SLIDE_MIN_PIXELS = 4096 * 4096  # larger single-scale images take the slide path too
ROUGH_LAYER_IN_MEMORY_PX = 32 * 2**20  # larger rough masks get an on-disk pyramid
EMPTY = np.zeros((0, 4), dtype=np.int64)


def is_slide(layer: object, plane: object) -> bool:
    """Whether ``layer``'s plane takes the whole-slide path: a 2D multiscale or very large image."""
    if plane.lead:  # stacks: the plane of a slice is segmented in memory, as before
        return False
    return bool(getattr(layer, "multiscale", False)) or plane.hw[0] * plane.hw[1] > SLIDE_MIN_PIXELS


class Workdir:
    """The widget's session folder (removed when the widget goes): stores and scratch space."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = itertools.count(1)

    @property
    def path(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="segthenseg-")
        return Path(self._tmp.name)

    def new(self, stem: str, suffix: str = ".ome.zarr") -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60] or "image"
        return self.path / f"{safe}-{next(self._count)}{suffix}"

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def remove_later(path: Path | None) -> None:
    """Delete a store in a background thread (hundreds of chunk files: not on the UI thread)."""
    if path is not None and Path(path).exists():
        threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                         daemon=True).start()


# -- boxes and regions -------------------------------------------------------------------------
def changed_footprints(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Boxes whose count differs between ``old`` and ``new`` (moved, resized, deleted or drawn):
    the footprints whose pixels must be fused again. Unchanged boxes cost nothing."""
    old = np.asarray(old, dtype=np.int64).reshape(-1, 4)
    new = np.asarray(new, dtype=np.int64).reshape(-1, 4)
    both = np.concatenate([old, new])
    if len(both) == 0:
        return EMPTY
    if both.min() >= 0 and both.max() < 2**16:  # one 64-bit key per box: a 1D sort (ms for 30,000 boxes)
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


def regions_for(footprints: np.ndarray, hw: tuple[int, int], chunk: int = CHUNK
                ) -> list[tuple[int, int, int, int]]:
    """One region per output chunk the ``footprints`` touch: the bounding box of their parts in
    that chunk (clipped to the image). Fusing a region needs only the boxes that overlap it."""
    fp = np.asarray(footprints, dtype=np.int64).reshape(-1, 4)
    fp = np.clip(fp, 0, [hw[0], hw[1], hw[0], hw[1]])
    fp = fp[(fp[:, 2] > fp[:, 0]) & (fp[:, 3] > fp[:, 1])]
    parts: dict[tuple[int, int], list[int]] = {}
    for y0, x0, y1, x1 in fp.tolist():
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                cy0, cx0 = cy * chunk, cx * chunk
                piece = (max(y0, cy0), max(x0, cx0), min(y1, cy0 + chunk), min(x1, cx0 + chunk))
                cur = parts.get((cy, cx))
                parts[(cy, cx)] = list(piece) if cur is None else [
                    *np.minimum(cur[:2], piece[:2]).tolist(), *np.maximum(cur[2:], piece[2:]).tolist()]
    return [tuple(parts[k]) for k in sorted(parts)]  # type: ignore[misc]


def boxes_touching(boxes: np.ndarray, regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Indices of the boxes that overlap any of ``regions`` (vectorised over the boxes)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    hit = np.zeros(len(boxes), dtype=bool)
    for y0, x0, y1, x1 in regions:
        hit |= (boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0)
    return np.flatnonzero(hit)


def union_region(regions: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    if not regions:
        return None
    r = np.asarray(regions)
    return int(r[:, 0].min()), int(r[:, 1].min()), int(r[:, 2].max()), int(r[:, 3].max())


# -- rough mask pyramid ------------------------------------------------------------------------
def rough_pyramid(mask: object, store: Path | None = None) -> list:
    """The rough mask as a uint8 pyramid (2x apart, down to ``omezarr.MIN_LEVEL_SIDE``), largest first:
    NumPy when it fits in memory, else an OME-Zarr at ``store`` copied block by block."""
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    if isinstance(mask, np.ndarray) or hw[0] * hw[1] <= ROUGH_LAYER_IN_MEMORY_PX or store is None:
        levels = [np.asarray(mask[...], dtype=np.uint8)]
        while max(levels[-1].shape) > omezarr.MIN_LEVEL_SIDE:
            levels.append(omezarr.max_pool2(levels[-1]))
        return levels
    image = omezarr.create(store, hw, 2048, name="rough")
    omezarr.write_level0(image, mask)
    return list(image.levels)


# -- jobs ---------------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """What a slide job hands back to the UI thread."""

    boxes: np.ndarray  # (N, 4) the boxes the store now reflects
    stats: object  # intensity windows (reused by later edits)
    label: omezarr.LabelImage | None = None  # a new store (run, adopt); None: edited in place
    rough_levels: list | None = None
    rough_zoom: tuple[float, float] | None = None  # image px per rough px (y, x)
    layers: dict = field(default_factory=dict)  # prebuilt layers: rough, seg, boxes (run)
    regions: list = field(default_factory=list)  # level-0 regions re-segmented (update)
    refined: int = 0  # boxes that went through the fine net
    timings: dict[str, float] = field(default_factory=dict)
    plan: str = ""


def _engine(make_engine: EngineFactory, model: StSModel, device: str, rough_scale: float | None):
    engine = make_engine(model, device)
    use_rough_scale(engine, rough_scale)
    return engine


def slide_run_job(make_engine: EngineFactory, model: StSModel, device: str, image: object,
                  store: Path, rough_scale: float | None = None,
                  build_layers: object | None = None, chunk: int = CHUNK, threads: int = 2
                  ) -> Generator[Progress, None, SlideResult]:
    """The whole pipeline on a slide, written chunk by chunk into a new OME-Zarr at ``store``.

    Returns the boxes, the rough mask as a pyramid with its pixel size and (with
    ``build_layers``, e.g. the :class:`~._session.Session`) the three layers, built here rather
    than on the UI thread: ``make_rough_layer(levels, zoom)``, ``make_seg_layer(label)`` and
    ``build_boxes_layer(boxes)``. A failed or cancelled run (the generator closed at a step)
    leaves no store behind.
    """
    engine = _engine(make_engine, model, device, rough_scale)
    src = image if isinstance(image, ImageSource) else ImageSource(image, name="slide")
    ok = False
    scratch = store.with_name(store.name + ".scratch")
    try:
        label = omezarr.create(store, src.hw, chunk)
        scratch.mkdir(parents=True, exist_ok=True)
        output = ChunkedOutput(label.levels[0], chunk, scratch, threads=threads)
        res = yield from engine.walk(src, output=output)
        timings = dict(res.timings)
        if engine.fine_net is not None:
            yield Progress("pyramid of the segmentation", 0, 1)
            with engine.timed("pyramid"):
                omezarr.update_pyramid(label)
        rough = res.rough
        plan = rough.plan
        zoom = (plan.scale, plan.scale) if plan.tiled else (
            src.hw[0] / rough.mask.shape[0], src.hw[1] / rough.mask.shape[1])
        yield Progress("rough mask pyramid", 0, 1)
        with engine.timed("rough_layer"):
            rough_levels = rough_pyramid(rough.mask, store.with_name(store.name + ".rough"))
        seg = label if engine.fine_net is not None else None
        layers: dict[str, object] = {}
        if build_layers is not None:
            yield Progress(f"layers: {len(res.boxes)} boxes", 0, 1)
            with engine.timed("layers"):
                layers["rough"] = build_layers.make_rough_layer(rough_levels, zoom)
                layers["seg"] = build_layers.make_seg_layer(seg) if seg is not None else None
                layers["boxes"] = build_layers.build_boxes_layer(res.boxes)
        timings.update({k: v for k, v in engine.timings.items() if k not in timings})
        ok = True
        return SlideResult(res.boxes, res.stats, seg, rough_levels, zoom, layers, timings=timings,
                           plan=plan.describe())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not ok:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(store.with_name(store.name + ".rough"), ignore_errors=True)


def slide_update_job(make_engine: EngineFactory, model: StSModel, device: str, image: object,
                     label: omezarr.LabelImage, boxes: np.ndarray, footprints: np.ndarray,
                     stats: object | None, rough_scale: float | None = None, threads: int = 2
                     ) -> Generator[Progress, None, SlideResult]:
    """Re-segment where ``footprints`` (changed boxes, old and new places) lie, with ``boxes``
    (all current boxes): only the output chunks they touch, only the boxes overlapping them."""
    t0 = time.perf_counter()
    engine = _engine(make_engine, model, device, rough_scale)
    src = image if isinstance(image, ImageSource) else ImageSource(image, name="slide")
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if stats is None:  # boxes by hand, or a reopened segmentation: the rough pass's windows
        yield Progress("image statistics", 0, 1)
        stats = engine.image_stats(src)
    chunk = int(label.levels[0].chunks[0])
    regions = regions_for(footprints, src.hw, chunk)
    near = boxes[boxes_touching(boxes, regions)]
    output = ChunkedOutput(label.levels[0], chunk, threads=max(1, min(threads, len(regions))), overwrite=True)
    t1 = time.perf_counter()
    times, counts = yield from fine_by_chunks(engine, src, near, stats, output, regions=regions)
    t2 = time.perf_counter()
    yield Progress("pyramid", 0, 1)
    for r in regions:
        omezarr.update_pyramid(label, r)
    t3 = time.perf_counter()
    times.update(wall_setup=t1 - t0, wall_chunks=t2 - t1, pyramid=t3 - t2)
    return SlideResult(boxes, stats, regions=regions, refined=int(counts.get("chunk_boxes", 0)),
                       timings=times)


def adopt_job(make_engine: EngineFactory, model: StSModel, device: str, image: object, source: Path,
              store: Path, boxes: np.ndarray, rough_scale: float | None = None
              ) -> Generator[Progress, None, SlideResult]:
    """Continue from a saved segmentation: copy its OME-Zarr into the session folder (edits go
    to the copy, never to the saved file) and take the image's intensity windows."""
    engine = _engine(make_engine, model, device, rough_scale)
    src = image if isinstance(image, ImageSource) else ImageSource(image, name="slide")
    ok = False
    try:
        yield Progress(f"copying {Path(source).name}", 0, 2)
        saved = omezarr.open_label_image(source)
        if saved.shape != src.hw:
            raise ValueError(f"{source}: the segmentation is {saved.shape[0]} x {saved.shape[1]} px, "
                             f"the image {src.hw[0]} x {src.hw[1]} px")
        shutil.copytree(source, store)
        label = omezarr.open_label_image(store, mode="r+")
        yield Progress("image statistics", 1, 2)
        stats = engine.image_stats(src)
        ok = True
        return SlideResult(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), stats, label)
    finally:
        if not ok:
            shutil.rmtree(store, ignore_errors=True)


# -- saving -------------------------------------------------------------------------------------
def save_label_image(path: str | Path, data: object, store: str | Path | None = None) -> Path:
    """Write a segmentation as an OME-Zarr label image at ``path`` (the format segthenseg-predict
    writes): a copy of ``store`` when the layer has one, else ``data`` (2D array, or the largest
    level of a pyramid) written block by block with its pyramid. Written beside, then renamed."""
    path = Path(path)
    partial = omezarr.partial_path(path)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if store is not None and Path(store).is_dir():
            shutil.copytree(store, partial)
        else:
            base = data[0] if isinstance(data, Sequence) else data  # a pyramid: its largest level
            if len(base.shape) != 2:
                raise ValueError(f"a segmentation must be 2D to be saved as OME-Zarr, got {base.shape}")
            dtype = np.dtype(base.dtype)
            dtype = np.dtype(np.uint8) if dtype.kind == "b" else dtype
            image = omezarr.create(partial, tuple(int(s) for s in base.shape), CHUNK, dtype=dtype.name,
                                   name=path.name.split(".")[0])
            omezarr.write_level0(image, base)
        return omezarr.finish(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def store_of(layer: object) -> Path | None:
    """The OME-Zarr label image behind a Labels layer: ours (metadata) or one napari-ome-zarr read."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get(STORE_KEY):
        return Path(meta[STORE_KEY])
    source = getattr(getattr(layer, "source", None), "path", None)
    if source and Path(source).is_dir():
        return Path(source)
    return None
