"""Fine-tuning: a run whose networks start from a model file (``--from-model``).

The parent fixes what the networks were built for, so a fine-tune keeps its S, padding, minimum
box, normalisation, width, depth, channels, threshold and trained scale; only what is given on
top of that (epochs, learning rate, checkpoint choice) gets the fine-tune defaults of
``config.FINE_TUNE_DEFAULTS``. The model file then records its parent (name and SHA-256 of the
file), the images it was tuned on and their fingerprint (docs/TRAINING.md, Fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from napari_segthenseg.engine import ModelFileError, StSModel, load_model
from napari_segthenseg.engine.integrity import file_sha256
from napari_segthenseg.engine.modelfile import DEFAULT_MODEL_NAME, resolve_model_path

from .config import FINE_TUNE_DEFAULTS

INHERITED = ("size", "width", "depth", "pad", "min_box", "normalisation")


@dataclass(frozen=True)
class Parent:
    """The model a fine-tune starts from."""

    name: str  # as given: "default", a model file or a run folder
    path: Path  # the model file itself
    sha256: str  # of the file's bytes (what ``sha256sum`` prints)
    model: StSModel

    @property
    def settings(self) -> dict[str, object]:
        """The run settings the parent fixes (``TrainConfig`` field names)."""
        s = self.model.settings
        net = self.model.rough or self.model.fine
        return {"size": s.size, "width": net.width, "depth": net.depth, "pad": s.pad, "min_box": s.min_box,
                "normalisation": s.normalisation}

    def record(self) -> dict[str, str]:
        """What the fine-tuned model file says about its parent."""
        return {"name": self.name, "file": str(self.path), "sha256": self.sha256,
                "trained_on": self.model.settings.trained_on}


def load_parent(name: str | Path) -> Parent:
    """Read ``name`` (a model file, a run folder or ``"default"``); a problem is a ``ValueError``
    naming it."""
    key = str(name)
    try:
        path = resolve_model_path(key)
        model = load_model(path)
    except (ModelFileError, FileNotFoundError) as exc:
        raise ValueError(f"--from-model {key}: {exc}") from None
    nets = [n for n in (model.rough, model.fine) if n is not None]
    if len({(n.width, n.depth) for n in nets}) > 1:
        raise ValueError(f"--from-model {key}: its rough and fine networks differ in width or depth; "
                         "fine-tune one of them with --stage")
    shown = DEFAULT_MODEL_NAME if key == DEFAULT_MODEL_NAME else str(path)
    return Parent(shown, path, file_sha256(path), model)


def fine_tune_values(values: dict[str, object], given: Iterable[str]) -> dict[str, object]:
    """``TrainConfig`` keyword values for a run: unchanged without ``from_model``; with it, the
    parent's settings (a conflicting one that was ``given`` is an error) and the fine-tune defaults
    of the options not ``given``."""
    if values.get("from_model") is None:
        return dict(values)
    given = set(given)
    parent = load_parent(values["from_model"])  # type: ignore[arg-type]
    out = dict(values)
    for key, value in parent.settings.items():
        if key in given and out.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {out.get(key)}: the model to fine-tune ({parent.name}) has {value}; a "
                             f"fine-tune keeps its parent's settings (leave {flag} out)")
        out[key] = value
    for key, value in FINE_TUNE_DEFAULTS.items():
        if key not in given:
            out[key] = value
    return out


def fingerprint_digest(fingerprint: dict[str, dict[str, str]]) -> str:
    """One SHA-256 for a run's data fingerprint (every train and selection image: size, pixels, mask)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
