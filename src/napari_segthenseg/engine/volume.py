"""Volumes: Segment-then-Segment on a whole z-stack with 3D boxes (SPEC 2d, docs/VOLUMES.md).

The paper segments CT slice by slice and names 3D as future work. Here the rough net runs on
every slice, slices batched: each at S x S (the paper's pass), or, when slices are larger than
the training images, whole at the trained scale (up to ``WHOLE_SLICE`` training images across,
one intensity window per slice as in training) or in tiles with local windows (larger, slide-
like slices; docs/WHOLE_SLIDES.md). The stacked rough masks' objects are 26-connected, and are
followed from slice to slice as *tracks* (:mod:`.tracks`): each track is one 3D box
``(z0, y0, x0, z1, y1, x1)``, a z-range and one square y/x window (the 2D rules on its extent
over its slices) shared by all its slices; an object that drifts in y/x (a curving vessel) is
cut into several tracks, since one window over its whole path is far larger than what the fine
net was trained on (measured: docs/VOLUMES.md). The fine net segments each slice's crop of
each box (the crops of many slices as one batch); within a box the slices' results are aligned
pixel to pixel, and are averaged along z (``z_smooth``) before they fuse per slice (OR) into a
3D mask, in memory or chunk by chunk to disk (:mod:`.volume_out`, :mod:`.volume_chunks`).

Where the 3D rules differ from slice-by-slice StS (docs/VOLUMES.md measures each):

* an object seen on one slice only is kept by default (``min_slices=1``) and gets a box over
  that slice +- ``z_pad``; ``min_slices=2`` drops such objects as rough-net noise;
* an object's z-range is padded by ``z_pad`` slices at its ends (not between the tracks of one
  object), so the fine net looks at the slices where the rough net may have missed it;
* a track under ``min_box`` px in y or x over all its slices is dropped; it is under that size
  on each of its slices too, so slice-by-slice StS drops it as well.

Intensity windows: one per slice (``norm="slice"``, as every training slice had its own) or one
for the whole volume (``norm="volume"``: the min and max over every slice's rough input); tiled
slices keep their local windows either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .boxes import MIN_SLICES, NO_BOXES_3D, clip_boxes_3d, finalize_boxes_3d, scale_boxes
from .image import ImageSource, NormStats, VolumeSource, compute_stats, match_channels
from .localnorm import Windows
from .pipeline import Engine
from .progress import Progress, Steps, drive
from .rough import rough_pass, windows_for
from .scale import RoughPlan
from .tracks import track_boxes
from .volume_chunks import VolumeChunked
from .volume_out import VolumeFine, VolumeInMemory

Z_PAD = 1  # slices added above and below each object's z-range (docs/VOLUMES.md: measured)
SLAB = 32  # slices read, or sent through the rough net, between progress reports
WHOLE_SLICE = 2  # slices up to this many training images across are read whole at the trained scale
NORMS = ("slice", "volume")
Z_SMOOTH = 2  # slices on each side that a box's fine probabilities are averaged over (measured)
GROWTH = 1.0  # a 3D box's window may grow to this many times its object's largest slice (measured)
VolumeOutput = VolumeInMemory | VolumeChunked


@dataclass(frozen=True)
class VolumeOptions:
    """The 3D rules (docs/VOLUMES.md)."""

    z_pad: int = Z_PAD
    min_slices: int = MIN_SLICES
    norm: str = "slice"
    growth: float | None = GROWTH  # None: one window for all the slices of an object
    z_smooth: int = Z_SMOOTH  # slices on each side a box's fine probabilities are averaged over

    def __post_init__(self) -> None:
        if self.z_pad < 0 or self.min_slices < 1 or self.z_smooth < 0:
            raise ValueError(f"z_pad and z_smooth must be >= 0 and min_slices >= 1, got {self.z_pad}, "
                             f"{self.z_smooth}, {self.min_slices}")
        if self.growth is not None and not self.growth >= 1:
            raise ValueError(f"growth must be at least 1 (or None), got {self.growth}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown volume normalisation {self.norm!r}; choose one of {NORMS}")


@dataclass
class VolumeRough:
    """The rough pass of every slice."""

    prob: np.ndarray | None  # (Z, S, S) float32 for the paper's pass; None at the trained scale
    mask: object  # (Z, rh, rw) bool: NumPy, or an on-disk zarr array
    stats: list[Windows]  # intensity windows per slice
    plan: RoughPlan


@dataclass
class VolumeResult:
    """A volume's segmentation and everything an edit needs."""

    shape: tuple[int, int, int]
    boxes: np.ndarray  # (N, 6) int64 (z0, y0, x0, z1, y1, x1), inside the volume
    probs: list[np.ndarray] | None  # per box (z1 - z0, S, S) fine-net probabilities (None: by chunks)
    mask: object  # (Z, H, W) bool NumPy, or the on-disk array it was written to
    stats: list[Windows]
    rough: VolumeRough | None = None
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def _volume_norm(stats: list[Windows], norm: str) -> list[Windows]:
    """Per-slice windows, or one window over all of them (``norm="volume"``, min-max windows)."""
    if norm == "slice" or not stats or not all(isinstance(s, NormStats) for s in stats):
        return stats
    lo, hi = min(s.lo for s in stats), max(s.hi for s in stats)
    one = NormStats(lo, hi if hi > lo else lo + 1.0)
    return [one] * len(stats)


