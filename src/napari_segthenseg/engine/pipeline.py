"""The two-stage engine: ``rough`` -> ``boxes`` -> ``refine`` -> ``fuse``, walked in one place.

:meth:`Engine.walk` is the pipeline: a generator that yields :class:`Progress` between steps
(so a caller can show progress and cancel) and returns a :class:`SegmentResult`. ``segment``,
the plugin's jobs, ``segthenseg-eval``, ``segthenseg-predict`` and the benchmarks all run it.
Every step can also be called alone, so the plugin re-runs only what an edit needs (one box's
``refine`` and a ``fuse`` from cached per-box results, or the output chunks a box touches).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from .boxes import clip_boxes, crop_windows
from .crops import cut_crops, cut_crops_lazy
from .device import resolve_device, synchronize
from .fuse import fuse, upsample_mask
from .image import ImageSource, NormStats, match_channels
from .localnorm import LocalWindows
from .modelfile import StSModel
from .progress import Progress
from .rough import RoughResult, rough_boxes, rough_pass, windows_for
from .scale import RoughPlan, plan_rough
from .unet import UNet

BYTES_PER_ACTIVATION = 4 * 12  # fp32 bytes x live feature maps per pixel and base feature
# cuDNN and oneDNN convolutions run faster on NHWC; on the CPU here by 1.2-1.5x (docs/BENCHMARKS.md).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")
REFINE_CHUNK = 64  # boxes per fine batch between progress reports (one batch for most images)
T = TypeVar("T")

Stats = NormStats | LocalWindows


@dataclass
class SegmentResult:
    """Everything a caller needs to show the result and to update it after an edit."""

    hw: tuple[int, int]
    boxes: np.ndarray  # (N, 4) int64, (y0, x0, y1, x1) full-res, inside the image
    probs: np.ndarray | None  # (N, S, S) float32 fine-net probability per box (None: by chunks)
    mask: object  # (H, W) bool NumPy, or the on-disk array a slide was written to
    stats: Stats  # intensity windows used for the crops
    rough: RoughResult | None = None
    baseline: np.ndarray | None = None  # the rough probabilities upsampled (when asked)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    counts: dict[str, int] = field(default_factory=dict)  # network pixels, boxes, tiles, chunks


def run(steps: Generator[Progress, None, T]) -> T:
    """Drive a step generator to its end and return its result (no progress shown)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class Engine:
    """Runs a :class:`StSModel` on a device. Not thread-safe: use one per worker thread.

    ``rough_scale`` (image px per rough px) overrides the scale recorded in the model file and
    always tiles the rough pass at that scale (docs/WHOLE_SLIDES.md).
    """

    def __init__(self, model: StSModel, device: str | torch.device = "auto",
                 memory_mb: float = 1024.0, amp: bool | None = None, rough_scale: float | None = None):
        self.model = model
        self.settings = model.settings
        self.device = resolve_device(device)
        self.memory_bytes = float(memory_mb) * 2**20
        # Half precision by default only on GPUs; the CPU path stays fp32 and deterministic
        # unless asked (then bfloat16, which CPUs run natively and float16 they do not).
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.rough_net = self._place(model.rough)
        self.fine_net = self._place(model.fine)
        self.rough_scale = rough_scale
        plan_rough((64, 64), self.settings.size, None, rough_scale)  # validates the override
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _place(self, net: UNet | None) -> UNet | None:
        if net is None:
            return None
        net = net.to(self.device).eval()
        if self.device.type in CHANNELS_LAST_DEVICES:
            net = net.to(memory_format=torch.channels_last)
        return net

    # -- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, name: str):
        """Add the time of the block (after the device finished) to ``timings[name]``."""
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def forward(self, net: UNet, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities of ``net`` on a batch, chunked to the memory budget."""
        per_item = x.shape[-2] * x.shape[-1] * net.width * BYTES_PER_ACTIVATION
        chunk = max(1, int(self.memory_bytes // per_item))
        role = "rough_px" if net is self.rough_net else "fine_px"  # pixels the networks evaluate
        self.counts[role] = self.counts.get(role, 0) + x.shape[0] * x.shape[-2] * x.shape[-1]
        if self.device.type in CHANNELS_LAST_DEVICES:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                     enabled=self.amp):
            for i in range(0, x.shape[0], chunk):
                outs.append(torch.sigmoid(net(x[i:i + chunk]).float())[:, 0])
        return torch.cat(outs) if outs else x.new_zeros((0, *x.shape[-2:]))

    @staticmethod
    def source(image: object) -> ImageSource:
        return image if isinstance(image, ImageSource) else ImageSource(image)

    def small(self, src: ImageSource) -> torch.Tensor:
        """The whole image at S x S with the network's channels (the paper's rough input)."""
        small = src.read_downsampled(self.settings.size, self.device)
        return match_channels(small, self.settings.in_channels)

    def plan(self, hw: tuple[int, int]) -> RoughPlan:
        """Whole-image or tiled rough pass for an image of ``hw`` (docs/WHOLE_SLIDES.md)."""
        s = self.settings
        return plan_rough(hw, s.size, s.trained_scale, self.rough_scale)

    # -- the steps -----------------------------------------------------------------------
    def image_stats(self, image: object) -> Stats:
        """Intensity windows of an image (for boxes drawn by hand), as the rough pass takes them."""
        src = self.source(image)
        with torch.inference_mode():
            return run(windows_for(self, src, self.plan(src.hw)))

    def rough(self, image: object) -> RoughResult:
        """Step 1: the rough net over the whole image at S x S, or in tiles at the trained scale."""
        if self.rough_net is None:
            raise ValueError("this model has no rough network: draw boxes by hand instead")
        src = self.source(image)
        with torch.inference_mode():
            return run(rough_pass(self, src, self.plan(src.hw)))

    def boxes(self, rough: RoughResult, hw: tuple[int, int]) -> np.ndarray:
        """Step 2: StS boxes at full resolution from the rough mask."""
        with self.timed("boxes"):
            return rough_boxes(rough, hw, self.settings.pad, self.settings.min_box)

    def crops(self, image: object, boxes: np.ndarray, stats: Stats,
              region: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
        """Normalised (N, C, S, S) network inputs for ``boxes`` (on the engine's device).

        ``region`` = ``(tensor, y0, x0)``: pixels already read that hold every crop window.
        """
        src = self.source(image)
        windows = crop_windows(boxes, src.hw)
        s = self.settings.size
        with torch.inference_mode():
            if region is not None:
                tensor, y0, x0 = region
                x = cut_crops(tensor, windows - (y0, x0, 0), s)
            elif src.lazy or src.height * src.width * src.channels * 4 > self.memory_bytes:
                x = cut_crops_lazy(lambda *r: src.read_region(*r, self.device), windows, src.hw, s)
            else:
                x = cut_crops(src.full_tensor(self.device), windows, s)
            # Channel matching and normalisation are affine, so they commute with the resampling;
            # doing them on the small crops is cheaper than on the full image.
            return stats.apply_to_crops(match_channels(x, self.settings.in_channels), boxes)

    def refine(self, image: object, boxes: np.ndarray, stats: Stats | None = None,
               region: tuple[torch.Tensor, int, int] | None = None) -> np.ndarray:
        """Step 3: fine-net probabilities (N, S, S) for ``boxes``, all crops as one batch."""
        if self.fine_net is None:
            raise ValueError("this model has no fine network")
        src = self.source(image)
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        if len(boxes) == 0:
            s = self.settings.size
            return np.zeros((0, s, s), dtype=np.float32)
        stats = stats if stats is not None else self.image_stats(src)
        with self.timed("crop"):
            x = self.crops(src, boxes, stats, region)
        with self.timed("fine_net"):
            probs = self.forward(self.fine_net, x)
        with self.timed("to_host"):
            return probs.cpu().numpy()

    def fuse(self, probs: np.ndarray, boxes: np.ndarray, hw: tuple[int, int],
             region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Step 4: full-resolution mask (or the ``region`` of it), OR where boxes overlap."""
        out_px = hw[0] * hw[1] if region is None else (region[2] - region[0]) * (region[3] - region[1])
        # On a GPU all boxes are fused there at once, unless the mask would not fit.
        on_device = self.device.type != "cpu" and out_px * 2 <= self.memory_bytes
        with self.timed("paste"):
            return fuse(probs, boxes, hw, self.settings.threshold,
                        device=self.device if on_device else "cpu", region=region)

    def baseline(self, rough: RoughResult, hw: tuple[int, int]) -> np.ndarray:
        """The paper's baseline: the rough probabilities upsampled to full resolution."""
        if rough.prob is None:
            raise ValueError("the rough probabilities of this image were not kept (a slide)")
        with self.timed("upsample"):
            return upsample_mask(rough.prob, hw, self.settings.threshold)

    # -- the walk ------------------------------------------------------------------------
    def refine_steps(self, src: ImageSource, boxes: np.ndarray, stats: Stats
                     ) -> Generator[Progress, None, np.ndarray]:
        """Step 3 in batches with progress between them.

        An image in memory is converted once and every batch cut from it; a lazy one is read
        where its boxes are: boxes are grouped by the output chunk they lie in and each group's
        crops come from one read (:func:`.slide.refine_nearby`).
        """
        from .slide import CHUNK, boxes_by_chunk, refine_nearby

        s = self.settings.size
        probs = np.zeros((len(boxes), s, s), dtype=np.float32)
        if not src.lazy and src.height * src.width * src.channels * 4 <= self.memory_bytes:
            with self.timed("crop"):
                region = (src.full_tensor(self.device), 0, 0)  # converted once for every batch
            for i in range(0, len(boxes), REFINE_CHUNK):
                yield Progress(f"fine pass: {i}/{len(boxes)} boxes", i, len(boxes))
                probs[i:i + REFINE_CHUNK] = self.refine(src, boxes[i:i + REFINE_CHUNK], stats, region)
            return probs
        centres = (boxes[:, :2] + boxes[:, 2:]) // 2
        groups = boxes_by_chunk(np.concatenate([centres, centres + 1], 1), src.hw, CHUNK)
        done = 0
        for idx in groups.values():  # each box in exactly one group: the chunk of its centre
            yield Progress(f"fine pass: {done}/{len(boxes)} boxes", done, len(boxes))
            probs[idx] = refine_nearby(self, src, boxes[idx], stats)
            done += len(idx)
        return probs

    def walk(self, image: object, boxes: np.ndarray | None = None, *, baseline: bool = False,
             output: object | None = None) -> Generator[Progress, None, SegmentResult]:
        """The pipeline: rough pass -> boxes -> fine pass -> fusion, yielding progress.

        With ``boxes`` (e.g. drawn by hand) the rough pass is skipped. ``baseline`` also returns
        the upsampled rough mask. ``output`` (a :class:`~.slide.ChunkedOutput`) writes the mask
        chunk by chunk to disk instead of returning it in memory (slides). A rough-only model
        returns the baseline as its mask.
        """
        self.timings, self.counts = {}, {}
        src = self.source(image)
        plan = self.plan(src.hw)
        rough = None
        if boxes is None:
            if self.rough_net is None:
                raise ValueError("this model has no rough network: draw boxes by hand instead")
            rough_store = output.rough_store(plan.rough_hw(src.hw, self.settings.size)) \
                if output is not None and plan.tiled else None
            rough = yield from rough_pass(self, src, plan, rough_store)
            self.counts.update(tiles_run=rough.tiles_run, tiles_skipped=rough.tiles_skipped)
            boxes = self.boxes(rough, src.hw)
            stats = rough.stats
        else:
            boxes = clip_boxes(boxes, src.hw)
            stats = yield from windows_for(self, src, plan)
        base = None
        if rough is not None and (baseline or self.fine_net is None) and output is None:
            base = self.baseline(rough, src.hw)
        if self.fine_net is None:
            if rough is None:
                raise ValueError("a rough-only model cannot segment boxes drawn by hand")
            s = self.settings.size
            return SegmentResult(src.hw, boxes, np.zeros((0, s, s), np.float32), base, stats, rough,
                                 base, dict(self.timings), dict(self.counts))
        self.counts["boxes"] = len(boxes)
        if output is not None:
            from .slide import fine_by_chunks

            times, counts = yield from fine_by_chunks(self, src, boxes, stats, output)
            for total, part in ((self.timings, times), (self.counts, counts)):
                for k, v in part.items():
                    total[k] = total.get(k, 0) + v
            return SegmentResult(src.hw, boxes, None, output.array, stats, rough, None,
                                 dict(self.timings), dict(self.counts))
        probs = yield from self.refine_steps(src, boxes, stats)
        yield Progress(f"fusing {len(boxes)} boxes", len(boxes), len(boxes))
        mask = self.fuse(probs, boxes, src.hw)
        return SegmentResult(src.hw, boxes, probs, mask, stats, rough, base, dict(self.timings),
                             dict(self.counts))

    def segment(self, image: object, boxes: np.ndarray | None = None, *, baseline: bool = False
                ) -> SegmentResult:
        """All four steps at once (see :meth:`walk`)."""
        return run(self.walk(image, boxes, baseline=baseline))


def segment(image: object, model: StSModel, device: str = "auto",
            boxes: np.ndarray | None = None) -> SegmentResult:
    """One-call StS segmentation of ``image`` with ``model``."""
    return Engine(model, device).segment(image, boxes)
