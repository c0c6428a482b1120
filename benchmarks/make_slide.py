"""Synthetic whole slides with ground truth, from real dsb2018 fluorescence or bright-field fields.

Fluorescence fields of the dsb2018 train and val splits (gray, dark background: 491 of the 507
gray fields; the other 16 are bright-field images with dark nuclei on a bright background) are
packed row by row, a few
pixels apart, into an elliptical "tissue" region of a black canvas, until the fields cover the
asked share of the slide; fields are reused as often as needed (within a row too, so a handful
of fields, like the 7 fluorescence fields bundled in tests/data/dsb2018, fill any slide), each
time flipped or rotated at random. A coverage the region cannot reach is refused, never
silently missed. ``--stain brightfield`` makes a bright-field slide instead: the 96 colour fields
(H&E-like, purple nuclei on a light background) and the 16 gray bright-field fields (as RGB) on a
light "glass" canvas, as an RGB slide. Written as a tiled, pyramidal OME-TIFF (levels 2x apart,
zlib), with:

* ``NAME_gt.tif``: the ground-truth mask (uint8 0/1, tiled BigTIFF);
* ``NAME_fields.csv``: every placed field (its stem, flip/rotation, y, x, h, w, and the corner oy, ox
  of the part used when it was cut to fit), so the same fields can be segmented one by one and
  scored against the same ground truth.

The slide is built in a memory-mapped scratch file, so any size fits on disk, not in memory:

    .venv/bin/python benchmarks/make_slide.py --size 10240 --out runs/slides/s10k.ome.tif

(``--data`` defaults to the bundled tests/data/dsb2018; docs/BENCHMARKS.md uses the full set.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from napari_segthenseg.engine.reader import read_image

TILE = 512
MIN_LEVEL = 1024
REPO = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO / "tests" / "data" / "dsb2018"
REACHED = 0.98  # share of the asked coverage a layout must reach


class SlideError(Exception):
    """A slide that cannot be made as asked (no fields, or a coverage out of reach)."""


@dataclass
class Field:
    stem: str
    image: np.ndarray  # (h, w) uint8 gray, or (h, w, 3) RGB for bright-field slides
    mask: np.ndarray  # (h, w) bool


FLUORESCENCE_MAX_MEAN = 128  # gray fields brighter than this on average are bright-field images


STAINS = ("fluorescence", "brightfield")
GLASS = 238  # a bright-field slide's empty background (white light through glass, a little grey)


def field_image(img: np.ndarray, stain: str) -> np.ndarray | None:
    """A dsb2018 image as the slide of ``stain`` holds it, or None when it is of the other kind:
    fluorescence is gray with a dark background; bright-field is colour, or gray with a light
    background (given 3 equal channels)."""
    colour = img.ndim == 3 and not (np.array_equal(img[..., 0], img[..., 1])
                                    and np.array_equal(img[..., 0], img[..., 2]))
    gray = img if img.ndim == 2 else img[..., 0]
    if stain == "fluorescence":
        return gray if not colour and gray.mean() < FLUORESCENCE_MAX_MEAN else None
    if colour:
        return np.ascontiguousarray(img[..., :3])
    return np.repeat(gray[..., None], 3, axis=2) if gray.mean() >= FLUORESCENCE_MAX_MEAN else None


def load_fields(data: Path, splits: tuple[str, ...] = ("train", "val"), stain: str = "fluorescence"
                ) -> list[Field]:
    """The fields of ``stain`` of the given splits, as (image, mask) (see :func:`field_image`)."""
    ids = [i for s in splits for i in json.loads((data / "splits.json").read_text())[s]]
    out = []
    for stem in sorted(ids):
        img = field_image(read_image(data / "images" / f"{stem}.png"), stain)
        if img is not None:
            out.append(Field(stem, img, read_image(data / "masks" / f"{stem}.png") > 0))
    return out


def transformed(f: Field, k: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    img, mask = np.rot90(f.image, k), np.rot90(f.mask, k)
    if flip:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def layout(fields: list[Field], size: int, coverage: float, gap: int, seed: int,
           tissue: str = "ellipse") -> list[tuple]:
    """Placements ``(field index, rot90 k, flip, y, x, h, w)`` packed in rows inside a circle just
    large enough to reach ``coverage`` (rows and gaps waste part of it); raises
    :class:`SlideError` when even the largest circle that fits cannot hold that much.
    ``tissue="full"`` packs rows of equal height over the whole slide, each field cut to the row
    (dense tissue: fields touch, rows are added until ``coverage`` is reached)."""
    if not fields:
        raise SlideError("no fields of this stain to place")
    target = coverage * size * size
    if tissue == "full":
        return _pack_dense(fields, size, target, np.random.default_rng(seed))
    for room in (1.35, 1.6, 1.9, 2.3, 2.8, 3.5):
        rng = np.random.default_rng(seed)
        radius = min(0.49 * size, math.sqrt(room * coverage * size * size / math.pi))
        placed = _pack(fields, size, target, radius, gap, rng)
        if sum(p[5] * p[6] for p in placed) >= REACHED * target:
            return placed
    reached = sum(p[5] * p[6] for p in placed) / (size * size)
    raise SlideError(f"coverage {coverage:g} cannot be reached on a {size} px slide: the fields fill at most "
                     f"{reached:.3f} of it (the tissue region is a circle inside the slide, with gaps); ask "
                     "for less")


def field_pool(fields: list[Field], size: int, gap: int) -> list[int]:
    """Field indices, each repeated as often as needed for one shuffled pool to outlast a row (a
    row holds at most size / (shortest side + gap) fields). With the full data set one copy is
    enough, so its layouts are the ones they always were; a handful of fields is repeated."""
    shortest = min(min(f.image.shape[:2]) for f in fields)
    reps = max(1, math.ceil((size / (shortest + gap) + 1) / len(fields)))
    return [i for _ in range(reps) for i in range(len(fields))]


def _pack_dense(fields: list[Field], size: int, target: float, rng: np.random.Generator) -> list[tuple]:
    """Rows of the smallest field side, left to right without gaps; each field cut at a random place
    to the row's height (and the last one of a row to the slide's edge): ``(..., oy, ox)`` is the
    cut's corner in the (rotated, flipped) field."""
    row = min(min(f.image.shape[:2]) for f in fields)
    placed, area, y = [], 0.0, 0
    while y < size and area < target:
        rh, x = min(row, size - y), 0
        while x < size:
            i = int(rng.integers(len(fields)))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            th, tw = fields[i].image.shape[1::-1] if k % 2 else fields[i].image.shape[:2]
            w = min(tw, size - x)
            oy, ox = int(rng.integers(0, th - rh + 1)), int(rng.integers(0, tw - w + 1))
            placed.append((i, k, flip, y, x, rh, w, oy, ox))
            area += rh * w
            x += w
        y += rh
    return placed


