"""``segthenseg-predict``: segment image files, folders and whole slides with a model file, headless.

Per image, in ``--out``:

* ``<stem>_mask.tif`` (uint8 0/1) for ordinary images, or ``<stem>_mask.ome.zarr`` (an OME-Zarr
  label image with a pyramid, written chunk by chunk) for slides and on request;
* ``<stem>_labels.tif`` / ``.ome.zarr`` instead with ``--labels`` (one id per object);
* ``<stem>.boxes.csv``: the StS boxes, full-resolution pixels, half-open ``y0,x0,y1,x1``.

Volumes (a ZYX TIFF/OME-TIFF, an OME-Zarr with a z axis) get the same files in 3D, with 3D boxes
(:mod:`.predict_volume`, docs/VOLUMES.md).

The boxes file is written last, so an image is done when both of its files exist, and
``segthenseg-predict.json`` then records the model (SHA-256) and options it was made with
(:mod:`.manifest`). A rerun skips finished images made with the same model and options, redoes
the others (saying why; ``--overwrite`` redoes all) and removes what a killed run left behind
(temporary files and ``.partial`` folders), except a slide killed during its fine pass with the same
model and options: that one goes on where it stopped (its journal, :mod:`..engine.journal`). A file
that cannot be read or segmented is reported and skipped; a full disk stops the run at once. Every
output path is checked before the first image. See docs/WHOLE_SLIDES.md for slides.
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
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from ..engine import DEFAULT_MODEL_NAME, Engine, ImageSource, bundled_model_path, omezarr
from ..engine.atomic import write_bytes
from ..engine.boxes import label_objects
from ..engine.boxio import write_boxes_csv
from ..engine.image import ImageReadError
from ..engine.integrity import file_sha256
from ..engine.journal import SlideJournal, load_journal
from ..engine.labels import LABEL_DTYPE, relabel_chunked
from ..engine.limits import LARGE_IMAGE_PX
from ..engine.progress import Progress, drive
from ..engine.reader import ImageFileError, is_image_path, is_ome_zarr, open_image, stem_of
from ..engine.slide import CHUNK, ChunkedOutput
from ..engine.volume import VolumeOptions
from .common import CliError, CommandProgress, check_output, model_path, open_engine
from .manifest import Manifest, Recipe
from .predict_volume import add_volume_arguments, predict_volume_file, volume_options
from .qupath import geojson_path, read_boxes_file, write_image_geojson, write_slide_geojson

FORMATS = ("auto", "tif", "ome-zarr")
JOURNAL_DIR = "journal"  # in a slide's scratch folder
DEFAULT_GROUP_ZOOM = 1.0  # slides' shared crops (engine/groups.py; measured in docs/BENCHMARKS.md)


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


def scratch_path(seg_path: Path) -> Path:
    """A slide's working folder beside its output: the rough mask when large, and the journal."""
    return seg_path.with_name(f".{seg_path.name}.scratch")


