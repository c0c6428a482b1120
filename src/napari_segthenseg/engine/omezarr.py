"""OME-Zarr label images with a pyramid: how slides' segmentations are written and reopened.

Layout (NGFF 0.4, zarr format 2, written with the ``ome-zarr`` library's metadata writer)::

    NAME.ome.zarr/            multiscales (axes y, x; or z, y, x) + image-label metadata
        0/  1/  2/ ...        uint8 (0/1 mask) or uint32 labels, each level half the one above

napari opens it with napari-ome-zarr (as a Labels layer), QuPath and other NGFF readers as an
image. A coarser level marks a pixel if any of the 2 x 2 pixels under it is marked (or takes
their largest label), so small objects stay visible when zoomed out. A volume's levels halve y
and x only and keep every slice (z is usually the coarse axis already; docs/VOLUMES.md), and
its chunks hold ``Z_CHUNK`` slices.

A segmentation is written into ``.NAME.partial`` beside its final place and renamed when done,
so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .grid import CHUNK

MIN_LEVEL_SIDE = 512  # the pyramid stops when a level fits in this many pixels
NGFF_VERSION = "0.4"
OUR_KEY = "segthenseg"  # our own entries in the group's attributes
MASK_COLOUR = [255, 59, 48, 255]  # red (#ff3b30): the plugin's first segmentation colour (plugin/layers.py)
Z_CHUNK = 16  # slices per chunk of a volume's label image
Z_BLOCK = 16  # slices handled at once when copying a volume or building its pyramid


@dataclass
class LabelImage:
    """An open OME-Zarr label image: its folder and the arrays of its levels (largest first)."""

    path: Path
    levels: list

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W)``, or ``(Z, H, W)`` for a volume."""
        return tuple(int(s) for s in self.levels[0].shape)


