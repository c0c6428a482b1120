"""A slide's segmentation on disk, and the work done on it in worker threads (no Qt, no layers).

The segmentation is an OME-Zarr instance label image (uint32, one id per 8-connected object, the
format ``segthenseg-predict --labels`` writes) in the widget's session folder (:class:`Workdir`).
A run walks the engine into it chunk by chunk (the chunks hold 0/1 as they are written, so napari
shows them as they come) and then numbers the objects (``engine.labels.relabel_chunked``); an edit
walks the engine over the regions it touched and numbers the objects around them again
(``engine.labels.relabel_region``), keeping every other object's id.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine import Engine, ImageSource, omezarr
from ..engine.atomic import atomic_write
from ..engine.boxes import NO_BOXES
from ..engine.grid import Region, regions_for
from ..engine.labels import LABEL_DTYPE, max_label, relabel_chunked, relabel_region
from ..engine.limits import IN_MEMORY_MASK_PX
from ..engine.localnorm import Windows, windows_from_arrays, windows_to_arrays
from ..engine.progress import Progress, Steps
from ..engine.slide import ChunkedOutput
from .layers import STORE_KEY


class Workdir:
    """The widget's session folder, made when first needed and removed with the widget (or at exit):
    stores and scratch space."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = itertools.count(1)

    @property
    def path(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="segthenseg-")
        return Path(self._tmp.name)

    def new(self, stem: str, suffix: str = ".ome.zarr") -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60] or "image"
        return self.path / f"{safe}-{next(self._count)}{suffix}"


@dataclass
class SlideStore:
    """A slide's segmentation on disk: the label image, the next free object id, and the footprints
    of box edits it does not reflect yet."""

    label: omezarr.LabelImage | None = None
    next_label: int = 1
    pending: np.ndarray = field(default_factory=NO_BOXES.copy)


def new_store(path: Path, hw: tuple[int, int], chunk: int) -> omezarr.LabelImage:
    return omezarr.create(path, hw, chunk, dtype=np.dtype(LABEL_DTYPE).name)


def remove_later(path: Path | None) -> None:
    """Delete a store in a background thread (hundreds of chunk files: not on the UI thread)."""
    if path is not None and Path(path).exists():
        threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                         daemon=True).start()


def store_of(layer: object) -> Path | None:
    """The OME-Zarr label image behind a Labels layer: ours (metadata) or one napari-ome-zarr read."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get(STORE_KEY):
        return Path(meta[STORE_KEY])
    source = getattr(getattr(layer, "source", None), "path", None)
    if source and Path(source).is_dir():
        return Path(source)
    return None


def rough_pyramid(mask: object, store: Path | None = None) -> list:
    """The rough mask as a uint8 pyramid (2x apart, down to ``omezarr.MIN_LEVEL_SIDE``), largest first:
    NumPy when it fits in memory, else an OME-Zarr at ``store`` copied block by block."""
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    if isinstance(mask, np.ndarray) or hw[0] * hw[1] <= IN_MEMORY_MASK_PX or store is None:
        levels = [np.asarray(mask[...], dtype=np.uint8)]
        while max(levels[-1].shape) > omezarr.MIN_LEVEL_SIDE:
            levels.append(omezarr.max_pool2(levels[-1]))
        return levels
    image = omezarr.create(store, hw, 2048, name="rough")
    omezarr.write_level0(image, mask)
    return list(image.levels)


WINDOWS_FILE = "segthenseg_windows.npz"  # beside the levels: zarr readers ignore it


def save_windows(label: omezarr.LabelImage, windows: Windows) -> None:
    """Keep the intensity windows with the segmentation (saved with it, so a continued slide needs no
    survey of the image before its first edit)."""
    with atomic_write(label.path / WINDOWS_FILE) as fh:
        np.savez(fh, **windows_to_arrays(windows))


def load_windows(label: omezarr.LabelImage) -> Windows | None:
    """The windows saved with a segmentation, or None (none saved, or unreadable)."""
    path = label.path / WINDOWS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return windows_from_arrays(dict(data))
    except (OSError, ValueError):
        return None


def number_objects(label: omezarr.LabelImage) -> Steps[int]:
    """Turn the 0/1 chunks a run wrote into object ids, build the pyramid; the next free id."""
    n = yield from relabel_chunked(label.levels[0], int(label.levels[0].chunks[0]))
    yield Progress("pyramid of the segmentation", 0, 1)
    omezarr.update_pyramid(label)
    omezarr.set_next_label(label, n + 1)
    return n + 1


def resegment(engine: Engine, src: ImageSource, label: omezarr.LabelImage, boxes_near: object,
              footprints: np.ndarray, stats: Windows | None, next_label: int, threads: int
              ) -> Steps[tuple[list[Region], object, int]]:
    """Segment again where ``footprints`` lie: one region per output chunk they touch, with the boxes
    ``boxes_near(region)`` gives, then number the objects around each region and update the pyramid.
    Returns the regions, the walk's result and the next free id."""
    chunk = int(label.levels[0].chunks[0])
    regions = regions_for(footprints, src.hw, chunk)
    near = np.unique(np.concatenate([boxes_near(r) for r in regions]), axis=0) if regions else NO_BOXES
    output = ChunkedOutput(label.levels[0], chunk, threads=threads, overwrite=True, regions=regions)
    res = yield from engine.walk(src, near, stats=stats, output=output)
    for i, region in enumerate(regions):
        yield Progress(f"numbering objects: {i}/{len(regions)} regions", i, len(regions))
        with engine.timed("labels"):
            next_label, window = relabel_region(label.levels[0], region, next_label)
        with engine.timed("pyramid"):
            omezarr.update_pyramid(label, window)
    omezarr.set_next_label(label, next_label)
    res.timings.update({k: engine.timings[k] for k in ("labels", "pyramid") if k in engine.timings})
    return regions, res, next_label


def copy_saved(source: Path, store: Path, hw: tuple[int, int]) -> Steps[tuple[omezarr.LabelImage, int]]:
    """A working copy of a saved segmentation (edits never touch the saved one) as instance labels:
    an id image is copied as it is; a 0/1 mask (an older save, ``segthenseg-predict`` without
    ``--labels``) is numbered into a new one. Returns it and its next free id."""
    saved = omezarr.open_label_image(source)
    if saved.shape != hw:
        raise ValueError(f"{source}: the segmentation is {saved.shape[0]} x {saved.shape[1]} px, "
                         f"the image {hw[0]} x {hw[1]} px")
    yield Progress(f"copying {source.name}", 0, 1)
    chunk = int(saved.levels[0].chunks[0])
    if np.dtype(saved.levels[0].dtype) == np.dtype(LABEL_DTYPE):
        shutil.copytree(source, store)
        label = omezarr.open_label_image(store, mode="r+")
        top = omezarr.next_label(label)
        if top is None:
            top = (yield from max_label(label.levels[0], chunk)) + 1
            omezarr.set_next_label(label, top)
        return label, top
    label = new_store(store, hw, chunk)
    omezarr.write_level0(label, saved.levels[0])
    return label, (yield from number_objects(label))
