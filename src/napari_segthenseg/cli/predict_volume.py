"""``segthenseg-predict`` on volumes: a ZYX TIFF/OME-TIFF or an OME-Zarr with a z axis (docs/VOLUMES.md).

Writes, beside what it writes for images:

* ``<stem>_mask.tif`` (uint8 0/1, the volume's Z x Y x X, axes ZYX), or ``<stem>_mask.ome.zarr``
  (a 3D OME-Zarr label image, written chunk by chunk) when the volume has more voxels than
  ``LARGE_IMAGE_PX`` or on request; ``--labels``: 3D instance ids (26-connected objects);
* ``<stem>.boxes.csv`` with the 3D boxes ``z0,y0,x0,z1,y1,x1``, last (an image is done when its
  boxes file exists, as for images).

Time series (an axis T) are refused by the reader with a message that says so.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from ..engine import Engine, omezarr
from ..engine.atomic import write_bytes
from ..engine.boxes import MIN_SLICES, connectivity, label_objects
from ..engine.boxio import write_boxes_csv
from ..engine.image import VolumeSource
from ..engine.limits import LARGE_IMAGE_PX
from ..engine.progress import Progress, drive
from ..engine.reader import OpenedImage, stem_of
from ..engine.volume import GROWTH, NORMS, Z_PAD, Z_SMOOTH, VolumeOptions, describe_plan, walk_volume
from ..engine.volume_chunks import VolumeChunked
from .common import CliError


def add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the 3D rules (docs/VOLUMES.md)."""
    group = parser.add_argument_group("volumes (ZYX TIFF/OME-TIFF, OME-Zarr with z)")
    group.add_argument("--z-pad", type=int, default=Z_PAD, metavar="N",
                       help=f"slices added above and below each object's 3D box (default {Z_PAD})")
    group.add_argument("--min-slices", type=int, default=MIN_SLICES, metavar="N",
                       help=f"drop rough objects on fewer slices than this (default {MIN_SLICES}: keep all)")
    group.add_argument("--volume-norm", choices=NORMS, default="slice",
                       help="intensity window per slice (as training saw slices; the default) or one for "
                            "the whole volume")
    group.add_argument("--z-smooth", type=int, default=Z_SMOOTH, metavar="N",
                       help=f"average each box's fine results over N slices on each side "
                            f"(default {Z_SMOOTH}; 0: off)")
    group.add_argument("--growth", default=str(GROWTH), metavar="F",
                       help=f"a 3D box follows its object while its window stays within F times the object's "
                            f"largest slice (default {GROWTH:g}); 'none': one window per object")


def volume_options(args: argparse.Namespace) -> VolumeOptions:
    try:
        growth = None if str(args.growth).lower() == "none" else float(args.growth)
        return VolumeOptions(args.z_pad, args.min_slices, args.volume_norm, growth, args.z_smooth)
    except ValueError as exc:
        raise CliError(f"volume options: {exc}") from exc


def write_volume_tif(array: np.ndarray, path: Path) -> None:
    """A ZYX TIFF (one page per slice) that readers reopen with its z axis."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib", photometric="minisblack", metadata={"axes": "ZYX"})
    write_bytes(path, buf.getbuffer())


def predict_volume_file(engine: Engine, opened: OpenedImage, path: Path, out: Path, fmt: str, labels: bool,
                        chunk: int, client: object | None, threads: int,
                        on_step: Callable[[Progress], None] | None, report: Path | None,
                        options: VolumeOptions | None) -> tuple[Path, Path]:
    """Segment one opened volume and write its outputs (see the module docstring)."""
    from .predict import output_paths  # the image path's own

    t0 = time.perf_counter()
    vol = VolumeSource(opened.levels, name=str(path))
    depth, h, w = vol.shape
    zarr_out = fmt == "ome-zarr" or (fmt == "auto" and depth * h * w > LARGE_IMAGE_PX)
    seg_path, boxes_path = output_paths(out, stem_of(path), zarr_out, labels)
    if h < engine.settings.size or w < engine.settings.size:
        tqdm.write(f"note: {path} (slices {h} x {w}) is smaller than the model's input size "
                   f"S={engine.settings.size}; its slices are upsampled", file=sys.stderr)
    if not zarr_out:
        res = drive(walk_volume(engine, vol, options=options), on_step)
        write_volume_tif(label_objects(res.mask) if labels else res.mask.astype(np.uint8), seg_path)
    else:
        partial = omezarr.partial_path(seg_path)
        scratch = seg_path.with_name(f".{seg_path.name}.scratch")
        try:
            image = omezarr.create(partial, vol.shape, chunk, name=stem_of(path))
            scratch.mkdir(parents=True, exist_ok=True)
            output = VolumeChunked(image.levels[0], chunk, scratch=scratch, client=client, threads=threads,
                                   source_path=str(path.resolve()))
            res = drive(walk_volume(engine, vol, output=output, options=options), on_step)
            if labels:
                _relabel(image)
            omezarr.update_pyramid(image)
            shutil.rmtree(scratch, ignore_errors=True)
            omezarr.finish(partial, seg_path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    write_boxes_csv(boxes_path, res.boxes)  # last: the volume is done when its boxes file exists
    if report is not None:
        line = {"input": str(path), "output": str(seg_path), "shape": list(vol.shape), "kind": opened.kind,
                "rough": describe_plan(engine.plan(vol.hw), vol.hw), "boxes": len(res.boxes),
                "seconds": time.perf_counter() - t0, "timings": res.timings, "counts": res.counts}
        with open(report, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return seg_path, boxes_path


def _relabel(image: omezarr.LabelImage) -> None:
    """Turn a large volume's 0/1 mask (level 0) into one id per 26-connected object (dask-image)."""
    import dask.array as da
    import zarr
    from dask_image.ndmeasure import label

    mask = da.from_zarr(image.levels[0])
    ids, _ = label(mask > 0, structure=connectivity(mask.ndim))
    group = zarr.open_group(str(image.path), mode="r+")
    for k, lv in enumerate(image.levels):  # the mask's uint8 levels become uint32 ones
        group.create_array(f"{k}.tmp", shape=lv.shape, chunks=lv.chunks, dtype="uint32", fill_value=0,
                           chunk_key_encoding={"name": "v2", "separator": "/"})
    da.store(ids.astype(np.uint32).rechunk(image.levels[0].chunks), group["0.tmp"], lock=False)
    for k in range(len(image.levels)):
        shutil.rmtree(image.path / str(k))
        (image.path / f"{k}.tmp").rename(image.path / str(k))
    image.levels[:] = omezarr.open_label_image(image.path, mode="r+").levels
