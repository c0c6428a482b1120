"""Whole slides in the plugin: lazy layers, every box in a table, edits that touch chunks.

A slide (a 2D multiscale image layer, or one over ``LARGE_IMAGE_PX``) is never held at full
resolution. Run walks the engine into an OME-Zarr label image in the widget's session folder
(:mod:`.slide_store`); the segmentation layer is a multiscale Labels layer whose levels *are* that
store's zarr arrays, put in place when the run starts and redrawn as chunks are written, so napari
reads only the tiles on screen. The boxes live in a :class:`~.boxtable.BoxTable`; the boxes layer
shows those near the view (:mod:`.viewport`). An edit of the shown rectangles becomes an edit of
the table, and re-segments only where boxes changed: the old and new places of every changed box,
cut at the output chunk borders, with the boxes overlapping them; then the objects around those
regions are numbered again. Undo takes back the last edits one by one.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from ..engine import ImageSource, omezarr
from ..engine.boxes import NO_BOXES, changed_boxes, clip_boxes
from ..engine.boxio import read_boxes_csv, write_boxes_csv
from ..engine.grid import CHUNK
from ..engine.limits import LARGE_IMAGE_PX
from ..engine.localnorm import windows_fit
from ..engine.progress import Progress, Steps
from ..engine.slide import ChunkedOutput
from .boxtable import BoxTable, Edit
from .layers import BOXES_FILE_KEY, KIND, Plane, ShapeBoxes, rough_layer, seg_layer
from .session import EngineFactory, Job, JobResult, Session, UiStep
from .slide_store import (
    SlideStore,
    Workdir,
    copy_saved,
    load_windows,
    new_store,
    number_objects,
    remove_later,
    resegment,
    rough_pyramid,
    save_windows,
    store_of,
)
from .viewport import ID, NEW, BoxesView, view_region

REFRESH_S = 2.5  # during a run the segmentation is redrawn at most this often (each redraw: ~0.3 s of napari)


def is_slide(layer: object, plane: Plane) -> bool:
    """Whether ``layer``'s plane takes the whole-slide path: a 2D multiscale or very large image."""
    if plane.lead:  # stacks: the plane of a slice is segmented in memory, as before
        return False
    return bool(getattr(layer, "multiscale", False)) or plane.hw[0] * plane.hw[1] > LARGE_IMAGE_PX


def redraw(layer: object) -> None:
    """Show what a store holds now: napari reads the tiles on screen again (and nothing else: the
    extent and thumbnail stay; napari >= 0.6 takes these keywords)."""
    try:
        layer.refresh(thumbnail=False, extent=False, highlight=False)
    except TypeError:
        layer.refresh()


def slide_edge_width(boxes: np.ndarray) -> float:
    """Box edges about 1/16 of a typical box side (image px): thin on a slide, seen when zoomed in."""
    if len(boxes) == 0:
        return 2.0
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return float(np.clip(np.median(sides) / 16, 1.5, 8.0))