def whole_slices(plan: RoughPlan, hw: tuple[int, int]) -> bool:
    """Whether a tiled plan's slices are read whole at its scale (one window per slice) rather
    than in tiles with local windows: slices up to ``WHOLE_SLICE`` training images across are
    one image each, as a CT slice at twice the training resolution is (docs/VOLUMES.md)."""
    return plan.tiled and max(hw) <= WHOLE_SLICE * (plan.window or 0)


def describe_plan(plan: RoughPlan, hw: tuple[int, int]) -> str:
    """How the rough net sees a volume's slices (for reports and the plugin's status)."""
    if not plan.tiled:
        return "each slice whole at S x S (the paper's rough pass)"
    how = "whole" if whole_slices(plan, hw) else "in tiles"
    return f"each slice {how} at {plan.scale:g} image px per rough px"


def _slice_input(core: Engine, src: ImageSource, plan: RoughPlan) -> tuple[torch.Tensor, Windows]:
    """One slice as the rough net's input (C, h, w) and its intensity window: at S x S (the
    paper's pass), or whole at the plan's scale padded to what the U-Net's poolings divide."""
    s = core.settings
    if not plan.tiled:
        small = core.small(src)
        return small, compute_stats(small, s.normalisation, src.dtype)
    f = plan.scale
    rh, rw = plan.rough_hw(src.hw, s.size)
    step = 2 ** core.rough_net.depth
    ih, iw = math.ceil(rh / step) * step, math.ceil(rw / step) * step
    t = match_channels(src.read_scaled(0, 0, ih * f, iw * f, f, (ih, iw), core.device), s.in_channels)
    return t, compute_stats(t[:, :rh, :rw], s.normalisation, src.dtype)


def rough_volume(core: Engine, vol: VolumeSource, plan: RoughPlan, norm: str = "slice",
                 mask_out: object | None = None) -> Steps[VolumeRough]:
    """Step 1 on every slice, ``SLAB`` slices at a time through the rough net: each slice at
    S x S (the paper's pass), or whole at the trained scale (:func:`whole_slices`); larger
    slices go one by one in tiles with local windows (:func:`.rough.rough_pass`)."""
    s, depth = core.settings, vol.depth
    rough_hw = plan.rough_hw(vol.hw, s.size)
    mask = np.zeros((depth, *rough_hw), dtype=bool) if mask_out is None else mask_out
    if plan.tiled and not whole_slices(plan, vol.hw):
        stats = []
        for z in range(depth):
            yield Progress(f"rough pass: slice {z + 1}/{depth}", z, depth)
            res = drive(rough_pass(core, vol.plane(z), plan))
            mask[z] = res.mask
            stats.append(res.stats)
        return VolumeRough(None, mask, stats, plan)
    prob = None if plan.tiled else np.zeros((depth, *rough_hw), dtype=np.float32)  # kept for baselines
    inputs: dict[int, torch.Tensor] = {}
    stats: list[Windows] = []
    rh, rw = rough_hw

    def run(z0: int, z1: int) -> None:
        x = torch.stack([stats[z].apply(inputs.pop(z)) for z in range(z0, z1)])
        with core.timed("rough_net"):
            p = core.forward(core.rough_net, x)[:, :rh, :rw].cpu().numpy()
        mask[z0:z1] = p >= s.threshold
        if prob is not None:
            prob[z0:z1] = p

    for z0 in range(0, depth, SLAB):
        z1 = min(z0 + SLAB, depth)
        yield Progress(f"rough pass: slice {z0 + 1}/{depth}", z0, depth)
        with core.timed("rough_read"):
            for z in range(z0, z1):
                inputs[z], window = _slice_input(core, vol.plane(z), plan)
                stats.append(window)
        if norm == "slice":
            run(z0, z1)
    if norm != "slice":  # one window over every slice: known once all are read
        stats = _volume_norm(stats, norm)
        for z0 in range(0, depth, SLAB):
            run(z0, min(z0 + SLAB, depth))
    return VolumeRough(prob, mask, stats, plan)


