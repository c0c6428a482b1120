"""napari-segthenseg: Segment-then-Segment for very large biomedical images."""

__version__ = "0.1.0"
