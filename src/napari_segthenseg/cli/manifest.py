"""What each finished image in a ``segthenseg-predict --out`` folder was made with.

``DIR/segthenseg-predict.json`` records, per output stem, the model file's SHA-256, the options that
change the output (``--rough-scale``, ``--labels``, ``--format``, ``--geojson``, the boxes file of
``--boxes`` (its SHA-256), ``--pixel-size``, and ``--chunk`` and ``--group-zoom`` for OME-Zarr
outputs) and the input file (path, size, modification time). A rerun skips an image only when its
outputs are complete (its boxes file exists) **and** this record matches what is asked now; anything
else is redone and the reason said, as ``make`` would. The file is written atomically after each
image, after its boxes file, so a killed run never records an image it did not finish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..engine.atomic import write_bytes

MANIFEST_NAME = "segthenseg-predict.json"
FORMAT = "napari-segthenseg/predict-outputs"
VERSION = 1


def input_stamp(path: Path) -> dict[str, object]:
    """Which input an output came from: its path, and for a file its size and modification time."""
    stamp: dict[str, object] = {"path": str(path.resolve())}
    if path.is_file():
        st = path.stat()
        stamp.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    return stamp


@dataclass(frozen=True)
class Recipe:
    """What a run is asked to make an image with."""

    model: str  # how the user named it (shown in messages)
    model_sha256: str
    rough_scale: float | None
    labels: bool
    format: str  # as asked: auto, tif or ome-zarr
    chunk: int  # matters for OME-Zarr outputs only
    geojson: bool = False  # QuPath detections written too
    boxes_sha256: str | None = None  # boxes given by hand (--boxes): the file's SHA-256
    pixel_size: float | None = None  # --pixel-size (µm), instead of what the files record
    group_zoom: float | None = None  # slides' shared crops (--group-zoom; None: one crop per box)

    def entry(self, path: Path, outputs: list[Path], zarr_out: bool) -> dict[str, object]:
        """The record of one finished image."""
        return {"input": input_stamp(path), "model": self.model, "model_sha256": self.model_sha256,
                "rough_scale": self.rough_scale, "labels": self.labels, "format": self.format,
                "written_as": "ome-zarr" if zarr_out else "tif", "chunk": self.chunk if zarr_out else None,
                "geojson": self.geojson, "boxes_sha256": self.boxes_sha256, "pixel_size": self.pixel_size,
                "group_zoom": self.group_zoom if zarr_out else None,
                "outputs": [p.name for p in outputs]}

    def differences(self, entry: dict[str, object], path: Path) -> str | None:
        """Why an image recorded as ``entry`` must be made again for this recipe (None: it need not)."""
        if entry.get("model_sha256") != self.model_sha256:
            return (f"made with another model (SHA-256 {str(entry.get('model_sha256'))[:12]}…, now "
                    f"{self.model_sha256[:12]}…)")
        changed = [f"{name} {entry.get(key, default)!r} -> {now!r}" for name, key, now, default in (
            ("--rough-scale", "rough_scale", self.rough_scale, None),
            ("--labels", "labels", self.labels, None), ("--geojson", "geojson", self.geojson, False),
            ("--boxes", "boxes_sha256", self.boxes_sha256, None),
            ("--pixel-size", "pixel_size", self.pixel_size, None))
            if entry.get(key, default) != now]
        if self.format not in (entry.get("format"), entry.get("written_as")):
            changed.append(f"--format {entry.get('format')!r} -> {self.format!r}")
        if entry.get("chunk") is not None and entry.get("chunk") != self.chunk:
            changed.append(f"--chunk {entry.get('chunk')} -> {self.chunk}")
        if entry.get("written_as") == "ome-zarr" and entry.get("group_zoom") != self.group_zoom:
            changed.append(f"--group-zoom {entry.get('group_zoom') or 0:g} -> {self.group_zoom or 0:g}")
        if changed:
            return "made with other options (" + ", ".join(changed) + ")"
        if entry.get("input") != input_stamp(path):
            return "its input file changed since"
        return None


class Manifest:
    """The records of one output folder; a missing or unreadable file holds no records."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST_NAME
        self.images: dict[str, dict[str, object]] = {}
        self.problem: str | None = None
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError("not a segthenseg-predict record")
            self.images = dict(data["images"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.problem = f"{self.path} is unreadable ({exc}); every image is made again"

    def why_redo(self, stem: str, path: Path, recipe: Recipe) -> str | None:
        """None when the finished outputs of ``stem`` were made from ``path`` with ``recipe``."""
        entry = self.images.get(stem)
        if entry is None:
            return "no record of the model and options that made them"
        return recipe.differences(entry, path)

    def record(self, stem: str, entry: dict[str, object]) -> None:
        self.images[stem] = entry
        text = json.dumps({"format": FORMAT, "version": VERSION, "images": self.images}, indent=1)
        write_bytes(self.path, (text + "\n").encode())
