"""The "Segment-then-Segment" dock widget: pick image, model and device, Run, then edit boxes.

The widget only turns layers into engine calls and results into layers; the work runs in
``thread_worker`` generators (:mod:`._jobs`), one at a time. Edits made while a job runs mark
the boxes dirty and are segmented as soon as it finishes, so the latest state always wins.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from napari.layers import Image, Shapes
from napari.layers.base import ActionType
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ._jobs import JobFailed, Progress, guarded, run_job, update_job
from ._layers import image_plane
from ._session import Session
from .engine import (
    DEFAULT_MODEL_NAME,
    Engine,
    ImageSource,
    ModelFileError,
    StSModel,
    available_devices,
    bundled_model_path,
    load_model,
    resolve_device,
)

AUTO, BY_HAND = "rough net finds boxes", "boxes by hand"
_FINISHED_EDITS = (ActionType.ADDED, ActionType.REMOVED, ActionType.CHANGED)
DEBOUNCE_MS = 150


class SegThenSegWidget(Container):
    """Dock widget; ``make_engine`` may be replaced (e.g. by tests, to watch ``refine``)."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.make_engine = lambda model, device: Engine(model, device)
        self._models: dict[str, StSModel] = {}
        self._model_key: str | None = None
        self._session: Session | None = None
        self._worker = None
        self._generation = 0
        self._dirty = False  # boxes edited since the last job snapshot
        self._quiet = 0  # >0 while we change the boxes layer ourselves
        self._pbar = None

        self.image = ComboBox(label="image", choices=self._layer_choices(Image))
        self.model = ComboBox(label="model", choices=self._model_choices, nullable=True)
        self.load_button = PushButton(text="Load model file…")
        self.model_info = Label(label="")
        self.mode = ComboBox(label="boxes", choices=[AUTO, BY_HAND], value=AUTO)
        self.boxes = ComboBox(label="boxes layer", choices=self._layer_choices(Shapes), nullable=True,
                              tooltip="Shapes layer whose rectangles are segmented (e.g. read from CSV)")
        self.device = ComboBox(label="device", choices=self._device_choices())
        self.live = CheckBox(text="re-segment boxes when edited", value=True)
        self.run_button = PushButton(text="Run")
        self.segment_button = PushButton(text="Segment boxes", tooltip="Segment the boxes layer now "
                                         "(only new or changed boxes go through the fine net)")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(label="", value="")
        super().__init__(widgets=[
            self.image, self.model, self.load_button, self.model_info, self.mode, self.boxes, self.device,
            self.live, self.run_button, self.segment_button, self.cancel_button, self.status])
        self._debounce = QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.update_boxes)
        self.model.changed.connect(self._on_model_changed)
        self.load_button.changed.connect(self._ask_model_file)
        self.boxes.changed.connect(self._on_boxes_layer_chosen)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.segment_button.changed.connect(self.update_boxes)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        if bundled_model_path().is_file():
            self.model.value = DEFAULT_MODEL_NAME  # the bundled model is used by default
            self._on_model_changed(DEFAULT_MODEL_NAME)
        else:
            self.model_info.value = "no model loaded"
            show_info("Segment-then-Segment: no default model is installed; use 'Load model file…'.")

    # -- choices -----------------------------------------------------------------------------
    def _layer_choices(self, kind: type):
        return lambda _w=None: [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, kind)]

    def _model_choices(self, _w=None) -> list[tuple[str, str]]:
        """The bundled default (if installed) and every model file loaded so far."""
        out = [("default (bundled)", DEFAULT_MODEL_NAME)] if bundled_model_path().is_file() else []
        return out + [(Path(p).name, p) for p in self._models if p != DEFAULT_MODEL_NAME]

    @staticmethod
    def _device_choices() -> list[tuple[str, str]]:
        return [(f"auto ({resolve_device('auto').type})", "auto")] + [(d, d) for d in available_devices()]

    # -- model -------------------------------------------------------------------------------
    def load_model_file(self, path: str | Path) -> bool:
        """Load a model file, add it to the picker and select it; errors become notifications."""
        key = str(path)
        try:
            self._models[key] = load_model(key)
        except (ModelFileError, FileNotFoundError, OSError, ValueError) as exc:
            show_error(f"Segment-then-Segment: cannot load model: {exc}")
            return False
        with self.model.changed.blocked():
            self.model.reset_choices()
            self.model.value = key
        self._select_model(key)
        return True

    def _ask_model_file(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self.native, "Load a Segment-then-Segment model", "",
                                              "Model files (*.pt *.pth);;All files (*)")
        if path:
            self.load_model_file(path)

    def _on_model_changed(self, key: str | None) -> None:
        if key is None or key == self._model_key:
            return
        if key not in self._models:
            try:
                self._models[key] = load_model(key)
            except (ModelFileError, FileNotFoundError, OSError, ValueError) as exc:
                show_error(f"Segment-then-Segment: cannot load model: {exc}")
                return
        self._select_model(key)

    def _select_model(self, key: str) -> None:
        model = self._models[key]
        self._model_key = key
        session = self._session
        if session is not None and session.model_key != key:  # cached results belong to the old model
            session.cache, session.stats, session.model_key = {}, None, key
        s = model.settings
        self.model_info.value = f"{model.describe()}\npad {s.pad} px, threshold {s.threshold}"
        self.model_info.tooltip = "\n".join(f"{k}: {v}" for k, v in s.notes.items()) or None
        if model.rough is None:
            self.mode.value = BY_HAND
        self.mode.enabled = model.rough is not None and model.fine is not None

    @property
    def busy(self) -> bool:
        """True while a job runs in the background or an edit waits to be segmented."""
        return self._worker is not None or self._debounce.isActive()

    @property
    def current_model(self) -> StSModel | None:
        return self._models.get(self._model_key) if self._model_key else None

    # -- running -----------------------------------------------------------------------------
    def _prepare(self) -> tuple[StSModel, Session] | None:
        """Check the inputs and return (model, session), or notify and return None."""
        model, layer = self.current_model, self.image.value
        if model is None:
            show_error("Segment-then-Segment: choose a model first ('Load model file…').")
            return None
        if layer is None:
            show_error("Segment-then-Segment: open an image first.")
            return None
        n = self.viewer.dims.ndim
        if self.viewer.dims.ndisplay != 2 or tuple(self.viewer.dims.displayed) != (n - 2, n - 1):
            show_error("Segment-then-Segment works on the plane of the last two axes: switch the viewer "
                       "to 2D and reset the axis order (transposed views are not supported).")
            return None
        try:
            data, plane = image_plane(layer, tuple(self.viewer.dims.point))
            ImageSource(data)  # validates shape and dtype; channel mismatches surface from the engine
        except ValueError as exc:
            show_error(f"Segment-then-Segment: unsupported image {layer.name!r}: {exc}")
            return None
        old = self._session
        if old is not None and old.matches(layer, plane, self._model_key):
            old.data = data
            return model, old
        session = Session(self.viewer, layer, plane, data, self._model_key)
        if old is not None and old.image_layer is layer:  # same image, other slice/model: reuse layers
            session.rough_layer, session.boxes_layer, session.seg_layer = (
                old.rough_layer, old.boxes_layer, old.seg_layer)
        self._adopt(session)
        return model, session

    def _adopt(self, session: Session) -> None:
        if self._session is not None and self._session.boxes_layer is not None:
            with contextlib.suppress(TypeError, ValueError):
                self._session.boxes_layer.events.data.disconnect(self._on_boxes_edited)
        self._session = session
        if session.boxes_layer is not None:
            session.boxes_layer.events.data.connect(self._on_boxes_edited)

    def run(self) -> None:
        """Run: the full pipeline, or (boxes by hand / fine-only model) segment the drawn boxes."""
        prepared = self._prepare()
        if prepared is None:
            return
        model, session = prepared
        self.cancel()
        if self.mode.value == BY_HAND or model.rough is None:
            if model.fine is None:
                show_error("Segment-then-Segment: this model has no fine network, so it cannot "
                           "segment boxes drawn by hand.")
                return
            if session.boxes_layer is None and self.boxes.value is not None:
                session.adopt_boxes_layer(self.boxes.value)
            self._use_boxes_layer(session.ensure_boxes_layer())
            session.ensure_seg_layer()
            self.viewer.layers.selection.active = session.boxes_layer
            session.boxes_layer.mode = "add_rectangle"
            if len(session.boxes_layer.data):
                self.update_boxes()
            else:
                show_info("Draw rectangles on the boxes layer; each one is segmented when drawn.")
            return
        self._dirty = False
        self._start("run", run_job, (self.make_engine, model, self.device.value, session.data),
                    lambda res: self._on_run_done(session, res))

    def update_boxes(self) -> None:
        """Segment the current boxes: only new or changed ones go through the fine net."""
        session, model = self._session, self.current_model
        if session is None or session.boxes_layer is None:  # e.g. boxes read from a CSV, no run yet
            if self.boxes.value is None or self._worker is not None:
                return
            prepared = self._prepare()
            if prepared is None:
                return
            model, session = prepared
            session.adopt_boxes_layer(self.boxes.value)
            self._adopt(session)
        if session.boxes_layer not in self.viewer.layers or model is None:
            return
        if self._worker is not None:  # the job's end picks this up
            self._dirty = True
            return
        if model.fine is None:
            show_warning("This model has no fine network: box edits cannot be re-segmented.")
            return
        got = session.read_boxes()
        if got.not_rectangles:
            show_info(f"{got.not_rectangles} shape(s) are not axis-aligned rectangles; "
                      "their bounding boxes are segmented.")
        if got.clipped or got.dropped:
            show_info(f"Boxes outside the image: {got.clipped} clipped, {got.dropped} ignored.")
        self._dirty = False
        session.ensure_seg_layer()
        args = (self.make_engine, model, self.device.value, session.data, got.boxes, dict(session.cache),
                session.stats)
        self._start("update", update_job, args, lambda res: self._on_update_done(session, res))

    def cancel(self) -> None:
        """Stop the running job at its next step (its result is discarded)."""
        self._debounce.stop()
        if self._worker is not None:
            self._generation += 1
            self._worker.quit()
            self._finish()
            self.status.value = "cancelled"

    # -- workers -----------------------------------------------------------------------------
    def _start(self, job: str, func, args: tuple, on_done) -> None:
        self._generation += 1
        generation = self._generation
        worker = create_worker(guarded, func, *args, _start_thread=False)
        self._pbar = progress(total=0, desc=f"Segment-then-Segment: {job}")
        worker.yielded.connect(lambda p: self._on_progress(p, generation))
        worker.returned.connect(lambda res: self._if_current(
            generation, self._on_error if isinstance(res, JobFailed) else on_done, res))
        worker.errored.connect(lambda exc: self._if_current(generation, self._on_error, exc))
        worker.finished.connect(lambda: self._if_current(generation, self._on_finished))
        self._worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"{job}…"
        worker.start()

    def _if_current(self, generation: int, func, *args) -> None:
        if generation == self._generation:
            func(*args)

    def _on_progress(self, p: Progress, generation: int) -> None:
        pbar = self._pbar
        if generation != self._generation or pbar is None:
            return
        self.status.value = p.step
        pbar.total = max(p.total, 1)
        pbar.n = min(p.done, p.total)
        pbar.set_description(p.step)

    def _finish(self) -> None:
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _on_finished(self) -> None:
        self._finish()
        if self._dirty and self.live.value:
            self._debounce.start()

    def _on_error(self, exc: Exception | JobFailed) -> None:
        """Layers stay as they were; the message says why."""
        self._dirty = False
        msg = exc.message if isinstance(exc, JobFailed) else str(exc)
        show_error(f"Segment-then-Segment failed: {msg}")
        self.status.value = f"failed: {msg}"

    def _on_run_done(self, session: Session, res) -> None:
        session.cache, session.stats = {}, None
        session.show_rough(res.rough.mask)
        session.ensure_seg_layer()  # made before the boxes, so the box edges are drawn on top
        edited = self._dirty and session.boxes_layer is not None and len(session.boxes_layer.data)
        if edited:  # the user's boxes are newer than this run: keep them, segment them next
            show_info("Boxes were edited during the run: your boxes were kept.")
            session.stats = res.stats
        else:
            with self._quietly():
                session.set_boxes(res.boxes)
            session.show_result(res)
        self._use_boxes_layer(session.boxes_layer)
        self.viewer.layers.selection.active = session.boxes_layer  # ready to edit with napari's tools
        t = sum(res.timings.values())
        self.status.value = f"{len(res.boxes)} boxes, {t:.2f} s"

    def _on_update_done(self, session: Session, res) -> None:
        session.show_result(res)
        t = sum(res.timings.values())
        self.status.value = f"{len(res.boxes)} boxes, {len(res.refined)} re-segmented, {t:.2f} s"

    # -- boxes layer -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _quietly(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _use_boxes_layer(self, layer) -> None:
        with self.boxes.changed.blocked():
            self.boxes.reset_choices()
            self.boxes.value = layer
        if self._session is not None:
            self._adopt(self._session)

    def _on_boxes_layer_chosen(self, layer) -> None:
        """A Shapes layer picked by the user (e.g. boxes read from CSV) becomes the boxes."""
        session = self._session
        if layer is None or (session is not None and layer is session.boxes_layer):
            return
        if session is None:
            self.update_boxes()
            return
        if session.boxes_layer is not None:
            with contextlib.suppress(TypeError, ValueError):
                session.boxes_layer.events.data.disconnect(self._on_boxes_edited)
        session.adopt_boxes_layer(layer)
        self._adopt(session)
        self.update_boxes()

    def _on_boxes_edited(self, event) -> None:
        # Shapes data events come twice per edit: ADDING/REMOVING/CHANGING before, then the finished one
        if self._quiet or getattr(event, "action", ActionType.CHANGED) not in _FINISHED_EDITS:
            return
        self._dirty = True
        if self.live.value and self._worker is None:
            self._debounce.start()

    def _on_layer_removed(self, event) -> None:
        """Forget a deleted image (and stop its job) or a deleted boxes layer."""
        session = self._session
        if session is None:
            return
        if event.value is session.image_layer or event.value is session.boxes_layer:
            if session.boxes_layer is not None:
                with contextlib.suppress(TypeError, ValueError):
                    session.boxes_layer.events.data.disconnect(self._on_boxes_edited)
        if event.value is session.image_layer:
            self.cancel()
            self._session = None
        elif event.value is session.boxes_layer:
            session.boxes_layer = None

    def current_boxes(self) -> np.ndarray:
        """The boxes the widget would segment now (image pixels)."""
        return self._session.read_boxes().boxes if self._session else np.zeros((0, 4), np.int64)
