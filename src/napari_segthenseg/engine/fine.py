"""Where the fine pass and fusion (the paper's steps 3-4) go: the in-memory output.

An *output* takes the boxes of a walk, runs the fine net on them and fuses the results. Two
kinds exist and the walk (:mod:`.pipeline`) and the plugin's edit jobs use them alike:

* :class:`InMemory` (this module): the fused mask as a NumPy array, with every box's fine result
  kept, so that an edit re-fuses from known results and refines only the boxes it changed;
* :class:`~.slide.ChunkedOutput`: a slide's mask written chunk by chunk to an on-disk array.

Each has ``run(core, src, boxes, stats)``, a step generator returning a :class:`FineResult`, and
``rough_store(rough_hw)``, where a tiled rough pass keeps its mask (None: in memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .core import Core
from .grid import CHUNK, boxes_by_chunk
from .image import ImageSource
from .localnorm import Windows
from .progress import Progress, Steps

REFINE_CHUNK = 64  # boxes per fine batch between progress reports (one batch for most images)
Box = tuple[int, int, int, int]


def box_key(box: np.ndarray) -> Box:
    """A box as a hashable key (for results kept per box)."""
    return tuple(int(v) for v in box)  # type: ignore[return-value]


@dataclass
class FineResult:
    """What an output made of the boxes."""

    mask: object  # (H, W) bool NumPy, or the on-disk array the mask was written to
    probs: np.ndarray | None  # (N, S, S) fine-net probability per box (in memory only)
    timings: dict[str, float] = field(default_factory=dict)  # stage seconds spent outside the core
    counts: dict[str, int] = field(default_factory=dict)  # e.g. ``refined``: boxes run through the fine net


@dataclass
class InMemory:
    """The fused mask in memory. ``known`` holds fine results of boxes segmented before (by
    :func:`box_key`): those boxes are not refined again, only fused."""

    known: Mapping[Box, np.ndarray] = field(default_factory=dict)
    in_memory = True  # the whole mask comes back as an array (the walk may add the baseline)

    def rough_store(self, rough_hw: tuple[int, int]) -> None:
        return None  # the rough mask stays in memory, with its probabilities

    def run(self, core: Core, src: ImageSource, boxes: np.ndarray, stats: Windows) -> Steps[FineResult]:
        """Refine the boxes without a known result (each distinct box once), then fuse all."""
        s = core.settings.size
        keys = [box_key(b) for b in boxes]
        todo: dict[Box, int] = {}
        for i, k in enumerate(keys):
            if k not in self.known and k not in todo:
                todo[k] = i
        idx = np.fromiter(todo.values(), dtype=np.int64, count=len(todo))
        new = yield from refine_all(core, src, boxes[idx], stats)
        found = dict(zip(todo, new, strict=True))
        probs = np.stack([found[k] if k in found else self.known[k] for k in keys]) if keys else \
            np.zeros((0, s, s), np.float32)
        yield Progress(f"fusing {len(boxes)} boxes", len(boxes), len(boxes))
        mask = core.fuse(probs, boxes, src.hw)
        return FineResult(mask, probs, counts={"refined": len(idx)})


def refine_all(core: Core, src: ImageSource, boxes: np.ndarray, stats: Windows) -> Steps[np.ndarray]:
    """Step 3 for ``boxes`` in batches, with progress between them.

    An image that fits in memory is converted once and every batch cut from it; a lazy one is
    read where its boxes are: boxes are grouped by the chunk their centre lies in and each
    group's crops come from one read (:meth:`.Core.refine_local`).
    """
    s = core.settings.size
    probs = np.zeros((len(boxes), s, s), dtype=np.float32)
    if len(boxes) == 0:
        return probs
    if core.fits(src):
        with core.timed("crop"):
            region = (src.full_tensor(core.device), 0, 0)  # converted once for every batch
        for i in range(0, len(boxes), REFINE_CHUNK):
            yield Progress(f"fine pass: {i}/{len(boxes)} boxes", i, len(boxes))
            probs[i:i + REFINE_CHUNK] = core.refine(src, boxes[i:i + REFINE_CHUNK], stats, region)
        return probs
    centres = (boxes[:, :2] + boxes[:, 2:]) // 2
    groups = boxes_by_chunk(np.concatenate([centres, centres + 1], 1), src.hw, CHUNK)
    done = 0
    for idx in groups.values():  # each box in exactly one group: the chunk of its centre
        yield Progress(f"fine pass: {done}/{len(boxes)} boxes", done, len(boxes))
        probs[idx] = core.refine_local(src, boxes[idx], stats)
        done += len(idx)
    return probs
