"""Data folders: ``images/`` + ``masks/`` with matching stems, splits, image reading, checks.

Everything is validated and decoded up front (in a thread pool), so a bad file stops a run
before any training starts; training images stay in memory, so no PNG is decoded twice per run.
Digests of the decoded pixels find images shared between splits and fingerprint the training
data, so a resumed run notices data that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from napari_segthenseg.engine.reader import ImageFileError
from napari_segthenseg.engine.reader import read_image as engine_read_image

from .config import DEFAULT_SEED

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test when there is no splits.json
MAX_LISTED_PROBLEMS = 10
SPLITS_NAME = "splits.json"
T = TypeVar("T")


class DataError(ValueError):
    """A data folder or file cannot be used; the message names the offending file."""


@dataclass
class Sample:
    """One decoded image and its foreground mask."""

    stem: str
    image: np.ndarray  # (H, W) or (H, W, 3), original dtype, alpha dropped
    mask: np.ndarray  # bool (H, W): anything > 0 is foreground


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as ``(H, W)`` or ``(H, W, 3)`` in its own dtype, with the engine's reader
    (one set of rules for colour, alpha and stacks: :mod:`napari_segthenseg.engine.reader`).

    Raises :class:`DataError` naming the file when it cannot be decoded or is not a 2D image.
    """
    try:
        return engine_read_image(path)
    except ImageFileError as exc:
        raise DataError(str(exc)) from exc


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a mask (binary or instance labels) as bool ``(H, W)``: anything > 0 is foreground."""
    arr = read_image(path)
    return (arr > 0).any(axis=2) if arr.ndim == 3 else arr > 0


def _stem_map(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem; two files with one stem are ambiguous."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
            continue
        if p.stem in found:
            raise DataError(f"{p}: same name as {found[p.stem].name}; keep one file per stem")
        found[p.stem] = p
    return found


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``inputs`` (files, or folders whose image files are taken, sorted).

    A path that does not exist raises :class:`DataError`; decoding is left to the caller.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(q for q in sorted(p.iterdir()) if is_image_file(q))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _pairs(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """``stem -> (image, mask or None)`` for a data folder."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if root.is_dir() and not img_dir.is_dir():
        loose = sum(1 for q in root.iterdir() if is_image_file(q))
        if loose:
            raise DataError(f"{root} holds {loose} image file(s) but no images/ and masks/ folders: a data "
                            "folder holds images/NAME.png and, for each, masks/NAME.png of the same size "
                            "(anything > 0 is foreground; docs/TRAINING.md)")
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found (a data folder holds images/ and masks/)")
    images, masks = _stem_map(img_dir), _stem_map(mask_dir)
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return {s: (p, masks.get(s)) for s, p in images.items()}


def image_stems(root: str | os.PathLike) -> list[str]:
    """The stems of a data folder's images (the folder layout is checked, no file is decoded)."""
    return sorted(_pairs(Path(root)))


def _seeded_split(stems: Sequence[str], seed: int) -> dict[str, list[str]]:
    order = sorted(stems)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = int(round(SPLIT_FRACTIONS[0] * len(order)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(order)))
    picked = [order[i] for i in perm]
    return {
        "train": sorted(picked[:n_train]),
        "val": sorted(picked[n_train:n_train + n_val]),
        "test": sorted(picked[n_train + n_val:]),
    }


def has_splits_file(root: str | os.PathLike) -> bool:
    return (Path(root) / SPLITS_NAME).is_file()


def read_splits_file(path: str | os.PathLike, known: Iterable[str], images: str | os.PathLike
                     ) -> dict[str, list[str]]:
    """A ``splits.json`` (``{"name": [stems]}``) whose every stem is in ``known`` (the files of ``images``).

    Used for a data folder's splits and for the splits a training run saved in its folder.
    """
    path, known = Path(path), set(known)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in raw.values()
    ):
        raise DataError(f'{path}: expected {{"train": [...], "val": [...], "test": [...]}} (lists of stems)')
    splits: dict[str, list[str]] = {}
    for name, ids in raw.items():
        missing = [s for s in ids if s not in known]
        if missing:
            raise DataError(f"{path}: split {name!r} names {len(missing)} stem(s) with no file in "
                            f"{images}, e.g. {missing[0]!r}")
        splits[name] = list(ids)
    return splits


def load_splits(root: str | os.PathLike, seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """``splits.json`` (any subset of train/val/test) or a seeded 80/10/10 split by sorted stem.

    Every listed stem must have an image, so a typo fails here and not mid-run.
    """
    root = Path(root)
    stems = _pairs(root)
    path = root / SPLITS_NAME
    if not path.is_file():
        return _seeded_split(list(stems), seed)
    return read_splits_file(path, stems, root / "images")


def _load_pair(stem: str, img_path: Path, mask_path: Path | None) -> Sample:
    if mask_path is None:
        raise DataError(f"{img_path}: no mask named {stem}.* in {img_path.parent.parent / 'masks'}")
    image = read_image(img_path)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but image {img_path.name} "
                        f"is {image.shape[0]}x{image.shape[1]}")
    return Sample(stem, image, mask)


def _each_pair(root: Path, stems: Sequence[str], fn: Callable[[Sample], T], workers: int | None) -> list[T]:
    """``fn`` of every decoded, validated pair of ``stems`` (in order), in a thread pool.

    All problems are collected first and raised as one :class:`DataError` naming the files, so
    nothing starts with half a data set.
    """
    pairs = _pairs(root)
    unknown = [s for s in stems if s not in pairs]
    if unknown:
        raise DataError(f"{root / 'images'}: no image for {len(unknown)} stem(s), e.g. {unknown[0]!r}")
    workers = workers or min(8, os.cpu_count() or 1)

    def job(stem: str) -> T | DataError:
        try:
            return fn(_load_pair(stem, *pairs[stem]))
        except DataError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(job, stems))
    problems = [r for r in results if isinstance(r, DataError)]
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(f"{len(problems)} problem(s) in {root}:\n  {shown}{tail}")
    return [r for r in results if not isinstance(r, DataError)]


