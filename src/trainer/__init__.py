"""Headless training for napari-segthenseg (``segthenseg-train``; no napari import): data, augmentation,
the training loops, checkpoints, losses and metrics. It reuses the engine's networks, box rules, image
reading and normalisation."""