def level_shapes(shape: tuple[int, ...], min_side: int = MIN_LEVEL_SIDE) -> list[tuple[int, ...]]:
    """Level shapes for ``(H, W)`` or ``(Z, H, W)``: y and x halved until they fit ``min_side``."""
    shapes = [tuple(int(v) for v in shape)]
    while max(shapes[-1][-2:]) > min_side:
        *lead, h, w = shapes[-1]
        shapes.append((*lead, math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def create(path: str | os.PathLike, hw: tuple[int, ...], chunk: int, dtype: str = "uint8",
           name: str = "segmentation", z_chunk: int = Z_CHUNK) -> LabelImage:
    """A new, empty label image at ``path`` (everything 0 until written): 2D for ``hw`` =
    ``(H, W)``, a volume for ``(Z, H, W)`` (chunks of ``z_chunk`` slices)."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    base = tuple(int(v) for v in hw)
    if len(base) not in (2, 3):
        raise ValueError(f"a label image is 2D or 3D, not {base}")
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    levels, datasets = [], []
    for k, shape in enumerate(level_shapes(base)):
        chunks = (min(chunk, shape[-2]), min(chunk, shape[-1]))
        if len(shape) == 3:
            chunks = (min(z_chunk, shape[0]), *chunks)
        levels.append(group.create_array(
            str(k), shape=shape, chunks=chunks, dtype=dtype,
            fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}))
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(b) / s for b, s in zip(base, shape, strict=True)]}]})
    axes = ["z", "y", "x"] if len(base) == 3 else ["y", "x"]
    write_multiscales_metadata(group, datasets=datasets, fmt=FormatV04(), axes=axes, name=name)
    group.attrs["image-label"] = {"version": NGFF_VERSION,
                                  "colors": [{"label-value": 1, "rgba": MASK_COLOUR}]}
    return LabelImage(path, levels)


def open_label_image(path: str | os.PathLike, mode: str = "r") -> LabelImage:
    """Reopen a label image written by :func:`create` (``mode="r+"`` to edit it)."""
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode=mode)
        datasets = group.attrs["multiscales"][0]["datasets"]
        levels = [group[d["path"]] for d in datasets]
    except Exception as exc:
        raise ValueError(f"{path}: not an OME-Zarr label image ({type(exc).__name__}: {exc})") from exc
    return LabelImage(path, levels)


def next_label(image: LabelImage) -> int | None:
    """The next free object id recorded with an instance label image (None: not recorded)."""
    import zarr

    value = zarr.open_group(str(image.path), mode="r").attrs.get(OUR_KEY, {}).get("next_label")
    return None if value is None else int(value)


def set_next_label(image: LabelImage, value: int) -> None:
    """Record the next free object id (edits number new objects from it; saved with the image)."""
    import zarr

    group = zarr.open_group(str(image.path), mode="r+")
    group.attrs[OUR_KEY] = {**group.attrs.get(OUR_KEY, {}), "next_label": int(value)}


def max_pool2(block: np.ndarray) -> np.ndarray:
    """2 x 2 max over the last two axes (odd edges padded with 0): one pyramid level from the one
    below (a volume's slices stay apart)."""
    h, w = block.shape[-2:]
    if h % 2 or w % 2:
        block = np.pad(block, [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)])
    lead = block.shape[:-2]
    return block.reshape(*lead, block.shape[-2] // 2, 2, block.shape[-1] // 2, 2).max(axis=(-3, -1))


def _z_blocks(image: LabelImage, zs: tuple[int, int] | None) -> list[tuple[slice, ...]]:
    """Index prefixes over a volume's slices, ``Z_BLOCK`` at a time (one empty prefix in 2D)."""
    if len(image.shape) == 2:
        return [()]
    z0, z1 = zs if zs is not None else (0, image.shape[0])
    return [(slice(z, min(z + Z_BLOCK, z1)),) for z in range(z0, z1, Z_BLOCK)]


def update_pyramid(image: LabelImage, region: tuple[int, int, int, int] | None = None,
                   block: int = 2048, zs: tuple[int, int] | None = None) -> None:
    """Recompute the coarser levels from level 0 where ``region`` (level-0 ``y0, x0, y1, x1``;
    a volume: on slices ``zs``, default all) changed."""
    edited = region is not None or zs is not None
    y0, x0, y1, x1 = region if region is not None else (0, 0, *image.shape[-2:])
    for k in range(1, len(image.levels)):
        prev, cur = image.levels[k - 1], image.levels[k]
        ph, pw = prev.shape[-2:]
        y0, x0 = y0 // 2, x0 // 2
        y1, x1 = min(math.ceil(y1 / 2), cur.shape[-2]), min(math.ceil(x1 / 2), cur.shape[-1])
        for zb in _z_blocks(image, zs):
            for by in range(y0, y1, block):
                for bx in range(x0, x1, block):
                    ey, ex = min(by + block, y1), min(bx + block, x1)
                    ys, xs = slice(2 * by, min(2 * ey, ph)), slice(2 * bx, min(2 * ex, pw))
                    src = np.asarray(prev[(*zb, ys, xs)])
                    out = max_pool2(src)[..., :ey - by, :ex - bx]
                    if out.any() or edited:  # an edit may have cleared this block
                        cur[(*zb, slice(by, ey), slice(bx, ex))] = out


def write_level0(image: LabelImage, data: object, block: int = 4096) -> None:
    """Copy a 2D or 3D array (NumPy, dask, zarr...) into level 0 in ``block``-sized tiles (a
    volume: ``Z_BLOCK`` slices at a time), then build the pyramid. All-zero tiles are not written
    (the fill value), so memory is one tile whatever the size."""
    level0 = image.levels[0]
    h, w = image.shape[-2:]
    for zb in _z_blocks(image, None):
        for y in range(0, h, block):
            for x in range(0, w, block):
                index = (*zb, slice(y, y + block), slice(x, x + block))
                part = np.asarray(data[index]).astype(level0.dtype, copy=False)
                if part.any():
                    level0[index] = part
    update_pyramid(image)


def save_label_image(path: str | os.PathLike, data: object = None, store: str | os.PathLike | None = None
                     ) -> Path:
    """Write a segmentation as a label image at ``path``: a copy of the label image ``store``, or
    ``data`` (a 2D or 3D array, or the largest level of a pyramid) written in tiles with its pyramid.
    Written under a ``.partial`` name and renamed when complete; a failure leaves nothing."""
    path = Path(path)
    partial = partial_path(path)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if store is not None and Path(store).is_dir():
            shutil.copytree(store, partial)
        else:
            base = data[0] if isinstance(data, (list, tuple)) else data  # a pyramid: its largest level
            if base is None or len(base.shape) not in (2, 3):
                shape = None if base is None else tuple(base.shape)
                raise ValueError(f"a segmentation must be 2D or 3D to be saved as OME-Zarr, got {shape}")
            dtype = np.dtype(base.dtype)
            dtype = np.dtype(np.uint8) if dtype.kind == "b" else dtype
            image = create(partial, tuple(int(s) for s in base.shape), CHUNK, dtype=dtype.name,
                           name=path.name.split(".")[0])
            write_level0(image, base)
        return finish(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def finish(partial: Path, final: Path) -> Path:
    """Move a completed label image into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final
