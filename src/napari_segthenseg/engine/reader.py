"""One image reader for the engine, the trainer and ``segthenseg-predict``.

Opens PNG/JPEG (decoded), TIFF/BigTIFF/OME-TIFF/SVS/NDPI (tifffile; tiles decoded on demand
through its zarr store, with imagecodecs for JPEG/JPEG 2000 tiles) and OME-Zarr folders
(the ome-zarr library). Every format ends as the same thing: a pyramid of 2D arrays
``(H, W)`` or ``(H, W, C)``, largest first, lazy where the format allows.

What is colour and what is a stack is decided from the file's own metadata (TIFF photometric
and extra samples, OME/ImageJ/NGFF axes), never from the array shape alone: a ``(3, H, W)``
array is a colour image only when the file says so. What cannot be told apart is refused with
a message that says how to fix it. The rules, in one place (docs/WHOLE_SLIDES.md):

* ``Y``/``X`` are the plane; axes of length 1 are dropped;
* TIFF samples ``S`` stored last with photometric RGB are colour (extra samples, i.e. alpha,
  dropped); gray + alpha keeps the gray; samples stored as planes (``SYX``) are refused, as that
  is also how a 3-slice stack saved without metadata looks;
* a channel axis ``C`` (OME, ImageJ, NGFF) of 3 is taken as colour channels; 2 or more than 3
  channels are refused (the networks take gray or RGB);
* any other axis longer than 1 (``Z``, ``T``, unknown ``Q``/``I``) is a stack: refused, unless
  the caller opens a *volume* (``open_image(path, volume=True)``, docs/VOLUMES.md): then one
  ``Z`` axis, or one unnamed page axis (``Q``/``I``, a plain multi-page TIFF), is the volume's
  z axis and the levels are ``(Z, H, W)`` or ``(Z, H, W, C)``; a time axis ``T`` (or two stack
  axes) is still refused, with a message that says so.

The physical pixel size (µm per pixel) is read where the file records it: OME-XML ``PhysicalSizeX/Y``
(OME-TIFF), the Aperio description's ``MPP`` (SVS), the TIFF resolution tags in pixels per centimetre
(NDPI and other scanners' TIFFs; inches are left alone, as 72 dpi is every editor's default), ImageJ's
``unit=micron``, and NGFF ``coordinateTransformations`` scales with ``space`` axis units (OME-Zarr).
Anything else, or a value outside 0.01-100 µm, is unknown (None).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .limits import LARGE_IMAGE_PX

PLAIN_EXTENSIONS = (".png", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn", ".qptiff")
IMAGE_EXTENSIONS = PLAIN_EXTENSIONS + TIFF_EXTENSIONS
LAZY_MIN_PIXELS = LARGE_IMAGE_PX  # TIFFs with more pixels than this are read tile by tile
LEVEL_TOLERANCE = 0.02  # relative disagreement allowed between a level's y and x downsampling
Z_AXES = "ZQI"  # axes a volume's slices may lie along: named z, or unnamed pages


class ImageFileError(ValueError):
    """A file that cannot be read as a 2D image; the message names the file and the reason."""


@dataclass
class OpenedImage:
    """An open image file: its pyramid (largest level first) and what kind of file it is."""

    path: Path
    levels: list  # (H, W) or (H, W, C) arrays (a volume: (Z, H, W[, C])): NumPy, or dask on demand
    kind: str
    _closers: list = field(default_factory=list, repr=False)
    pixel_size: float | None = None  # µm per pixel of level 0, when the file records it
    volume: bool = False  # the levels have a leading z axis (opened with ``volume=True``)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.levels[0].shape)

    @property
    def lazy(self) -> bool:
        return not isinstance(self.levels[0], np.ndarray)

    def describe(self) -> str:
        plane = self.shape[1:] if self.volume else self.shape
        h, w = plane[:2]
        colour = f"{plane[2]} channels" if len(plane) == 3 else "gray"
        pyramid = f", {len(self.levels)} levels" if len(self.levels) > 1 else ""
        depth = f" x {self.shape[0]} slices" if self.volume else ""
        size = f", {self.pixel_size:.4g} µm/px" if self.pixel_size else ""
        return f"{self.kind}, {w} x {h} px{depth}, {colour}, {np.dtype(self.levels[0].dtype)}{pyramid}{size}"

    def close(self) -> None:
        for closer in self._closers:
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_image_path(path: Path) -> bool:
    """A file we can read, or an OME-Zarr folder."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return is_ome_zarr(path)
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def stem_of(path: str | os.PathLike) -> str:
    """The name outputs and layers are named after (``slide.ome.tif`` -> ``slide``)."""
    name = Path(path).name
    for ext in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in (".zattrs", "zarr.json", ".zgroup"))


