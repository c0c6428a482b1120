"""``segthenseg-predict``: segment image files or folders with a model file, headless.

Per image ``<stem>_mask.tif`` (uint8 0/1 at the original size) and ``<stem>.boxes.csv`` (the
StS boxes, full-resolution pixels, half-open ``y0,x0,y1,x1``). A file that cannot be read or
segmented is reported and skipped; the others are still written.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from napari_segthenseg.engine import DEFAULT_MODEL_NAME, Engine, bundled_model_path
from napari_segthenseg.engine.atomic import atomic_write
from napari_segthenseg.engine.boxio import write_boxes_csv
from napari_segthenseg.engine.device import DEVICE_CHOICES

from .data import DataError, list_images, read_image
from .evaluate import CliError, open_engine


def write_mask(mask: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()  # tifffile wants a named file or a buffer, not a bare descriptor
    tifffile.imwrite(buf, np.asarray(mask, dtype=np.uint8), compression="zlib")
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def output_paths(out: Path, stem: str) -> tuple[Path, Path]:
    return out / f"{stem}_mask.tif", out / f"{stem}.boxes.csv"


def predict_file(engine: Engine, path: Path, out: Path) -> tuple[Path, Path]:
    """Segment one file and write its mask and boxes; raises DataError/ValueError on a bad image."""
    image = read_image(path)
    result = engine.segment(image)
    mask_path, boxes_path = output_paths(out, path.stem)
    write_mask(result.mask, mask_path)
    write_boxes_csv(boxes_path, result.boxes)
    return mask_path, boxes_path


def check_unique_stems(files: Sequence[Path]) -> None:
    """Two inputs with one stem would overwrite each other's outputs: refuse before starting."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise CliError(f"{f} and {seen[f.stem]} would both write {f.stem}_mask.tif; rename one")
        seen[f.stem] = f


def default_model_arg() -> str | None:
    return DEFAULT_MODEL_NAME if bundled_model_path().is_file() else None


def build_parser() -> argparse.ArgumentParser:
    default = default_model_arg()
    p = argparse.ArgumentParser(
        prog="segthenseg-predict",
        description="Segment images with Segment-then-Segment; writes DIR/<stem>_mask.tif (uint8 0/1) "
                    "and DIR/<stem>.boxes.csv per image (the plugin opens both). Exit status 1 if any file was skipped.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders of images")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--model", default=default,
                   help="model file, or 'default' for the bundled model"
                        + (" (the default)" if default else " (required: no bundled model is installed)"))
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} (default auto)")
    return p


def run(args: argparse.Namespace) -> tuple[int, list[tuple[Path, str]]]:
    """Predict every input; returns the number written and the ``(file, reason)`` of those skipped."""
    if args.model is None:
        raise CliError("no bundled default model is installed; pass --model FILE")
    try:
        files = list_images(args.inputs)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    if not files:
        raise CliError("no image files (png, jpg, tif) in the inputs")
    check_unique_stems(files)
    engine = open_engine(args.model, args.device)
    if engine.model.rough is None:
        raise CliError("this model has no rough network, so it cannot find objects by itself; "
                       "use the napari plugin to draw boxes")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output folder {args.out}: {exc}") from exc
    written, skipped = 0, []
    bar = tqdm(files, desc="segmenting", unit="image", disable=None, file=sys.stderr)
    for f in bar:
        try:
            predict_file(engine, f, args.out)
            written += 1
        except (ValueError, OSError, MemoryError) as exc:  # DataError is a ValueError
            reason = str(exc) if str(f) in str(exc) else f"{f}: {exc}"
            skipped.append((f, reason))
            tqdm.write(f"skipped {reason}", file=sys.stderr)
    return written, skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written, skipped = run(args)
    except CliError as exc:
        print(f"segthenseg-predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} image(s) to {args.out}" + (f"; skipped {len(skipped)}" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
