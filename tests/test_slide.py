"""Whole slides: the rough pass at the trained scale, local windows, chunked output, clusters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import make_tiny_model
from napari_segthenseg.engine import Engine, ImageSource, omezarr
from napari_segthenseg.engine.localnorm import LocalWindows
from napari_segthenseg.engine.progress import drive as run
from napari_segthenseg.engine.reader import open_image
from napari_segthenseg.engine.rough import (
    RoughResult,
    lazy_component_boxes,
    rough_boxes,
    rough_pass,
    windows_for,
)
from napari_segthenseg.engine.scale import RoughPlan, TrainedScale, plan_rough
from napari_segthenseg.engine.slide import ChunkedOutput, boxes_by_chunk

DSB_SCALE = TrainedScale(median=4.0, low=4.0, high=21.6875, aspect=2.1095, window=256)


def test_the_rough_pass_keeps_the_paper_for_ordinary_images_and_tiles_the_rest():
    assert not plan_rough((256, 320), 64, DSB_SCALE).tiled  # a training-sized image: the paper's pass
    assert not plan_rough((1040, 1388), 64, DSB_SCALE).tiled  # the largest training image
    slide = plan_rough((20480, 20480), 64, DSB_SCALE)
    assert slide.tiled and slide.scale == 4.0 and slide.rough_hw((20480, 20480), 64) == (5120, 5120)
    assert plan_rough((300, 20000), 64, DSB_SCALE).tiled  # a long strip
    assert plan_rough((256, 256), 64, DSB_SCALE, rough_scale=2.0).scale == 2.0  # the user's override
    assert not plan_rough((20480, 20480), 64, None).tiled  # format 1 model files: the paper's pass
    with pytest.raises(ValueError, match="positive"):
        plan_rough((256, 256), 64, DSB_SCALE, rough_scale=0)


def fields_canvas(dsb_dir, shape=(768, 1280)) -> np.ndarray:
    """A gray canvas tiled with the bundled dsb2018 fields (real nuclei), black in between."""
    from skimage import io

    ids = json.loads((dsb_dir / "splits.json").read_text())["train"][:6]
    canvas = np.zeros(shape, np.uint8)
    y = x = 8
    for i in ids:
        img = io.imread(dsb_dir / "images" / f"{i}.png")[..., 0]
        h, w = img.shape
        if x + w > shape[1]:
            y, x = y + 272, 8
        if y + h > shape[0]:
            break
        canvas[y:y + h, x:x + w] = img
        x += w + 24
    return canvas


@pytest.fixture(scope="module")
def slide_engine(default_model):
    return Engine(default_model, "cpu", rough_scale=4.0)


@pytest.fixture(scope="module")
def canvas(dsb_dir):
    return fields_canvas(dsb_dir)


def test_tiles_stitch_without_seams(slide_engine, canvas, monkeypatch):
    import napari_segthenseg.engine.rough as rough

    src = ImageSource(canvas)
    plan = slide_engine.plan(src.hw)
    one = run(rough_pass(slide_engine, src, plan))
    monkeypatch.setattr(rough, "TILE", 64)  # 3 x 5 tiles instead of one
    tiled = run(rough_pass(slide_engine, src, plan))
    assert (one.tiles_run, tiled.tiles_run + tiled.tiles_skipped) == (1, 15)
    assert one.mask.sum() > 500
    assert (one.mask != tiled.mask).sum() <= 0.002 * one.mask.sum()


def test_an_object_across_tiles_and_chunks_is_one_box():
    mask = np.zeros((300, 400), bool)
    mask[40:45, 20:380] = True  # crosses every tile and chunk border on its row
    mask[200:230, 100:110] = True
    rough = RoughResult(None, mask, None, RoughPlan(True, 4.0, 256))
    boxes = rough_boxes(rough, (1200, 1600), pad=8, min_box=5)
    assert len(boxes) == 2
    assert lazy_component_boxes(mask, chunk=160).tolist() == [[40, 20, 45, 380], [200, 100, 230, 110]]


def test_lazy_labelling_matches_scipy():
    from napari_segthenseg.engine.boxes import component_boxes

    rng = np.random.default_rng(1)
    mask = np.zeros((257, 300), bool)
    for y, x, h, w in zip(*(rng.integers(0, 240, 30), rng.integers(0, 280, 30), rng.integers(1, 40, 30),
                            rng.integers(1, 30, 30)), strict=True):
        mask[y:y + h, x:x + w] = True  # blobs, many across the 100 px chunk borders, some merging
    ref = sorted(map(tuple, component_boxes(mask).tolist()))
    assert len(ref) > 10
    assert sorted(map(tuple, lazy_component_boxes(mask, chunk=100).tolist())) == ref


def test_local_windows_follow_the_image(slide_engine):
    """A dim field beside a bright one gets its own window; flat background is skipped."""
    img = np.zeros((2048, 2048), np.uint8)
    rng = np.random.default_rng(0)
    img[256:768, 256:768] = rng.integers(0, 40, (512, 512))  # dim
    img[256:768, 1280:1792] = rng.integers(0, 250, (512, 512))  # bright, far away
    src = ImageSource(img)
    rough = run(rough_pass(slide_engine, src, slide_engine.plan(src.hw)))
    assert isinstance(rough.stats, LocalWindows) and rough.tiles_skipped == 0  # 512 px tiles: all hit
    lo, hi = rough.stats.window_at(np.array([128.0, 128.0]), np.array([128.0, 384.0]))
    assert hi[0] < 0.6 * hi[1]  # the dim field is stretched, not dimmed by the bright one
    flat = ImageSource(np.zeros((4096, 4096), np.uint8))
    empty = run(rough_pass(slide_engine, flat, slide_engine.plan(flat.hw)))
    assert empty.tiles_run == 0 and empty.tiles_skipped == 4 and not empty.mask.any()


def test_a_crops_floor_follows_the_tissue_nearby_not_the_brightest_place():
    """Crops' windows are at least 0.3 of the widest cell range within 9 x 9 cells (that range taken
    as at least 0.15 of the slide's): a dim region far from the bright one keeps its own window, one
    beside it is widened; bright-field windows keep half the slide's range; older saved windows their
    rule."""
    from napari_segthenseg.engine.localnorm import windows_from_arrays, windows_to_arrays

    cmin = np.zeros((20, 40), np.float32)
    cmax = np.full((20, 40), 100.0, np.float32)  # dim tissue everywhere ...
    cmax[:, :5] = 1000.0  # ... but for a bright strip on the left
    cmax[:, 36:] = 10.0  # and a nearly empty strip on the right
    flat = np.zeros((20, 40), bool)
    w = LocalWindows(4.0, 32, cmin, cmax, flat)

    def centre(col: int) -> tuple[np.ndarray, np.ndarray]:  # rough px at the centre of a cell of row 10
        return np.array([10.5 * 32.0]), np.array([(col + 0.5) * 32.0])

    lo, hi = w.window_at(*centre(20))  # far from the bright strip: its own range
    assert abs(hi[0] - lo[0] - 100.0) < 1e-3
    lo, hi = w.window_at(*centre(39))  # nearly empty: 0.3 of 0.15 of the slide's range
    assert abs(hi[0] - lo[0] - 45.0) < 1e-3
    lo, hi = w.window_at(*centre(7))  # within 4 cells of it: 0.3 of its range
    assert abs(hi[0] - lo[0] - 300.0) < 1e-3
    bright = LocalWindows(4.0, 32, cmin, cmax, flat, floors=(0.15, 0.5), bright=True, crop_reach=0)
    lo, hi = bright.window_at(*centre(20))
    assert abs(hi[0] - lo[0] - 500.0) < 1e-3
    arrays = windows_to_arrays(w)
    assert windows_from_arrays(arrays).crop_reach == 9
    del arrays["crop_reach"]  # saved by an older version: the slide's range, as then
    assert windows_from_arrays(arrays).crop_reach == 0


def test_chunked_output_equals_the_in_memory_walk(slide_engine, canvas, tmp_path):
    ref = slide_engine.segment(canvas)
    image = omezarr.create(tmp_path / "m.ome.zarr", canvas.shape, chunk=256)
    out = ChunkedOutput(image.levels[0], 256, tmp_path, threads=2)
    res = run(slide_engine.walk(canvas, output=out))
    assert np.array_equal(res.boxes, ref.boxes) and len(ref.boxes) > 20
    # crops are cut from each chunk's region rather than the whole image, and grid_sample normalises
    # coordinates by its input's size: sampling positions differ in the last float bits, which can flip
    # a pixel sitting at the threshold (1 of 44,377 on the bundled fields' canvas). A seam would be
    # hundreds along the chunk borders.
    differ = int(((np.asarray(image.levels[0][:]) > 0) != ref.mask).sum())
    assert differ <= max(2, int(ref.mask.sum()) // 10_000), differ
    assert res.counts["chunks"] < 15 and res.counts["chunk_boxes"] >= len(ref.boxes)
    omezarr.update_pyramid(image)
    lv1 = np.asarray(image.levels[1][:])
    m = ref.mask.astype(np.uint8)
    assert np.array_equal(lv1, m.reshape(m.shape[0] // 2, 2, m.shape[1] // 2, 2).max(axis=(1, 3)))


def test_a_box_across_four_chunks_is_refined_once(slide_engine, tmp_path):
    """Its chunk (the one of its centre) refines it and hands the other three their parts."""
    yy, xx = np.mgrid[:768, :768]
    img = np.zeros((768, 768), np.uint8)
    for cy, cx, r in ((256, 256, 30), (60, 70, 20), (600, 400, 25)):  # a nucleus on the corner (256, 256)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 200
    boxes = np.array([[216, 216, 296, 296], [40, 50, 80, 90]])
    ref = slide_engine.segment(img, boxes)
    image = omezarr.create(tmp_path / "b.ome.zarr", img.shape, chunk=256)
    res = run(slide_engine.walk(img, boxes, output=ChunkedOutput(image.levels[0], 256, threads=2)))
    s = slide_engine.settings.size
    assert res.counts["refined"] == 2 and res.counts["fine_px"] == 2 * s * s  # once each, not 4 + 1
    assert res.counts["chunks"] == 4 and res.counts["merges"] == 3
    out = np.asarray(image.levels[0][:]) > 0
    assert all(out[y:y + 256, x:x + 256].any() for y in (0, 256) for x in (0, 256))  # all four got parts
    assert np.array_equal(out, ref.mask)


def test_each_box_has_one_owner_among_the_regions():
    from napari_segthenseg.engine.grid import box_owners

    boxes = np.array([[100, 100, 140, 140], [120, 250, 140, 290], [250, 250, 270, 270], [250, 100, 270, 120],
                      [500, 500, 510, 510]])
    regions = [(0, 0, 256, 256), (0, 256, 200, 400), (256, 256, 300, 300)]  # parts of three tiles
    owned, spills = box_owners(boxes, regions, 256)
    # boxes 1 and 2 go to the region of their centre; box 3's centre tile (1, 0) has no region
    assert [o.tolist() for o in owned] == [[0, 3], [1], [2]]
    assert spills == [[], [0], [0]]  # boxes 1 and 2 also reach region 0
    assert sum(len(o) for o in owned) == 4  # the box outside every region is nobody's
    with pytest.raises(ValueError, match="alone inside one"):
        box_owners(boxes, [(0, 0, 300, 100)], 256)


def test_pyramid_update_of_one_region(tmp_path):
    image = omezarr.create(tmp_path / "p.ome.zarr", (1500, 1100), chunk=128)
    assert [lv.shape for lv in image.levels] == [(1500, 1100), (750, 550), (375, 275)]
    image.levels[0][100:300, 200:260] = 1
    omezarr.update_pyramid(image)
    assert np.asarray(image.levels[2][:]).sum() == 50 * 15
    image.levels[0][100:300, 200:260] = 0  # an edit clears a box
    omezarr.update_pyramid(image, (100, 200, 300, 260))
    assert not np.asarray(image.levels[1][:]).any() and not np.asarray(image.levels[2][:]).any()
    back = omezarr.open_label_image(tmp_path / "p.ome.zarr")
    assert [lv.shape for lv in back.levels] == [lv.shape for lv in image.levels]


def test_write_level0_copies_in_tiles_and_builds_the_pyramid(tmp_path):
    data = np.zeros((1500, 1100), bool)
    data[100:300, 200:260] = True
    data[1400:1500, 1000:1100] = True
    image = omezarr.create(tmp_path / "w.ome.zarr", data.shape, chunk=128)
    omezarr.write_level0(image, data, block=512)
    assert np.array_equal(np.asarray(image.levels[0][:]), data.astype(np.uint8))
    assert np.array_equal(np.asarray(image.levels[1][:]), omezarr.max_pool2(data.astype(np.uint8)))
    assert np.asarray(image.levels[2][:]).sum() == 50 * 15 + 25 * 25


def test_boxes_by_chunk():
    boxes = np.array([[0, 0, 10, 10], [120, 120, 140, 140], [250, 0, 260, 300]])
    index = boxes_by_chunk(boxes, (300, 300), 128)
    assert sorted(index) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert index[(0, 0)].tolist() == [0, 1] and index[(1, 2)].tolist() == [2]


def write_slide(path, image):
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        opts = {"tile": (128, 128), "compression": "zlib", "photometric": "minisblack"}
        tw.write(image, subifds=1, metadata={"axes": "YX"}, **opts)
        tw.write(image[::2, ::2], subfiletype=1, **opts)


def test_a_two_worker_dask_cluster_gives_the_same_result(tmp_path, canvas):
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "slide.ome.tif"
    write_slide(path, canvas)
    model = make_tiny_model(32)
    engine = Engine(model, "cpu", rough_scale=4.0)
    src = ImageSource(open_image(path).levels, name=str(path))
    local = omezarr.create(tmp_path / "local.ome.zarr", canvas.shape, chunk=256)
    run(engine.walk(src, output=ChunkedOutput(local.levels[0], 256, tmp_path)))
    cluster_out = omezarr.create(tmp_path / "cluster.ome.zarr", canvas.shape, chunk=256)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = run(engine.walk(src, output=ChunkedOutput(cluster_out.levels[0], 256, tmp_path,
                                                        client=client, source_path=str(path))))
        workers = len(client.scheduler_info()["workers"])
        shared = np.zeros(canvas.shape, np.uint8)  # shared crops too: the cluster writes zarr, here NumPy
        shared_out = omezarr.create(tmp_path / "shared.ome.zarr", canvas.shape, chunk=256)
        run(engine.walk(src, res.boxes, stats=res.stats,
                        output=ChunkedOutput(shared_out.levels[0], 256, client=client, source_path=str(path),
                                             group_zoom=1.0)))
    assert workers == 2 and res.counts["chunks"] > 1
    assert np.array_equal(np.asarray(local.levels[0][:]), np.asarray(cluster_out.levels[0][:]))
    assert res.counts["refined"] == len(res.boxes)  # each box once on the cluster too
    run(engine.walk(src, res.boxes, stats=res.stats, output=ChunkedOutput(shared, 256, group_zoom=1.0)))
    assert np.array_equal(shared, np.asarray(shared_out.levels[0][:]))


def test_chunk_tasks_never_reuse_a_core_built_for_another_job():
    """Cores are cached per thread and job; CPython reuses ``id()`` of freed objects, so a job made
    after another is gone (another model) must still get its own core."""
    from napari_segthenseg.engine.slide import ChunkJob, core_for

    first, second = make_tiny_model(size=32), make_tiny_model(size=32, seed=1)
    src = ImageSource(np.zeros((64, 64), np.uint8))
    job = ChunkJob(first, "cpu", src, None, None)
    assert core_for(job).model is first
    old_id = id(job)
    del job
    other = ChunkJob(second, "cpu", src, None, None)  # usually takes the freed job's memory, and id
    assert core_for(other).model is second, f"reused id: {id(other) == old_id}"


def test_intensity_windows_are_kept_as_plain_arrays(slide_engine):
    from napari_segthenseg.engine.image import NormStats
    from napari_segthenseg.engine.localnorm import windows_fit, windows_from_arrays, windows_to_arrays

    img = np.zeros((2048, 2048), np.uint8)
    img[256:768, 256:768] = np.random.default_rng(0).integers(0, 40, (512, 512))
    src = ImageSource(img)
    plan = slide_engine.plan(src.hw)
    local = run(rough_pass(slide_engine, src, plan)).stats
    back = windows_from_arrays(windows_to_arrays(local))
    assert isinstance(back, LocalWindows) and back.cell == local.cell
    assert np.array_equal(back.cmax, local.cmax)
    crops = np.array([[300, 300, 364, 364]])
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(back.apply_to_crops(x, crops), local.apply_to_crops(x, crops))
    assert windows_fit(back, True, plan.scale, plan.window, "minmax")
    assert not windows_fit(back, True, plan.scale * 2, plan.window, "minmax")  # another rough scale
    assert not windows_fit(back, False, None, None, "minmax")  # the whole-image pass needs one window
    assert windows_from_arrays(windows_to_arrays(NormStats(3.0, 9.0))) == NormStats(3.0, 9.0)
    with pytest.raises(ValueError, match="not intensity windows"):
        windows_from_arrays({"kind": np.array("local")})


def test_the_rough_scale_follows_the_physical_pixel_size(default_model):
    """A model trained at 0.5 µm/px with scale 4: a 0.25 µm/px (40x) slide is read at scale 8 (2 µm per
    rough px either way), with a window twice as wide; unknown sizes keep the trained scale in px."""
    at40 = plan_rough((20480, 20480), 64, DSB_SCALE, pixel_size=0.25, trained_pixel_size=0.5)
    assert at40.tiled and at40.scale == 8.0 and at40.window == 512 and at40.physical == 2.0
    assert "2 µm per rough px" in at40.describe()
    assert plan_rough((20480, 20480), 64, DSB_SCALE, pixel_size=0.25).scale == 4.0  # the model's unknown
    assert plan_rough((20480, 20480), 64, DSB_SCALE, None, trained_pixel_size=0.5).scale == 4.0
    sizes = {"pixel_size": 0.25, "trained_pixel_size": 0.5}
    assert plan_rough((20480, 20480), 64, DSB_SCALE, 6.0, **sizes).scale == 6.0  # the user's rough scale
    assert not plan_rough((256, 320), 64, DSB_SCALE, **sizes).tiled  # ordinary images: the paper's pass
    import dataclasses

    from napari_segthenseg.engine.modelfile import StSModel

    model = StSModel(dataclasses.replace(default_model.settings, pixel_size=0.5), default_model.rough,
                     default_model.fine)
    engine = Engine(model, "cpu")
    import dask.array as da

    src = ImageSource(da.zeros((20480, 20480), dtype=np.uint8), pixel_size=0.25)
    assert engine.plan_for(src).scale == 8.0
    engine.pixel_size = 0.5  # the user's override wins over the file's
    assert engine.plan_for(src).scale == 4.0
    with pytest.raises(ValueError, match="positive"):
        engine.pixel_size = -1


def test_the_rough_net_sees_only_the_busy_part_of_a_tile(slide_engine, canvas, monkeypatch):
    """A field in one corner of a mostly black tile: the rough net runs on the bounding box of the cells
    that are not flat, and finds the same as on the whole tile."""
    from napari_segthenseg.engine.localnorm import LocalWindows

    img = np.zeros((2048, 2048), np.uint8)
    img[200:200 + canvas.shape[0] // 2, 300:300 + canvas.shape[1] // 2] = canvas[::2, ::2]  # one 512 px tile
    src = ImageSource(img)
    plan = slide_engine.plan(src.hw)
    slide_engine.counts = {}
    busy = run(rough_pass(slide_engine, src, plan))
    part_px = slide_engine.counts["rough_px"]
    busy_part = LocalWindows.busy_part  # the whole tile instead, unless every cell is flat
    monkeypatch.setattr(LocalWindows, "busy_part",
                        lambda self, *r, step=1: None if busy_part(self, *r[:4]) is None else tuple(r[:4]))
    slide_engine.counts = {}
    whole = run(rough_pass(slide_engine, src, plan))
    assert (busy.tiles_run, whole.tiles_run) == (1, 1) and busy.mask.sum() > 100
    assert part_px < 0.6 * slide_engine.counts["rough_px"]  # the black rest of the tile is not run
    assert (busy.mask != whole.mask).sum() <= 0.002 * whole.mask.sum()


def test_shared_crops_give_the_mask_of_single_crops_within_a_pixel(slide_engine, canvas):
    """Small neighbouring boxes share crops at zoom 1 (engine/groups.py): fewer crops, and the same
    objects. The tolerance: the shared crop samples a nucleus at 1 network px per image px instead of
    about 1.6, so its outline may move by a fraction of a pixel; flipped pixels must stay below a fifth
    of the outline pixels, and the two masks' DSC above 0.98 (measured with the bundled model: 9 % and
    0.993 on the full-data canvas, 15 % and 0.984 on the canvas of the bundled test images)."""
    from scipy import ndimage

    from napari_segthenseg.engine.groups import group_boxes

    one, shared = np.zeros(canvas.shape, np.uint8), np.zeros(canvas.shape, np.uint8)
    ref = run(slide_engine.walk(canvas, output=ChunkedOutput(one, 256)))
    res = run(slide_engine.walk(canvas, output=ChunkedOutput(shared, 256, group_zoom=1.0)))
    assert np.array_equal(res.boxes, ref.boxes) and res.counts["crops"] < 0.85 * len(ref.boxes)
    assert res.counts["fine_px"] == res.counts["crops"] * slide_engine.settings.size ** 2
    a, b = one > 0, shared > 0
    outline = int((a & ~ndimage.binary_erosion(a)).sum())
    assert int((a ^ b).sum()) <= outline // 5 and 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
    # every box lies whole inside its window; windows have the asked side (or the box's own)
    windows, member = group_boxes(ref.boxes, canvas.shape, 64, 1.0)
    w = windows[member]
    assert ((ref.boxes[:, :2] >= w[:, :2]) & (ref.boxes[:, 2:] <= w[:, :2] + w[:, 2:])).all()
    assert set(np.bincount(member).tolist()) - {1} and (w[np.bincount(member)[member] > 1, 2] == 64).all()


def test_bright_field_glass_is_left_out(slide_engine, canvas):
    """Bright-field fields (the bundled H&E-like ones) on light glass: the windows see a bright
    background and its glass level, nothing is found on the glass or along the tissue edges, and the
    fields score close to themselves segmented alone. A fluorescence canvas has neither."""
    from napari_segthenseg.engine.reader import read_image

    bundled = Path(__file__).parent / "data" / "dsb2018"
    stems = ["00ae65c1", "01d44a26"]
    slide = np.full((1024, 1400, 3), 238, np.uint8)  # glass
    gt = np.zeros(slide.shape[:2], bool)
    alone = {"tp": 0, "sum": 0}
    for k, stem in enumerate(stems):
        name = next((bundled / "images").glob(f"{stem}*.png")).stem
        field = read_image(bundled / "images" / f"{name}.png")[..., :3]
        y, x = 300, 200 + 600 * k
        slide[y:y + 256, x:x + 320] = field
        gt[y:y + 256, x:x + 320] = read_image(bundled / "masks" / f"{name}.png") > 0
        own = slide_engine.segment(field).mask
        g = gt[y:y + 256, x:x + 320]
        alone["tp"] += int((own & g).sum())
        alone["sum"] += int(own.sum() + g.sum())
    res = slide_engine.segment(slide)
    stats = res.stats
    assert isinstance(stats, LocalWindows) and stats.bright and stats.glass is not None
    assert 225 < stats.glass < 238
    fields = np.zeros(gt.shape, bool)
    fields[300:556, 200:520] = fields[300:556, 800:1120] = True
    assert res.mask[~fields].sum() < 0.01 * res.mask.sum()  # nothing on the glass
    sides = np.maximum(res.boxes[:, 2] - res.boxes[:, 0], res.boxes[:, 3] - res.boxes[:, 1])
    assert sides.max() < 256  # no box chained along a tissue edge
    dsc_slide = 2 * (res.mask & gt).sum() / (res.mask.sum() + gt.sum())
    dsc_alone = 2 * alone["tp"] / alone["sum"]
    assert dsc_slide > dsc_alone - 0.08, (dsc_slide, dsc_alone)
    fluo = run(windows_for(slide_engine, ImageSource(canvas), slide_engine.plan(canvas.shape)))
    assert not fluo.bright and fluo.glass is None