def clean_leftovers(out: Path, keep: Collection[Path] = ()) -> int:
    """Remove what killed runs left in ``out``: ``.NAME.*.tmp`` files and ``.NAME.partial`` folders
    (but those in ``keep``: slides that go on)."""
    n = 0
    for p in out.glob(".*"):
        if p in keep:
            continue
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
                 on_step: Callable[[Progress], None] | None = None,
                 report: Path | None = None, key: dict | None = None,
                 resume: SlideJournal | None = None, boxes: np.ndarray | None = None,
                 geojson: bool = False, group_zoom: float | None = None,
                 volume: VolumeOptions | None = None) -> tuple[Path, Path]:
    """Segment one file and write its outputs; raises ImageFileError/ValueError on a bad image.

    ``on_step`` sees the walk's progress (:class:`.common.CommandProgress`). With ``report``, one
    JSON line about the image is appended there (size, rough plan, boxes, stage seconds, network
    pixels). A slide keeps a journal made with ``key`` (what it is made with) so that a killed run
    can go on; ``resume`` is the journal of such a run (:func:`resumable`). ``boxes`` (drawn by hand)
    skip the rough pass; ``geojson`` also writes the objects as QuPath detections; on slides, small
    neighbouring boxes share crops at ``group_zoom`` (None: one crop per box). A volume goes to
    :func:`.predict_volume.predict_volume_file` with the 3D rules of ``volume``.
    """
    t0 = time.perf_counter()
    with open_image(path, volume=True) as opened:
        if opened.volume:
            if geojson or boxes is not None:
                raise ValueError("a volume (ZYX): --geojson and --boxes take 2D images and slides; "
                                 "volumes give a 3D mask and a z0,y0,x0,z1,y1,x1 boxes CSV (docs/VOLUMES.md)")
            return predict_volume_file(engine, opened, path, out, fmt, labels, chunk, client, threads,
                                       on_step, report, volume)
        src = ImageSource(opened.levels, name=str(path), pixel_size=opened.pixel_size)
        pixel_size = engine.pixel_size or opened.pixel_size
        if engine.plan_for(src).tiled:
            tqdm.write(scale_note(engine, src, path), file=sys.stderr)
        zarr_out = fmt == "ome-zarr" or (fmt == "auto" and src.height * src.width > LARGE_IMAGE_PX)
        seg_path, boxes_path = output_paths(out, stem_of(path), zarr_out, labels)
        if src.height < engine.settings.size or src.width < engine.settings.size:
            tqdm.write(f"note: {path} ({src.height} x {src.width}) is smaller than the model's input size "
                       f"S={engine.settings.size}; it is upsampled", file=sys.stderr)
        gj_path = geojson_path(out, stem_of(path)) if geojson else None
        if not zarr_out:
            res = drive(engine.walk(src, boxes), on_step)
            ids = label_objects(res.mask) if labels or geojson else None
            if labels:
                write_tif(ids, seg_path)
            else:
                write_mask(res.mask, seg_path)
            if gj_path is not None:
                write_image_geojson(ids, gj_path, pixel_size)
        else:
            res = _predict_slide(engine, src, path, seg_path, labels, chunk, client, threads, on_step,
                                 key, resume, boxes, gj_path, group_zoom)
    write_boxes_csv(boxes_path, res.boxes)  # last: an image is done when its boxes file exists
    if report is not None:
        plan = engine.plan_for(src)
        line = {"input": str(path), "output": str(seg_path), "hw": list(src.hw), "kind": opened.kind,
                "pixel_size_um": pixel_size,
                "rough": plan.describe(), "boxes": len(res.boxes), "seconds": time.perf_counter() - t0,
                "timings": res.timings, "counts": res.counts}
        with open(report, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return seg_path, boxes_path


def scale_note(engine: Engine, src: ImageSource, path: Path) -> str:
    """One line on how a slide's rough pass sees it, and the pixel sizes behind that."""
    plan, trained = engine.plan_for(src), engine.settings.pixel_size
    if engine.pixel_size:
        size = f"{engine.pixel_size:g} µm/px (--pixel-size)"
    else:
        size = f"{src.pixel_size:.4g} µm/px (from the file)" if src.pixel_size else "pixel size unknown"
    if plan.physical is None and engine.rough_scale is None:
        size += ("; the model records none (segthenseg-train --pixel-size): the trained scale in px is used"
                 if not trained else "; the trained scale in px is used (give --pixel-size to follow µm)")
    return f"{path.name}: {size}; rough pass {plan.describe()}"


def _predict_slide(engine: Engine, src: ImageSource, path: Path, seg_path: Path, labels: bool,
                   chunk: int, client: object | None, threads: int,
                   on_step: Callable[[Progress], None] | None, key: dict | None = None,
                   resume: SlideJournal | None = None, boxes: np.ndarray | None = None,
                   geojson: Path | None = None, group_zoom: float | None = None):
    """Walk a slide into an OME-Zarr written under a ``.partial`` name, then renamed into place.

    With a ``key`` the run keeps a journal in its scratch folder; killed during the fine pass, the
    ``.partial`` store and the journal stay, and ``resume`` (their journal) goes on with the same
    boxes and windows, segmenting only the chunks that were not final.
    """
    partial = omezarr.partial_path(seg_path)
    scratch = scratch_path(seg_path)
    journal = resume if resume is not None else (
        SlideJournal(scratch / JOURNAL_DIR, key) if key is not None else None)
    try:
        source = str(path.resolve())
        if resume is not None:
            image = omezarr.open_label_image(partial, mode="r+")
            remaining = resume.remaining()
            output = ChunkedOutput(image.levels[0], chunk, scratch, client, threads, source_path=source,
                                   overwrite=True, regions=remaining, journal=resume, group_zoom=group_zoom)
            res = drive(engine.walk(src, resume.boxes, stats=resume.stats, output=output), on_step)
            res.counts["chunks_resumed"] = len(resume.done) - len(remaining)
        else:
            shutil.rmtree(scratch, ignore_errors=True)  # another run's journal (e.g. --overwrite)
            image = omezarr.create(partial, src.hw, chunk, dtype=LABEL_DTYPE.__name__ if labels else "uint8",
                                   name=stem_of(path))
            scratch.mkdir(parents=True, exist_ok=True)
            output = ChunkedOutput(image.levels[0], chunk, scratch, client, threads, source_path=source,
                                   journal=journal, group_zoom=group_zoom)
            res = drive(engine.walk(src, boxes, output=output), on_step)
        if labels:  # the 0/1 mask becomes one id per object, in place, chunk by chunk
            n = drive(relabel_chunked(image.levels[0], chunk), on_step)
            omezarr.set_next_label(image, n + 1)  # the plugin numbers objects of later edits from it
        if geojson is not None:
            write_slide_geojson(image.levels[0], chunk, geojson, scratch, labels, on_step,
                                engine.pixel_size or src.pixel_size)
        omezarr.update_pyramid(image)
        shutil.rmtree(scratch, ignore_errors=True)
        omezarr.finish(partial, seg_path)
        return res
    except BaseException:
        if journal is None or not journal.resumes:  # killed before the fine pass: nothing to keep
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def resumable(out: Path, files: Sequence[Path], recipe: Recipe, overwrite: bool
              ) -> dict[Path, SlideJournal]:
    """The slides a killed run left in ``out`` during their fine pass with the same model, options
    and input: their journals (the run goes on with them). None with ``--overwrite``."""
    found: dict[Path, SlideJournal] = {}
    if overwrite:
        return found
    for f in files:
        seg_path = output_paths(out, stem_of(f), True, recipe.labels)[0]
        if not omezarr.partial_path(seg_path).is_dir():
            continue
        journal = load_journal(scratch_path(seg_path) / JOURNAL_DIR)
        if journal is not None and journal.key == journal_key(recipe, f, seg_path):
            found[f] = journal
    return found


def journal_key(recipe: Recipe, path: Path, seg_path: Path) -> dict:
    """What a slide is made with, as its journal keeps it (JSON's view of it)."""
    return json.loads(json.dumps(recipe.entry(path, [seg_path], True)))


# -- inputs ----------------------------------------------------------------------------------
IMAGE_KINDS = "png, jpg, tif, OME-TIFF, SVS, NDPI, OME-Zarr"


def list_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files and OME-Zarr folders named by ``inputs`` (folders are searched one level), and
    the inputs that give none (missing, or a folder without images: reported and skipped, not fatal)."""
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for p in inputs:
        if is_ome_zarr(p) or p.is_file():
            files.append(p)
        elif p.is_dir():
            found = [q for q in sorted(p.iterdir()) if is_image_path(q)]
            if not found:
                missing.append((p, f"{p}: a folder without image files ({IMAGE_KINDS})"))
            files.extend(found)
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


def is_done(out: Path, path: Path, labels: bool, geojson: bool = False) -> bool:
    """Whether a previous run finished this image (its segmentation and its boxes file exist, and its
    GeoJSON when asked)."""
    stem = stem_of(path)
    _, boxes = output_paths(out, stem)
    return (boxes.is_file() and any(output_paths(out, stem, z, labels)[0].exists() for z in (False, True))
            and (not geojson or geojson_path(out, stem).is_file()))


# -- what a rerun redoes -------------------------------------------------------------------------
def plan_work(files: Sequence[Path], out: Path, manifest: Manifest, recipe: Recipe,
              overwrite: bool) -> tuple[list[Path], list[str]]:
    """The files to segment, and one line per group of finished images: skipped (same model and
    options) or made again (and why). Unfinished images are redone without a word, as before."""
    todo: list[Path] = []
    groups: dict[str, list[Path]] = {}
    for f in files:
        if not is_done(out, f, recipe.labels, recipe.geojson):
            todo.append(f)
            continue
        why = "--overwrite" if overwrite else manifest.why_redo(stem_of(f), f, recipe)
        groups.setdefault(why or "", []).append(f)
        if why is not None:
            todo.append(f)
    notes = [manifest.problem] if manifest.problem else []
    for why, group in groups.items():
        names = _names(group)
        if why:
            notes.append(f"{len(group)} finished image(s) in {out} made again: {why}: {names}")
        else:
            notes.append(f"{len(group)} image(s) already done in {out} with the same model and options; "
                         f"skipping them (--overwrite makes them again): {names}")
    return todo, notes


def _names(files: Sequence[Path], shown: int = 5) -> str:
    names = ", ".join(f.name for f in files[:shown])
    return names + (f" and {len(files) - shown} more" if len(files) > shown else "")


def unfinish(out: Path, path: Path) -> None:
    """Before an image is made again: its boxes file goes first, so that until the new one is
    written the image counts as unfinished (a kill in between never pairs old and new files)."""
    output_paths(out, stem_of(path))[1].unlink(missing_ok=True)


# -- the command ---------------------------------------------------------------------------------
def default_model_arg() -> str | None:
    return DEFAULT_MODEL_NAME if bundled_model_path().is_file() else None


def build_parser() -> argparse.ArgumentParser:
    default = default_model_arg()
    p = argparse.ArgumentParser(
        prog="segthenseg-predict",
        description="Segment images, whole slides and volumes with Segment-then-Segment. Writes "
                    "DIR/<stem>_mask.tif (uint8 0/1; a volume: Z x Y x X), or DIR/<stem>_mask.ome.zarr for "
                    "slides and large volumes, and DIR/<stem>.boxes.csv per image; napari opens both. A "
                    "rerun skips the images already made with the same model and options. Exit status 1 "
                    "if any input was skipped, 2 for a usage error, 3 if the disk filled up.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="image files (PNG, JPEG, TIFF, OME-TIFF, SVS, NDPI; ZYX stacks are volumes), "
                        "OME-Zarr folders, or folders of these")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--model", default=default, metavar="MODEL",
                   help="a model file, a training run's folder (its model.pt), or 'default': the bundled "
                        "nuclei model, trained on dsb2018 fluorescence, bright-field and H&E images; "
                        + ("default: default" if default else "required, as no bundled model is installed"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--rough-scale", type=float, default=None, metavar="PX",
                   help="image px per rough-net px: tile the rough pass at this scale instead of the one "
                        "recorded in the model file (docs/WHOLE_SLIDES.md)")
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM",
                   help="µm per pixel of the inputs, instead of what their files record (OME, Aperio MPP, "
                        "NDPI/TIFF resolution, OME-Zarr scale); with the model's, it sets a slide's rough "
                        "scale (docs/WHOLE_SLIDES.md)")
    p.add_argument("--group-zoom", type=float, default=DEFAULT_GROUP_ZOOM, metavar="Z",
                   help="slides (OME-Zarr outputs): small neighbouring boxes share S x S crops at Z network "
                        "px per image px (docs/WHOLE_SLIDES.md); 0: one crop per box, as in the paper "
                        "(default: %(default)s; ordinary images always get one crop per box)")
    p.add_argument("--labels", action="store_true",
                   help="write instance labels (one id per object, uint16/uint32) instead of a 0/1 mask")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help=f"segmentation file type; auto: OME-Zarr above {LARGE_IMAGE_PX // 2**20} Mpx, "
                        "else TIFF (default: auto)")
    p.add_argument("--chunk", type=int, default=CHUNK, metavar="PX",
                   help="OME-Zarr chunk side in px (default: %(default)s)")
    p.add_argument("--report", type=Path, metavar="JSONL",
                   help="append one JSON line per image: size, rough plan, boxes, stage seconds, network px")
    p.add_argument("--threads", type=int, default=2, metavar="N",
                   help="local threads working on OME-Zarr chunks (default: %(default)s)")
    p.add_argument("--geojson", action="store_true",
                   help="also write DIR/<stem>.geojson: one QuPath detection per object (its outline in "
                        "image pixels, with area and centroid); drag it onto the image in QuPath")
    p.add_argument("--boxes", type=Path, metavar="FILE",
                   help="segment these boxes instead of finding them (no rough pass; one image): a boxes "
                        "CSV (y0,x0,y1,x1) or a GeoJSON file of QuPath rectangles (other shapes: their "
                        "bounding boxes)")
    p.add_argument("--overwrite", action="store_true",
                   help="make every image again, even those already made with the same model and options")
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
    check_output(args.out, "--out", folder=True)
    check_output(args.report, "--report")
    volume = volume_options(args)
    files, skipped = list_inputs(args.inputs)
    for _, reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not files:
        raise CliError(f"no image files ({IMAGE_KINDS}) in {', '.join(str(p) for p in args.inputs)}")
    check_unique_stems(files)
    model_file = model_path(args.model)
    engine = open_engine(args.model, args.device)
    try:
        engine.rough_scale = args.rough_scale
    except ValueError as exc:
        raise CliError(f"--rough-scale: {exc}") from exc
    try:
        engine.pixel_size = args.pixel_size
    except ValueError as exc:
        raise CliError(f"--pixel-size: {exc}") from exc
    if not (args.group_zoom >= 0 and np.isfinite(args.group_zoom)):
        raise CliError("--group-zoom must be 0 (off) or a positive zoom")
    given = given_boxes(args, files)
    if engine.model.rough is None and given is None:
        raise CliError("this model has no rough network, so it cannot find objects by itself; "
                       "give boxes with --boxes FILE, or draw them in the napari plugin")
    name = "the bundled default model" if args.model == DEFAULT_MODEL_NAME else str(model_file)
    recipe = Recipe(args.model, file_sha256(model_file), args.rough_scale, args.labels, args.format,
                    args.chunk, args.geojson, file_sha256(args.boxes) if given is not None else None,
                    args.pixel_size, args.group_zoom or None)
    print(f"model: {name} ({engine.model.describe()}; SHA-256 {recipe.model_sha256[:12]}…) on "
          f"{engine.device}", file=sys.stderr)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output folder {args.out}: {exc}") from exc
    resume = resumable(args.out, files, recipe, args.overwrite)
    if clean_leftovers(args.out, keep_for(args.out, resume, args.labels)):
        print(f"removed unfinished outputs of an interrupted run in {args.out}", file=sys.stderr)
    manifest = Manifest(args.out)
    todo, notes = plan_work(files, args.out, manifest, recipe, args.overwrite)
    for note in notes:
        print(note, file=sys.stderr)
    for f, journal in resume.items():
        total = len(journal.done) + len(journal.remaining())
        print(f"{f.name}: going on where an interrupted run stopped with the same model and options "
              f"({len(journal.done)} of {total} chunks done)", file=sys.stderr)
    written = 0
    with ExitStack() as stack:
        client = open_client(args, stack)
        progress = CommandProgress(todo, "segmenting", "image", name=lambda f: f.name)
        for f in progress:
            try:
                unfinish(args.out, f)
                seg_path = output_paths(args.out, stem_of(f), True, args.labels)[0]
                seg, boxes = predict_file(engine, f, args.out, args.format, args.labels, args.chunk, client,
                                          args.threads, on_step=progress.on_step, report=args.report,
                                          key=journal_key(recipe, f, seg_path), resume=resume.get(f),
                                          boxes=given, geojson=args.geojson,
                                          group_zoom=args.group_zoom or None, volume=volume)
                made = [seg, boxes] + ([geojson_path(args.out, stem_of(f))] if args.geojson else [])
                manifest.record(stem_of(f), recipe.entry(f, made, seg.name.endswith(".ome.zarr")))
                written += 1
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"the disk holding {args.out} is full while writing {f}: {written} "
                                   "image(s) were written and are complete; free space and run the same "
                                   "command again to do the rest") from exc
                skipped.append((f, _reason(f, exc)))
                progress.write(f"skipped {_reason(f, exc)}")
            except (ImageFileError, ImageReadError, ValueError, MemoryError) as exc:
                skipped.append((f, _reason(f, exc)))
                progress.write(f"skipped {_reason(f, exc)}")
    return written, skipped


def given_boxes(args: argparse.Namespace, files: Sequence[Path]) -> np.ndarray | None:
    """The boxes of ``--boxes`` (one image only), read before any work; None without it."""
    if args.boxes is None:
        return None
    if len(files) != 1:
        raise CliError(f"--boxes holds the boxes of one image, but {len(files)} images were given")
    return read_boxes_file(args.boxes)


def keep_for(out: Path, resume: dict[Path, SlideJournal], labels: bool) -> set[Path]:
    """The ``.partial`` store and scratch folder of each slide that goes on."""
    segs = [output_paths(out, stem_of(f), True, labels)[0] for f in resume]
    return {p for seg in segs for p in (omezarr.partial_path(seg), scratch_path(seg))}


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