class SlideSession(Session):
    """A slide: segmentation in an OME-Zarr in ``workdir`` (``chunk`` px chunks), boxes in a table."""

    def __init__(self, *args, workdir: Workdir, chunk: int = CHUNK, threads: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.workdir, self.chunk, self.threads = workdir, chunk, threads
        self.slide = SlideStore()
        self.table = BoxTable()
        self.view: BoxesView | None = None
        self.saved: Path | None = None  # a saved segmentation to continue from (copied first)
        self.saved_layer: object = None  # the layer showing it (replaced by the copy's layer)
        self.boxes_file: Path | None = None  # a boxes file to read into the table (by the next job)
        self.view_of = lambda: view_region(self.viewer, self.image_layer, self.plane.hw)  # on screen

    def _source(self) -> ImageSource:
        return self.data if isinstance(self.data, ImageSource) else ImageSource(self.data, name="slide")

    # -- run ---------------------------------------------------------------------------------------
    def run_job(self, make_engine: EngineFactory) -> Job:
        """The whole pipeline into a new store, shown as soon as it exists and redrawn as chunks come.
        The worker makes the store (so that a run cancelled before it starts leaves nothing) and hands
        it over through ``made``; the first progress report after that puts its layer in place."""
        path = self.workdir.new(self.image_layer.name)
        before = self.seg_layer if self.alive(self.seg_layer) else None
        rough_name, plane, threads, chunk = self.name("rough"), self.plane, self.threads, self.chunk
        made: dict = {}
        last = [0.0]

        def steps():
            engine = make_engine()
            src = self._source()
            ok = False
            scratch = path.with_name(path.name + ".scratch")
            rough_store = path.with_name(path.name + ".rough")
            try:
                made["label"] = label = new_store(path, src.hw, chunk)
                scratch.mkdir(parents=True, exist_ok=True)
                output = ChunkedOutput(label.levels[0], chunk, scratch, threads=threads)
                res = yield from engine.walk(src, output=output)
                with engine.timed("labels"):
                    next_label = (yield from number_objects(label)) if engine.fine_net is not None else 1
                save_windows(label, res.stats)
                plan, mask = res.rough.plan, res.rough.mask
                zoom = (plan.scale, plan.scale) if plan.tiled else (src.hw[0] / mask.shape[0],
                                                                     src.hw[1] / mask.shape[1])
                yield Progress("rough mask pyramid", 0, 1)
                with engine.timed("rough_layer"):  # built here, not on the UI thread
                    layers = {"rough": rough_layer(rough_pyramid(mask, rough_store), rough_name, plane, zoom)}
                timings = dict(engine.timings)  # the walk's (chunk tasks' included) and what came after
                ok = True
                return JobResult(res.boxes, res.stats, rough=res.rough,
                                 store=label if engine.fine_net is not None else None, layers=layers,
                                 refined=res.counts.get("refined", 0), timings=timings, plan=plan.describe(),
                                 table=BoxTable(res.boxes), next_label=next_label)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                if not ok:
                    shutil.rmtree(path, ignore_errors=True)
                    shutil.rmtree(rough_store, ignore_errors=True)

        def on_progress(_: Progress) -> None:
            label = made.get("label")
            if label is None:
                return
            if made.get("layer") is None:  # the store exists now: show it
                self.install(seg=seg_layer(list(label.levels), self.name("segmentation"), plane, label.path))
                made["layer"] = self.seg_layer
            now = time.perf_counter()
            if now - last[0] >= REFRESH_S and self.alive(made["layer"]):
                last[0] = now
                redraw(made["layer"])

        def show(res: JobResult, edited: bool) -> list[UiStep]:
            on_progress(Progress("", 0, 0))  # the store's layer, if no report put it in place yet
            return self._show_run(res, edited, before)

        return Job("run", steps, show, _run_status, on_progress=on_progress,
                   on_abort=lambda: self._put_back(made.get("layer"), before))

    def _put_back(self, shown: object, before: object) -> None:
        """The run did not make a segmentation: its layer goes, the one before it comes back."""
        if self.alive(shown):
            if before is not None:
                self.install(seg=before)
            else:
                self.viewer.layers.remove(shown)
                self.seg_layer = None

    def _show_run(self, res: JobResult, edited: bool, before: object) -> list[UiStep]:
        st = self.slide
        old_store = st.label.path if st.label is not None else None

        def state() -> None:
            self.stats = res.stats
            if res.store is None:
                from napari.utils.notifications import show_warning

                show_warning("This model has no fine network: the rough layer is its result on a slide.")
                self._put_back(self.seg_layer, before)
            else:
                st.label, st.next_label, st.pending = res.store, res.next_label, NO_BOXES.copy()
                redraw(self.seg_layer)
            self._place_rough(res.layers["rough"])

        def boxes() -> None:
            if edited:  # the user's boxes are newer than this run: keep them, segment them next
                from napari.utils.notifications import show_info

                show_info("Boxes were edited during the run: your boxes were kept.")
                st.pending = np.concatenate([st.pending, changed_boxes(res.table.all(), self.table.all())])
                return
            self.table = res.table
            layer = self.ensure_boxes_layer(edge_width=slide_edge_width(res.boxes))
            layer.current_edge_width = slide_edge_width(res.boxes)
            self._clear_boxes_layer()
            self.view = BoxesView(self.table, layer, self.plane, self.view_of)
            if old_store is not None and res.store is not None and old_store != res.store.path:
                remove_later(old_store)

        return [state, boxes]

    def _place_rough(self, layer: object) -> None:
        """The rough layer, new or replacing the old one, below the segmentation."""
        if self.alive(self.rough_layer):
            self.install(rough=layer)
            return
        layers = self.viewer.layers
        at = layers.index(self.seg_layer) if self.alive(self.seg_layer) else len(layers)
        layers.insert(at, layer)
        self.rough_layer = layer

    def _clear_boxes_layer(self) -> None:
        layer = self.boxes_layer
        layer.data = []
        layer.features = {ID: np.zeros(0, np.int64)}
        layer.feature_defaults = {ID: NEW}

    # -- edits ---------------------------------------------------------------------------------------
    def update_job(self, make_engine: EngineFactory, got: ShapeBoxes) -> Job | None:
        st = self.slide
        if st.label is None and self.saved is not None:
            return self._continue_job(make_engine)
        if self.boxes_file is not None:
            return self._load_job()
        if st.label is None:
            self._ensure_store()
        edit = self._boxes_view().take_edits(got)
        return self._resegment_job(make_engine, edit)

    def undo_job(self, make_engine: EngineFactory) -> Job | None:
        edit = self.table.undo()
        if edit is None or self.slide.label is None:
            return None
        if self.view is not None:
            self.view.stale = np.concatenate([self.view.stale, edit.removed_ids, edit.added_ids])
        return self._resegment_job(make_engine, edit, name="undo")

    def _resegment_job(self, make_engine: EngineFactory, edit: Edit, name: str = "update") -> Job | None:
        st = self.slide
        footprints = np.concatenate([edit.footprints, st.pending])
        if len(footprints) == 0:
            return None
        st.pending = np.unique(footprints, axis=0)  # until written (a cancelled job leaves them stale)
        label, stats, threads, next_label = st.label, self.stats, self.threads, st.next_label
        table = self.table
        pending = st.pending

        def near(region):
            return table.in_region(region)[1]

        def steps():
            t0 = time.perf_counter()
            engine = make_engine()
            regions, res, top = yield from resegment(engine, self._source(), label, near, pending, stats,
                                                     next_label, threads)
            times = {**res.timings, "wall": time.perf_counter() - t0}
            return JobResult(table.all(), res.stats, regions=regions, refined=res.counts.get("refined", 0),
                             timings=times, next_label=top)

        return Job(name, steps, self._show_update,
                   lambda res, t: f"{len(table)} boxes, {len(res.regions)} region(s) re-segmented "
                                  f"({res.refined} boxes), {t:.2f} s")

    def _show_update(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            st = self.slide
            st.pending, st.next_label = NO_BOXES.copy(), res.next_label
            self.stats = res.stats
            if self.alive(self.seg_layer):
                redraw(self.seg_layer)  # napari reads the tiles on screen again
            else:
                self.show_seg(st.label)

        return [show]

    # -- continuing from a saved result ------------------------------------------------------------
    def continue_from(self, layer: object) -> bool:
        source = store_of(layer) if layer is not None else None
        if source is None or layer is self.seg_layer:
            return False
        if self.slide.label is not None:
            remove_later(self.slide.label.path)
        self.slide.label, self.saved, self.saved_layer = None, source, layer
        return True

    def _continue_job(self, make_engine: EngineFactory) -> Job:
        """Continue from a saved segmentation: a working copy in the session folder (edits go to the
        copy, never to the saved file) and the image's intensity windows."""
        source, store, boxes_file = self.saved, self.workdir.new(self.image_layer.name), self.boxes_file

        def steps():
            engine = make_engine()
            src = self._source()
            ok = False
            try:
                table = (yield from self._read_table(boxes_file)) if boxes_file is not None else None
                label, top = yield from copy_saved(source, store, src.hw)
                stats = load_windows(label)
                plan = engine.plan(src.hw)
                if stats is None or not windows_fit(stats, plan.tiled, plan.scale, plan.window,
                                                    engine.settings.normalisation):
                    # saved without them (e.g. by segthenseg-predict), or for another model or scale
                    yield Progress("image statistics", 1, 2)
                    stats = engine.image_stats(src)
                    save_windows(label, stats)
                ok = True
                return JobResult(NO_BOXES, stats, store=label, next_label=top, table=table)
            finally:
                if not ok:
                    shutil.rmtree(store, ignore_errors=True)

        return Job("continue", steps, self._show_continue,
                   lambda res, t: f"continuing: {len(self.table):,} boxes on {res.store.path.name}")

    def _show_continue(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            chosen = self.saved_layer
            if self.alive(chosen) and chosen is not self.seg_layer:
                if self.alive(self.seg_layer):
                    self.viewer.layers.remove(self.seg_layer)
                self.seg_layer = chosen  # replaced in place by the lazy layer of the copy
            st = self.slide
            st.label, st.next_label, st.pending = res.store, res.next_label, NO_BOXES.copy()
            self.stats, self.saved, self.saved_layer = res.stats, None, None
            if res.table is not None:  # the boxes file, read with the segmentation
                self.boxes_file = None
                self._use_table(res.table, self.boxes_layer)
            self.show_seg(res.store, replace=True)

        return [show]

    # -- boxes ------------------------------------------------------------------------------------------
    def adopt_boxes_layer(self, layer: object) -> None:
        """A boxes layer picked by the user (e.g. read from a boxes CSV) holds the boxes now: all of
        them go into the table, the layer shows those near the view. A file too large to have been
        drawn whole is read by the next job (a million rows take seconds: not on the UI thread)."""
        super().adopt_boxes_layer(layer)
        if self.view is not None and self.view.layer is layer:
            return
        path = (layer.metadata or {}).get(BOXES_FILE_KEY)
        if path:
            self.boxes_file, self.view = Path(path), None
            return
        got = self.read_boxes()
        ids = np.full(len(layer.data), NEW, np.int64)
        if got.rows is not None:
            ids[got.rows] = np.arange(len(got.rows))
        self._use_table(BoxTable(got.boxes), layer, ids)

    def _use_table(self, table: BoxTable, layer: object, ids: np.ndarray | None = None) -> None:
        """``table`` holds the boxes from now on; the boxes layer's rectangles carry ``ids`` (none: the
        layer is emptied and follows the view). Where the boxes differ from those the store was made
        with, the store is stale."""
        st = self.slide
        if st.label is not None and len(self.table):
            st.pending = np.concatenate([st.pending, changed_boxes(self.table.all(), table.all())])
        self.table = table
        if ids is None:
            self._clear_boxes_layer()
        else:
            layer.features = {ID: ids}
            layer.feature_defaults = {ID: NEW}
        self.view = BoxesView(self.table, layer, self.plane, self.view_of)

    def _read_table(self, path: Path) -> Steps[BoxTable]:
        yield Progress(f"reading {path.name}", 0, 1)
        return BoxTable(clip_boxes(read_boxes_csv(path), self.plane.hw))

    def _load_job(self) -> Job:
        """Read a boxes file into the table (in the worker)."""
        path = self.boxes_file

        def steps():
            return JobResult(NO_BOXES, self.stats, table=(yield from self._read_table(path)))

        def show(res: JobResult, edited: bool) -> list[UiStep]:
            def use() -> None:
                self.boxes_file = None
                self._use_table(res.table, self.boxes_layer)

            return [use]

        return Job("read boxes", steps, show, lambda res, t: f"{len(res.table):,} boxes from {path.name}, "
                                                             f"{t:.1f} s")

    def _boxes_view(self) -> BoxesView:
        layer = self.ensure_boxes_layer()
        if self.view is None or self.view.layer is not layer:
            self.view = BoxesView(self.table, layer, self.plane, self.view_of)
        return self.view

    def follow_view(self) -> list[UiStep]:
        if not self.alive(self.boxes_layer) or self.view is None or self.view.layer is not self.boxes_layer:
            return []
        return self.view.follow()

    def all_boxes(self) -> np.ndarray:
        return self.table.all()

    def view_note(self) -> str:
        if self.view is None or not self.view.too_many:
            return ""
        return f"{self.view.in_view:,} boxes in view: zoom in to edit them"

    def ensure_boxes_layer(self, edge_width: float | None = None) -> object:
        fresh = not self.alive(self.boxes_layer)
        layer = super().ensure_boxes_layer(edge_width)
        if fresh:
            layer.features = {ID: np.zeros(len(layer.data), np.int64) + NEW}
            layer.feature_defaults = {ID: NEW}
        return layer

    # -- what else the widget asks ------------------------------------------------------------------
    def _ensure_store(self) -> None:
        """An empty on-disk segmentation (and its layer), e.g. for boxes drawn by hand."""
        st = self.slide
        if st.label is None:
            st.label = new_store(self.workdir.new(self.image_layer.name), self.plane.hw, self.chunk)
            st.next_label, st.pending = 1, NO_BOXES.copy()
        if not self.alive(self.seg_layer):
            self.show_seg(st.label)

    def by_hand(self) -> None:
        self._ensure_store()
        self.ensure_boxes_layer(edge_width=2.0)
        self._boxes_view()

    def invalidate(self, model_key: str) -> None:
        super().invalidate(model_key)
        self.slide.pending = np.concatenate([self.slide.pending, self.table.all()])  # all the old model's

    def pending(self) -> bool:
        return len(self.slide.pending) > 0

    def save(self, path: Path) -> tuple[Path, Path]:
        seg_path, boxes_path = Path(f"{path}.ome.zarr"), Path(f"{path}.boxes.csv")
        omezarr.save_label_image(seg_path, store=self.slide.label.path)
        write_boxes_csv(boxes_path, self.table.all())
        return seg_path, boxes_path

    def close(self) -> None:
        if self.slide.label is not None:
            remove_later(self.slide.label.path)

    def take_over(self, old: Session) -> None:
        super().take_over(old)
        if isinstance(old, SlideSession):  # e.g. another model: the store stays, all of it stale
            self.slide, self.table, self.view = old.slide, old.table, old.view
            self.slide.pending = np.concatenate([old.slide.pending, old.table.all()])

    def show_seg(self, label: omezarr.LabelImage, replace: bool = False) -> object:
        """Show the store ``label`` (``replace``: a new layer in place of the current one, e.g. one
        napari-ome-zarr read)."""
        old = self.seg_layer
        if not replace and self.alive(old) and old.multiscale and len(label.levels) > 1:
            old.metadata = {**old.metadata, KIND: "segmentation", "segthenseg_store": str(label.path)}
            old.data = list(label.levels)
            self.place(old)
            return old
        self.install(seg=seg_layer(list(label.levels), self.name("segmentation"), self.plane, label.path))
        return self.seg_layer


def _run_status(res: JobResult, seconds: float) -> str:
    return f"{len(res.boxes)} boxes, {seconds:.1f} s ({res.plan})"