def open_image(path: str | os.PathLike, volume: bool = False) -> OpenedImage:
    """Open ``path`` as a pyramid of 2D images; raise :class:`ImageFileError` naming the file.

    With ``volume``, a z-stack is accepted too (``opened.volume`` then says which it is).
    """
    p = Path(path)
    if not p.exists():
        raise ImageFileError(f"{p}: no such file or folder")
    try:
        if p.is_dir():
            if not is_ome_zarr(p):
                raise ImageFileError(f"{p}: a folder that is not an OME-Zarr image")
            opened = _open_ome_zarr(p, volume)
        elif p.suffix.lower() in TIFF_EXTENSIONS:
            opened = _open_tiff(p, volume)
        elif p.suffix.lower() in PLAIN_EXTENSIONS:
            opened = _open_plain(p)
        else:
            raise ImageFileError(f"{p}: unknown image type {p.suffix!r} (readable: "
                                 f"{', '.join(IMAGE_EXTENSIONS)} files and OME-Zarr folders)")
    except ImageFileError:
        raise
    except Exception as exc:  # decoders raise many types; all mean "unreadable"
        first = (str(exc).splitlines() or [""])[0]
        raise ImageFileError(f"{p}: cannot read image ({type(exc).__name__}: {first})") from exc
    _check_levels(opened)
    return opened


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The full-resolution image of ``path``, decoded: ``(H, W)`` or ``(H, W, 3)``."""
    with open_image(path) as opened:
        base = opened.levels[0]
        try:
            arr = np.asarray(base.compute() if hasattr(base, "compute") else base)
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise ImageFileError(f"{path}: cannot decode pixels ({type(exc).__name__}: {first})") from exc
    if arr.dtype.kind not in "biuf":
        raise ImageFileError(f"{path}: pixel type {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageFileError(f"{path}: contains NaN or infinite values")
    return arr


# -- formats -------------------------------------------------------------------------------
def _open_plain(p: Path) -> OpenedImage:
    import imageio.v3 as iio

    arr = np.asarray(iio.imread(p, plugin="pillow"))  # palette images come back as RGB(A)
    if arr.ndim == 3:
        arr = _drop_alpha(arr, p, alpha=arr.shape[2] in (2, 4))
    return OpenedImage(p, [arr], p.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def _drop_alpha(arr, p: Path, alpha: bool):
    """Channel-last ``arr`` -> gray or RGB: gray + alpha keeps gray, RGBA keeps RGB."""
    c = arr.shape[-1]
    if c == 1:
        return arr[..., 0]
    if c == 3:
        return arr
    if alpha and c == 2:
        return arr[..., 0]
    if alpha and c == 4:
        return arr[..., :3]
    raise ImageFileError(f"{p}: {c} colour samples per pixel; the networks take gray or RGB")


def _open_tiff(p: Path, volume: bool = False) -> OpenedImage:
    import tifffile

    tif = tifffile.TiffFile(p)
    try:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        page = series.keyframe
        kind = _tiff_kind(tif, series)
        plan = _tiff_axes_plan(p, axes, shape, page, volume)
        # A volume's slices count too: a long stack is read slice by slice, never decoded whole.
        counted = "YX" + (Z_AXES if plan.volume else "")
        n_pixels = int(np.prod([n for a, n in zip(axes, shape, strict=True) if a in counted]))
        size = tiff_pixel_size(tif)
        if len(series.levels) == 1 and n_pixels <= LAZY_MIN_PIXELS:
            arr = plan(series.asarray())
            tif.close()
            return OpenedImage(p, [arr], kind, volume=plan.volume, pixel_size=size)
        import dask.array as da
        import zarr

        store = series.aszarr()
        node = zarr.open(store, mode="r")
        arrays = [node] if hasattr(node, "shape") else [node[str(i)] for i in range(len(series.levels))]
        levels = [plan(da.from_zarr(a)) for a in arrays]
        return OpenedImage(p, levels, kind, [store.close, tif.close], volume=plan.volume, pixel_size=size)
    except BaseException:
        tif.close()
        raise


def _tiff_kind(tif, series) -> str:
    name = "OME-TIFF" if tif.is_ome else "SVS" if tif.is_svs else "NDPI" if tif.is_ndpi else "TIFF"
    if tif.is_bigtiff and name == "TIFF":
        name = "BigTIFF"
    return f"pyramidal {name}" if len(series.levels) > 1 else name


def _tiff_axes_plan(p: Path, axes: str, shape: tuple[int, ...], page, volume: bool = False):
    """A function turning an array with ``axes`` into ``(H, W)``/``(H, W, C)``; checks first."""
    import tifffile

    photometric = getattr(page, "photometric", None)
    rgb = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
    extras = tuple(getattr(page, "extrasamples", ()) or ())
    return _axes_plan(p, axes, shape, samples_are_colour=rgb, alpha=bool(extras), volume=volume)


def _axes_plan(p: Path, axes: str, shape: tuple[int, ...], samples_are_colour: bool, alpha: bool,
               volume: bool = False):
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes:
        raise ImageFileError(f"{p}: axes {axes} have no Y and X plane")
    keep = [a for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX"]
    sizes = dict(zip(axes, shape, strict=True))
    stack = [(a, n) for a, n in zip(axes, shape, strict=True) if n > 1 and a not in "YXSC"]
    z_axis = None
    if volume and stack:
        z_axis = _volume_axis(p, axes, shape, stack)
        stack = []
    extra = [a for a in keep if a not in "YX" and a != z_axis]
    if stack:
        what = ", ".join(f"{a}={n}" for a, n in stack)
        raise ImageFileError(
            f"{p}: a stack ({what}; axes {axes}, shape {shape}), not one 2D image; save the slice to "
            "segment as its own file, or open the stack in napari and run the plugin on one slice")
    if len(extra) > 1:
        raise ImageFileError(f"{p}: both samples and channels (axes {axes}, shape {shape}); "
                             "save a gray or RGB image")
    channel_axis = extra[0] if extra else None
    if channel_axis == "S":
        if keep.index("S") != len(keep) - 1:
            raise ImageFileError(
                f"{p}: {sizes['S']} samples stored as separate planes (axes {axes}): that is how planar "
                "RGB looks, and also how a stack of slices saved without metadata looks, so it cannot be "
                "told apart; save it as interleaved RGB (H, W, 3) or as an OME-TIFF with its axes")
        if not samples_are_colour and not (alpha and sizes["S"] == 2):
            raise ImageFileError(f"{p}: {sizes['S']} samples per pixel that are not RGB "
                                 "(photometric says otherwise); the networks take gray or RGB")
    elif channel_axis == "C" and sizes["C"] != 3:
        raise ImageFileError(f"{p}: {sizes['C']} channels (axes {axes}); the networks take gray or "
                             "3 channels: save the channel to segment as its own image")
    order = [i for i, a in enumerate(axes) if a in keep]

    def plan(arr):
        index = tuple(slice(None) if a in keep else 0 for a in axes)
        arr = arr[index]
        names = [axes[i] for i in order]
        target = ([names.index(z_axis)] if z_axis else []) + [names.index("Y"), names.index("X")] + (
            [names.index(channel_axis)] if channel_axis else [])
        arr = arr.transpose(target) if target != list(range(len(target))) else arr
        if channel_axis == "S":
            arr = _drop_alpha(arr, p, alpha)
        return arr

    plan.volume = z_axis is not None  # type: ignore[attr-defined]
    return plan


def _volume_axis(p: Path, axes: str, shape: tuple[int, ...], stack: list[tuple[str, int]]) -> str:
    """The one axis a volume's slices lie along; a time series or a second stack axis is refused."""
    where = f"axes {axes}, shape {shape}"
    times = [n for a, n in stack if a == "T"]
    if times:
        raise ImageFileError(
            f"{p}: a time series (T={times[0]}; {where}); volumes are segmented one at a time: save "
            "each time point as its own ZYX file")
    if len(stack) > 1 or stack[0][0] not in Z_AXES:
        what = ", ".join(f"{a}={n}" for a, n in stack)
        raise ImageFileError(f"{p}: a stack with {what} ({where}); a volume has one z axis: save each "
                             "volume as its own ZYX file")
    return stack[0][0]


