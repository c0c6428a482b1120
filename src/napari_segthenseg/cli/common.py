"""What the commands share: user-facing errors, opening a model, progress on the command line."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ..engine import DEFAULT_MODEL_NAME, Engine, ModelFileError, load_model
from ..engine.progress import Progress


class CliError(Exception):
    """A problem the user can fix (bad model, data or device); printed without a traceback."""


def open_engine(model: str, device: str) -> Engine:
    """Load a model file (or ``default``) onto a device, turning every failure into :class:`CliError`."""
    try:
        return Engine(load_model(model), device=device)
    except (ModelFileError, FileNotFoundError) as exc:
        hint = " (no bundled model yet: pass a model file)" if model == DEFAULT_MODEL_NAME else ""
        raise CliError(f"{exc}{hint}") from exc
    except ValueError as exc:  # unknown or unavailable device
        raise CliError(str(exc)) from exc


class StageBars:
    """Progress of a walk as one tqdm bar per stage (survey, rough tiles, fine chunks): the
    ``on_step`` of :func:`~napari_segthenseg.engine.progress.drive`, used as a context manager."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        name = p.step.split(":")[0]
        if name != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=p.total, desc=name, unit="step", leave=False,
                                        file=sys.stderr), name
        self.bar.total = p.total
        self.bar.n = p.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
