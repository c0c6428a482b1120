"""Correct, then fine-tune (no Qt): corrected results become training data, and a fine-tune job.

**Add to training set** writes what the user corrected into a folder in ``segthenseg-train``'s
layout (``images/NAME``, ``masks/NAME.png`` instance labels, ``splits.json`` listing every image
as ``train``), chosen once and growing image by image; adding the same image again replaces it
(a later correction wins). An ordinary image goes in whole with its segmentation layer. A slide
never does: the boxes the user edited (else those on screen) are grown by a margin of context,
overlapping windows joined up to :data:`MAX_WINDOW` px a side, and each window goes in with its
part of the on-disk label image.

**Fine-tune** runs the trainer's own steps (``trainer.loop.train_steps``, the loop of
``segthenseg-train --from-model``) in the widget's worker, from the model in use, and writes the
run beside the folder (``FOLDER-models/NAME/``, with ``model.pt``, ``train.log`` and
``metrics.csv``); the widget then selects the new model and segments the image again.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from trainer.config import TrainConfig
from trainer.finetune import fine_tune_values
from trainer.loop import train_steps

from ..engine import load_model
from ..engine.atomic import write_bytes
from ..engine.boxes import NO_BOXES
from ..engine.grid import Region
from ..engine.modelfile import DEFAULT_MODEL_NAME, StSModel
from ..engine.progress import Progress
from .session import Job, JobResult, Session, UiStep

SPLITS = "splits.json"
MODELS_SUFFIX = "-models"  # the fine-tuned models of FOLDER go to FOLDER-models/
MARGIN = 64  # context around a slide's corrected box: at least this many px, or the box's side
MAX_WINDOW = 2048  # a slide window's longest side (px); windows are joined only up to this
MAX_VIEW_PX = MAX_WINDOW * MAX_WINDOW  # a slide's view used as a window when no box was edited
FINE_TUNE_MINUTES = 3.0  # the plugin's default time limit (the issue: minutes on a laptop CPU)


class TrainingSetError(ValueError):
    """What to tell the user when nothing can be added (one line)."""


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:80] or "image"


@dataclass
class Piece:
    """One training image: pixels as the engine reads them, instance labels of the same size."""

    stem: str
    image: np.ndarray  # (H, W) or (H, W, C)
    labels: np.ndarray  # (H, W) integer, 0 = background


class TrainingSet:
    """A data folder in the trainer's layout that grows image by image."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def stems(self) -> list[str]:
        path = self.folder / SPLITS
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("train", []))
        except (OSError, ValueError, AttributeError):
            raise TrainingSetError(f"{path} is not a training set's splits.json") from None

    def __len__(self) -> int:
        return len(self.stems())

    def check(self) -> None:
        """A folder that is not a training set (a file, or files of another layout) is refused."""
        if self.folder.exists() and not self.folder.is_dir():
            raise TrainingSetError(f"{self.folder} is a file, not a folder")
        if self.folder.is_dir() and any(self.folder.iterdir()) and not (self.folder / SPLITS).is_file() \
                and not (self.folder / "images").is_dir():
            raise TrainingSetError(f"{self.folder} holds other files: choose an empty or new folder (or one "
                                   "this plugin made) for the training set")
        self.stems()

    def add(self, pieces: list[Piece]) -> tuple[list[str], list[str]]:
        """Write each piece (image, mask) and list it in ``splits.json``; returns (added, replaced)."""
        self.check()
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        (self.folder / "masks").mkdir(exist_ok=True)
        stems = self.stems()
        added, replaced = [], []
        for p in pieces:
            for old in (self.folder / "images").glob(f"{p.stem}.*"):  # e.g. a .png replaced by a .tif
                old.unlink()
            write_bytes(self.folder / "images" / f"{p.stem}{_suffix(p.image)}", _encode(p.image))
            labels = p.labels.astype(np.uint16 if int(p.labels.max(initial=0)) < 2**16 else np.uint32)
            mask_name = f"{p.stem}.png" if labels.dtype == np.uint16 else f"{p.stem}.tif"
            for old in (self.folder / "masks").glob(f"{p.stem}.*"):
                old.unlink()
            write_bytes(self.folder / "masks" / mask_name, _encode(labels))
            (replaced if p.stem in stems else added).append(p.stem)
            if p.stem not in stems:
                stems.append(p.stem)
        write_bytes(self.folder / SPLITS, (json.dumps({"train": stems}, indent=1) + "\n").encode())
        return added, replaced

    def models_folder(self) -> Path:
        """Where fine-tuned models go: beside the training set, never inside it."""
        return self.folder.with_name(self.folder.name + MODELS_SUFFIX)

    def new_run(self, parent: str) -> Path:
        """A fresh run folder for a fine-tune of ``parent`` (a model key: a path or "default")."""
        name = "default" if parent == DEFAULT_MODEL_NAME else Path(parent).parent.name \
            if Path(parent).name == "model.pt" else Path(parent).stem
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = self.models_folder() / f"{stamp}-from-{safe_stem(name)}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path


def _suffix(image: np.ndarray) -> str:
    """PNG for 8/16-bit gray or RGB(A); TIFF for everything else (float, 32-bit, ...)."""
    png = image.dtype in (np.uint8, np.uint16) and (image.ndim == 2 or image.shape[2] in (3, 4))
    return ".png" if png else ".tif"


def _encode(image: np.ndarray) -> bytes:
    if _suffix(image) == ".png":
        return iio.imwrite("<bytes>", np.ascontiguousarray(image), extension=".png")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(image), photometric="rgb" if image.ndim == 3 else None)
    return buf.getvalue()


