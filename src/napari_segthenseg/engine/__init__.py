"""The Segment-then-Segment engine: pure torch + NumPy, no napari or Qt.

Typical use::

    from napari_segthenseg.engine import Engine, load_model
    result = Engine(load_model("model.pt")).segment(image)
    result.mask, result.boxes
"""

from .boxes import (
    boxes_from_mask,
    clip_boxes,
    component_boxes,
    crop_windows,
    default_pad,
    finalize_boxes,
    scale_boxes,
    square_pad_shift,
)
from .crops import cut_crops, cut_crops_lazy
from .device import available_devices, resolve_device
from .fuse import fuse, upsample_mask
from .image import ImageSource, NormStats, VolumeSource, compute_stats, match_channels
from .modelfile import (
    DEFAULT_MODEL_NAME,
    ModelFileError,
    ModelSettings,
    StSModel,
    bundled_model_path,
    load_model,
    resolve_model_path,
    save_model,
)
from .pipeline import Engine, SegmentResult, segment
from .rough import RoughResult
from .unet import UNet, build_network, count_parameters
from .volume import VolumeOptions, VolumeResult, segment_volume, walk_volume

__all__ = [
    "DEFAULT_MODEL_NAME", "Engine", "ImageSource", "ModelFileError", "ModelSettings", "NormStats",
    "RoughResult", "SegmentResult", "StSModel", "UNet", "available_devices", "boxes_from_mask",
    "build_network", "bundled_model_path", "clip_boxes", "component_boxes", "compute_stats",
    "count_parameters", "crop_windows", "cut_crops", "cut_crops_lazy", "default_pad",
    "finalize_boxes", "fuse", "load_model", "match_channels", "resolve_device",
    "resolve_model_path", "save_model", "scale_boxes", "segment", "segment_volume", "square_pad_shift",
    "upsample_mask", "VolumeOptions", "VolumeResult", "VolumeSource", "walk_volume",
]
