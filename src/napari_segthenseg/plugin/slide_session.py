"""Whole slides in the plugin: lazy layers in, the engine's chunked output, edits that touch chunks.

A slide (a 2D multiscale image layer, or one over ``LARGE_IMAGE_PX``) is never held at full
resolution. Run walks the engine with a :class:`~napari_segthenseg.engine.slide.ChunkedOutput`
into an OME-Zarr label image in the widget's session folder (:class:`Workdir`); the
segmentation layer is a multiscale Labels layer whose levels *are* that store's zarr arrays, so
napari reads only the tiles on screen. An edit re-segments only where the set of boxes changed:
the old and new footprints of every changed box, cut at the output chunk borders (one region per
touched chunk), with the boxes that overlap those regions (the same walk, with the output's
``regions`` and ``overwrite``), then the pyramid above them.

Heavy layer work is done in the job (worker thread) so the Qt event loop stays live: the rough
mask's pyramid and the boxes' Shapes layer (napari builds 15,000 rectangles in about 4 s; adding
the prebuilt layer costs the UI thread well under a second) are made there and handed over, one
layer per event-loop turn.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine import ImageSource, omezarr
from ..engine.boxes import NO_BOXES, changed_boxes
from ..engine.boxio import write_boxes_csv
from ..engine.grid import CHUNK, boxes_touching, regions_for
from ..engine.limits import IN_MEMORY_MASK_PX, LARGE_IMAGE_PX
from ..engine.progress import Progress
from ..engine.slide import ChunkedOutput
from .layers import KIND, STORE_KEY, Plane, boxes_layer, rough_layer, seg_layer
from .session import EngineFactory, Job, JobResult, Session, UiStep


def is_slide(layer: object, plane: Plane) -> bool:
    """Whether ``layer``'s plane takes the whole-slide path: a 2D multiscale or very large image."""
    if plane.lead:  # stacks: the plane of a slice is segmented in memory, as before
        return False
    return bool(getattr(layer, "multiscale", False)) or plane.hw[0] * plane.hw[1] > LARGE_IMAGE_PX


class Workdir:
    """The widget's session folder, made when first needed and removed with the widget (or at exit):
    stores and scratch space."""

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


def remove_later(path: Path | None) -> None:
    """Delete a store in a background thread (hundreds of chunk files: not on the UI thread)."""
    if path is not None and Path(path).exists():
        threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                         daemon=True).start()


def rough_pyramid(mask: object, store: Path | None = None) -> list:
    """The rough mask as a uint8 pyramid (2x apart, down to ``omezarr.MIN_LEVEL_SIDE``), largest first:
    NumPy when it fits in memory, else an OME-Zarr at ``store`` copied block by block."""
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    if isinstance(mask, np.ndarray) or hw[0] * hw[1] <= IN_MEMORY_MASK_PX or store is None:
        levels = [np.asarray(mask[...], dtype=np.uint8)]
        while max(levels[-1].shape) > omezarr.MIN_LEVEL_SIDE:
            levels.append(omezarr.max_pool2(levels[-1]))
        return levels
    image = omezarr.create(store, hw, 2048, name="rough")
    omezarr.write_level0(image, mask)
    return list(image.levels)


def store_of(layer: object) -> Path | None:
    """The OME-Zarr label image behind a Labels layer: ours (metadata) or one napari-ome-zarr read."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get(STORE_KEY):
        return Path(meta[STORE_KEY])
    source = getattr(getattr(layer, "source", None), "path", None)
    if source and Path(source).is_dir():
        return Path(source)
    return None


def slide_edge_width(boxes: np.ndarray) -> float:
    """Box edges about 1/16 of a typical box side (image px): thin on a slide, seen when zoomed in."""
    if len(boxes) == 0:
        return 2.0
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return float(np.clip(np.median(sides) / 16, 1.5, 8.0))


@dataclass
class SlideStore:
    """A slide's segmentation on disk, and which boxes it reflects."""

    label: omezarr.LabelImage | None = None  # the store behind the segmentation layer
    boxes: np.ndarray = field(default_factory=NO_BOXES.copy)  # the boxes fused into ``label``
    pending: np.ndarray = field(default_factory=NO_BOXES.copy)  # footprints that may be stale