# -- what a session gives ------------------------------------------------------------------------

def image_stem(session: Session) -> str:
    """The image layer's name, and the slice of a stack."""
    lead = "".join(f"_{i}" for i in session.plane.lead)
    return safe_stem(f"{session.image_layer.name}{lead}")


def pieces_of(session: Session) -> list[Piece]:
    """What ``session`` adds to a training set: the whole image with its segmentation layer, or for
    a slide the windows around its corrected boxes."""
    if getattr(session, "slide", None) is not None:
        return slide_pieces(session)
    if getattr(session, "boxes3d", None) is not None:  # a VolumeSession
        raise TrainingSetError("a volume cannot be added to a training set yet: the trainer takes 2D "
                               "images (docs/VOLUMES.md)")
    if not session.alive(session.seg_layer):
        raise TrainingSetError("nothing to add yet: press Run (or draw boxes), correct the segmentation, "
                               "then add it")
    image = np.asarray(session.data)
    labels = np.asarray(session.seg_layer.data).reshape(session.plane.hw)
    return [Piece(image_stem(session), image, labels)]


def join_windows(boxes: np.ndarray, hw: tuple[int, int], margin: int = MARGIN,
                 max_side: int = MAX_WINDOW) -> list[Region]:
    """Each box grown by ``max(margin, its longest side)`` on every side (clipped to the image),
    overlapping windows joined while the join stays within ``max_side`` px a side."""
    windows: list[list[int]] = []
    for y0, x0, y1, x1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4).tolist():
        grow = max(margin, y1 - y0, x1 - x0)
        windows.append([max(0, y0 - grow), max(0, x0 - grow), min(hw[0], y1 + grow), min(hw[1], x1 + grow)])
    joined = True
    while joined:
        joined = False
        for i in range(len(windows)):
            for j in range(i + 1, len(windows)):
                a, b = windows[i], windows[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    u = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    if max(u[2] - u[0], u[3] - u[1]) <= max_side:
                        windows[i] = u
                        del windows[j]
                        joined = True
                        break
            if joined:
                break
    return [tuple(w) for w in sorted(windows)]  # type: ignore[misc]


def slide_pieces(session: Session) -> list[Piece]:
    """Windows around a slide's corrected boxes (or the view, when small enough and no box was
    edited), each with its part of the label image; never the whole slide."""
    label = session.slide.label
    if label is None:
        raise TrainingSetError("nothing to add yet: press Run (or draw boxes) on the slide first")
    hw = session.plane.hw
    boxes = session.table.edited()
    if len(boxes):
        windows = join_windows(boxes, hw)
    else:
        y0, x0, y1, x1 = (int(v) for v in session.view_of())
        if (y1 - y0) * (x1 - x0) > MAX_VIEW_PX or y1 <= y0 or x1 <= x0:
            raise TrainingSetError("no box was edited: zoom in on the objects you checked (at most "
                                   f"{MAX_WINDOW} x {MAX_WINDOW} px on screen) or edit their boxes, then add")
        windows = [(y0, x0, y1, x1)]
    data = session.data
    base = data.levels[0] if hasattr(data, "levels") else data[0] if isinstance(data, list) else data
    level0 = label.levels[0]
    stem = image_stem(session)
    return [Piece(f"{stem}_y{y0}_x{x0}_{y1 - y0}x{x1 - x0}", np.asarray(base[y0:y1, x0:x1]),
                  np.asarray(level0[y0:y1, x0:x1])) for y0, x0, y1, x1 in windows]


# -- the fine-tune job ------------------------------------------------------------------------------

@dataclass
class FineTuned(JobResult):
    """A finished fine-tune: the new model, where it is, and what it was made from."""

    model: StSModel | None = None
    path: Path | None = None
    summary: str = ""


@dataclass
class FineTuneSettings:
    folder: Path
    parent: str  # the model key in use: a path or "default"
    minutes: float = FINE_TUNE_MINUTES
    device: str = "cpu"
    threads: int = 1  # one torch thread keeps a core for napari's own thread
    extra: dict = field(default_factory=dict)  # other TrainConfig values (tests: a tiny batch)


def fine_tune_job(settings: FineTuneSettings, show: Callable[[FineTuned], list[UiStep]]) -> Job:
    """The trainer's ``--from-model`` steps in a worker; ``show`` puts the new model in place."""
    folder = Path(settings.folder)
    if len(TrainingSet(folder)) == 0:
        raise TrainingSetError(f"the training set {folder} is empty: add corrected images first")
    out = TrainingSet(folder).new_run(settings.parent)
    values = {"data": folder, "out": out, "from_model": settings.parent, "minutes": settings.minutes,
              "device": settings.device, "threads": settings.threads, **settings.extra,
              "command": f"napari-segthenseg Fine-tune {folder} from {settings.parent}"}

    def steps():
        cfg = TrainConfig(**fine_tune_values(values, set(values) - {"command"}))
        yield Progress("fine-tune: reading the training set", 0, 1)
        path = yield from train_steps(cfg)
        model = load_model(path)
        notes = model.settings.notes
        return FineTuned(NO_BOXES.copy(), None, model=model, path=path, timings={"train": notes["wall_s"]},
                         summary=f"{notes['images']} image(s), {notes['wall_s']:.0f} s")

    return Job("fine-tune", steps, lambda res, edited: show(res),
               lambda res, t: f"fine-tuned on {res.summary}: {res.path}")
