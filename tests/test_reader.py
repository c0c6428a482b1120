"""The one image reader: colour vs stacks from the file's metadata, pyramids, OME-Zarr, bad files."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from napari_segthenseg.engine import ImageSource
from napari_segthenseg.engine.image import ImageReadError
from napari_segthenseg.engine.reader import ImageFileError, open_image, read_image

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 255, (48, 64), dtype=np.uint8)
RGB = RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("n", [3, 4])
def test_a_stack_saved_without_metadata_is_not_taken_for_colour(tmp_path, n):
    """tifffile stores a (3, H, W) array as planar RGB by default: it cannot be told from a stack."""
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, RNG.integers(0, 255, (n, 48, 64), dtype=np.uint8))
    with pytest.raises(ImageFileError, match="stack.tif.*separate planes|stack.tif: a stack"):
        open_image(path)


def test_ome_axes_decide(tmp_path):
    tifffile.imwrite(tmp_path / "z.ome.tif", RNG.integers(0, 255, (5, 48, 64), dtype=np.uint8),
                     metadata={"axes": "ZYX"})
    with pytest.raises(ImageFileError, match="a stack \\(Z=5"):
        open_image(tmp_path / "z.ome.tif")
    tifffile.imwrite(tmp_path / "c2.ome.tif", RNG.integers(0, 255, (2, 48, 64), dtype=np.uint8),
                     metadata={"axes": "CYX"})
    with pytest.raises(ImageFileError, match="2 channels"):
        open_image(tmp_path / "c2.ome.tif")
    c3 = RNG.integers(0, 255, (3, 48, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c3.ome.tif", c3, metadata={"axes": "CYX"}, photometric="minisblack")
    assert np.array_equal(read_image(tmp_path / "c3.ome.tif"), np.moveaxis(c3, 0, -1))
    one = RNG.integers(0, 255, (1, 1, 48, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tc.ome.tif", one, metadata={"axes": "TCYX"})
    assert np.array_equal(read_image(tmp_path / "tc.ome.tif"), one[0, 0])  # length-1 axes dropped


def test_colour_and_alpha_from_photometric(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", RGB, photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "rgb.tif"), RGB)
    rgba = np.dstack([RGB, np.full((48, 64), 255, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(read_image(tmp_path / "rgba.tif"), RGB)
    ga = np.dstack([GRAY, np.full((48, 64), 255, np.uint8)])
    tifffile.imwrite(tmp_path / "ga.tif", ga, photometric="minisblack", extrasamples=["unassalpha"])
    assert np.array_equal(read_image(tmp_path / "ga.tif"), GRAY)
    iio.imwrite(tmp_path / "ga.png", ga)  # PNG gray + alpha (mode LA)
    assert np.array_equal(read_image(tmp_path / "ga.png"), GRAY)
    assert ImageSource(ga).channels == 1  # an array with 2 channels is gray + alpha too


def write_pyramid(path, base, levels):
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(base, subifds=len(levels), tile=(64, 64), metadata={"axes": "YX"}, photometric="minisblack")
        for lv in levels:
            tw.write(lv, subfiletype=1, tile=(64, 64), photometric="minisblack")


def test_pyramidal_ome_tiff_is_read_lazily_from_the_right_level(tmp_path, monkeypatch):
    import napari_segthenseg.engine.reader as reader

    monkeypatch.setattr(reader, "LAZY_MIN_PIXELS", 0)  # a small file stands in for a slide
    base = np.zeros((512, 768), np.uint8)
    base[100:200, 300:420] = 200
    path = tmp_path / "p.ome.tif"
    write_pyramid(path, base, [base[::2, ::2], base[::4, ::4]])
    with open_image(path) as opened:
        assert opened.lazy and [lv.shape for lv in opened.levels] == [(512, 768), (256, 384), (128, 192)]
        assert "pyramidal OME-TIFF" in opened.describe()
        src = ImageSource(opened.levels, name=str(path))
        assert src.level_for(4.0) == 2 and src.level_for(3.9) == 1 and src.level_for(1.0) == 0
        small = src.read_scaled(96, 296, 204, 424, 4.0, (27, 32), torch.device("cpu"))
        assert small.shape == (1, 27, 32) and float(small[0, 13, 16]) == 200.0
        assert np.array_equal(src.read_region(100, 300, 110, 310, torch.device("cpu"))[0].numpy(),
                              np.full((10, 10), 200.0))


def test_pyramid_levels_that_disagree_are_refused(tmp_path):
    base = RNG.integers(0, 255, (512, 768), dtype=np.uint8)
    write_pyramid(tmp_path / "bad.ome.tif", base, [base[::2, ::3]])
    with pytest.raises(ImageFileError, match="bad.ome.tif: pyramid levels disagree: level 1"):
        open_image(tmp_path / "bad.ome.tif")


def test_an_unreadable_tile_names_the_file(tmp_path, monkeypatch):
    import napari_segthenseg.engine.reader as reader

    monkeypatch.setattr(reader, "LAZY_MIN_PIXELS", 0)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, RNG.integers(0, 255, (256, 256), dtype=np.uint8), tile=(64, 64),
                     compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[0].dataoffsets[5]
    data = bytearray(path.read_bytes())
    data[offset:offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))
    src = ImageSource(open_image(path).levels, name=str(path))
    src.read_region(0, 0, 64, 64, torch.device("cpu"))  # an intact tile reads
    with pytest.raises(ImageReadError, match="t.tif: cannot read pixels"):
        src.read_region(64, 64, 128, 128, torch.device("cpu"))


def write_ome_zarr(path, arrays, axes):
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_multiscale(arrays, group, fmt=FormatV04(), axes=axes)


def test_ome_zarr_pyramid(tmp_path):
    base = RNG.integers(0, 255, (1, 256, 384), dtype=np.uint8)  # c, y, x with one channel
    write_ome_zarr(tmp_path / "img.ome.zarr", [base, base[:, ::2, ::2]], ["c", "y", "x"])
    with open_image(tmp_path / "img.ome.zarr") as opened:
        assert opened.kind == "OME-Zarr" and [lv.shape for lv in opened.levels] == [(256, 384), (128, 192)]
        assert np.array_equal(np.asarray(opened.levels[0]), base[0])
    stack = RNG.integers(0, 255, (4, 64, 64), dtype=np.uint8)
    write_ome_zarr(tmp_path / "z.ome.zarr", [stack], ["z", "y", "x"])
    with pytest.raises(ImageFileError, match="z.ome.zarr: a stack \\(Z=4"):
        open_image(tmp_path / "z.ome.zarr")


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(ImageFileError, match="no such file"):
        open_image(tmp_path / "nope.png")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ImageFileError, match="unknown image type"):
        open_image(tmp_path / "x.bmp")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageFileError, match="not an OME-Zarr"):
        open_image(tmp_path / "folder")


def test_jpeg_tiled_rgb_slide_svs_style(tmp_path, monkeypatch):
    """JPEG tiles (imagecodecs) of an RGB slide, with the Aperio description tifffile knows SVS by."""
    import napari_segthenseg.engine.reader as reader

    monkeypatch.setattr(reader, "LAZY_MIN_PIXELS", 0)
    smooth = np.kron(RNG.integers(0, 255, (32, 48, 3), dtype=np.uint8), np.ones((32, 32, 1), np.uint8))
    path = tmp_path / "slide.svs"
    tifffile.imwrite(path, smooth, tile=(256, 256), compression="jpeg", photometric="rgb",
                     description="Aperio Image Library v11.2.1 \r\n1536x1024 (256x256) JPEG/RGB Q=90")
    with open_image(path) as opened:
        assert opened.kind == "SVS" and opened.lazy and opened.shape == (1024, 1536, 3)
        region = np.asarray(opened.levels[0][300:364, 300:364])
        assert np.abs(region.astype(int) - smooth[300:364, 300:364]).mean() < 4  # lossy, but the image


def test_pixel_size_is_read_from_each_format(tmp_path):
    """µm per pixel from OME-XML, Aperio's MPP, TIFF resolution in cm (NDPI's way), ImageJ and NGFF."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    img = RNG.integers(0, 255, (256, 320), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.ome.tif", img, metadata={
        "axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm"})
    tifffile.imwrite(tmp_path / "nm.ome.tif", img, metadata={
        "axes": "YX", "PhysicalSizeX": 500, "PhysicalSizeY": 500, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeYUnit": "nm"})
    tifffile.imwrite(tmp_path / "b.svs", img, description="Aperio Image Library v12.0.5\r\n320x256 "
                     "[0,0 320x256] (256x256) JPEG/RGB Q=70|AppMag = 40|StripeWidth = 2040|MPP = 0.2527")
    # NDPI: pixels per centimetre in the resolution tags (and its private tag 65420)
    tifffile.imwrite(tmp_path / "c.tif", img, resolution=(1e4 / 0.4416, 1e4 / 0.4416),
                     resolutionunit="CENTIMETER", extratags=[(65420, 4, 1, 1, False)])
    tifffile.imwrite(tmp_path / "d.tif", img, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"unit": "micron"})
    tifffile.imwrite(tmp_path / "plain.tif", img, resolution=(72, 72))  # 72 dpi: any editor's default
    iio.imwrite(tmp_path / "e.png", img)
    group = zarr.open_group(str(tmp_path / "f.ome.zarr"), mode="w", zarr_format=2)
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    write_multiscale([img, img[::2, ::2]], group, fmt=FormatV04(), axes=axes,
        coordinate_transformations=[[{"type": "scale", "scale": [0.5, 0.5]}],
                                    [{"type": "scale", "scale": [1.0, 1.0]}]])
    expected = {"a.ome.tif": 0.25, "nm.ome.tif": 0.5, "b.svs": 0.2527, "c.tif": 0.4416, "d.tif": 0.325,
                "plain.tif": None, "e.png": None, "f.ome.zarr": 0.5}
    for name, size in expected.items():
        with open_image(tmp_path / name) as opened:
            assert opened.pixel_size == pytest.approx(size) if size else opened.pixel_size is None, name
            if size:
                assert f"{size:.4g} µm/px" in opened.describe()
