"""What the commands share: user-facing errors, opening a model, output checks, progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Generic, TypeVar

from tqdm import tqdm

from ..engine import DEFAULT_MODEL_NAME, Engine, ModelFileError, load_model, resolve_model_path
from ..engine.atomic import output_problem
from ..engine.progress import Progress

T = TypeVar("T")
PLAIN_EVERY_S = 10.0  # without a terminal: one progress line at most this often


class CliError(Exception):
    """A problem the user can fix (bad model, data or device); printed without a traceback."""


def model_path(model: str) -> Path:
    """The model file ``model`` names: ``default``, a file, or a training run's folder (its
    ``model.pt``; the rule is :func:`~napari_segthenseg.engine.resolve_model_path`'s)."""
    try:
        return resolve_model_path(model)
    except (ModelFileError, FileNotFoundError) as exc:
        raise CliError(_model_message(model, exc)) from exc


def open_engine(model: str, device: str) -> Engine:
    """Load a model file, a run folder's ``model.pt`` or ``default`` onto a device, turning every
    failure into :class:`CliError`."""
    try:
        return Engine(load_model(model), device=device)
    except (ModelFileError, OSError) as exc:
        raise CliError(_model_message(model, exc)) from exc
    except ValueError as exc:  # unknown or unavailable device
        raise CliError(str(exc)) from exc


def _model_message(model: str, exc: BaseException) -> str:
    hint = " (no bundled model yet: pass a model file)" if model == DEFAULT_MODEL_NAME else ""
    return f"{exc}{hint}"


def check_output(path: Path | str | None, option: str, folder: bool = False) -> None:
    """Refuse an output path that could not be written, before any work starts (not after it)."""
    if path is None:
        return
    problem = output_problem(path, folder=folder)
    if problem is not None:
        raise CliError(f"{option} {path}: {problem}")


class StageBars:
    """Progress of a walk as one tqdm bar per stage (survey, rough tiles, fine chunks): the
    ``on_step`` of :func:`~napari_segthenseg.engine.progress.drive`, used as a context manager."""

    def __init__(self, enabled: bool, file: IO[str] | None = None):
        self.enabled = enabled
        self.file = file
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        name = p.step.split(":")[0]
        if name != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=p.total, desc=name, unit="step", leave=False,
                                        file=self.file or sys.stderr), name
        self.bar.total = p.total
        self.bar.n = p.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CommandProgress(Generic[T]):
    """Progress of a command over several items (images).

    On a terminal: tqdm bars (one over the items, one per stage of the current item). Otherwise
    (output to a file, a cluster job, ``nohup``) tqdm draws nothing, so one plain line is written
    at the first item and then at most every ``every`` seconds, e.g.
    ``segmenting 3/10 images, slide.tif: fine pass: 120/400 chunks, 35 s`` (as segthenseg-train
    logs one line per epoch).
    """

    def __init__(self, items: Sequence[T], desc: str, unit: str = "image", *, name: Callable[[T], str] = str,
                 file: IO[str] | None = None, terminal: bool | None = None, every: float | None = None,
                 enabled: bool = True):
        self.items, self.desc, self.unit, self.name = list(items), desc, unit, name
        self.file = file if file is not None else sys.stderr
        self.terminal = _is_terminal(self.file) if terminal is None else terminal
        self.every = PLAIN_EVERY_S if every is None else every
        self.enabled = enabled
        self.bars = StageBars(enabled and self.terminal, self.file)
        self.t0 = time.monotonic()
        self.printed: float | None = None
        self.index, self.current, self.step = 0, "", None

    def __iter__(self) -> Iterator[T]:
        items: Iterator[T] | tqdm = iter(self.items)
        if self.enabled and self.terminal:
            items = tqdm(self.items, desc=self.desc, unit=self.unit, file=self.file)
        try:
            for i, item in enumerate(items):
                self.bars.close()
                self.index, self.current, self.step = i, self.name(item), None
                self._plain()
                yield item
        finally:
            self.bars.close()
            if isinstance(items, tqdm):
                items.close()

    def on_step(self, p: Progress) -> None:
        """The ``on_step`` of :func:`~napari_segthenseg.engine.progress.drive` for the current item."""
        self.step = p
        if self.terminal:
            self.bars(p)
        else:
            self._plain()

    def line(self) -> str:
        text = f"{self.desc} {self.index + 1}/{len(self.items)} {self.unit}s, {self.current}"
        if self.step is not None:
            p = self.step
            text += f": {p.step}" + ("" if "/" in p.step else f" {p.done}/{p.total}")
        return f"{text}, {time.monotonic() - self.t0:.0f} s"

    def write(self, text: str) -> None:
        """A message between the bars (or the plain lines)."""
        if self.enabled and self.terminal:
            tqdm.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def _plain(self) -> None:
        if not self.enabled or self.terminal:
            return
        now = time.monotonic()
        if self.printed is None or now - self.printed >= self.every:
            self.printed = now
            print(self.line(), file=self.file, flush=True)


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError, OSError):
        return False
