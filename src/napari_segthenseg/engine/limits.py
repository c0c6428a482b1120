"""The sizes that decide how an image is handled, each defined once (docs/WHOLE_SLIDES.md)."""

from __future__ import annotations

# An image with more pixels than this is a slide: files are read tile by tile, the plugin and
# segthenseg-predict write its segmentation chunk by chunk into an OME-Zarr, and the plugin shows
# a 0/1 mask instead of relabelling every object at each edit (seconds at this size).
LARGE_IMAGE_PX = 4096 * 4096
# A mask with more pixels than this (a slide's rough mask, or one being labelled) lives on disk
# and is labelled lazily (dask-image) instead of in memory.
IN_MEMORY_MASK_PX = 32 * 2**20
