"""The napari plugin: the dock widget and its sessions, layer conversions, npe2 readers, writers and
sample data, and ``segthenseg-demo``. Thin glue over :mod:`napari_segthenseg.engine`; the manifest
(``napari_segthenseg/napari.yaml``) names the entry points here."""
