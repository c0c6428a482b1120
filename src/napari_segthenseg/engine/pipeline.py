"""The two-stage engine: ``rough`` -> ``boxes`` -> ``refine`` -> ``fuse``, or all at once.

Every step can be called alone, so the plugin can re-run only what an edit needs (one box's
``refine`` and a ``fuse`` from cached per-box results).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .boxes import boxes_from_mask, clip_boxes, crop_windows
from .crops import cut_crops, cut_crops_lazy
from .device import resolve_device, synchronize
from .fuse import fuse, upsample_mask
from .image import ImageSource, NormStats, compute_stats, match_channels
from .modelfile import StSModel
from .unet import UNet

BYTES_PER_ACTIVATION = 4 * 12  # fp32 bytes x live feature maps per pixel and base feature
# cuDNN and oneDNN convolutions run faster on NHWC; on the CPU here by 1.2-1.5x (docs/BENCHMARKS.md).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


@dataclass
class RoughResult:
    """Output of the rough pass at ``S x S``."""

    prob: np.ndarray  # float32 probabilities
    mask: np.ndarray  # bool, prob >= threshold
    stats: NormStats  # intensity window of this image, reused for its crops


@dataclass
class SegmentResult:
    """Everything a caller needs to show the result and to update it after an edit."""

    hw: tuple[int, int]
    boxes: np.ndarray  # (N, 4) int64, (y0, x0, y1, x1) full-res, inside the image
    probs: np.ndarray  # (N, S, S) float32: fine-net probability per box
    mask: np.ndarray  # (H, W) bool: fused segmentation
    stats: NormStats
    rough: RoughResult | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Engine:
    """Runs a :class:`StSModel` on a device. Not thread-safe: use one per worker thread."""

    def __init__(self, model: StSModel, device: str | torch.device = "auto",
                 memory_mb: float = 1024.0, amp: bool | None = None):
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
        self.timings: dict[str, float] = {}

    def _place(self, net: UNet | None) -> UNet | None:
        if net is None:
            return None
        net = net.to(self.device).eval()
        if self.device.type in CHANNELS_LAST_DEVICES:
            net = net.to(memory_format=torch.channels_last)
        return net

    # -- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, name: str):
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _forward(self, net: UNet, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities of ``net`` on a batch, chunked to the memory budget."""
        s = self.settings.size
        per_item = s * s * net.width * BYTES_PER_ACTIVATION
        chunk = max(1, int(self.memory_bytes // per_item))
        if self.device.type in CHANNELS_LAST_DEVICES:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            for i in range(0, x.shape[0], chunk):
                outs.append(torch.sigmoid(net(x[i:i + chunk]).float())[:, 0])
        return torch.cat(outs) if outs else x.new_zeros((0, s, s))

    @staticmethod
    def source(image: object) -> ImageSource:
        return image if isinstance(image, ImageSource) else ImageSource(image)

    def _small(self, src: ImageSource) -> torch.Tensor:
        small = src.read_downsampled(self.settings.size, self.device)
        return match_channels(small, self.settings.in_channels)

    # -- the steps -----------------------------------------------------------------------
    @torch.inference_mode()
    def image_stats(self, image: object) -> NormStats:
        """Normalisation window of an image, from its downsampled copy (as the rough pass does)."""
        src = self.source(image)
        return compute_stats(self._small(src), self.settings.normalisation, src.dtype)

    @torch.inference_mode()
    def rough(self, image: object) -> RoughResult:
        """Step 1: the whole image at S x S through the rough net."""
        if self.rough_net is None:
            raise ValueError("this model has no rough network: draw boxes by hand instead")
        src = self.source(image)
        with self._timed("rough_read"):
            small = self._small(src)
            stats = compute_stats(small, self.settings.normalisation, src.dtype)
            x = stats.apply(small)[None]
        with self._timed("rough_net"):
            prob = self._forward(self.rough_net, x)[0].cpu().numpy()
        return RoughResult(prob, prob >= self.settings.threshold, stats)

    def boxes(self, rough_mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Step 2: StS boxes at full resolution from the rough mask."""
        with self._timed("boxes"):
            return boxes_from_mask(rough_mask, hw, self.settings.pad, self.settings.min_box)

    @torch.inference_mode()
    def crops(self, image: object, boxes: np.ndarray, stats: NormStats) -> torch.Tensor:
        """Normalised (N, C, S, S) network inputs for ``boxes`` (on the engine's device)."""
        src = self.source(image)
        windows = crop_windows(boxes, src.hw)
        s = self.settings.size
        full_bytes = src.height * src.width * src.channels * 4
        if src.lazy or full_bytes > self.memory_bytes:
            x = cut_crops_lazy(lambda *r: src.read_region(*r, self.device), windows, src.hw, s)
        else:
            x = cut_crops(src.full_tensor(self.device), windows, s)
        # Channel matching and normalisation are affine, so they commute with the resampling;
        # doing them on the small crops is cheaper than on the full image.
        return stats.apply(match_channels(x, self.settings.in_channels))

    @torch.inference_mode()
    def refine(self, image: object, boxes: np.ndarray, stats: NormStats | None = None) -> np.ndarray:
        """Step 3: fine-net probabilities (N, S, S) for ``boxes``, all crops as one batch."""
        if self.fine_net is None:
            raise ValueError("this model has no fine network")
        src = self.source(image)
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        if len(boxes) == 0:
            s = self.settings.size
            return np.zeros((0, s, s), dtype=np.float32)
        stats = stats if stats is not None else self.image_stats(src)
        with self._timed("crop"):
            x = self.crops(src, boxes, stats)
        with self._timed("fine_net"):
            probs = self._forward(self.fine_net, x)
        with self._timed("to_host"):
            return probs.cpu().numpy()

    def fuse(self, probs: np.ndarray, boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Step 4: full-resolution mask, OR where boxes overlap."""
        # On a GPU all boxes are fused there at once, unless the full-size mask would not fit.
        on_device = self.device.type != "cpu" and hw[0] * hw[1] * 2 <= self.memory_bytes
        with self._timed("paste"):
            return fuse(probs, boxes, hw, self.settings.threshold,
                        device=self.device if on_device else "cpu")

    def baseline(self, rough: RoughResult, hw: tuple[int, int]) -> np.ndarray:
        """The paper's baseline: the rough probabilities upsampled to full resolution."""
        with self._timed("upsample"):
            return upsample_mask(rough.prob, hw, self.settings.threshold)

    def segment(self, image: object, boxes: np.ndarray | None = None) -> SegmentResult:
        """All four steps. With ``boxes`` (e.g. drawn by hand) the rough pass is skipped.

        A rough-only model returns the upsampled rough mask as ``mask`` (the baseline).
        """
        self.timings = {}
        src = self.source(image)
        rough = None
        if boxes is None:
            rough = self.rough(src)
            boxes = self.boxes(rough.mask, src.hw)
            stats = rough.stats
        else:
            boxes = clip_boxes(boxes, src.hw)
            stats = self.image_stats(src)
        if self.fine_net is None:
            if rough is None:
                raise ValueError("a rough-only model cannot segment boxes drawn by hand")
            s = self.settings.size
            empty = np.zeros((0, s, s), dtype=np.float32)
            return SegmentResult(src.hw, boxes, empty, self.baseline(rough, src.hw), stats, rough,
                                 dict(self.timings))
        probs = self.refine(src, boxes, stats)
        mask = self.fuse(probs, boxes, src.hw)
        return SegmentResult(src.hw, boxes, probs, mask, stats, rough, dict(self.timings))


def segment(image: object, model: StSModel, device: str = "auto",
            boxes: np.ndarray | None = None) -> SegmentResult:
    """One-call StS segmentation of ``image`` with ``model``."""
    return Engine(model, device).segment(image, boxes)
