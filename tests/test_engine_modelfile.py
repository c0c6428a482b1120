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
from napari_segthenseg.engine.integrity import seal
from napari_segthenseg.engine.scale import TrainedScale


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
        with pytest.raises(ModelFileError, match="refused|not a PyTorch zip") as err:
            load_model(path)
        assert "weights_only" not in str(err.value)  # never advise disabling the safe loader
    assert not marker.exists()


def test_truncated_file(tmp_path):
    p = save_model(make_tiny_model(), tmp_path / "m.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="is truncated"):
        load_model(p)


def test_flipped_bytes_are_refused_by_the_checksum(tmp_path):
    """PyTorch's zip holds no checksum it verifies: without ours, damaged weights load silently."""
    p = save_model(make_tiny_model(), tmp_path / "m.pt")
    data = bytearray(p.read_bytes())
    payload = torch.load(p, weights_only=True)
    key = next(k for k, v in payload["fine"]["state"].items() if v.numel() > 64 and v.is_floating_point())
    raw = payload["fine"]["state"][key].numpy().tobytes()
    at = bytes(data).index(raw[:64])  # the tensor's bytes are stored as they are
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    p.write_bytes(bytes(data))
    assert torch.load(p, weights_only=True)  # PyTorch itself does not notice
    with pytest.raises(ModelFileError, match="damaged"):
        load_model(p)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (os.urandom(4096), "not a PyTorch zip archive"),
])
def test_messages_say_what_is_wrong(tmp_path, content, message):
    p = tmp_path / "m.pt"
    p.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model(p)
    assert "run code" not in str(err.value)


def test_a_folder_is_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="is a folder"):
        load_model(tmp_path)


def test_a_training_run_folder_means_its_model_pt(tmp_path):
    """One rule for every command and the plugin: a run folder given as a model is its model.pt."""
    from napari_segthenseg.engine import resolve_model_path

    save_model(make_tiny_model(), tmp_path / "model.pt")
    assert resolve_model_path(tmp_path) == tmp_path / "model.pt"
    assert load_model(tmp_path).settings.size == load_model(tmp_path / "model.pt").settings.size


def test_version_1_files_still_load(tmp_path):
    """Format 1 had no checksum and no trained scale: it loads, with the scale unknown."""
    m = make_tiny_model()
    p = save_model(m, tmp_path / "m.pt")
    payload = torch.load(p, weights_only=True)
    del payload["sha256"]
    payload["version"] = 1
    settings = json.loads(payload["settings"])
    del settings["trained_scale"]
    payload["settings"] = json.dumps(settings)
    torch.save(payload, tmp_path / "v1.pt")
    back = load_model(tmp_path / "v1.pt")
    assert back.settings.trained_scale is None and _same(m.fine, back.fine)


def test_trained_scale_round_trip(tmp_path):
    m = make_tiny_model()
    m.settings.trained_scale = TrainedScale.from_sizes([(256, 256), (256, 320), (520, 696)], 64)
    back = load_model(save_model(m, tmp_path / "m.pt"))
    assert back.settings.trained_scale == m.settings.trained_scale
    t = back.settings.trained_scale  # median of sqrt(h w)/S: 4, sqrt(20)=4.47, 9.39
    assert (t.median, t.low, t.high, t.window) == (4.4721, 4.0, 10.875, 286)


def test_wrong_version_and_foreign_files(tmp_path):
    m = make_tiny_model()
    p = save_model(m, tmp_path / "m.pt")
    payload = torch.load(p, weights_only=True)
    payload["version"] = 99
    torch.save(seal(payload), tmp_path / "v99.pt")
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
    torch.save(seal(payload), tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="fine"):
        load_model(tmp_path / "bad.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