def _open_ome_zarr(p: Path, volume: bool = False) -> OpenedImage:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    location = parse_url(str(p), mode="r")
    if location is None:
        raise ImageFileError(f"{p}: not an OME-Zarr image")
    for node in Reader(location)():
        if node.load(Multiscales) is None or not node.data:
            continue
        names = [a["name"] if isinstance(a, dict) else str(a) for a in node.metadata.get("axes", [])]
        if not names:  # NGFF 0.3 and older: the axes were always (t, c, z, y, x) minus leading ones
            names = list("tczyx"[-len(node.data[0].shape):])
        axes = "".join(n[0].upper() for n in names)
        plan = _axes_plan(p, axes, tuple(node.data[0].shape), samples_are_colour=False, alpha=False,
                          volume=volume)
        return OpenedImage(p, [plan(level) for level in node.data], "OME-Zarr", volume=plan.volume,
                           pixel_size=ngff_pixel_size(node.metadata))
    raise ImageFileError(f"{p}: an OME-Zarr folder with no multiscale image")


# -- physical pixel size ----------------------------------------------------------------------
UM_PER_UNIT = {"nm": 1e-3, "nanometer": 1e-3, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0,
               "micrometer": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6,
               "meter": 1e6}
PLAUSIBLE_UM = (0.01, 100.0)  # µm per pixel: from electron-microscope-ish to a phone photo of a slide


