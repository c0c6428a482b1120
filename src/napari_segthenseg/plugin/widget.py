"""The "Segment-then-Segment" dock widget: pick image, model and device, Run, then edit boxes.

The widget builds the panel and routes events; what a Run or an edit means is the session's
(:mod:`.session`: :class:`~.image_session.ImageSession` for ordinary images,
:class:`~.slide_session.SlideSession` for slides, :class:`~.volume_session.VolumeSession` for
3D images segmented whole). Each job runs in a ``thread_worker``, one at
a time, with progress and Cancel; its result is put in place one step per event-loop turn.
Edits made while a job runs mark the boxes dirty and are segmented as soon as it finishes, so
the latest state always wins.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image, Labels, Shapes
from napari.layers.base import ActionType
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ..engine import (
    DEFAULT_MODEL_NAME,
    Engine,
    ModelFileError,
    StSModel,
    available_devices,
    bundled_model_path,
    load_model,
    resolve_device,
)
from ..engine.grid import CHUNK
from ..engine.image import ImageSource, VolumeSource
from ..engine.progress import Progress
from ..engine.scale import plan_rough
from .image_session import ImageSession
from .layers import PIXEL_SIZE_KEY, image_plane
from .session import CANCELLED, EngineFactory, Job, JobFailed, Session, run_in_worker
from .slide_session import SlideSession, Workdir, is_slide
from .training import FINE_TUNE_MINUTES, FineTuned, FineTuneSettings, TrainingSet, fine_tune_job, pieces_of
from .volume_session import NEW_BOX_SPAN, VolumeSession

AUTO, BY_HAND = "rough net finds boxes", "boxes by hand"
WHOLE_VOLUME, THIS_SLICE = "whole volume", "this slice only"
TIME_LABELS = ("t", "time", "frame", "frames")  # axis labels of a time series
_FINISHED_EDITS = (ActionType.ADDED, ActionType.REMOVED, ActionType.CHANGED)
DEBOUNCE_MS = 150
VIEW_MS = 150  # the camera rests this long before the boxes layer follows it
PROGRESS_INTERVAL_S = 0.1
PROGRESS_AFTER_S = 3.0  # napari's progress bar costs the UI thread 0.3-1 s to make here: only for long jobs


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
        self._installing = 0  # steps (a job's result, boxes following the view) still to run, one per turn
        self._job: Job | None = None  # the running job
        self._job_status = ""  # what the last job said
        self._pbar_stage: str | None = None  # the stage the progress bar names
        self._quiet = 0  # >0 while we change the boxes layer ourselves
        self._pbar = None
        self._t0 = self._shown = 0.0
        self._job_name = ""
        self.last_seconds = 0.0  # wall time of the last finished job, start to layers shown
        self.last_timings: dict[str, float] = {}  # its engine stages (seconds, summed over threads)
        self._cancel: threading.Event | None = None
        self._workdir = Workdir()  # slides' segmentations while they are being edited
        self.slide_chunk = CHUNK  # output chunk side of a slide's segmentation (px)

        self.image = ComboBox(label="image", choices=self._layer_choices(Image))
        self.model = ComboBox(label="model", choices=self._model_choices, nullable=True)
        self.load_button = PushButton(text="Load model file…")
        self.model_info = Label(label="")
        self.mode = ComboBox(label="boxes", choices=[AUTO, BY_HAND], value=AUTO)
        self.boxes = ComboBox(label="boxes layer", choices=self._layer_choices(Shapes), nullable=True,
                              tooltip="Shapes layer whose rectangles are segmented (e.g. read from CSV)")
        self.device = ComboBox(label="device", choices=self._device_choices())
        self.rough_scale = FloatSpinBox(
            label="rough scale", value=0.0, min=0.0, max=4096.0, step=0.5,
            tooltip="Image pixels per rough-net pixel. auto: the model's choice (the paper's whole-image "
                    "pass for images like its training images, tiles at the trained scale for larger "
                    "ones); a number: tiles at that scale. Takes effect at the next Run.")
        self.rough_scale.native.setSpecialValueText("auto")
        self.pixel_size = FloatSpinBox(
            label="pixel size (µm)", value=0.0, min=0.0, max=100.0, step=0.05,
            tooltip="µm per image pixel. from file: what the slide's file records (OME, Aperio MPP, NDPI, "
                    "OME-Zarr), if anything; a number: this instead. With the model's own, it sets a "
                    "slide's rough scale (docs/WHOLE_SLIDES.md). Takes effect at the next Run.")
        self.pixel_size.native.setSpecialValueText("from file")
        self.pixel_size.native.setDecimals(4)
        self.scale_info = Label(value="")
        self.segmentation = ComboBox(
            label="segmentation layer", choices=self._layer_choices(Labels), nullable=True, value=None,
            tooltip="Slides only: a saved OME-Zarr segmentation of this slide to continue with the boxes "
                    "layer (edits then re-segment only what they touch); empty: segment the boxes anew")
        self.volume = ComboBox(
            label="3D image", choices=[WHOLE_VOLUME, THIS_SLICE], value=WHOLE_VOLUME,
            tooltip="A 3D image: segment the whole volume with 3D boxes, or only the slice on screen")
        self.z_span = SpinBox(label="new box ± slices", value=NEW_BOX_SPAN, min=0, max=10000,
                              tooltip="A box drawn by hand on a volume spans this many slices above "
                                      "and below its slice")
        self.z_from = SpinBox(label="box slices", min=0, max=10**6, enabled=False,
                              tooltip="First slice of the selected 3D box")
        self.z_to = SpinBox(label="to", min=0, max=10**6, enabled=False,
                            tooltip="Last slice of the selected 3D box")
        self.z_range = Container(widgets=[self.z_from, self.z_to], layout="horizontal", labels=True,
                                 label="z-range")
        self.live = CheckBox(text="re-segment boxes when edited", value=True)
        self.run_button = PushButton(text="Run")
        self.segment_button = PushButton(text="Segment boxes", tooltip="Segment the boxes layer now "
                                         "(only new or changed boxes go through the fine net)")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.undo_button = PushButton(text="Undo box edit", tooltip="Take back the last box edit (Ctrl+Z in "
                                      "the boxes layer) and segment again where it was")
        self.save_button = PushButton(text="Save segmentation + boxes…",
                                      tooltip="NAME.ome.zarr (OME-Zarr label image) and NAME.boxes.csv")
        self.status = Label(label="", value="")
        self.training_folder: Path | None = None  # chosen once, at the first "Add to training set"
        self.add_button = PushButton(text="Add to training set", tooltip="The image (a slide: windows around "
                                     "the edited boxes) and its corrected segmentation, into the training "
                                     "folder (images/, masks/, splits.json)")
        self.finetune_minutes = FloatSpinBox(label="fine-tune minutes", value=FINE_TUNE_MINUTES, min=0.1,
                                             max=600.0, step=0.5)
        self.finetune_button = PushButton(text="Fine-tune", tooltip="Fine-tune the model in use on the "
                                          "training folder; the new model is selected and the image "
                                          "segmented again (the old one stays in the model list)")
        self.fine_tune_options: dict = {}  # more segthenseg-train settings for Fine-tune (tests: tiny runs)
        self.training_info = Label(value="")
        super().__init__(widgets=[
            self.image, self.model, self.load_button, self.model_info, self.mode, self.boxes, self.device,
            self.rough_scale, self.pixel_size, self.scale_info, self.segmentation, self.volume, self.z_span,
            self.z_range,
            self.live, self.run_button,
            self.segment_button, self.cancel_button, self.undo_button, self.save_button, self.status,
            self.add_button, self.finetune_minutes, self.finetune_button, self.training_info])
        for info in (self.model_info, self.scale_info, self.status, self.training_info):
            info.native.setWordWrap(True)  # long lines (a model's lineage) wrap, not widen the dock
        self._debounce = QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.update_boxes)
        self._view_timer = QTimer()  # the boxes layer follows the camera once it rests
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(VIEW_MS)
        self._view_timer.timeout.connect(self.follow_view)
        # napari 0.9 moved the camera to viewer.scene (viewer.camera is a deprecated alias there)
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.events.center.connect(self._on_camera)
        camera.events.zoom.connect(self._on_camera)
        self.undo_button.changed.connect(self.undo)
        self.model.changed.connect(self._on_model_changed)
        self.load_button.changed.connect(self._ask_model_file)
        self.boxes.changed.connect(self._on_boxes_layer_chosen)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.segment_button.changed.connect(self.update_boxes)
        self.save_button.changed.connect(self._ask_save)
        self.add_button.changed.connect(self.add_to_training_set)
        self.finetune_button.changed.connect(self.fine_tune)
        self.image.changed.connect(self._show_scale)
        self.image.changed.connect(self._show_segmentation_choice)
        self.rough_scale.changed.connect(self._show_scale)
        self.pixel_size.changed.connect(self._show_scale)
        self.segmentation.changed.connect(self._on_segmentation_chosen)
        self.z_span.changed.connect(self._on_z_span)
        self.z_from.changed.connect(self._on_z_range)
        self.z_to.changed.connect(self._on_z_range)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        if bundled_model_path().is_file():
            self.model.value = DEFAULT_MODEL_NAME  # the bundled model is used by default
            self._on_model_changed(DEFAULT_MODEL_NAME)
        else:
            self.model_info.value = "no model loaded"
            show_info("Segment-then-Segment: no default model is installed; use 'Load model file…'.")
        self._show_scale()
        self._show_segmentation_choice()

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
        """Load a model file (or a training run folder's model.pt), add it to the picker and
        select it; errors become notifications."""
        key = str(path)
        try:
            model = load_model(key)
        except (ModelFileError, FileNotFoundError, OSError, ValueError) as exc:
            show_error(f"Segment-then-Segment: cannot load model: {exc}")
            return False
        self.use_model(key, model)
        return True

    def use_model(self, key: str, model: StSModel) -> None:
        """Add a loaded model to the picker under ``key`` (its path) and select it."""
        self._models[key] = model
        with self.model.changed.blocked():
            self.model.reset_choices()
            self.model.value = key
        self._select_model(key)

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
        if self._session is not None and self._session.model_key != key:
            self._session.invalidate(key)  # results of the old model are stale
        s = model.settings
        lineage = f"\n{model.lineage()}" if model.lineage() else ""
        self.model_info.value = f"{model.describe()}\npad {s.pad} px, threshold {s.threshold}{lineage}"
        self.model_info.tooltip = "\n".join(f"{k}: {v}" for k, v in s.notes.items()) or None
        if model.rough is None:
            self.mode.value = BY_HAND
        self.mode.enabled = model.rough is not None and model.fine is not None
        self._show_scale()

    def _show_segmentation_choice(self, _=None) -> None:
        """The saved-segmentation picker continues a slide: shown only when the image is one (an
        empty picker on an ordinary image reads as a missing result); the 3D controls only for 3D
        images."""
        layer, slide = self.image.value, False
        if layer is not None:
            try:
                slide = is_slide(layer, image_plane(layer, tuple(self.viewer.dims.point))[1])
            except ValueError:  # not a 2D+ image: nothing to continue
                slide = False
        self.segmentation.visible = slide
        volume = layer is not None and is_volume(layer)  # the 3D controls, for 3D images only
        for w in (self.volume, self.z_span, self.z_range):
            w.visible = volume

    # -- rough scale -------------------------------------------------------------------------
    @property
    def rough_scale_value(self) -> float | None:
        """The user's rough scale (image px per rough px), or None for the model's choice."""
        v = float(self.rough_scale.value)
        return v if v > 0 else None

    @property
    def pixel_size_value(self) -> float | None:
        """µm per pixel: the user's, else what the image layer's file records (None: unknown)."""
        v = float(self.pixel_size.value)
        if v > 0:
            return v
        layer = self.image.value
        recorded = (layer.metadata or {}).get(PIXEL_SIZE_KEY) if layer is not None else None
        return float(recorded) if recorded else None

    def _show_scale(self, _=None) -> None:
        """Say what the rough net will see: the model's trained scale and the plan for the image."""
        model, layer = self.current_model, self.image.value
        if model is None:
            self.scale_info.value = ""
            return
        s = model.settings
        trained = s.trained_scale
        text = (f"model trained at {trained.median:.3g} px per rough px "
                f"({trained.low:.3g}-{trained.high:.3g})" if trained is not None else
                "model records no trained scale")
        if layer is not None:
            shape = (layer.data[0] if layer.multiscale else layer.data).shape
            hw = tuple(int(v) for v in (shape[-3:-1] if layer.rgb else shape[-2:]))
            plan = plan_rough(hw, s.size, trained, self.rough_scale_value, pixel_size=self.pixel_size_value,
                              trained_pixel_size=s.pixel_size)
            if plan.tiled:
                rh, rw = plan.rough_hw(hw, s.size)
                text += f"\nthis image: tiles at {plan.scale:g} px per rough px ({rw} x {rh} rough px)"
                if self.pixel_size_value:
                    text += f"\n{self.pixel_size_value:.4g} µm/px" + (
                        f" (trained at {s.pixel_size:g} µm/px: {plan.physical:.3g} µm per rough px)"
                        if plan.physical else " (the model records no pixel size)")
            else:
                text += (f"\nthis image: whole at {s.size} x {s.size} "
                         f"({hw[1] / s.size:.3g} x {hw[0] / s.size:.3g} px per rough px)")
        self.scale_info.value = text

    @property
    def busy(self) -> bool:
        """True while a job runs in the background or an edit waits to be segmented."""
        return self._worker is not None or self._debounce.isActive() or self._installing > 0

    @property
    def current_model(self) -> StSModel | None:
        return self._models.get(self._model_key) if self._model_key else None

    # -- sessions ----------------------------------------------------------------------------
    def _prepare(self) -> tuple[StSModel, Session] | None:
        """Check the inputs and return (model, session), or notify and return None."""
        model, layer = self.current_model, self.image.value
        if model is None:
            show_error("Segment-then-Segment: choose a model first ('Load model file…').")
            return None
        if layer is None:
            show_error("Segment-then-Segment: open an image first.")
            return None
        volume = self.volume.value == WHOLE_VOLUME and is_volume(layer)
        n, shown = self.viewer.dims.ndim, tuple(self.viewer.dims.displayed)
        # A volume is segmented whole in either view; a plane only where it is the one on screen.
        if shown != tuple(range(n - self.viewer.dims.ndisplay, n)) or not (
                self.viewer.dims.ndisplay == 2 or (volume and self.viewer.dims.ndisplay == 3)):
            show_error("Segment-then-Segment works on the plane of the last two axes: switch the viewer "
                       "to 2D and reset the axis order (transposed views are not supported).")
            return None
        try:
            data, plane = image_plane(layer, tuple(self.viewer.dims.point), volume=volume)
            # validates shape and dtype; channel mismatches surface from the engine
            VolumeSource(data) if volume else ImageSource(data)
        except ValueError as exc:
            show_error(f"Segment-then-Segment: unsupported image {layer.name!r}: {exc}")
            return None
        old = self._session
        if old is not None and old.matches(layer, plane, self._model_key):
            old.data = data
            return model, old
        args = (self.viewer, layer, plane, data, self._model_key)
        if volume:
            session = VolumeSession(*args)
            session.new_box_span = int(self.z_span.value)
        elif is_slide(layer, plane):
            session = SlideSession(*args, workdir=self._workdir, chunk=self.slide_chunk)
        else:
            session = ImageSession(*args)
        if old is not None and old.image_layer is layer:  # same image, other slice/model: reuse layers
            session.take_over(old)
        self._adopt(session)
        saved = self.segmentation.value
        if saved is not None and saved in self.viewer.layers:  # picked before there was a session
            session.continue_from(saved)
        return model, session

    def _unwatch_boxes(self, session: Session | None) -> None:
        """Stop listening to edits of ``session``'s boxes layer (if any, and if listened to)."""
        if session is not None and session.boxes_layer is not None:
            with contextlib.suppress(TypeError, ValueError):
                session.boxes_layer.events.data.disconnect(self._on_boxes_edited)
            with contextlib.suppress(TypeError, ValueError):
                session.boxes_layer.events.highlight.disconnect(self._on_box_selection)

    def _adopt(self, session: Session) -> None:
        """Make ``session`` the current one and listen to its boxes layer (edits, and Ctrl+Z)."""
        self._unwatch_boxes(self._session)
        self._unwatch_boxes(session)
        self._session = session
        if session.boxes_layer is not None:
            session.boxes_layer.events.data.connect(self._on_boxes_edited)
            session.boxes_layer.bind_key("Control-Z", lambda _layer: self.undo(), overwrite=True)
            session.boxes_layer.events.highlight.connect(self._on_box_selection)

    def _engine_factory(self, model: StSModel) -> EngineFactory:
        """Builds the job's engine (in the worker): the model on the chosen device and rough scale."""
        device, scale, pixel_size = self.device.value, self.rough_scale_value, self.pixel_size_value

        def make() -> Engine:
            engine = self.make_engine(model, device)
            if scale is not None:  # None keeps the factory's own
                engine.rough_scale = scale
            if pixel_size is not None:
                engine.pixel_size = pixel_size
            return engine

        return make

    # -- running -----------------------------------------------------------------------------
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
            with self._quietly():
                session.by_hand()
            self._use_boxes_layer(session.boxes_layer)
            self.viewer.layers.selection.active = session.boxes_layer
            session.boxes_layer.mode = "add_rectangle"
            if len(session.boxes_layer.data):
                self.update_boxes()
            else:
                show_info("Draw rectangles on the boxes layer; each one is segmented when drawn.")
            return
        self._dirty = False
        self._start(session, session.run_job(self._engine_factory(model)))

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
        if self._worker is not None or self._installing:  # the job's end picks this up
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
        with self._quietly():
            job = session.update_job(self._engine_factory(model), got)
        if job is None:
            self.status.value = f"{len(got.boxes)} boxes, nothing to re-segment"
            return
        self._start(session, job)

    def cancel(self) -> None:
        """Stop the running job at its next step (its result is discarded)."""
        self._debounce.stop()
        if self._worker is not None:
            self._generation += 1
            if self._cancel is not None:
                self._cancel.set()  # the job closes itself in its thread (and cleans up after itself)
            job = self._job
            self._finish()
            if job is not None and job.on_abort is not None:
                job.on_abort()
            self.status.value = "cancelled"

    # -- workers -----------------------------------------------------------------------------
    def _start(self, session: Session, job: Job) -> None:
        self._t0 = time.perf_counter()
        self._shown = 0.0
        self._generation += 1
        generation = self._generation
        self._cancel = threading.Event()
        worker = create_worker(run_in_worker, job, self._cancel, _start_thread=False)
        self._pbar, self._job_name, self._job = None, job.name, job  # the bar appears after PROGRESS_AFTER_S
        worker.yielded.connect(lambda p: self._on_progress(p, generation))
        worker.returned.connect(lambda res: self._on_returned(generation, session, job, res))
        worker.errored.connect(lambda exc: self._if_current(generation, self._on_error, exc))
        worker.finished.connect(lambda: self._if_current(generation, self._on_finished))
        self._worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"{job.name}…"
        worker.start()

    def _on_returned(self, generation: int, session: Session, job: Job, res) -> None:
        if res is CANCELLED or generation != self._generation:
            return
        if isinstance(res, JobFailed):
            self._on_error(res)
        else:
            self._on_done(session, job, res)

    def _if_current(self, generation: int, func, *args) -> None:
        if generation == self._generation:
            func(*args)

    def _on_progress(self, p: Progress, generation: int) -> None:
        if generation != self._generation or self._worker is None:
            return
        if self._job is not None and self._job.on_progress is not None:
            self._job.on_progress(p)
        now = time.perf_counter()  # a slide reports hundreds of steps: redraw at most 10 times a second
        if p.done < p.total and now - self._shown < PROGRESS_INTERVAL_S:
            return
        self._shown = now
        self.status.value = p.step
        if self._pbar is None:
            if now - self._t0 < PROGRESS_AFTER_S:  # an edit's short job: the status line is enough
                return
            self._pbar = progress(total=0, desc=f"Segment-then-Segment: {self._job_name}")
            self._pbar_stage = None
        pbar = self._pbar
        pbar.total = max(p.total, 1)
        pbar.n = min(p.done, p.total)
        stage = p.step.split(":")[0]  # a new text relays out napari's activity dock (0.3 s here): per stage
        if stage != self._pbar_stage:
            self._pbar_stage = stage
            pbar.set_description(stage)

    def _finish(self) -> None:
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _on_finished(self) -> None:
        self._finish()
        if self._dirty and self.live.value and not self._installing:
            self._debounce.start()

    def _on_error(self, exc: Exception | JobFailed) -> None:
        """Layers stay as they were; the message says why."""
        self._dirty = False
        if self._job is not None and self._job.on_abort is not None:
            self._job.on_abort()
        msg = exc.message if isinstance(exc, JobFailed) else str(exc)
        show_error(f"Segment-then-Segment failed: {msg}")
        self.status.value = f"failed: {msg}"

    def _on_done(self, session: Session, job: Job, res) -> None:
        """Put the result in place, one step per event-loop turn (napari's insertions and first
        draws of a slide's layers never add up to one long stall), then get ready for edits."""
        edited = bool(self._dirty and session.boxes_layer is not None and len(session.boxes_layer.data))
        self._unwatch_boxes(session)  # our own changes to the boxes layer are not edits

        def ready() -> None:
            self._use_boxes_layer(session.boxes_layer)
            if session.boxes_layer is not None:
                self.viewer.layers.selection.active = session.boxes_layer  # ready for napari's tools
            if job.name == "continue":  # the saved segmentation's layer was replaced by its copy's
                with self.segmentation.changed.blocked():
                    self.segmentation.reset_choices()
                    self.segmentation.value = session.seg_layer
            self.last_seconds, self.last_timings = self._elapsed(), dict(res.timings)
            self._job_status = self.status.value = job.status(res, self.last_seconds)
            self.follow_view()

        self._in_turns([*job.show(res, edited), ready])

    def _in_turns(self, steps: list) -> None:
        """Run ``steps`` one per event-loop turn (the widget stays busy until the last)."""
        if not steps:
            return
        self._installing += 1

        def step(i: int) -> None:
            try:
                with self._quietly():
                    steps[i]()
            finally:
                if i + 1 < len(steps):
                    QTimer.singleShot(0, lambda: step(i + 1))
                else:
                    self._installing -= 1
                    if self._dirty and self.live.value and self._worker is None and not self._installing:
                        self._debounce.start()

        step(0)

    # -- the view ----------------------------------------------------------------------------
    def _on_camera(self, _event=None) -> None:
        self._view_timer.start()

    def follow_view(self) -> None:
        """Bring the boxes layer in step with what is on screen (slides show only nearby boxes)."""
        session = self._session
        if session is None:
            return
        self._in_turns(session.follow_view())
        if self._worker is None:  # the last job's line, and what to know about the view
            self.status.value = "\n".join(t for t in (self._job_status, session.view_note()) if t)

    # -- undo --------------------------------------------------------------------------------
    def undo(self) -> None:
        """Take back the last box edit and segment again where it was."""
        session, model = self._session, self.current_model
        if session is None or model is None or model.fine is None:
            return
        if self._worker is not None or self._installing:
            show_info("Segment-then-Segment: a job is running; undo when it has finished.")
            return
        self._debounce.stop()
        with self._quietly():
            job = session.undo_job(self._engine_factory(model))
        if job is None:
            self.status.value = "nothing to undo"
            return
        self._start(session, job)

    def _on_segmentation_chosen(self, layer) -> None:
        """A saved segmentation picked for the current image: continue from it with the boxes."""
        session = self._session
        if layer is None or session is None or session.boxes_layer is None:
            return  # picked before the boxes: used when the boxes layer is picked
        self.cancel()  # a job may be writing the segmentation that is about to be replaced
        if session.continue_from(layer):
            self.update_boxes()

    # -- saving ------------------------------------------------------------------------------
    def _ask_save(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save the segmentation (OME-Zarr) and boxes (CSV)",
                                              "", "OME-Zarr (*.ome.zarr)")
        if path:
            self.save(path)

    def save(self, path: str | Path) -> tuple[Path, Path] | None:
        """Write the segmentation as ``STEM.ome.zarr`` (what segthenseg-predict writes for slides)
        and the boxes as ``STEM.boxes.csv``; reopen both with the image to continue."""
        session = self._session
        if session is None or not session.alive(session.seg_layer):
            show_error("Segment-then-Segment: nothing to save yet (press Run first).")
            return None
        if self.busy:
            show_error("Segment-then-Segment: a job is running; save when it has finished (or Cancel).")
            return None
        name = str(path)
        for ext in (".ome.zarr", ".zarr", ".boxes.csv"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        if session.pending():
            show_warning("Some box edits are not segmented yet (press 'Segment boxes'); saving as it is.")
        try:
            seg_path, boxes_path = session.save(Path(name))
        except (OSError, ValueError) as exc:
            show_error(f"Segment-then-Segment: cannot save: {exc}")
            return None
        show_info(f"Saved {seg_path.name} and {boxes_path.name}")
        return seg_path, boxes_path

    # -- correct, then fine-tune (plugin/training.py) ------------------------------------------------
    def _ask_training_folder(self) -> Path | None:
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(self.native, "Training folder (images/, masks/)")
        return Path(path) if path else None

    def add_to_training_set(self) -> list[str] | None:
        """The current image (a slide: windows around its edited boxes) and its corrected segmentation
        into the training folder, asked for the first time."""
        session = self._session
        if session is None:
            show_error("Segment-then-Segment: nothing to add yet (press Run, correct, then add).")
            return None
        if self.busy:
            show_error("Segment-then-Segment: a job is running; add when it has finished (or Cancel).")
            return None
        try:
            pieces = pieces_of(session)  # what to add, before asking where
            if self.training_folder is None:
                self.training_folder = self._ask_training_folder()
                if self.training_folder is None:
                    return None
            training = TrainingSet(self.training_folder)
            added, replaced = training.add(pieces)
        except (ValueError, OSError) as exc:
            show_error(f"Segment-then-Segment: cannot add to the training set: {exc}")
            return None
        verb = f"added {len(added)}" + (f", replaced {len(replaced)}" if replaced else "")
        self.training_info.value = f"training set {training.folder.name}: {len(training)} image(s) ({verb})"
        show_info(f"Segment-then-Segment: {verb} image(s) in {training.folder}")
        return added + replaced

    def fine_tune(self) -> None:
        """Fine-tune the model in use on the training folder (in a worker); then use the new model."""
        if self.training_folder is None or len(TrainingSet(self.training_folder)) == 0:
            show_error("Segment-then-Segment: the training set is empty: correct a segmentation and press "
                       "'Add to training set' first.")
            return
        prepared = self._prepare()
        if prepared is None:
            return
        _, session = prepared
        self.cancel()
        settings = FineTuneSettings(self.training_folder, self._model_key, float(self.finetune_minutes.value),
                                    self.device.value, extra=dict(self.fine_tune_options))
        try:
            job = fine_tune_job(settings, self._show_fine_tuned)
        except (ValueError, OSError) as exc:
            show_error(f"Segment-then-Segment: cannot fine-tune: {exc}")
            return
        self._start(session, job)

    def _show_fine_tuned(self, res: FineTuned) -> list:
        def select() -> None:
            self.use_model(str(res.path), res.model)  # the old model stays in the list
            self.training_info.value = f"fine-tuned model: {res.path}"
            QTimer.singleShot(0, self._run_when_idle)

        return [select]

    def _run_when_idle(self) -> None:
        """Segment the image again with the new model once the fine-tune's steps are all done."""
        if self.busy:
            QTimer.singleShot(50, self._run_when_idle)
        else:
            self.run()

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0

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
        self._unwatch_boxes(session)
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
            self._unwatch_boxes(session)
        if event.value is session.image_layer:
            self.cancel()
            self._session = None
            session.close()
        elif event.value is session.boxes_layer:
            session.boxes_layer = None

    # -- volumes: z-ranges of 3D boxes ----------------------------------------------------------
    def _on_z_span(self, value: int) -> None:
        if self._session is not None:
            self._session.new_box_span = int(value)

    def _on_box_selection(self, _event=None) -> None:
        """Show the z-range of the selected 3D box (a volume's boxes layer), or disable the fields."""
        session = self._session
        if self._quiet:  # our own redraw selects rectangles to remove them
            return
        span = session.selected_z_range() if session is not None else None
        with self.z_from.changed.blocked(), self.z_to.changed.blocked():
            self.z_from.enabled = self.z_to.enabled = span is not None
            if span is not None:
                self.z_from.max = self.z_to.max = session.plane.depth - 1
                self.z_from.value, self.z_to.value = span[0], span[1] - 1

    def _on_z_range(self, _value=None) -> None:
        """The z-range fields changed: the selected 3D box spans those slices, segmented as an edit."""
        session = self._session
        if session is None:
            return
        with self._quietly():
            changed = session.set_selected_z_range(int(self.z_from.value), int(self.z_to.value) + 1)
        if changed and self.live.value:
            self.update_boxes()
        elif changed:
            self._dirty = True

    def current_boxes(self) -> np.ndarray:
        """The boxes the widget would segment now (image pixels)."""
        return self._session.all_boxes() if self._session else np.zeros((0, 4), np.int64)


def is_volume(layer: object) -> bool:
    """Whether an image layer has three or more spatial axes (a volume, or a stack of them) whose
    third-last is not labelled as time (napari's ``axis_labels``: a time series is segmented a
    frame at a time)."""
    shape = (layer.data[0] if layer.multiscale else layer.data).shape
    n = len(shape) - (1 if getattr(layer, "rgb", False) else 0)
    labels = [str(a).lower() for a in getattr(layer, "axis_labels", ())]  # one per spatial axis
    return n >= 3 and not (len(labels) >= 3 and labels[-3] in TIME_LABELS)
