"""Safe loading and integrity checks for the files we write with ``torch.save``.

Model files and training checkpoints are loaded with ``torch.load(weights_only=True)``, so a
file can never run code; on top of that each file carries a SHA-256 of its content (tensors,
settings, everything but the digest itself), so a damaged file is refused instead of silently
giving wrong weights. The zip container PyTorch writes has no checksum of its own that
``torch.load`` verifies: bytes flipped inside a tensor load without complaint.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import write_bytes

DIGEST_KEY = "sha256"
ZIP_MAGIC = b"PK\x03\x04"


class FileProblem(ValueError):
    """A file that cannot be used; the message says what is wrong with it."""


def _update(h: hashlib._Hash, obj: Any) -> None:
    """Feed a canonical encoding of ``obj`` (type-tagged, dict keys sorted) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _update(h, str(key))
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)}:".encode() + data)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"V{obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (what ``sha256sum`` prints): a model's identity in predict's
    manifest and in a fine-tuned model's record of its parent."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(payload: dict[str, Any]) -> str:
    """SHA-256 of everything in ``payload`` except its own digest entry."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its digest added (what gets saved)."""
    return {**payload, DIGEST_KEY: digest(payload)}


def save_sealed(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` with its digest, atomically. It is serialised in memory first, so that a
    full disk surfaces as the ``OSError`` it is (``torch.save`` into a file wraps it in a
    ``RuntimeError``) and the file it replaces stays as it was."""
    buf = io.BytesIO()
    torch.save(seal(payload), buf)
    return write_bytes(path, buf.getbuffer())


def verify(payload: dict[str, Any], path: str | os.PathLike, what: str) -> None:
    """Raise :class:`FileProblem` when the stored digest is missing or does not match."""
    stored = payload.get(DIGEST_KEY)
    if not isinstance(stored, str):
        raise FileProblem(f"{path}: this {what} has no integrity checksum; it was not written by "
                          "napari-segthenseg or was altered")
    if stored != digest(payload):
        raise FileProblem(f"{path}: this {what} is damaged: its content does not match the checksum "
                          "written with it (a disk or copy error changed some bytes)")


def load_checked(path: str | os.PathLike, what: str, fmt: str, versions: tuple[int, ...],
                 sealed_from: int) -> dict[str, Any]:
    """Safely load one of our files: its ``format`` must be ``fmt``, its ``version`` one of
    ``versions``, and from version ``sealed_from`` on its checksum must match. Raises
    :class:`FileProblem` saying which check failed."""
    payload = safe_load(path, what)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise FileProblem(f"{path} is not a {what}")
    version = payload.get("version")
    if version not in versions:
        raise FileProblem(f"{path} is a {what} of format version {version!r}; this release reads "
                          f"{', '.join(map(str, versions))}")
    if version >= sealed_from:
        verify(payload, path, what)
    return payload


def safe_load(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` with messages that say what is actually wrong.

    Never suggests loading with ``weights_only=False``: our files hold only tensors and plain
    values, so a file that needs more is not ours and may run code.
    """
    p = Path(path)
    if p.is_dir():
        raise FileProblem(f"{p} is a folder, not a {what}")
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise FileProblem(f"{p}: cannot read this {what}: {exc.strerror or exc}") from exc
    if not head:
        raise FileProblem(f"{p} is empty (0 bytes): not a {what} (an interrupted copy or download?)")
    if head != ZIP_MAGIC:
        raise FileProblem(f"{p} is not a {what}: it is not a PyTorch zip archive "
                          f"(it starts with bytes {head!r})")
    if not zipfile.is_zipfile(p):  # the zip's directory sits at its end: gone when truncated
        raise FileProblem(f"{p} is truncated: the archive ends early (an interrupted write or copy?)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Flipped bytes in the pickled part can look like a forbidden object to the safe loader;
        # the archive's own CRC-32 (stored by the zip, never checked by torch.load) tells damage
        # apart from a file that is not ours.
        bad = _damaged_member(p)
        if bad is not None:
            raise FileProblem(f"{p}: this {what} is damaged: the data of {bad} does not match the "
                              "checksum stored in the archive (a disk or copy error changed some "
                              "bytes)") from None
        _explain(p, what, exc)
        raise


def _damaged_member(path: Path) -> str | None:
    """The first archive member whose stored CRC-32 does not match its data, if any."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return None


def _explain(p: Path, what: str, exc: BaseException) -> None:
    """Raise the :class:`FileProblem` that says what a failed ``torch.load`` means."""
    if isinstance(exc, pickle.UnpicklingError):
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise FileProblem(f"{p} was refused: it holds Python objects that would run code when "
                              f"loaded, which a {what} never does") from None
        raise FileProblem(f"{p} is damaged: its data cannot be decoded ({_first_line(exc)})") from None
    if isinstance(exc, (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError)):
        text = str(exc).lower()
        if "central directory" in text or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            raise FileProblem(f"{p} is truncated: the archive ends early (an interrupted write or "
                              "copy?)") from None
        raise FileProblem(f"{p} is damaged: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """The first line of an error, without PyTorch's advice to disable the safe loader."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line.split("Weights only load failed")[0].strip() or type(exc).__name__
