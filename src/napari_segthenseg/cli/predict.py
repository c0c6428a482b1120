"""``segthenseg-predict``: segment image files, folders and whole slides with a model file, headless.

Per image, in ``--out``:

* ``<stem>_mask.tif`` (uint8 0/1) for ordinary images, or ``<stem>_mask.ome.zarr`` (an OME-Zarr
  label image with a pyramid, written chunk by chunk) for slides and on request;
* ``<stem>_labels.tif`` / ``.ome.zarr`` instead with ``--labels`` (one id per object);
* ``<stem>.boxes.csv``: the StS boxes, full-resolution pixels, half-open ``y0,x0,y1,x1``.

Volumes (a ZYX TIFF/OME-TIFF, an OME-Zarr with a z axis) get the same files in 3D, with 3D boxes
(:mod:`.predict_volume`, docs/VOLUMES.md).

The boxes file is written last, so an image is done when both of its files exist: a rerun skips
finished images, redoes unfinished ones and removes what a killed run left behind (temporary
files and ``.partial`` folders). A file that cannot be read or segmented is reported and
skipped; a full disk stops the run at once. See docs/WHOLE_SLIDES.md for slides.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from ..engine import DEFAULT_MODEL_NAME, Engine, ImageSource, bundled_model_path, omezarr
from ..engine.atomic import write_bytes
from ..engine.boxes import connectivity, label_objects
from ..engine.boxio import write_boxes_csv
from ..engine.image import ImageReadError
from ..engine.limits import LARGE_IMAGE_PX
from ..engine.progress import drive
from ..engine.reader import ImageFileError, is_image_path, is_ome_zarr, open_image, stem_of
from ..engine.slide import CHUNK, ChunkedOutput
from ..engine.volume import VolumeOptions
from .common import CliError, StageBars, open_engine
from .predict_volume import add_volume_arguments, predict_volume_file, volume_options

FORMATS = ("auto", "tif", "ome-zarr")


class DiskFull(Exception):
    """No space left for the outputs: stop at once (the next images could not be written)."""


# -- outputs ---------------------------------------------------------------------------------
def write_tif(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()  # tifffile wants a named file or a buffer, not a bare descriptor
    tifffile.imwrite(buf, array, compression="zlib", photometric="minisblack")
    write_bytes(path, buf.getbuffer())


def write_mask(mask: np.ndarray, path: Path) -> None:
    write_tif(np.asarray(mask, dtype=np.uint8), path)


def output_paths(out: Path, stem: str, zarr_out: bool = False, labels: bool = False) -> tuple[Path, Path]:
    """Where one image's segmentation and boxes go."""
    kind = "labels" if labels else "mask"
    return out / (f"{stem}_{kind}.ome.zarr" if zarr_out else f"{stem}_{kind}.tif"), out / f"{stem}.boxes.csv"


def clean_leftovers(out: Path) -> int:
    """Remove what killed runs left in ``out``: ``.NAME.*.tmp`` files and ``.NAME.partial`` folders."""
    n = 0
    for p in out.glob(".*"):
        if p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            n += 1
        elif p.is_dir() and (p.name.endswith(".partial") or p.name.endswith(".scratch")):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