def volume_windows(core: Engine, vol: VolumeSource, plan: RoughPlan, norm: str = "slice"
                   ) -> Steps[list[Windows]]:
    """The intensity windows of every slice as the rough pass takes them (for boxes by hand)."""
    stats = []
    for z in range(vol.depth):
        if z % SLAB == 0:
            yield Progress(f"intensity windows: slice {z + 1}/{vol.depth}", z, vol.depth)
        if plan.tiled and not whole_slices(plan, vol.hw):
            stats.append(drive(windows_for(core, vol.plane(z), plan)))
        else:
            stats.append(_slice_input(core, vol.plane(z), plan)[1])
    return _volume_norm(stats, norm)


def volume_boxes(rough: VolumeRough, shape: tuple[int, int, int], pad: int, min_box: int,
                 options: VolumeOptions) -> np.ndarray:
    """Step 2 in 3D: the stacked rough masks' objects (26-connected) as 3D boxes.

    Objects are followed on the rough grid (:func:`.tracks.track_boxes`), their y/x extents
    scaled to full resolution as :func:`.rough.rough_boxes` does per image, then the 3D rules
    applied (:func:`~.boxes.finalize_boxes_3d`).
    """
    mask = rough.mask
    rh, rw = (int(v) for v in mask.shape[1:])
    hw = shape[1:]
    if rough.plan.tiled:
        f = rough.plan.scale

        def to_full(b: np.ndarray) -> np.ndarray:
            return np.minimum(scale_boxes(b, (rh, rw), (rh * f, rw * f)), (hw[0], hw[1], hw[0], hw[1]))
    else:
        def to_full(b: np.ndarray) -> np.ndarray:
            return scale_boxes(b, (rh, rw), hw)
    found = track_boxes(mask, to_full, options.growth)
    return finalize_boxes_3d(found.boxes, shape, pad, options.z_pad, min_box, options.min_slices,
                             found.objects)


def walk_volume(engine: Engine, volume: object, boxes: np.ndarray | None = None, *,
                stats: list[Windows] | None = None, output: VolumeOutput | None = None,
                options: VolumeOptions | None = None) -> Steps[VolumeResult]:
    """The pipeline on a volume: rough pass on every slice -> 3D boxes -> fine pass -> fusion.

    As :meth:`.Engine.walk`: ``boxes`` (3D, by hand or after an edit) skip the rough pass and use
    ``stats`` (the windows of an earlier pass) if given; ``output`` takes the fine pass
    (:class:`~.volume_out.VolumeInMemory` by default, or :class:`~.volume_chunks.VolumeChunked`).
    A rough-only model returns its rough masks upsampled (the paper's baseline) per slice.
    """
    options = options or VolumeOptions()
    engine.timings, engine.counts = {}, {}
    vol = volume if isinstance(volume, VolumeSource) else VolumeSource(volume)
    plan = engine.plan(vol.hw)
    output = VolumeInMemory() if output is None else output
    rough = None
    if boxes is None:
        if engine.rough_net is None:
            raise ValueError("this model has no rough network: draw boxes by hand instead")
        store = output.rough_store((vol.depth, *plan.rough_hw(vol.hw, engine.settings.size))) \
            if plan.tiled else None
        rough = yield from rough_volume(engine, vol, plan, options.norm, store)
        with engine.timed("boxes"):
            boxes = volume_boxes(rough, vol.shape, engine.settings.pad, engine.settings.min_box, options)
        stats = rough.stats
    else:
        boxes = clip_boxes_3d(boxes, vol.shape) if len(np.asarray(boxes).reshape(-1)) else NO_BOXES_3D.copy()
        if stats is None:
            stats = yield from volume_windows(engine, vol, plan, options.norm)
    engine.counts["boxes"] = len(boxes)
    if engine.fine_net is None:
        if rough is None or rough.prob is None or not output.in_memory:
            raise ValueError("a rough-only model segments a volume only with the paper's whole-slice "
                             "rough pass, in memory")
        mask = np.stack([engine.upsample(p, vol.hw) for p in rough.prob])
        return VolumeResult(vol.shape, boxes, None, mask, stats, rough, dict(engine.timings),
                            dict(engine.counts))
    fine: VolumeFine = yield from output.run(engine, vol, boxes, stats, options.z_smooth)
    for total, part in ((engine.timings, fine.timings), (engine.counts, fine.counts)):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return VolumeResult(vol.shape, boxes, fine.probs, fine.mask, stats, rough, dict(engine.timings),
                        dict(engine.counts))


def segment_volume(engine: Engine, volume: object, boxes: np.ndarray | None = None,
                   options: VolumeOptions | None = None) -> VolumeResult:
    """All steps at once on a volume (see :func:`walk_volume`)."""
    return drive(walk_volume(engine, volume, boxes, options=options))
