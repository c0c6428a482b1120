"""Running napari's Qt event loop from a measuring script (shared by the plugin benchmarks)."""

from __future__ import annotations

import time


def loop_until(cond, timeout: float) -> bool:
    """Run the Qt event loop (as napari does) until ``cond()`` or ``timeout`` seconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    end = time.perf_counter() + timeout
    loop = QEventLoop()
    check = QTimer()
    check.setInterval(10)
    check.timeout.connect(lambda: loop.quit() if cond() or time.perf_counter() >= end else None)
    check.start()
    while not cond() and time.perf_counter() < end:  # (re-entered if something else quit it)
        loop.exec()
    check.stop()
    return bool(cond())
