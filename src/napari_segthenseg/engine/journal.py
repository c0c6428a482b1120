"""A slide run's journal on disk, so that a killed run goes on where it stopped.

A :class:`~.slide.ChunkedOutput` with a journal records, in one folder beside its output, the
rough result as soon as the fine pass starts (the boxes and the intensity windows, with a key
saying what they were made from: model, options, input) and then each output chunk once it is
final (its own task and the parts of its neighbours' boxes written). A rerun with the same key
reads it back (:func:`load_journal`) and segments only the chunks not listed, with the same boxes
and windows, so its result is the one an uninterrupted run writes (docs/WHOLE_SLIDES.md).

Files: ``boxes.npy`` and ``windows.npz`` (written atomically), then ``journal.json`` (atomically,
last: its presence means the two are complete), and ``done.txt``, one ``y0 x0 y1 x1`` line per final
chunk, appended and flushed (a line cut short by a kill is ignored: that chunk is done again).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .grid import Region, boxes_by_chunk, tiles
from .localnorm import Windows, windows_from_arrays, windows_to_arrays

FORMAT = "napari-segthenseg/slide-journal"
VERSION = 1


@dataclass
class SlideJournal:
    """Where a chunked run records its progress. ``key`` says what the run was made with (compared
    by the caller on a rerun); ``done`` holds the chunks already final (from a killed run)."""

    folder: Path
    key: dict
    hw: tuple[int, int] | None = None
    chunk: int | None = None
    boxes: np.ndarray | None = None
    stats: Windows | None = None
    done: set[Region] = field(default_factory=set)

    @property
    def resumes(self) -> bool:
        """Whether it holds a killed run's rough result (then :meth:`started` keeps it)."""
        return self.boxes is not None

    def started(self, boxes: np.ndarray, stats: Windows, hw: tuple[int, int], chunk: int) -> None:
        """The fine pass starts with these boxes and windows: record them (a new run only)."""
        if self.resumes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "done.txt").unlink(missing_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
        write_bytes(self.folder / "boxes.npy", buf.getvalue())
        buf = io.BytesIO()
        np.savez(buf, **windows_to_arrays(stats))
        write_bytes(self.folder / "windows.npz", buf.getvalue())
        head = {"format": FORMAT, "version": VERSION, "key": self.key, "hw": list(hw), "chunk": int(chunk),
                "boxes": len(boxes)}
        write_bytes(self.folder / "journal.json", (json.dumps(head, indent=1) + "\n").encode())
        self.hw, self.chunk, self.boxes, self.stats = (int(hw[0]), int(hw[1])), int(chunk), boxes, stats

    def remaining(self) -> list[Region]:
        """The output chunks (of a killed run's boxes) not yet final, row by row."""
        if self.boxes is None or self.hw is None or self.chunk is None:
            raise ValueError("this journal holds no run")
        index = boxes_by_chunk(self.boxes, self.hw, self.chunk)
        return [r for r in tiles(self.hw, self.chunk)
                if (r[0] // self.chunk, r[1] // self.chunk) in index and r not in self.done]

    def finished(self, region: Region) -> None:
        """One output chunk is final."""
        with open(self.folder / "done.txt", "a") as fh:
            fh.write(" ".join(str(int(v)) for v in region) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add(tuple(int(v) for v in region))  # type: ignore[arg-type]


def load_journal(folder: Path) -> SlideJournal | None:
    """The journal a killed run left in ``folder``, or None (none, or not readable: start over)."""
    try:
        head = json.loads((folder / "journal.json").read_text())
        if head.get("format") != FORMAT or head.get("version") != VERSION:
            return None
        boxes = np.load(folder / "boxes.npy", allow_pickle=False)
        with np.load(folder / "windows.npz", allow_pickle=False) as data:
            stats = windows_from_arrays(dict(data))
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != head["boxes"]:
            return None
        hw = (int(head["hw"][0]), int(head["hw"][1]))
        journal = SlideJournal(folder, dict(head["key"]), hw, int(head["chunk"]), boxes.astype(np.int64),
                               stats)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    done = folder / "done.txt"
    if done.is_file():
        for line in done.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and all(p.isdigit() for p in parts):
                journal.done.add(tuple(int(p) for p in parts))  # type: ignore[arg-type]
    return journal
