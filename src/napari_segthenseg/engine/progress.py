"""Progress reports that the engine's steps yield (for progress bars, and Cancel between steps)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of the named step."""

    step: str
    done: int
    total: int
