"""The bundled default model: small, loads by name, says how it was made, and segments nuclei."""

from __future__ import annotations

import numpy as np

from napari_segthenseg.engine import Engine, bundled_model_path

MAX_BYTES = 10 * 2**20


def test_size_settings_and_provenance(default_model):
    assert bundled_model_path().stat().st_size <= MAX_BYTES
    s = default_model.settings
    assert (s.size, s.in_channels, s.pad, s.normalisation) == (64, 3, 8, "minmax")
    assert default_model.rough is not None and default_model.fine is not None
    assert s.notes["select_on"] == "holdout" and s.notes["command"].startswith("segthenseg-train ")
    val = s.notes["val_metrics"]
    assert val["sts"]["dsc"] >= 0.84  # the paper's S=64 StS (84.3), as measured in docs/MODEL_CARD.md


def test_segments_a_real_val_image(default_model, dsb_image):
    image, labels = dsb_image
    gt = labels > 0
    engine = Engine(default_model, device="cpu")
    result = engine.segment(image)
    rough = engine.rough(image)
    base = engine.baseline(rough, gt.shape)

    def dice(a: np.ndarray) -> float:
        return 2 * float((a & gt).sum()) / float(a.sum() + gt.sum())

    assert len(result.boxes) > 5
    assert dice(result.mask) > 0.8 and dice(result.mask) > dice(base)