class SlideSession(Session):
    """A slide: segmentation in an OME-Zarr in ``workdir``, written in ``chunk`` px chunks."""

    def __init__(self, *args, workdir: Workdir, chunk: int = CHUNK, threads: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.workdir, self.chunk, self.threads = workdir, chunk, threads
        self.slide = SlideStore()
        self.saved: Path | None = None  # a saved segmentation to continue from (copied first)
        self.saved_layer: object = None  # the layer showing it (replaced by the copy's layer)

    def _source(self) -> ImageSource:
        return self.data if isinstance(self.data, ImageSource) else ImageSource(self.data, name="slide")

    # -- jobs ------------------------------------------------------------------------------------
    def run_job(self, make_engine: EngineFactory) -> Job:
        store, chunk, threads = self.workdir.new(self.image_layer.name), self.chunk, self.threads
        names = {k: self.name(k) for k in ("rough", "segmentation", "boxes")}
        plane = self.plane

        def steps():
            engine = make_engine()
            src = self._source()
            ok = False
            scratch = store.with_name(store.name + ".scratch")
            rough_store = store.with_name(store.name + ".rough")
            try:
                label = omezarr.create(store, src.hw, chunk)
                scratch.mkdir(parents=True, exist_ok=True)
                res = yield from engine.walk(src, output=ChunkedOutput(label.levels[0], chunk, scratch,
                                                                       threads=threads))
                timings = dict(res.timings)
                if engine.fine_net is not None:
                    yield Progress("pyramid of the segmentation", 0, 1)
                    with engine.timed("pyramid"):
                        omezarr.update_pyramid(label)
                plan = res.rough.plan
                mask = res.rough.mask
                zoom = (plan.scale, plan.scale) if plan.tiled else (src.hw[0] / mask.shape[0],
                                                                     src.hw[1] / mask.shape[1])
                yield Progress("rough mask pyramid", 0, 1)
                with engine.timed("rough_layer"):
                    levels = rough_pyramid(mask, rough_store)
                seg = label if engine.fine_net is not None else None
                yield Progress(f"layers: {len(res.boxes)} boxes", 0, 1)
                with engine.timed("layers"):  # built here, not on the UI thread
                    width = slide_edge_width(res.boxes)
                    layers = {"rough": rough_layer(levels, names["rough"], plane, zoom),
                              "seg": None if seg is None else seg_layer(
                                  list(seg.levels), names["segmentation"], plane, seg.path),
                              "boxes": boxes_layer(res.boxes, names["boxes"], plane, width)}
                timings.update({k: v for k, v in engine.timings.items() if k not in timings})
                ok = True
                return JobResult(res.boxes, res.stats, rough=res.rough, store=seg, layers=layers,
                                 refined=res.counts.get("refined", 0), timings=timings, plan=plan.describe())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                if not ok:
                    shutil.rmtree(store, ignore_errors=True)
                    shutil.rmtree(rough_store, ignore_errors=True)

        return Job("run", steps, self._show_run,
                   lambda res, t: f"{len(res.boxes)} boxes, {t:.1f} s ({res.plan})")

    def update_job(self, make_engine: EngineFactory, boxes: np.ndarray) -> Job | None:
        st = self.slide
        if st.label is None:
            if self.saved is not None:
                return self._continue_job(make_engine, boxes)
            self._ensure_store()
        footprints = changed_boxes(st.boxes, boxes)
        if len(st.pending):
            footprints = np.unique(np.concatenate([footprints, st.pending]), axis=0)
        if len(footprints) == 0:
            return None
        st.pending = footprints  # until the job has written them (a cancelled job leaves them stale)
        label, stats, threads = st.label, self.stats, self.threads
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)

        def steps():
            t0 = time.perf_counter()
            engine = make_engine()
            src = self._source()
            chunk = int(label.levels[0].chunks[0])
            regions = regions_for(footprints, src.hw, chunk)
            near = boxes[boxes_touching(boxes, regions)]
            output = ChunkedOutput(label.levels[0], chunk, threads=threads, overwrite=True, regions=regions)
            t1 = time.perf_counter()
            res = yield from engine.walk(src, near, stats=stats, output=output)
            t2 = time.perf_counter()
            yield Progress("pyramid", 0, 1)
            for r in regions:
                omezarr.update_pyramid(label, r)
            times = {**res.timings, "wall_setup": t1 - t0, "wall_chunks": t2 - t1,
                     "pyramid": time.perf_counter() - t2}
            return JobResult(boxes, res.stats, regions=regions, refined=res.counts.get("refined", 0),
                             timings=times)

        return Job("update", steps, self._show_update,
                   lambda res, t: f"{len(res.boxes)} boxes, {len(res.regions)} region(s) re-segmented "
                                  f"({res.refined} boxes), {t:.2f} s")

    def _continue_job(self, make_engine: EngineFactory, boxes: np.ndarray) -> Job:
        """Continue from a saved segmentation: copy its OME-Zarr into the session folder (edits go
        to the copy, never to the saved file) and take the image's intensity windows."""
        source, store = self.saved, self.workdir.new(self.image_layer.name)
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)

        def steps():
            engine = make_engine()
            src = self._source()
            ok = False
            try:
                yield Progress(f"copying {source.name}", 0, 2)
                saved = omezarr.open_label_image(source)
                if saved.shape != src.hw:
                    raise ValueError(f"{source}: the segmentation is {saved.shape[0]} x {saved.shape[1]} px, "
                                     f"the image {src.hw[0]} x {src.hw[1]} px")
                shutil.copytree(source, store)
                label = omezarr.open_label_image(store, mode="r+")
                yield Progress("image statistics", 1, 2)
                stats = engine.image_stats(src)
                ok = True
                return JobResult(boxes, stats, store=label)
            finally:
                if not ok:
                    shutil.rmtree(store, ignore_errors=True)

        return Job("continue", steps, self._show_continue,
                   lambda res, t: f"continuing: {len(res.boxes)} boxes on {res.store.path.name}")

    def _ensure_store(self) -> None:
        """An empty on-disk segmentation (and its layer), e.g. for boxes drawn by hand."""
        st = self.slide
        if st.label is None:
            st.label = omezarr.create(self.workdir.new(self.image_layer.name), self.plane.hw, self.chunk)
            st.boxes, st.pending = NO_BOXES.copy(), NO_BOXES.copy()
        if not self.alive(self.seg_layer):
            self.show_seg(st.label)

    # -- what else the widget asks ----------------------------------------------------------------
    def by_hand(self) -> None:
        self._ensure_store()
        self.ensure_boxes_layer(edge_width=2.0)

    def invalidate(self, model_key: str) -> None:
        super().invalidate(model_key)
        st = self.slide  # every box of the store is the old model's
        st.pending = np.concatenate([st.pending, st.boxes])

    def continue_from(self, layer: object) -> bool:
        source = store_of(layer) if layer is not None else None
        if source is None or layer is self.seg_layer:
            return False
        if self.slide.label is not None:
            remove_later(self.slide.label.path)
        self.slide.label, self.saved, self.saved_layer = None, source, layer
        return True

    def pending(self) -> bool:
        return len(self.slide.pending) > 0

    def save(self, path: Path) -> tuple[Path, Path]:
        seg_path, boxes_path = Path(f"{path}.ome.zarr"), Path(f"{path}.boxes.csv")
        omezarr.save_label_image(seg_path, store=self.slide.label.path)
        write_boxes_csv(boxes_path, self.read_boxes().boxes)
        return seg_path, boxes_path

    def close(self) -> None:
        if self.slide.label is not None:
            remove_later(self.slide.label.path)

    def take_over(self, old: Session) -> None:
        super().take_over(old)
        if isinstance(old, SlideSession):  # e.g. another model: the store stays, all of it stale
            self.slide = old.slide
            self.slide.pending = np.concatenate([old.slide.pending, old.slide.boxes])

    # -- showing results ---------------------------------------------------------------------------
    def show_seg(self, label: omezarr.LabelImage, replace: bool = False) -> object:
        """Show the store ``label`` (``replace``: a new layer in place of the current one, e.g. one
        napari-ome-zarr read)."""
        old = self.seg_layer
        if not replace and self.alive(old) and old.multiscale and len(label.levels) > 1:
            old.metadata = {**old.metadata, KIND: "segmentation", STORE_KEY: str(label.path)}
            old.data = list(label.levels)
            self.place(old)
            return old
        self.install(seg=seg_layer(list(label.levels), self.name("segmentation"), self.plane, label.path))
        return self.seg_layer

    def _show_run(self, res: JobResult, edited: bool) -> list[UiStep]:
        """The run's layers (all built in the worker), one per event-loop turn, so that napari's
        insertions and first draws never add up to one long stall of the UI."""
        st = self.slide
        old_store = st.label.path if st.label is not None else None

        def state() -> None:
            self.stats = res.stats
            if res.store is None:
                from napari.utils.notifications import show_warning

                show_warning("This model has no fine network: the rough layer is its result on a slide.")
            else:
                st.label, st.boxes, st.pending = res.store, res.boxes, NO_BOXES.copy()
            self.install(rough=res.layers.get("rough"))

        def boxes() -> None:
            if edited:  # the user's boxes are newer than this run: keep them, segment them next
                from napari.utils.notifications import show_info

                show_info("Boxes were edited during the run: your boxes were kept.")
            else:
                self.install(boxes=res.layers.get("boxes"))
            if old_store is not None and res.store is not None and old_store != res.store.path:
                remove_later(old_store)

        return [state, lambda: self.install(seg=res.layers.get("seg")), boxes]

    def _show_update(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            st = self.slide
            st.boxes, st.pending = res.boxes, NO_BOXES.copy()
            self.stats = res.stats
            if self.alive(self.seg_layer):
                self.seg_layer.refresh()  # napari reads the tiles on screen again
            else:
                self.show_seg(st.label)

        return [show]

    def _show_continue(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            chosen = self.saved_layer
            if self.alive(chosen) and chosen is not self.seg_layer:
                if self.alive(self.seg_layer):
                    self.viewer.layers.remove(self.seg_layer)
                self.seg_layer = chosen  # replaced in place by the lazy layer of the copy
            st = self.slide
            st.label, st.boxes, st.pending = res.store, res.boxes, NO_BOXES.copy()
            self.stats, self.saved, self.saved_layer = res.stats, None, None
            self.show_seg(res.store, replace=True)

        return [show]

