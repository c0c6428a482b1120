"""Training checkpoints that survive kills, damage and full disks.

* A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
  over the old one (``os.replace`` is atomic), so ``checkpoint.pt`` is always a complete epoch.
* Before it is replaced, the previous checkpoint is kept as ``checkpoint.prev.pt`` (a hard link:
  no bytes copied), so a checkpoint damaged on disk later still leaves one to resume from.
* It holds only tensors and plain values, carries a SHA-256 of its content (the engine's
  ``integrity.seal``) and is read back with ``weights_only=True`` (``integrity.safe_load``): a
  file with flipped bytes, a truncated, empty or foreign file is refused with a message that
  says which, and never with advice to load it unsafely.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_segthenseg.engine.atomic import write_bytes
from napari_segthenseg.engine.integrity import FileProblem, load_checked, save_sealed

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
DAMAGED_NAME = "checkpoint.damaged.pt"
FORMAT = "napari-segthenseg/train-checkpoint"
# 2: SHA-256 of the content and a fingerprint of the training data. Version 1 files (no
# checksum, no fingerprint) still resume, with a warning that neither can be checked.
VERSION = 2
READABLE_VERSIONS = (1, 2)
WHAT = "training checkpoint"
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (damaged, foreign, or from different settings or data)."""


class WriteFailed(RuntimeError):
    """A file of the run could not be written (full disk, permissions); the message says what is kept."""


def _keep_previous(path: Path, prev: Path) -> None:
    """Make ``prev`` a copy of ``path`` (hard link where the file system has them)."""
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise
        write_bytes(prev, path.read_bytes())  # no hard links here (e.g. FAT, some network shares)
        return
    os.replace(tmp, prev)


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write the training state (tensors, dicts, lists, numbers, strings) atomically, with a checksum.

    The checkpoint it replaces becomes ``checkpoint.prev.pt``.
    """
    path = Path(out) / CHECKPOINT_NAME
    if path.is_file():
        _keep_previous(path, Path(out) / PREVIOUS_NAME)
    return save_sealed({"format": FORMAT, "version": VERSION, **state}, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, checked; :class:`CheckpointError` says what is wrong with it."""
    try:
        return load_checked(path, WHAT, FORMAT, READABLE_VERSIONS, sealed_from=2)
    except FileProblem as exc:
        raise CheckpointError(str(exc)) from None


def holds_run(out: Path) -> bool:
    return (Path(out) / CHECKPOINT_NAME).exists() or (Path(out) / PREVIOUS_NAME).exists()


@dataclass
class Resumable:
    """The checkpoint a resumed run continues from."""

    state: dict[str, Any]
    path: Path
    problem: str | None = None  # why the latest checkpoint was not used (``path`` is then the previous)

    @property
    def version(self) -> int:
        return int(self.state["version"])


def find_resumable(out: Path) -> Resumable | None:
    """The latest usable checkpoint: ``checkpoint.pt``, else ``checkpoint.prev.pt``; ``None`` if none.

    Raises :class:`CheckpointError` (saying how to start over) when neither can be used.
    """
    out = Path(out)
    latest, prev = out / CHECKPOINT_NAME, out / PREVIOUS_NAME
    if not holds_run(out):
        return None
    if latest.exists():
        try:
            return Resumable(read_checkpoint(latest), latest)
        except CheckpointError as exc:
            problem = str(exc)
    else:
        problem = f"{latest} is missing"
    if prev.exists():
        try:
            return Resumable(read_checkpoint(prev), prev, problem)
        except CheckpointError as exc:
            problem += f"; the previous checkpoint cannot be used either: {exc}"
    else:
        problem += f"; there is no previous checkpoint ({PREVIOUS_NAME}) to fall back on"
    raise CheckpointError(f"cannot resume: {problem}. To start over, move the folder {out} away (or "
                          "delete it) or choose a new --out.")


def set_aside(out: Path) -> Path:
    """Rename an unusable ``checkpoint.pt`` to ``checkpoint.damaged.pt`` (kept for inspection), so
    the next checkpoint does not turn it into the fallback."""
    dest = Path(out) / DAMAGED_NAME
    os.replace(Path(out) / CHECKPOINT_NAME, dest)
    return dest


def remove_temporary(out: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) a killed run left beside the files ``names``."""
    gone = []
    for name in names:
        for p in Path(out).glob(f".{name}.*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume when settings that shape the networks or the data have changed."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError("cannot resume: settings differ from the checkpoint's (" + "; ".join(diffs)
                              + "). Use the original options or a new --out folder.")


def write_failed(exc: OSError, path: Path, kept: str) -> WriteFailed:
    """A :class:`WriteFailed` for ``exc`` raised while writing ``path``; ``kept`` says what is safe."""
    if exc.errno in DISK_FULL:
        reason = f"the disk is full ({exc.strerror or 'no space left on device'})"
    else:
        reason = exc.strerror or str(exc)
    return WriteFailed(f"cannot write {path}: {reason}. {kept}")


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
    write_bytes(path, buf.getvalue().encode())


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)
