"""Headless commands on the engine: ``segthenseg-predict`` (segment files, folders and slides) and
``segthenseg-eval`` (baseline vs. StS metrics on a data folder). ``segthenseg-train`` is the
trainer's (:mod:`trainer.train`); ``segthenseg-demo`` opens napari (:mod:`napari_segthenseg.plugin`)."""
