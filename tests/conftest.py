"""Shared fixtures: the real data folder (skipped when absent) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_segthenseg.engine import ModelSettings, StSModel, UNet

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGTHENSEG_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA} (set SEGTHENSEG_DATA)")
    return DATA


@pytest.fixture(scope="session")
def dsb_dir(data_root: Path) -> Path:
    d = data_root / "dsb2018"
    if not (d / "images").is_dir():
        pytest.skip(f"dsb2018 not found under {data_root}")
    return d


@pytest.fixture(scope="session")
def dsb_image(dsb_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real val image with many nuclei (RGB uint8) and its instance mask."""
    import json

    from skimage import io

    ids = json.loads((dsb_dir / "splits.json").read_text())["val"]
    best = None
    for i in ids:
        img_path = dsb_dir / "images" / f"{i}.png"
        shape = io.imread(img_path).shape
        if shape[0] != shape[1] and shape[0] >= 256:
            best = i
            break
    best = best or ids[0]
    return io.imread(dsb_dir / "images" / f"{best}.png"), io.imread(dsb_dir / "masks" / f"{best}.png")


def make_tiny_model(size: int = 32, channels: int = 3, rough: bool = True, fine: bool = True,
                    seed: int = 0) -> StSModel:
    """A random 4-base-feature U-Net pair: fast, deterministic, meaningless output."""
    torch.manual_seed(seed)
    net = lambda: UNet(channels, width=4, depth=2).eval()  # noqa: E731
    return StSModel(ModelSettings(size=size, in_channels=channels),
                    net() if rough else None, net() if fine else None)


@pytest.fixture
def tiny_model() -> StSModel:
    return make_tiny_model()