# -- one image -------------------------------------------------------------------------------
def predict_file(engine: Engine, path: Path, out: Path, fmt: str = "auto", labels: bool = False,
                 chunk: int = CHUNK, client: object | None = None, threads: int = 2,
                 bars: bool = False, report: Path | None = None, volume: VolumeOptions | None = None
                 ) -> tuple[Path, Path]:
    """Segment one file and write its outputs; raises ImageFileError/ValueError on a bad image.

    With ``report``, one JSON line about the image is appended there (size, rough plan, boxes,
    stage seconds, network pixels). A volume goes to :func:`.predict_volume.predict_volume_file`
    with the 3D rules of ``volume``.
    """
    t0 = time.perf_counter()
    with open_image(path, volume=True) as opened:
        if opened.volume:
            return predict_volume_file(engine, opened, path, out, fmt, labels, chunk, client, threads, bars,
                                       report, volume)
        src = ImageSource(opened.levels, name=str(path))
        zarr_out = fmt == "ome-zarr" or (fmt == "auto" and src.height * src.width > LARGE_IMAGE_PX)
        seg_path, boxes_path = output_paths(out, stem_of(path), zarr_out, labels)
        if src.height < engine.settings.size or src.width < engine.settings.size:
            tqdm.write(f"note: {path} ({src.height} x {src.width}) is smaller than the model's input size "
                       f"S={engine.settings.size}; it is upsampled", file=sys.stderr)
        if not zarr_out:
            with StageBars(bars) as show:
                res = drive(engine.walk(src), show)
            if labels:
                write_tif(label_objects(res.mask), seg_path)
            else:
                write_mask(res.mask, seg_path)
        else:
            res = _predict_slide(engine, src, path, seg_path, labels, chunk, client, threads, bars)
    write_boxes_csv(boxes_path, res.boxes)  # last: an image is done when its boxes file exists
    if report is not None:
        plan = engine.plan(src.hw)
        line = {"input": str(path), "output": str(seg_path), "hw": list(src.hw), "kind": opened.kind,
                "rough": plan.describe(), "boxes": len(res.boxes), "seconds": time.perf_counter() - t0,
                "timings": res.timings, "counts": res.counts}
        with open(report, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return seg_path, boxes_path


def _predict_slide(engine: Engine, src: ImageSource, path: Path, seg_path: Path, labels: bool,
                   chunk: int, client: object | None, threads: int, bars: bool):
    """Walk a slide into an OME-Zarr written under a ``.partial`` name, then renamed into place."""
    partial = omezarr.partial_path(seg_path)
    scratch = seg_path.with_name(f".{seg_path.name}.scratch")
    try:
        image = omezarr.create(partial, src.hw, chunk, name=stem_of(path))
        scratch.mkdir(parents=True, exist_ok=True)
        output = ChunkedOutput(image.levels[0], chunk, scratch, client, threads,
                               source_path=str(path.resolve()))
        with StageBars(bars) as show:
            res = drive(engine.walk(src, output=output), show)
        if labels:
            _relabel(image, chunk)
        omezarr.update_pyramid(image)
        shutil.rmtree(scratch, ignore_errors=True)
        omezarr.finish(partial, seg_path)
        return res
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _relabel(image: omezarr.LabelImage, chunk: int) -> None:
    """Turn the 0/1 mask of level 0 into one id per object (dask-image, chunk by chunk; objects
    are 26-connected in a volume)."""
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


# -- inputs ----------------------------------------------------------------------------------
def list_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files and OME-Zarr folders named by ``inputs`` (folders are searched one level), and
    the inputs that do not exist (reported and skipped, not fatal)."""
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for p in inputs:
        if is_ome_zarr(p) or p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(q for q in sorted(p.iterdir()) if is_image_path(q))
        else:
            missing.append((p, f"{p}: no such file or folder"))
    return files, missing


def check_unique_stems(files: Sequence[Path]) -> None:
    """Two inputs with one stem would overwrite each other's outputs: refuse before starting."""
    seen: dict[str, Path] = {}
    for f in files:
        stem = stem_of(f)
        if stem in seen:
            raise CliError(f"{f} and {seen[stem]} would both write {stem}_mask.*; rename one")
        seen[stem] = f


def is_done(out: Path, path: Path, labels: bool) -> bool:
    """Whether a previous run finished this image (its segmentation and its boxes file exist)."""
    stem = stem_of(path)
    _, boxes = output_paths(out, stem)
    return boxes.is_file() and any(output_paths(out, stem, z, labels)[0].exists() for z in (False, True))


def default_model_arg() -> str | None:
    return DEFAULT_MODEL_NAME if bundled_model_path().is_file() else None


def build_parser() -> argparse.ArgumentParser:
    default = default_model_arg()
    p = argparse.ArgumentParser(
        prog="segthenseg-predict",
        description="Segment images, whole slides and volumes with Segment-then-Segment. Writes "
                    "DIR/<stem>_mask.tif (uint8 0/1; a volume: Z x Y x X), or DIR/<stem>_mask.ome.zarr for "
                    "slides and large volumes, and DIR/<stem>.boxes.csv per image; napari opens both. A "
                    "rerun skips finished images. Exit status 1 if any input was skipped, 3 if the disk "
                    "filled up.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="image files (PNG, JPEG, TIFF, OME-TIFF, SVS, NDPI; ZYX stacks are volumes), "
                        "OME-Zarr folders, or folders of these")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--model", default=default,
                   help="model file, or 'default' for the bundled nuclei model (dsb2018 fluorescence, "
                        "brightfield and H&E)" + (" (the default)" if default else
                                                  " (required: no bundled model is installed)"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--rough-scale", type=float, default=None, metavar="PX",
                   help="image px per rough-net px: tile the rough pass at this scale instead of the one "
                        "recorded in the model file (docs/WHOLE_SLIDES.md)")
    p.add_argument("--labels", action="store_true",
                   help="write instance labels (one id per object, uint16/uint32) instead of a 0/1 mask")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help=f"segmentation file type; auto: OME-Zarr above {LARGE_IMAGE_PX // 2**20} Mpx, "
                        "else TIFF")
    p.add_argument("--chunk", type=int, default=CHUNK, help="OME-Zarr chunk side in px")
    p.add_argument("--report", type=Path, metavar="JSONL",
                   help="append one JSON line per image: size, rough plan, boxes, stage seconds, network px")
    p.add_argument("--threads", type=int, default=2, help="local threads working on OME-Zarr chunks")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="start a local dask.distributed cluster of N worker processes for the chunks")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="run the chunks on an existing dask.distributed cluster (e.g. "
                              "tcp://host:8786); its workers must see the input and --out paths")
    add_volume_arguments(p)
    return p