def load_stems(root: str | os.PathLike, stems: Sequence[str], workers: int | None = None) -> list[Sample]:
    """Decode and validate the image/mask pairs of ``stems``, in that order."""
    return _each_pair(Path(root), list(stems), lambda s: s, workers)


def load_samples(root: str | os.PathLike, split: str | None, seed: int = DEFAULT_SEED,
                 workers: int | None = None) -> list[Sample]:
    """Decode and validate every image/mask of ``split`` (all images when ``None``), in split order."""
    root = Path(root)
    if split is None:
        stems = sorted(_pairs(root))
    else:
        splits = load_splits(root, seed)
        if split not in splits:
            raise DataError(f"{root}: no split {split!r}; available: {', '.join(sorted(splits)) or 'none'}")
        stems = splits[split]
        if not stems:
            raise DataError(f"{root}: split {split!r} is empty")
    return load_stems(root, stems, workers)


# -- content checks and fingerprints -------------------------------------------------------------

def image_digest(image: np.ndarray) -> str:
    """SHA-256 of decoded pixels (shape and dtype included): equal for the same picture in two files."""
    h = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ImageInfo:
    """What the checks keep of a decoded pair: its size, a digest of its pixels and of its mask."""

    stem: str
    hw: tuple[int, int]
    image: str  # image_digest of the pixels
    mask: str  # SHA-256 of the packed mask bits
    foreground: int  # mask pixels > 0

    @classmethod
    def of(cls, sample: Sample) -> ImageInfo:
        mask = hashlib.sha256(f"{sample.mask.shape}".encode() + np.packbits(sample.mask).tobytes())
        return cls(sample.stem, (int(sample.mask.shape[0]), int(sample.mask.shape[1])),
                   image_digest(sample.image), mask.hexdigest(), int(np.count_nonzero(sample.mask)))

    def entry(self) -> str:
        """Size and a short content digest (image and mask), e.g. ``256x320:9f86d081884c7d65``."""
        both = hashlib.sha256((self.image + self.mask).encode()).hexdigest()
        return f"{self.hw[0]}x{self.hw[1]}:{both[:16]}"


def scan_stems(root: str | os.PathLike, stems: Sequence[str], workers: int | None = None) -> list[ImageInfo]:
    """Decode and validate the pairs of ``stems`` like :func:`load_stems`, keeping only their digests."""
    return _each_pair(Path(root), list(stems), ImageInfo.of, workers)


def check_has_both_classes(infos: Sequence[ImageInfo], what: str) -> None:
    """Refuse training images whose masks are all empty (no foreground) or all full (no background)."""
    fg = sum(i.foreground for i in infos)
    total = sum(i.hw[0] * i.hw[1] for i in infos)
    if fg == 0:
        raise DataError(f"all {len(infos)} masks of {what} are empty (no pixel > 0): there is nothing to "
                        "learn to segment. Check masks/ (anything > 0 is foreground).")
    if fg == total:
        raise DataError(f"all {len(infos)} masks of {what} are completely foreground (every pixel > 0): "
                        "there is no background to learn. Check masks/ (0 is background).")


def shared_images(splits: dict[str, Sequence[ImageInfo]], trained: str) -> list[str]:
    """Warnings for images of ``splits[trained]`` that are also in another split: by stem or by pixels."""
    notes = []
    mine = {i.stem: i for i in splits[trained]}
    by_pixels = {i.image: i.stem for i in splits[trained]}
    for name, infos in splits.items():
        if name == trained:
            continue
        same_stem = [i.stem for i in infos if i.stem in mine]
        same_pixels = [f"{i.stem} = {by_pixels[i.image]}" for i in infos
                       if i.image in by_pixels and i.stem not in mine]
        if same_stem:
            notes.append(f"{len(same_stem)} image(s) of {name!r} are also in {trained!r} (same stem), "
                         f"e.g. {', '.join(same_stem[:3])}")
        if same_pixels:
            notes.append(f"{len(same_pixels)} image(s) of {name!r} have the same pixels as one in "
                         f"{trained!r}, e.g. {', '.join(same_pixels[:3])}")
    return notes


def fingerprint(roles: dict[str, Sequence[ImageInfo]]) -> dict[str, dict[str, str]]:
    """``{role: {stem: "HxW:digest"}}``: what a resumed run compares to notice changed data."""
    return {role: {i.stem: i.entry() for i in infos} for role, infos in roles.items()}


def fingerprint_changes(saved: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """How the data of ``now`` differ from ``saved``, one phrase per role that changed (empty: same)."""
    out = []
    for role in sorted(set(saved) | set(now)):
        a, b = saved.get(role, {}), now.get(role, {})
        gone = sorted(set(a) - set(b))
        new = sorted(set(b) - set(a))
        changed = sorted(s for s in set(a) & set(b) if a[s] != b[s])
        if not (gone or new or changed):
            continue
        parts = []
        for n, label in ((gone, "gone"), (new, "new"), (changed, "changed")):
            if n:
                parts.append(f"{len(n)} {label} (e.g. {', '.join(n[:3])})")
        out.append(f"{role} images ({len(a)} then, {len(b)} now): " + ", ".join(parts))
    return out
