"""Headless training, evaluation and batch prediction for napari-segthenseg (no napari import)."""
