"""The model file: both networks, their architecture and the settings they were trained with.

Layout (a ``torch.save`` zip, read with ``torch.load(weights_only=True)`` so that loading never
runs code)::

    {"format": "napari-segthenseg/model", "version": 2,
     "settings": "<json>", "rough": {"arch": "<json>", "state": {...}} | None, "fine": ... | None,
     "sha256": "<digest of everything else>"}

Version 2 added the checksum (a damaged file is refused) and ``trained_scale`` in the settings
(the scale the rough net learned, which whole slides need: docs/WHOLE_SLIDES.md). Version 1
files still load: they carry no checksum and no scale, so every image gets the paper's
whole-image rough pass unless a rough scale is given.

A model with only a rough net is a baseline; one with only a fine net segments boxes by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .boxes import MIN_BOX, default_pad
from .image import NORMALISATIONS
from .integrity import FileProblem, load_checked, save_sealed
from .scale import TrainedScale
from .unet import UNet, build_network

FORMAT = "napari-segthenseg/model"
VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_MODEL_NAME = "default"
RUN_MODEL_NAME = "model.pt"  # what segthenseg-train writes into its --out folder


class ModelFileError(ValueError):
    """A file that is not a usable model (corrupt, foreign, unsafe or from another version)."""


@dataclass
class ModelSettings:
    """What inference needs to reproduce training conditions, plus provenance."""

    size: int = 64  # network input S (both stages)
    in_channels: int = 3
    pad: int | None = None  # box padding k in full-res px; None = S/8
    min_box: int = MIN_BOX
    normalisation: str = "minmax"
    threshold: float = 0.5
    trained_on: str = ""
    # Scale and normalisation window the rough net learned; None: unknown (format 1 files).
    trained_scale: TrainedScale | None = None
    pixel_size: float | None = None  # µm per pixel of the training images, when known (--pixel-size)
    notes: dict = field(default_factory=dict)  # free-form: command, metrics, wall time

    def __post_init__(self) -> None:
        if isinstance(self.trained_scale, dict):
            self.trained_scale = TrainedScale.from_dict(self.trained_scale)
        if self.pad is None:
            self.pad = default_pad(self.size)
        if self.size < 8:
            raise ValueError(f"input size S={self.size} is too small")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold} must lie in (0, 1)")
        if self.pixel_size is not None and not 0 < float(self.pixel_size) < float("inf"):
            raise ValueError(f"pixel size {self.pixel_size} µm must be positive")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))  # asdict turns trained_scale into a dict too

    @classmethod
    def from_json(cls, text: str) -> ModelSettings:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StSModel:
    """A rough and/or a fine network with their settings."""

    settings: ModelSettings
    rough: UNet | None = None
    fine: UNet | None = None

    def __post_init__(self) -> None:
        if self.rough is None and self.fine is None:
            raise ValueError("a model needs a rough net, a fine net or both")
        for net in (self.rough, self.fine):
            if net is None:
                continue
            if net.in_channels != self.settings.in_channels:
                raise ValueError("network channels differ from the settings' in_channels")
            if self.settings.size % 2**net.depth:
                raise ValueError(f"S={self.settings.size} is not divisible by 2**depth={2**net.depth}")

    def describe(self) -> str:
        """One line for the user: stages, S and what it was trained on."""
        stages = "+".join(s for s, n in (("rough", self.rough), ("fine", self.fine)) if n is not None)
        s = self.settings
        text = f"{stages}, S={s.size}, {s.in_channels} ch"
        if s.trained_scale is not None:
            text += f", rough scale {s.trained_scale.median:g} px/px"
        if s.pixel_size:
            text += f" at {s.pixel_size:g} µm/px"
        return text + (f", trained on {s.trained_on}" if s.trained_on else "")

    def lineage(self) -> str:
        """For a fine-tuned model (``segthenseg-train --from-model``): its parent (name and SHA-256 of
        the file), the number of images it was tuned on and their fingerprint; else empty."""
        notes = self.settings.notes
        parent = notes.get("parent")
        if not isinstance(parent, dict):
            return ""
        text = f"fine-tuned from {parent.get('name', '?')} (SHA-256 {str(parent.get('sha256', '?'))[:12]})"
        if "images" in notes:
            text += f" on {notes['images']} image(s)"
        if "data_fingerprint" in notes:
            text += f" (data fingerprint {str(notes['data_fingerprint'])[:12]})"
        return text


def _net_payload(net: UNet | None, half: bool) -> dict | None:
    if net is None:
        return None
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    return {"arch": json.dumps(net.architecture()), "state": state}


def save_model(model: StSModel, path: str | os.PathLike, half: bool = False) -> Path:
    """Write ``model`` atomically (a temp file renamed into place); ``half`` stores fp16 weights.

    A full disk raises ``OSError`` and leaves an existing file at ``path`` as it was."""
    return save_sealed({
        "format": FORMAT,
        "version": VERSION,
        "settings": model.settings.to_json(),
        "rough": _net_payload(model.rough, half),
        "fine": _net_payload(model.fine, half),
    }, path)


def _read_net(entry: object, name: str) -> UNet | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or "arch" not in entry or "state" not in entry:
        raise ModelFileError(f"model file: '{name}' network entry is malformed")
    try:
        net = build_network(json.loads(entry["arch"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in entry["state"].items()}
        net.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"model file: '{name}' network does not load: {exc}") from exc
    return net.eval()


def bundled_model_path() -> Path:
    """Where the default model ships inside the package."""
    return Path(str(resources.files("napari_segthenseg") / "data" / "default_model.pt"))


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``"default"`` names the bundled model; a training run's folder means its ``model.pt`` (the
    one rule for every command and the plugin); anything else is a file path."""
    if str(path) == DEFAULT_MODEL_NAME:
        p = bundled_model_path()
        if not p.is_file():
            raise FileNotFoundError("no bundled default model is installed with this package")
        return p
    p = Path(path)
    if p.is_dir():
        if (p / RUN_MODEL_NAME).is_file():
            return p / RUN_MODEL_NAME
        raise ModelFileError(f"{p} is a folder without a {RUN_MODEL_NAME}, not a model file (a training run "
                             f"writes DIR/{RUN_MODEL_NAME})")
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    return p


def load_model(path: str | os.PathLike) -> StSModel:
    """Load a model file (or ``"default"``) without executing any code; raise ModelFileError."""
    p = resolve_model_path(path)
    try:
        payload = load_checked(p, "napari-segthenseg model file", FORMAT, READABLE_VERSIONS, sealed_from=2)
    except FileProblem as exc:
        raise ModelFileError(str(exc)) from None
    try:
        settings = ModelSettings.from_json(payload["settings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{p}: settings are unreadable: {exc}") from exc
    try:
        return StSModel(settings, _read_net(payload.get("rough"), "rough"),
                        _read_net(payload.get("fine"), "fine"))
    except ModelFileError:
        raise
    except ValueError as exc:
        raise ModelFileError(f"{p}: {exc}") from exc
