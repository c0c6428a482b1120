"""Volumes: Segment-then-Segment on a whole z-stack with 3D boxes (SPEC 2d, docs/VOLUMES.md).

The paper segments CT slice by slice and names 3D as future work. Here the rough net runs on
every slice (the paper's S x S pass, slices batched; or tiles at the trained scale when slices
are larger than the training images), the stacked rough masks are labelled in 3D
(26-connected), and each component becomes one 3D box ``(z0, y0, x0, z1, y1, x1)``: its
z-range padded by ``z_pad`` slices and clamped to the volume, and one square y/x window (the 2D
rules on its extent over all its slices) shared by every slice. The fine net segments each
slice's crop of each box (the crops of many slices as one batch), and the results fuse per
slice (OR) into a 3D mask: in memory or chunk by chunk to disk (:mod:`.volume_out`).

Where the 3D rule differs from slice-by-slice StS (docs/VOLUMES.md measures both):

* an object seen on one slice only is kept by default (``min_slices=1``) and gets a box over
  that slice +- ``z_pad``; ``min_slices=2`` drops such components as rough-net noise;
* a component under ``min_box`` px in y or x over all its slices is dropped; it is under that
  size on each of its slices too, so slice-by-slice StS drops it as well;
* ``z_pad`` gives the fine net the slices next to each rough object: objects the rough net
  missed there are found again.

Intensity windows: one per slice (``norm="slice"``, as every training slice had its own) or one
for the whole volume (``norm="volume"``: the min and max over every slice's S x S copy); tiled
slices keep their local windows (docs/WHOLE_SLIDES.md) either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .boxes import MIN_SLICES, NO_BOXES_3D, clip_boxes_3d, finalize_boxes_3d, scale_boxes
from .image import NormStats, VolumeSource, compute_stats
from .localnorm import Windows
from .pipeline import Engine
from .progress import Progress, Steps, drive
from .rough import rough_pass, windows_for
from .scale import RoughPlan
from .tracks import track_boxes
from .volume_out import VolumeChunked, VolumeFine, VolumeInMemory

Z_PAD = 1  # slices added above and below each object's z-range (docs/VOLUMES.md: measured)
SLAB = 32  # slices read, or sent through the rough net, between progress reports
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

    prob: np.ndarray | None  # (Z, S, S) float32 for the paper's pass; None when tiled
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


def rough_volume(core: Engine, vol: VolumeSource, plan: RoughPlan, norm: str = "slice",
                 mask_out: object | None = None) -> Steps[VolumeRough]:
    """Step 1 on every slice. The paper's pass reads each slice at S x S and sends ``SLAB`` slices
    at a time through the rough net; tiled slices go one by one (:func:`.rough.rough_pass`)."""
    s, depth = core.settings, vol.depth
    if plan.tiled:
        rough_hw = plan.rough_hw(vol.hw, s.size)
        mask = np.zeros((depth, *rough_hw), dtype=bool) if mask_out is None else mask_out
        stats = []
        for z in range(depth):
            yield Progress(f"rough pass: slice {z + 1}/{depth}", z, depth)
            res = drive(rough_pass(core, vol.plane(z), plan))
            mask[z] = res.mask
            stats.append(res.stats)
        return VolumeRough(None, mask, stats, plan)
    smalls, stats = [], []
    for z0 in range(0, depth, SLAB):
        yield Progress(f"rough pass: reading slice {z0 + 1}/{depth}", z0, 2 * depth)
        with core.timed("rough_read"):
            for z in range(z0, min(z0 + SLAB, depth)):
                smalls.append(core.small(vol.plane(z)))
                stats.append(compute_stats(smalls[-1], s.normalisation, vol.dtype))
    stats = _volume_norm(stats, norm)
    prob = np.zeros((depth, s.size, s.size), dtype=np.float32)
    for z0 in range(0, depth, SLAB):
        yield Progress(f"rough pass: slice {z0 + 1}/{depth}", depth + z0, 2 * depth)
        z1 = min(z0 + SLAB, depth)
        x = torch.stack([stats[z].apply(smalls[z]) for z in range(z0, z1)])
        with core.timed("rough_net"):
            prob[z0:z1] = core.forward(core.rough_net, x).cpu().numpy()
    return VolumeRough(prob, prob >= s.threshold, stats, plan)


def volume_windows(core: Engine, vol: VolumeSource, plan: RoughPlan, norm: str = "slice"
                   ) -> Steps[list[Windows]]:
    """The intensity windows of every slice as the rough pass takes them (for boxes by hand)."""
    stats = []
    for z in range(vol.depth):
        if z % SLAB == 0:
            yield Progress(f"intensity windows: slice {z + 1}/{vol.depth}", z, vol.depth)
        stats.append(drive(windows_for(core, vol.plane(z), plan)))
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
    (:class:`~.volume_out.VolumeInMemory` by default, or :class:`~.volume_out.VolumeChunked`).
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
