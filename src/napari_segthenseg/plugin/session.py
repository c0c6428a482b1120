"""One segmentation session: an image plane, its three result layers, and what the widget asks of it.

:class:`Session` is the interface the widget talks to; :class:`~.image_session.ImageSession`
(ordinary images, results in memory), :class:`~.slide_session.SlideSession` (slides, results
in an on-disk pyramid) and :class:`~.volume_session.VolumeSession` (a 3D image segmented whole
with 3D boxes) implement it. A session makes :class:`Job` s (the work, run in a worker
thread, and how to show its :class:`JobResult` on the UI thread), takes edits, saves, continues
from saved results and forgets results when the model changes; the widget never asks which kind
it has.

Results are tied to the image: the layers are named after it and share its scale, translate,
rotate, shear and affine. For a 3D/time stack they keep the leading axes with length 1, placed at
the slice that was segmented, so they appear only on that slice; running another slice moves
them there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine import Engine, RoughResult
from ..engine.boxes import NO_BOXES
from ..engine.fine import Box
from ..engine.localnorm import Windows
from ..engine.progress import Cancelled, Progress, Steps, guard
from .layers import (
    BOX_COLOUR,
    KIND,
    Plane,
    ShapeBoxes,
    boxes_to_rectangles,
    rectangles_to_boxes,
    rough_layer,
    seg_layer,
    shapes_in_image_pixels,
)

EngineFactory = Callable[[], Engine]  # builds the engine in the worker thread (model, device, scale chosen)
UiStep = Callable[[], None]


@dataclass
class JobResult:
    """What a finished job hands back to the UI thread (both kinds of session)."""

    boxes: np.ndarray  # (N, 4) the boxes the segmentation now reflects
    stats: Windows | None  # intensity windows (reused by later edits)
    rough: RoughResult | None = None  # a run's rough pass
    labels: np.ndarray | None = None  # in memory: the label image of the fused mask
    known: dict[Box, np.ndarray] = field(default_factory=dict)  # in memory: fine result per box
    store: object = None  # slides: a new on-disk segmentation (run, continue); None: edited in place
    mask: np.ndarray | None = None  # volumes: the fused mask (an edit updates it where boxes changed)
    layers: dict[str, object] = field(default_factory=dict)  # slides: layers built in the worker
    regions: list = field(default_factory=list)  # slides: the regions re-segmented by an edit
    refined: int = 0  # boxes that went through the fine net
    timings: dict[str, float] = field(default_factory=dict)  # engine stages (s, summed over threads)
    plan: str = ""  # how the rough net saw the image
    table: object = None  # slides: every box, with ids (a new run's or a continued result's)
    next_label: int = 0  # slides: the next free object id of the store


@dataclass(frozen=True)
class JobFailed:
    """An expected failure (bad image for this model, out of memory, full disk): a notification."""

    message: str


CANCELLED = JobFailed("cancelled")


@dataclass
class Job:
    """Work for a worker thread and what to do with its result.

    ``steps`` builds the work (a step generator; no Qt in it). ``show(result, edited)`` returns the
    UI-thread steps that put the result in place, run one per event-loop turn; ``edited`` says
    that the user changed the boxes while the job ran (their boxes are kept). ``status(result,
    seconds)`` is the line the panel shows afterwards. ``on_progress`` sees each step on the UI
    thread while the job runs (e.g. to show a slide's chunks as they are written); ``on_abort`` puts
    things back when the job is cancelled or fails.
    """

    name: str
    steps: Callable[[], Steps[JobResult]]
    show: Callable[[JobResult, bool], list[UiStep]]
    status: Callable[[JobResult, float], str]
    on_progress: Callable[[Progress], None] | None = None
    on_abort: UiStep | None = None


def run_in_worker(job: Job, cancel: threading.Event) -> Steps[JobResult | JobFailed]:
    """A job's steps as a worker runs them: expected errors become :class:`JobFailed` (bugs still
    raise); a cancel closes the steps at the next step *in the worker's thread* (a slide job stops
    its chunk threads and removes its unfinished store there) and gives :data:`CANCELLED`."""
    try:
        return (yield from guard(job.steps(), cancel.is_set))
    except Cancelled:
        return CANCELLED
    except (ValueError, RuntimeError, MemoryError, OSError) as exc:  # torch OOM is a RuntimeError
        return JobFailed(str(exc))


class Session:
    """The state of one image plane being segmented; the widget owns one at a time."""

    def __init__(self, viewer: object, image_layer: object, plane: Plane, data: object, model_key: str):
        self.viewer = viewer
        self.image_layer = image_layer
        self.plane = plane
        self.data = data  # the 2D (or 2D + colour) plane, or its pyramid, that the engine reads
        self.model_key = model_key
        self.stats: Windows | None = None  # intensity windows of the last pass (edits reuse them)
        self.rough_layer: object = None
        self.boxes_layer: object = None
        self.seg_layer: object = None
        self.new_box_span = 0  # volumes: slices above and below a box drawn by hand

    # -- what the widget asks (each kind answers) -------------------------------------------
    def run_job(self, make_engine: EngineFactory) -> Job:
        """The whole pipeline on the image."""
        raise NotImplementedError

    def update_job(self, make_engine: EngineFactory, got: ShapeBoxes) -> Job | None:
        """Segment the boxes layer's boxes ``got`` (after an edit), redoing only what changed; None
        when nothing needs doing."""
        raise NotImplementedError

    def undo_job(self, make_engine: EngineFactory) -> Job | None:
        """Take back the last box edit and segment again where it was; None: nothing to undo."""
        return None

    def follow_view(self) -> list[UiStep]:
        """UI steps that keep the boxes layer in step with the view (slides show only nearby boxes)."""
        return []

    def view_note(self) -> str:
        """What to tell the user about the view (e.g. zoom in to edit a slide's boxes), if anything."""
        return ""

    def all_boxes(self) -> np.ndarray:
        """Every box of the session (image px), also those not shown."""
        return self.read_boxes().boxes

    def by_hand(self) -> None:
        """Get ready for boxes drawn by hand: an empty segmentation and boxes layer."""
        raise NotImplementedError

    def invalidate(self, model_key: str) -> None:
        """Another model was chosen: every result of the old one is stale."""
        self.model_key, self.stats = model_key, None

    def continue_from(self, layer: object) -> bool:
        """Continue from a saved segmentation shown in ``layer`` (False: not possible here)."""
        return False

    def save(self, path: Path) -> tuple[Path, Path]:
        """Write the segmentation (OME-Zarr) and the boxes (CSV) at ``path``'s stem."""
        raise NotImplementedError

    def pending(self) -> bool:
        """Whether box edits are not segmented yet."""
        return False

    def close(self) -> None:
        """The image went away: free what the session holds."""

    def selected_z_range(self) -> tuple[int, int] | None:
        """Volumes: the slices ``(z0, z1)`` of the one 3D box selected (None: no volume, none)."""
        return None

    def set_selected_z_range(self, z0: int, z1: int) -> bool:
        """Volumes: give the selected 3D box slices ``z0`` to ``z1 - 1``; True if that is an edit."""
        return False

    def take_over(self, old: Session) -> None:
        """Follow ``old`` on the same image (another slice or model): reuse its layers."""
        self.rough_layer, self.boxes_layer, self.seg_layer = old.rough_layer, old.boxes_layer, old.seg_layer

    # -- shared layer handling -----------------------------------------------------------------
    def matches(self, image_layer: object, plane: Plane, model_key: str) -> bool:
        return (self.image_layer is image_layer and self.plane.lead == plane.lead
                and self.plane.shape == plane.shape and self.model_key == model_key)

    def alive(self, layer: object) -> bool:
        return layer is not None and layer in self.viewer.layers

    def name(self, what: str) -> str:
        return f"{self.image_layer.name} {what}"

    def place(self, layer: object, zoom: tuple[float, float] = (1.0, 1.0)) -> None:
        for key, value in self.plane.layer_kwargs(zoom).items():
            setattr(layer, key, value)

    def adopt_boxes_layer(self, layer: object) -> None:
        """Use an existing Shapes layer as the boxes; one of ours (e.g. read from a boxes CSV, whose
        coordinates are image pixels) is moved into the image's frame, any other keeps its own."""
        self.boxes_layer = layer
        if layer.metadata.get(KIND) == "boxes" and layer.ndim == self.plane.ndim:
            self.place(layer)

    def ensure_boxes_layer(self, edge_width: float | None = None) -> object:
        """The editable boxes layer (created empty, in the image's frame, if needed)."""
        if self.alive(self.boxes_layer):
            self.adopt_boxes_layer(self.boxes_layer)
            return self.boxes_layer
        width = edge_width or max(1.5, min(self.plane.hw) / 250)
        layer = self.viewer.add_shapes(
            None, ndim=self.plane.ndim, shape_type="rectangle", edge_color=BOX_COLOUR,
            face_color="transparent", edge_width=width, name=self.name("boxes"),
            metadata={KIND: "boxes"}, **self.plane.layer_kwargs())
        layer.current_edge_color = BOX_COLOUR
        layer.current_face_color = "transparent"
        layer.current_edge_width = width
        self.boxes_layer = layer
        return layer

    def set_boxes(self, boxes: np.ndarray) -> None:
        layer = self.ensure_boxes_layer()
        layer.data = []
        if len(boxes):
            layer.add_rectangles(boxes_to_rectangles(boxes, self.plane), edge_color=BOX_COLOUR,
                                 face_color="transparent", edge_width=layer.current_edge_width)

    def read_boxes(self) -> ShapeBoxes:
        """The boxes currently drawn, in image pixels, clipped to the image."""
        layer = self.boxes_layer
        if layer is None:
            return ShapeBoxes(NO_BOXES.copy())
        verts = shapes_in_image_pixels(layer, self.image_layer, self.plane)
        return rectangles_to_boxes(verts, list(layer.shape_type), self.plane.hw)

    def show_rough(self, rough_mask: object, zoom: tuple[float, float] | None = None) -> None:
        """The rough mask (an array or a pyramid), scaled (not upsampled) over the image: the S x S
        mask covers the image extent exactly; a tiled rough pass's mask has ``zoom`` image px per
        rough px."""
        base = rough_mask[0] if isinstance(rough_mask, list) else rough_mask
        if zoom is None:
            zoom = (self.plane.hw[0] / base.shape[0], self.plane.hw[1] / base.shape[1])
        if isinstance(rough_mask, list) and len(rough_mask) > 1:  # a pyramid: a new layer in place
            self.install(rough=rough_layer(rough_mask, self.name("rough"), self.plane, zoom))
            return
        data = self.plane.expand(np.asarray(base, dtype=np.uint8))
        if self.alive(self.rough_layer) and not self.rough_layer.multiscale:
            self.rough_layer.data = data
            self.place(self.rough_layer, zoom)
            return
        self.install(rough=rough_layer(data, self.name("rough"), self.plane, zoom))

    def _replace(self, old: object, new: object) -> object:
        """Put ``new`` where ``old`` is in the layer list (or on top), in one step."""
        layers = self.viewer.layers
        if self.alive(old):
            index = layers.index(old)
            layers.remove(old)
            layers.insert(index, new)
        else:
            layers.append(new)
        return new

    def ensure_seg_layer(self) -> object:
        """The segmentation layer, made (empty, uint16) or placed and sized for the plane."""
        data = self.plane.expand(np.zeros(self.plane.shape, dtype=np.uint16))
        if self.alive(self.seg_layer):
            self.place(self.seg_layer)
            if self.seg_layer.data.shape != data.shape:
                self.seg_layer.data = data
            return self.seg_layer
        self.install(seg=seg_layer(data, self.name("segmentation"), self.plane))
        return self.seg_layer

    def install(self, rough: object = None, seg: object = None, boxes: object = None) -> None:
        """Put prebuilt layers in place of the current ones (same places in the layer list)."""
        if rough is not None:
            old, self.rough_layer = self.rough_layer, None
            self.rough_layer = self._replace(old, rough)
        if seg is not None:
            old, self.seg_layer = self.seg_layer, None
            self.seg_layer = self._replace(old, seg)
        if boxes is not None:
            old, self.boxes_layer = self.boxes_layer, None
            self.boxes_layer = self._replace(old, boxes)
