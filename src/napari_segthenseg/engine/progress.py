"""Steps: long work is a generator that yields :class:`Progress` between steps and returns its result.

:func:`guard` is the one driver of such generators; :func:`drive` runs one to its end with an
optional progress callback (the engine, ``segthenseg-predict``'s bars), and the plugin's worker
threads pass the steps on to napari with ``yield from guard(...)``. Cancelling stops at the next
step and closes the generator in the thread that drives it, so its ``finally`` blocks (chunk
threads shut down, unfinished stores removed) run there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
Steps = Generator["Progress", None, T]


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of the named step."""

    step: str
    done: int
    total: int


class Cancelled(Exception):
    """The steps were stopped by a cancel request (nothing of their result is kept)."""


def guard(steps: Steps[T], cancel: Callable[[], bool] | None = None) -> Steps[T]:
    """Pass on every step of ``steps`` and return its result; close it here, whatever happens.

    ``cancel`` is asked before each step; when it says yes, the steps are closed and
    :class:`Cancelled` is raised.
    """
    try:
        while True:
            if cancel is not None and cancel():
                raise Cancelled
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value
            yield step
    finally:
        steps.close()


def drive(steps: Steps[T], on_step: Callable[[Progress], None] | None = None,
          cancel: Callable[[], bool] | None = None) -> T:
    """Run ``steps`` to the end (``on_step`` sees each :class:`Progress`) and return the result."""
    guarded = guard(steps, cancel)
    while True:
        try:
            step = next(guarded)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(step)
