"""Model file: round trip, rough-only/fine-only, and refusals (never executing code)."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch

from conftest import make_tiny_model
from napari_segthenseg.engine import (
    ModelFileError,
    ModelSettings,
    StSModel,
    UNet,
    count_parameters,
    load_model,
    save_model,
)


def test_paper_unet_has_776m_parameters():
    n = count_parameters(UNet(3, width=32, depth=4))
    assert abs(n - 7.76e6) < 0.01e6
    assert count_parameters(UNet(3, width=16, depth=4)) < n / 3.5  # width is a parameter


def test_unet_shapes():
    out = UNet(1, width=4, depth=3)(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)


def _same(a, b):
    x = torch.rand(1, a.in_channels, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_round_trip(tmp_path):
    m = make_tiny_model()
    m.settings.trained_on = "dsb2018 train"
    m.settings.notes = {"epochs": 3}
    p = save_model(m, tmp_path / "m.pt")
    back = load_model(p)
    assert back.settings == m.settings
    assert _same(m.rough, back.rough) and _same(m.fine, back.fine)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_half_storage_is_smaller_and_close(tmp_path):
    m = make_tiny_model()
    full, half = save_model(m, tmp_path / "f.pt"), save_model(m, tmp_path / "h.pt", half=True)
    assert half.stat().st_size < full.stat().st_size
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.fine(x), load_model(half).fine(x), atol=1e-2)


@pytest.mark.parametrize("rough,fine", [(True, False), (False, True)])
def test_single_stage_models(tmp_path, rough, fine):
    back = load_model(save_model(make_tiny_model(rough=rough, fine=fine), tmp_path / "m.pt"))
    assert (back.rough is not None) == rough and (back.fine is not None) == fine


def test_model_needs_a_network_and_matching_settings():
    with pytest.raises(ValueError):
        StSModel(ModelSettings())
    with pytest.raises(ValueError, match="divisible"):
        StSModel(ModelSettings(size=36), UNet(3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        StSModel(ModelSettings(in_channels=1), UNet(3, 4, 2))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    for name, writer in (
        ("torch_zip.pt", lambda p: torch.save({"format": "x", "payload": _Evil()}, p)),
        ("plain.pkl", lambda p: p.write_bytes(pickle.dumps(_Evil()))),
    ):
        path = tmp_path / name
        writer(path)
        with pytest.raises(ModelFileError, match="refused|not a readable"):
            load_model(path)
    assert not marker.exists()


def test_truncated_file(tmp_path):
    p = save_model(make_tiny_model(), tmp_path / "m.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated|refused"):
        load_model(p)


def test_wrong_version_and_foreign_files(tmp_path):
    m = make_tiny_model()
    p = save_model(m, tmp_path / "m.pt")
    payload = torch.load(p, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(ModelFileError, match="version 99"):
        load_model(tmp_path / "v99.pt")
    torch.save({"state_dict": m.fine.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not a napari-segthenseg model"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text(json.dumps({"format": "napari-segthenseg/model"}))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "text.pt")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "zip.pt")


def test_mismatched_weights(tmp_path):
    p = save_model(make_tiny_model(), tmp_path / "m.pt")
    payload = torch.load(p, weights_only=True)
    payload["fine"]["arch"] = json.dumps({"name": "unet", "in_channels": 3, "width": 8, "depth": 2})
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="fine"):
        load_model(tmp_path / "bad.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
