"""The two-stage engine: ``rough`` -> ``boxes`` -> ``refine`` -> ``fuse``, walked in one place.

:meth:`Engine.walk` is the pipeline: a generator that yields :class:`Progress` between steps
(so a caller can show progress and cancel) and returns a :class:`SegmentResult`. ``segment``,
the plugin's jobs (runs and edits), ``segthenseg-eval``, ``segthenseg-predict`` and the
benchmarks all run it. Its fine pass goes to an *output*: in memory (:class:`~.fine.InMemory`,
the default) or chunk by chunk to disk (:class:`~.slide.ChunkedOutput`, slides). The layers
below it: :mod:`.core` (the networks on a device), :mod:`.rough` (the rough pass at any size),
:mod:`.fine` and :mod:`.slide` (the outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .boxes import clip_boxes
from .core import Core
from .fine import InMemory
from .image import ImageSource
from .localnorm import Windows
from .modelfile import StSModel
from .progress import Steps, drive
from .rough import RoughResult, rough_boxes, rough_pass, windows_for
from .scale import RoughPlan, check_rough_scale, plan_rough
from .slide import ChunkedOutput

Output = InMemory | ChunkedOutput


@dataclass
class SegmentResult:
    """Everything a caller needs to show the result and to update it after an edit."""

    hw: tuple[int, int]
    boxes: np.ndarray  # (N, 4) int64, (y0, x0, y1, x1) full-res, inside the image
    probs: np.ndarray | None  # (N, S, S) float32 fine-net probability per box (None: by chunks)
    mask: object  # (H, W) bool NumPy, or the on-disk array a slide was written to
    stats: Windows  # intensity windows used for the crops
    rough: RoughResult | None = None
    baseline: np.ndarray | None = None  # the rough probabilities upsampled (when asked)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    counts: dict[str, int] = field(default_factory=dict)  # network pixels, boxes, refined, tiles, chunks


class Engine(Core):
    """Runs a :class:`StSModel` on a device. Not thread-safe: use one per worker thread.

    ``rough_scale`` (image px per rough px) overrides the scale recorded in the model file and
    always tiles the rough pass at that scale (docs/WHOLE_SLIDES.md). ``pixel_size`` (µm per px)
    overrides the one an image's file records; with the model's, it sets a slide's rough scale.
    """

    def __init__(self, model: StSModel, device: str = "auto", memory_mb: float = 1024.0,
                 amp: bool | None = None, rough_scale: float | None = None,
                 pixel_size: float | None = None):
        super().__init__(model, device, memory_mb, amp)
        self.rough_scale = rough_scale
        self.pixel_size = pixel_size

    @property
    def rough_scale(self) -> float | None:
        return self._rough_scale

    @rough_scale.setter
    def rough_scale(self, value: float | None) -> None:
        self._rough_scale = check_rough_scale(value)  # ValueError for zero, negative, NaN

    @property
    def pixel_size(self) -> float | None:
        return self._pixel_size

    @pixel_size.setter
    def pixel_size(self, value: float | None) -> None:
        if value is not None and not 0 < float(value) < float("inf"):
            raise ValueError(f"pixel size must be a positive number of µm, got {value}")
        self._pixel_size = None if value is None else float(value)

    def plan(self, hw: tuple[int, int], pixel_size: float | None = None) -> RoughPlan:
        """Whole-image or tiled rough pass for an image of ``hw`` with ``pixel_size`` µm per px
        (the user's override wins; docs/WHOLE_SLIDES.md)."""
        s = self.settings
        return plan_rough(hw, s.size, s.trained_scale, self.rough_scale,
                          pixel_size=self.pixel_size or pixel_size, trained_pixel_size=s.pixel_size)

    def plan_for(self, src: ImageSource) -> RoughPlan:
        """:meth:`plan` for an image, with the pixel size its file records."""
        return self.plan(src.hw, src.pixel_size)

    # -- steps callable alone ---------------------------------------------------------------
    def image_stats(self, image: object) -> Windows:
        """Intensity windows of an image (for boxes drawn by hand), as the rough pass takes them."""
        src = self.source(image)
        return drive(windows_for(self, src, self.plan_for(src)))

    def rough(self, image: object) -> RoughResult:
        """Step 1: the rough net over the whole image at S x S, or in tiles at the trained scale."""
        if self.rough_net is None:
            raise ValueError("this model has no rough network: draw boxes by hand instead")
        src = self.source(image)
        return drive(rough_pass(self, src, self.plan_for(src)))

    def boxes(self, rough: RoughResult, hw: tuple[int, int]) -> np.ndarray:
        """Step 2: StS boxes at full resolution from the rough mask."""
        with self.timed("boxes"):
            return rough_boxes(rough, hw, self.settings.pad, self.settings.min_box)

    def baseline(self, rough: RoughResult, hw: tuple[int, int]) -> np.ndarray:
        """The paper's baseline: the rough probabilities upsampled to full resolution."""
        if rough.prob is None:
            raise ValueError("the rough probabilities of this image were not kept (a slide)")
        return self.upsample(rough.prob, hw)

    # -- the walk ------------------------------------------------------------------------
    def walk(self, image: object, boxes: np.ndarray | None = None, *, baseline: bool = False,
             stats: Windows | None = None, output: Output | None = None) -> Steps[SegmentResult]:
        """The pipeline: rough pass -> boxes -> fine pass -> fusion, yielding progress.

        With ``boxes`` (drawn by hand, or after an edit) the rough pass is skipped and ``stats``
        (the intensity windows of an earlier pass) are used if given. ``baseline`` also returns
        the upsampled rough mask. ``output`` takes the fine pass: :class:`~.fine.InMemory` (the
        default; it may hold earlier per-box results) or :class:`~.slide.ChunkedOutput`. A
        rough-only model returns the baseline as its mask.
        """
        self.timings, self.counts = {}, {}
        src = self.source(image)
        plan = self.plan_for(src)
        output = InMemory() if output is None else output
        rough = None
        if boxes is None:
            if self.rough_net is None:
                raise ValueError("this model has no rough network: draw boxes by hand instead")
            store = output.rough_store(plan.rough_hw(src.hw, self.settings.size)) if plan.tiled else None
            rough = yield from rough_pass(self, src, plan, store)
            self.counts.update(tiles_run=rough.tiles_run, tiles_skipped=rough.tiles_skipped)
            boxes = self.boxes(rough, src.hw)
            stats = rough.stats
        else:
            boxes = clip_boxes(boxes, src.hw)
            if stats is None:
                stats = yield from windows_for(self, src, plan)
        base = None
        if rough is not None and (baseline or self.fine_net is None) and output.in_memory:
            base = self.baseline(rough, src.hw)
        if self.fine_net is None:
            if rough is None:
                raise ValueError("a rough-only model cannot segment boxes drawn by hand")
            s = self.settings.size
            return SegmentResult(src.hw, boxes, np.zeros((0, s, s), np.float32), base, stats, rough,
                                 base, dict(self.timings), dict(self.counts))
        self.counts["boxes"] = len(boxes)
        fine = yield from output.run(self, src, boxes, stats)
        for total, part in ((self.timings, fine.timings), (self.counts, fine.counts)):
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return SegmentResult(src.hw, boxes, fine.probs, fine.mask, stats, rough, base,
                             dict(self.timings), dict(self.counts))

    def segment(self, image: object, boxes: np.ndarray | None = None, *, baseline: bool = False
                ) -> SegmentResult:
        """All four steps at once (see :meth:`walk`)."""
        return drive(self.walk(image, boxes, baseline=baseline))


def segment(image: object, model: StSModel, device: str = "auto",
            boxes: np.ndarray | None = None) -> SegmentResult:
    """One-call StS segmentation of ``image`` with ``model``."""
    return Engine(model, device).segment(image, boxes)

