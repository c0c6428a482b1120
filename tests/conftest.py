"""Shared fixtures: real data (the full sets when present, else the few dsb2018 images in tests/data),
data subsets and tiny random models.

The full data sets are looked for in ``$SEGTHENSEG_DATA`` (default: ``../shared/data`` beside the
repository). Without them every test still runs: ``dsb_dir`` falls back to ``tests/data/dsb2018``
(9 CC0 images, see its README); only tests that ask for ``data_root`` itself skip.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_segthenseg.engine import ModelSettings, StSModel, UNet, bundled_model_path, load_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGTHENSEG_DATA", REPO.parent / "shared" / "data"))
BUNDLED_DSB = REPO / "tests" / "data" / "dsb2018"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder of full data sets (dsb2018, kvasir_seg, ...); skips the test when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"full data sets not found at {DATA} (set SEGTHENSEG_DATA)")
    return DATA


def find_dsb_dir() -> Path:
    """The full dsb2018 folder under ``DATA`` when it is there, else the bundled 9-image subset."""
    full = DATA / "dsb2018"
    return full if (full / "images").is_dir() else BUNDLED_DSB


@pytest.fixture(scope="session")
def dsb_dir() -> Path:
    """A dsb2018-layout folder (images/, masks/, splits.json with train and val): the full set or the
    bundled subset (6 train + 3 val images), so tests that use it never skip."""
    return find_dsb_dir()


@pytest.fixture(scope="session")
def dsb_image(dsb_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real val image with many nuclei (RGB uint8) and its instance mask: the first non-square val
    image (the same 320 x 256 image, 70 nuclei, in the full set and in the bundled subset)."""
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


def copy_subset(dsb_dir: Path, dest: Path, splits: dict[str, list[str]]) -> Path:
    """A data folder at ``dest`` holding only the named dsb2018 stems, with ``splits`` as splits.json."""
    for d in ("images", "masks"):
        (dest / d).mkdir(parents=True)
        for stem in dict.fromkeys(s for stems in splits.values() for s in stems):
            shutil.copy(dsb_dir / d / f"{stem}.png", dest / d / f"{stem}.png")
    (dest / "splits.json").write_text(json.dumps(splits))
    return dest


def first_stems(dsb_dir: Path, train: int, val: int) -> dict[str, list[str]]:
    """The first ``train`` and ``val`` stems of dsb2018's own splits."""
    splits = json.loads((dsb_dir / "splits.json").read_text())
    return {"train": splits["train"][:train], "val": splits["val"][:val]}


def random_boxes(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """``n`` random (y0, x0, y1, x1) boxes of any size inside an ``h x w`` image."""
    y0, x0 = rng.integers(0, h - 1, n), rng.integers(0, w - 1, n)
    return np.stack([y0, x0, np.minimum(h, y0 + rng.integers(1, h, n)),
                     np.minimum(w, x0 + rng.integers(1, w, n))], 1)


@pytest.fixture(scope="session")
def default_model() -> StSModel:
    if not bundled_model_path().is_file():
        pytest.skip("no bundled default model in this checkout")
    return load_model("default")


def make_tiny_model(size: int = 32, channels: int = 3, rough: bool = True, fine: bool = True,
                    seed: int = 0) -> StSModel:
    """A random 4-base-feature U-Net pair: fast, deterministic, meaningless output."""
    torch.manual_seed(seed)
    net = lambda: UNet(channels, width=4, depth=2).eval()  # noqa: E731
    return StSModel(ModelSettings(size=size, in_channels=channels),
                    net() if rough else None, net() if fine else None)


class ThresholdNet(UNet):
    """A "network" that marks pixels brighter than mid-grey (after normalisation): predictable
    rough masks and fine results for synthetic data, so box rules can be checked end to end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x.mean(dim=1, keepdim=True) - 0.5)


def make_threshold_model(size: int = 32, channels: int = 1) -> StSModel:
    """Both stages :class:`ThresholdNet` (not saved to a file: a loaded copy is a plain U-Net)."""
    net = lambda: ThresholdNet(channels, width=4, depth=2).eval()  # noqa: E731
    return StSModel(ModelSettings(size=size, in_channels=channels), net(), net())


@pytest.fixture
def tiny_model() -> StSModel:
    return make_tiny_model()


def flip_middle(path, n: int = 8) -> None:
    """Invert ``n`` bytes in the middle of the largest tensor stored in a checkpoint (a zip archive;
    the exact middle of a small file can be alignment padding, which holds no data)."""
    with zipfile.ZipFile(path) as z:
        rec = max(z.infolist(), key=lambda i: i.compress_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[rec.header_offset + 26:rec.header_offset + 30])
    mid = rec.header_offset + 30 + name_len + extra_len + rec.compress_size // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    path.write_bytes(bytes(raw))


def record_calls(monkeypatch) -> list[Path]:
    """The files segthenseg-predict's predict_file is called for (it still runs)."""
    from napari_segthenseg.cli import predict as predict_mod

    calls: list[Path] = []
    real = predict_mod.predict_file

    def spy(engine, f, *args, **kwargs):
        calls.append(f)
        return real(engine, f, *args, **kwargs)

    monkeypatch.setattr(predict_mod, "predict_file", spy)
    return calls