def open_client(args: argparse.Namespace, stack: ExitStack) -> object | None:
    if args.workers is None and args.scheduler is None:
        return None
    from distributed import Client, LocalCluster

    if args.scheduler:
        return stack.enter_context(Client(args.scheduler))
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               local_directory=tempfile.gettempdir()))
    return stack.enter_context(Client(cluster))


def run(args: argparse.Namespace) -> tuple[int, list[tuple[Path, str]]]:
    """Predict every input; returns the number written and the ``(file, reason)`` of those skipped."""
    if args.model is None:
        raise CliError("no bundled default model is installed; pass --model FILE")
    if args.chunk < 64:
        raise CliError("--chunk must be at least 64")
    volume = volume_options(args)
    files, skipped = list_inputs(args.inputs)
    for _, reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not files:
        raise CliError("no image files (png, jpg, tif, OME-TIFF, SVS, NDPI, OME-Zarr) in the inputs")
    check_unique_stems(files)
    engine = open_engine(args.model, args.device)
    try:
        engine.rough_scale = args.rough_scale
    except ValueError as exc:
        raise CliError(f"--rough-scale: {exc}") from exc
    if engine.model.rough is None:
        raise CliError("this model has no rough network, so it cannot find objects by itself; "
                       "use the napari plugin to draw boxes")
    name = "the bundled default model" if args.model == DEFAULT_MODEL_NAME else args.model
    print(f"model: {name} ({engine.model.describe()}) on {engine.device}", file=sys.stderr)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output folder {args.out}: {exc}") from exc
    if clean_leftovers(args.out):
        print(f"removed unfinished outputs of an interrupted run in {args.out}", file=sys.stderr)
    todo = [f for f in files if not is_done(args.out, f, args.labels)]
    if len(todo) < len(files):
        print(f"{len(files) - len(todo)} image(s) already done in {args.out}; skipping them", file=sys.stderr)
    written = 0
    with ExitStack() as stack:
        client = open_client(args, stack)
        bar = tqdm(todo, desc="segmenting", unit="image", disable=None, file=sys.stderr)
        for f in bar:
            try:
                predict_file(engine, f, args.out, args.format, args.labels, args.chunk, client,
                             args.threads, bars=not bar.disable, report=args.report, volume=volume)
                written += 1
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"the disk holding {args.out} is full while writing {f}: {written} "
                                   "image(s) were written and are complete; free space and run the same "
                                   "command again to do the rest") from exc
                skipped.append((f, _reason(f, exc)))
                tqdm.write(f"skipped {_reason(f, exc)}", file=sys.stderr)
            except (ImageFileError, ImageReadError, ValueError, MemoryError) as exc:
                skipped.append((f, _reason(f, exc)))
                tqdm.write(f"skipped {_reason(f, exc)}", file=sys.stderr)
    return written, skipped


def _reason(f: Path, exc: BaseException) -> str:
    return str(exc) if str(f) in str(exc) else f"{f}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written, skipped = run(args)
    except CliError as exc:
        print(f"segthenseg-predict: error: {exc}", file=sys.stderr)
        return 2
    except DiskFull as exc:
        print(f"segthenseg-predict: error: {exc}", file=sys.stderr)
        return 3
    print(f"wrote {written} image(s) to {args.out}" + (f"; skipped {len(skipped)}" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
