"""npe2 sample data: one real dsb2018 / BBBC038v1 nuclei image (CC0) shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_NAME = "nuclei (BBBC038v1)"


def sample_path() -> Path:
    return Path(str(resources.files("napari_segthenseg") / "data" / "sample_nuclei.png"))


def load_sample_image() -> np.ndarray:
    """The sample as an ``(H, W, 3)`` uint8 array."""
    from imageio.v3 import imread

    return np.asarray(imread(sample_path()))[..., :3]


def sample_nuclei() -> list[tuple]:
    """napari layer data for *File > Open Sample*."""
    return [(load_sample_image(), {"name": SAMPLE_NAME, "rgb": True}, "image")]