def _pack(fields: list[Field], size: int, target: float, radius: float, gap: int,
          rng: np.random.Generator) -> list[tuple]:
    pool = field_pool(fields, size, gap)
    cy = cx = size / 2
    placed, area, y = [], 0.0, cy - radius
    while y < cy + radius and area < target:
        row_h, x = 0, None
        order = rng.permutation(len(pool))
        for j in order:
            i = pool[j]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            h, w = fields[i].image.shape[1::-1] if k % 2 else fields[i].image.shape[:2]
            # The chord of the ellipse over this row's rows.
            dy = max(abs(y - cy), abs(y + h - cy))
            if dy >= radius:
                continue
            half = radius * math.sqrt(1 - (dy / radius) ** 2)
            if x is None:
                x = cx - half + rng.integers(0, gap + 1)
            if x + w > cx + half:
                break
            placed.append((int(i), k, flip, int(y), int(x), h, w, 0, 0))
            area += h * w
            x += w + gap + int(rng.integers(0, gap + 1))
            row_h = max(row_h, h)
            if area >= target:
                break
        y += (row_h or 64) + gap
    return placed


def pyramid(base: np.ndarray) -> list[np.ndarray]:
    """2x mean-downsampled levels until the smallest fits in MIN_LEVEL px (gray or RGB)."""
    levels = [base]
    while max(levels[-1].shape[:2]) > MIN_LEVEL:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        out = np.empty((h // 2, w // 2, *a.shape[2:]), np.uint8)
        for y in range(0, h, 4096):  # in row blocks: a memory map is never read whole
            blk = a[y:min(y + 4096, h), :w].astype(np.uint16)
            out[y // 2:(y + blk.shape[0]) // 2] = (
                (blk[0::2, 0::2] + blk[1::2, 0::2] + blk[0::2, 1::2] + blk[1::2, 1::2] + 2) // 4)
        levels.append(out)
    return levels


def write_pyramid(path: Path, levels: list[np.ndarray]) -> None:
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        rgb = levels[0].ndim == 3
        opts = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "rgb" if rgb else "minisblack"}
        tw.write(levels[0], subifds=len(levels) - 1, metadata={"axes": "YXS" if rgb else "YX"}, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)


def make_slide(fields: list[Field], size: int, coverage: float, out: Path, seed: int = 2022,
               gap: int = 16, noise: float = 0.0, tissue: str = "ellipse") -> dict:
    rgb = fields[0].image.ndim == 3
    rng = np.random.default_rng(seed + 1)
    place = layout(fields, size, coverage, gap, seed, tissue)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name.split(".")[0]
    scratch = out.with_name(f".{stem}_scratch.npy")
    shape = (size, size, 3) if rgb else (size, size)
    img = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
    gt_path = out.with_name(f"{stem}_gt.tif")
    gt_scratch = out.with_name(f".{stem}_gt_scratch.npy")
    gt = np.lib.format.open_memmap(gt_scratch, mode="w+", dtype=np.uint8, shape=(size, size))
    back = GLASS if rgb else 8  # light glass, or a dim fluorescence background (black without noise)
    for y in range(0, size, 2048):
        rows = min(2048, size - y)
        if noise > 0:  # a noisy background like an empty part of a real slide
            img[y:y + rows] = np.clip(rng.normal(back, noise, (rows, size, *img.shape[2:])), 0, 255
                                      ).astype(np.uint8)
        elif rgb:
            img[y:y + rows] = GLASS
    with open(out.with_name(f"{stem}_fields.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "rot90", "flip", "y", "x", "h", "w", "oy", "ox"])
        for i, k, flip, y, x, h, w, oy, ox in place:
            im, m = transformed(fields[i], k, flip)
            img[y:y + h, x:x + w] = im[oy:oy + h, ox:ox + w]
            gt[y:y + h, x:x + w] = m[oy:oy + h, ox:ox + w]
            writer.writerow([fields[i].stem, k, int(flip), y, x, h, w, oy, ox])
    img.flush()
    gt.flush()
    write_pyramid(out, pyramid(img))
    tifffile.imwrite(gt_path, gt, bigtiff=True, tile=(TILE, TILE), compression="zlib",
                     photometric="minisblack")
    area = sum(p[5] * p[6] for p in place)
    del img, gt
    scratch.unlink()
    gt_scratch.unlink()
    return {"slide": str(out), "gt": str(gt_path), "size": size, "fields": len(place),
            "stain": "brightfield" if rgb else "fluorescence",
            "coverage": area / size**2, "seed": seed}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=BUNDLED_DATA, metavar="DIR",
                   help="dsb2018 folder (images/, masks/, splits.json) whose train and val "
                        "fluorescence fields are placed (default: the 9 images bundled in "
                        "tests/data/dsb2018, 7 of them fluorescence)")
    p.add_argument("--size", type=int, default=20480, metavar="PX",
                   help="slide side in px (default: %(default)s)")
    p.add_argument("--coverage", type=float, default=0.3,
                   help="share of the slide covered by fields; refused when out of reach "
                        "(default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="std of a dim noisy background (default: %(default)s = black)")
    p.add_argument("--seed", type=int, default=2022,
                   help="seed of the layout, the flips/rotations and the noise (default: %(default)s)")
    p.add_argument("--gap", type=int, default=16,
                   help="px between fields (default: %(default)s; 0 with --tissue full: touching, like dense "
                        "tissue)")
    p.add_argument("--tissue", choices=("ellipse", "full"), default="ellipse",
                   help="where fields go: an elliptical tissue region (default), or rows over the whole "
                        "slide, each field cut to its row")
    p.add_argument("--stain", choices=STAINS, default="fluorescence",
                   help="fluorescence (gray fields on black, default) or brightfield (colour and gray "
                        "bright-field fields on light glass, an RGB slide)")
    p.add_argument("--out", type=Path, required=True, help="slide path (NAME.ome.tif)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.coverage < 1 or args.size < 256:
        print("make_slide.py: error: --coverage must be in (0, 1) and --size at least 256", file=sys.stderr)
        return 2
    t = time.perf_counter()
    try:
        fields = load_fields(args.data, stain=args.stain)
        layout(fields, args.size, args.coverage, args.gap, args.seed, args.tissue)  # refused before writing
    except (OSError, KeyError, ValueError, SlideError) as exc:
        print(f"make_slide.py: error: {args.data}: {exc}" if not isinstance(exc, SlideError) else
              f"make_slide.py: error: {exc}", file=sys.stderr)
        return 2
    info = make_slide(fields, args.size, args.coverage, args.out, args.seed, gap=args.gap, noise=args.noise,
                      tissue=args.tissue)
    info["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