def plausible(x_um: float | None, y_um: float | None = None) -> float | None:
    """One pixel size from x and y (their geometric mean), or None when unknown or implausible."""
    vals = [float(v) for v in (x_um, y_um) if v is not None]
    if not vals or not all(np.isfinite(v) and v > 0 for v in vals):
        return None
    size = float(np.sqrt(np.prod(vals))) if len(vals) == 2 else vals[0]
    return size if PLAUSIBLE_UM[0] <= size <= PLAUSIBLE_UM[1] else None


def tiff_pixel_size(tif) -> float | None:
    """µm per pixel of a TIFF's level 0 from its metadata (see the module's notes), or None."""
    import tifffile

    try:
        page = tif.pages.first
        if tif.is_ome and tif.ome_metadata:
            return _ome_xml_pixel_size(tif.ome_metadata)
        if tif.is_svs:  # "Aperio Image Library ...|AppMag = 20|MPP = 0.4990|..."
            mpp = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description)
            return plausible(float(mpp.group(1))) if mpp else None
        unit = page.tags.get("ResolutionUnit")
        unit = int(unit.value) if unit is not None else 1
        xres, yres = (page.tags.get(n) for n in ("XResolution", "YResolution"))
        if xres is None or yres is None:
            return None
        ppx, ppy = (v.value[0] / v.value[1] if isinstance(v.value, tuple) else float(v.value)
                    for v in (xres, yres))
        if unit == int(tifffile.RESUNIT.CENTIMETER):
            return plausible(1e4 / ppx, 1e4 / ppy)
        if tif.is_imagej and str((tif.imagej_metadata or {}).get("unit", "")).lower() in UM_PER_UNIT:
            scale = UM_PER_UNIT[str(tif.imagej_metadata["unit"]).lower()]
            return plausible(scale / ppx, scale / ppy)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return None


def _ome_xml_pixel_size(xml: str) -> float | None:
    import xml.etree.ElementTree as ET

    for el in ET.fromstring(xml).iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            sizes = []
            for axis in "XY":
                v = el.get(f"PhysicalSize{axis}")
                unit = el.get(f"PhysicalSize{axis}Unit", "µm")
                sizes.append(float(v) * UM_PER_UNIT[unit] if v is not None and unit in UM_PER_UNIT else None)
            return plausible(*sizes) if sizes[0] is not None else None
    return None


def ngff_pixel_size(metadata: dict) -> float | None:
    """µm per pixel of an OME-Zarr image's level 0 (NGFF 0.4+ scale transformations and axis units)."""
    try:
        axes = metadata.get("axes") or []
        first = (metadata.get("coordinateTransformations") or [None])[0] or []
        scale = next(t["scale"] for t in first if t.get("type") == "scale")
        sizes = {}
        for ax, f in zip(axes, scale, strict=True):
            if isinstance(ax, dict) and ax.get("name") in ("x", "y"):
                unit = ax.get("unit")
                if unit not in UM_PER_UNIT:
                    return None
                sizes[ax["name"]] = float(f) * UM_PER_UNIT[unit]
        return plausible(sizes.get("x"), sizes.get("y")) if "x" in sizes else None
    except (StopIteration, KeyError, TypeError, ValueError):
        return None


def _check_levels(opened: OpenedImage) -> None:
    """Pyramid levels must be the same image, each smaller, with matching y and x downsampling."""
    base = opened.levels[0]
    z = 1 if opened.volume else 0  # a volume's levels keep (or reduce) z; y and x are checked
    h0, w0 = (int(s) for s in base.shape[z:z + 2])
    for k, lv in enumerate(opened.levels[1:], start=1):
        h, w = (int(s) for s in lv.shape[z:z + 2])
        problem = None
        if z and int(lv.shape[0]) > int(base.shape[0]):
            problem = f"has {lv.shape[0]} slices, level 0 {base.shape[0]}"
        elif lv.shape[z + 2:] != base.shape[z + 2:] or np.dtype(lv.dtype) != np.dtype(base.dtype):
            problem = f"has shape {tuple(lv.shape)} {lv.dtype}, level 0 {tuple(base.shape)} {base.dtype}"
        elif h > h0 or w > w0:
            problem = f"({h} x {w}) is larger than level 0 ({h0} x {w0})"
        else:
            fx = w0 / max(w, 1)
            # Level sizes are rounded: allow a pixel or two, or a small relative error.
            if abs(h - h0 / fx) > max(1.5, LEVEL_TOLERANCE * h):
                problem = f"({h} x {w}) is downsampled {h0 / max(h, 1):.3g}x in y but {fx:.3g}x in x"
        if problem:
            raise ImageFileError(f"{opened.path}: pyramid levels disagree: level {k} {problem}")
