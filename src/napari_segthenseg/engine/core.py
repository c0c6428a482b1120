"""The engine's core: a model on a device and the steps that run its networks.

:class:`Core` holds the two networks placed on a device with the model's settings, and does the
device-bound work every route shares: a forward pass in memory-bounded batches, the S x S read
for the rough net, cutting and normalising crops, the fine pass on a batch of boxes (step 3),
fusing per-box results (step 4) and the paper's baseline. It knows nothing of tiles, chunks or
plans: the rough pass (:mod:`.rough`), the fine-pass outputs (:mod:`.fine`, :mod:`.slide`) and
the walk (:mod:`.pipeline`) are built on it. A chunk task of a slide needs only a Core.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from .boxes import crop_windows
from .crops import cut_crops, cut_crops_lazy
from .device import resolve_device, synchronize
from .fuse import fuse, upsample_mask
from .image import ImageSource, match_channels
from .localnorm import Windows
from .modelfile import StSModel
from .unet import UNet

BYTES_PER_ACTIVATION = 4 * 12  # fp32 bytes x live feature maps per pixel and base feature
# cuDNN and oneDNN convolutions run faster on NHWC; on the CPU here by 1.2-1.5x (docs/BENCHMARKS.md).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")
LARGE_WINDOW = 2048  # crop windows above this side are read one by one (one huge box never makes a huge read)

Region = tuple[torch.Tensor, int, int]  # pixels already read (C, h, w) and their top-left (y0, x0)


class Core:
    """A :class:`StSModel` on a device. Not thread-safe: use one per thread (the nets can be shared).

    ``memory_mb`` bounds a forward batch's activations; ``amp`` runs the nets in half precision
    (default: on GPUs only).
    """

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
        self.timings: dict[str, float] = {}  # seconds per stage since the last reset
        self.counts: dict[str, int] = {}  # network pixels, boxes, tiles, chunks

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

    @staticmethod
    def source(image: object) -> ImageSource:
        return image if isinstance(image, ImageSource) else ImageSource(image)

    def fits(self, src: ImageSource) -> bool:
        """Whether the whole image can be held as one float tensor within the memory budget."""
        return not src.lazy and src.height * src.width * src.channels * 4 <= self.memory_bytes

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

    def small(self, src: ImageSource) -> torch.Tensor:
        """The whole image at S x S with the network's channels (the paper's rough input)."""
        small = src.read_downsampled(self.settings.size, self.device)
        return match_channels(small, self.settings.in_channels)

    # -- the fine pass and fusion -----------------------------------------------------------
    def crops(self, image: object, boxes: np.ndarray, stats: Windows, region: Region | None = None,
              windows: np.ndarray | None = None) -> torch.Tensor:
        """Normalised (N, C, S, S) network inputs for ``boxes`` (on the core's device).

        ``region`` = ``(tensor, y0, x0)``: pixels already read that hold every crop window.
        ``windows`` (``y0, x0, side``): crop windows other than the boxes' own (shared crops).
        """
        src = self.source(image)
        windows = crop_windows(boxes, src.hw) if windows is None else windows
        s = self.settings.size
        with torch.inference_mode():
            if region is not None:
                tensor, y0, x0 = region
                x = cut_crops(tensor, windows - (y0, x0, 0), s)
            elif not self.fits(src):
                x = cut_crops_lazy(lambda *r: src.read_region(*r, self.device), windows, src.hw, s)
            else:
                x = cut_crops(src.full_tensor(self.device), windows, s)
            # Channel matching and normalisation are affine, so they commute with the resampling;
            # doing them on the small crops is cheaper than on the full image.
            return stats.apply_to_crops(match_channels(x, self.settings.in_channels), boxes)

    def refine(self, image: object, boxes: np.ndarray, stats: Windows, region: Region | None = None,
               windows: np.ndarray | None = None) -> np.ndarray:
        """Step 3: fine-net probabilities (N, S, S) for ``boxes`` (or their ``windows``), one batch."""
        if self.fine_net is None:
            raise ValueError("this model has no fine network")
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        if len(boxes) == 0:
            s = self.settings.size
            return np.zeros((0, s, s), dtype=np.float32)
        with self.timed("crop"):
            x = self.crops(image, boxes, stats, region, windows)
        with self.timed("fine_net"):
            probs = self.forward(self.fine_net, x)
        with self.timed("to_host"):
            return probs.cpu().numpy()

    def refine_local(self, src: ImageSource, boxes: np.ndarray, stats: Windows,
                     windows: np.ndarray | None = None) -> np.ndarray:
        """Step 3 for boxes that lie close together in a lazy image, from one read.

        The read covers every crop window (+1 px for the bilinear samples at their edges);
        windows larger than ``LARGE_WINDOW`` are read one by one instead. ``windows``: crop
        windows other than the boxes' own (shared crops, :mod:`.groups`).
        """
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        windows = crop_windows(boxes, src.hw) if windows is None else np.asarray(windows, np.float64)
        large = windows[:, 2] > LARGE_WINDOW
        probs = np.zeros((len(boxes), self.settings.size, self.settings.size), dtype=np.float32)
        small = np.flatnonzero(~large)
        if len(small):
            w = windows[small]
            y0 = max(0, math.floor(w[:, 0].min()) - 1)
            x0 = max(0, math.floor(w[:, 1].min()) - 1)
            y1 = min(src.height, math.ceil((w[:, 0] + w[:, 2]).max()) + 1)
            x1 = min(src.width, math.ceil((w[:, 1] + w[:, 2]).max()) + 1)
            with self.timed("crop"):
                tensor = src.read_region(y0, x0, y1, x1, self.device)
            probs[small] = self.refine(src, boxes[small], stats, (tensor, y0, x0), w)
            del tensor
        for i in np.flatnonzero(large):
            probs[i] = self.refine(src, boxes[i:i + 1], stats, windows=windows[i:i + 1])[0]
        return probs

    def fuse(self, probs: np.ndarray, boxes: np.ndarray, hw: tuple[int, int],
             region: tuple[int, int, int, int] | None = None, windows: np.ndarray | None = None
             ) -> np.ndarray:
        """Step 4: full-resolution mask (or the ``region`` of it), OR where boxes overlap;
        ``windows``: where each map lies when not in its box's own crop window."""
        out_px = hw[0] * hw[1] if region is None else (region[2] - region[0]) * (region[3] - region[1])
        # On a GPU all boxes are fused there at once, unless the mask would not fit.
        on_device = self.device.type != "cpu" and out_px * 2 <= self.memory_bytes
        with self.timed("paste"):
            return fuse(probs, boxes, hw, self.settings.threshold,
                        device=self.device if on_device else "cpu", region=region, windows=windows)

    def upsample(self, prob: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """The paper's baseline: rough probabilities upsampled to full resolution, thresholded."""
        with self.timed("upsample"):
            return upsample_mask(prob, hw, self.settings.threshold)
