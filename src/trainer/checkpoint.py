"""Atomic training checkpoints: a run killed at any moment resumes from the last finished epoch.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
over the old one (``os.replace`` is atomic), so the file on disk is always a complete epoch.
It holds only tensors and plain Python values and is read back with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from napari_segthenseg.engine.atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "napari-segthenseg/train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (corrupt, foreign, or from different settings)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    with atomic_write(path) as fh:
        fh.write(data)


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write the training state ``state`` (tensors, dicts, lists, numbers, strings) atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    path = Path(out) / CHECKPOINT_NAME
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``out``, or ``None`` if there is none."""
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a segthenseg-train checkpoint of version {VERSION}")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume when settings that shape the networks or the data have changed."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError("cannot resume: settings differ from the checkpoint's (" + "; ".join(diffs)
                              + "). Use the original options or a new --out folder.")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All epochs so far, one row each (rewritten atomically, so a kill never leaves half a row)."""
    if not rows:
        return
    fields = list(rows[0])
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)
