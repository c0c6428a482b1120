"""Volumes in the engine (docs/VOLUMES.md): 3D box rules, the volume walk, its two outputs and edits."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_threshold_model, make_tiny_model
from napari_segthenseg.engine import Engine, omezarr
from napari_segthenseg.engine.boxes import (
    clip_boxes_3d,
    component_boxes,
    finalize_boxes_3d,
    label_objects,
)
from napari_segthenseg.engine.boxio import read_boxes_csv, write_boxes_csv
from napari_segthenseg.engine.image import VolumeSource
from napari_segthenseg.engine.progress import drive
from napari_segthenseg.engine.rough import lazy_component_boxes
from napari_segthenseg.engine.volume import VolumeOptions, segment_volume, walk_volume
from napari_segthenseg.engine.volume_chunks import VolumeChunked
from napari_segthenseg.engine.volume_out import VolumeInMemory, box_key

S = 32
SHAPE = (12, 96, 128)


def ball(shape, centre, radius) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius ** 2


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bright objects on a flat background: a ball across slices 3-9, a blob on slice 10 only,
    and a cylinder on the first three slices at the image's corner."""
    objects = {"ball": np.zeros(SHAPE, bool)}
    for z, r in zip(range(3, 10), (6, 9, 11, 12, 11, 9, 6), strict=True):
        objects["ball"][z] = ball((1, *SHAPE[1:]), (0, 40, 50), r)[0]
    objects["blob"] = np.zeros(SHAPE, bool)
    objects["blob"][10] = ball((1, *SHAPE[1:]), (0, 70, 100), 7)[0]
    objects["corner"] = np.zeros(SHAPE, bool)
    objects["corner"][0:3, 84:96, 114:128] = True
    vol = np.full(SHAPE, 20, np.uint8)
    for m in objects.values():
        vol[m] = 200
    return vol, objects


def box_volume(box: np.ndarray) -> np.ndarray:
    z0, y0, x0, z1, y1, x1 = box
    inside = np.zeros(SHAPE, bool)
    inside[z0:z1, y0:y1, x0:x1] = True
    return inside


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# -- the 3D box rules -------------------------------------------------------------------------
def test_3d_rules_pad_square_and_clamp_at_the_ends():
    shape = (8, 100, 100)
    raw = np.array([
        [2, 10, 10, 5, 20, 30],  # inside: square 20 + 2 * 4, z padded by 1
        [0, 90, 90, 2, 99, 99],  # at the first slice and the corner: clamped in z, shifted in y/x
        [6, 40, 40, 8, 60, 60],  # at the last slice
        [4, 10, 50, 5, 14, 70],  # 4 px high: noise under the 5 px rule
    ])
    out = finalize_boxes_3d(raw, shape, pad=4, z_pad=1)
    assert out.tolist() == [[1, 1, 6, 6, 29, 34], [0, 83, 83, 3, 100, 100], [5, 36, 36, 8, 64, 64]]
    wide = finalize_boxes_3d(raw[:1], shape, pad=4, z_pad=5)
    assert wide[0, [0, 3]].tolist() == [0, 8]  # padded past both ends: the whole volume
    # the y/x window is the 2D rule on the extent over all slices; one window for every slice
    assert finalize_boxes_3d(raw[:1], shape, 4, 0)[0, [1, 2, 4, 5]].tolist() == [1, 6, 29, 34]


def test_objects_on_one_slice_are_kept_or_dropped_explicitly():
    raw = np.array([[3, 10, 10, 4, 30, 30], [3, 50, 50, 6, 70, 70]])
    assert len(finalize_boxes_3d(raw, (8, 100, 100), 4, 1, min_slices=1)) == 2
    assert finalize_boxes_3d(raw, (8, 100, 100), 4, 1, min_slices=2)[:, 1].tolist() == [46]


def test_26_connected_components_give_one_box_across_slices():
    mask = np.zeros((4, 10, 10), bool)
    mask[0, 2, 2] = mask[1, 3, 3] = mask[2, 4, 4] = True  # touching only by their corners
    mask[3, 8, 0] = True
    assert component_boxes(mask).tolist() == [[0, 2, 2, 3, 5, 5], [3, 8, 0, 4, 9, 1]]
    assert label_objects(mask).max() == 2 and len(np.unique(label_objects(mask)[:3])) == 2
    assert sorted(map(tuple, lazy_component_boxes(mask, chunk=(2, 4, 4)).tolist())) == \
        sorted(map(tuple, component_boxes(mask).tolist()))


def test_clip_boxes_3d_orders_corners_and_drops_empty():
    got = clip_boxes_3d(np.array([[5, 50, 60, 2, 10, 20], [0, 0, 0, 3, 0, 9], [-2, -5, -5, 1, 5, 5]]),
                        (4, 40, 40))
    assert got.tolist() == [[2, 10, 20, 4, 40, 40], [0, 0, 0, 1, 5, 5]]


def test_3d_boxes_csv_round_trip_and_2d_unchanged(tmp_path):
    boxes = np.array([[0, 1, 2, 3, 4, 5], [2, 10, 10, 5, 30, 40]])
    path = write_boxes_csv(tmp_path / "v.boxes.csv", boxes)
    assert path.read_text().splitlines()[0] == "z0,y0,x0,z1,y1,x1"
    np.testing.assert_array_equal(read_boxes_csv(path), boxes)
    assert write_boxes_csv(tmp_path / "i.boxes.csv", boxes[:, 1:5]).read_text().startswith("y0,x0,y1,x1")
    (tmp_path / "bad.boxes.csv").write_text("z0,y0,x0,z1,y1,x1\n3,0,0,3,5,5\n")
    with pytest.raises(ValueError, match="line 2: need z1 > z0"):
        read_boxes_csv(tmp_path / "bad.boxes.csv")


# -- the walk -----------------------------------------------------------------------------------
def test_an_object_across_slices_is_one_3d_box(volume):
    vol, objects = volume
    engine = Engine(make_threshold_model(S), "cpu")
    res = segment_volume(engine, vol, options=VolumeOptions(z_pad=1, z_smooth=0))
    assert res.boxes.shape == (3, 6) and res.mask.shape == SHAPE
    zs = {(b[0], b[3]) for b in res.boxes.tolist()}
    assert zs == {(2, 11), (9, 12), (0, 4)}  # ball 3-9, blob 10, corner 0-2; each padded by 1, clamped
    for name, m in objects.items():
        inside = max((box_volume(b) for b in res.boxes), key=lambda v: (v & m).sum())
        assert not (m & ~inside).any(), name  # one window holds the object on every slice
        assert dice(res.mask & inside, m) > 0.9, name
    truth = np.any(list(objects.values()), axis=0)
    assert dice(res.mask, truth) > 0.93
    ids = label_objects(res.mask)
    assert len(np.unique(ids[objects["ball"]])) == 1 and ids.max() == 3  # one 3D id per object
    # objects on one slice only: kept by default, dropped as noise with min_slices=2
    strict = segment_volume(engine, vol, options=VolumeOptions(z_pad=1, min_slices=2, z_smooth=0))
    assert len(strict.boxes) == 2 and not strict.mask[10].any()


def test_identical_slices_give_the_2d_result_on_every_slice(dsb_image):
    img, _ = dsb_image
    engine = Engine(make_tiny_model(S, seed=3), "cpu")
    res = segment_volume(engine, np.stack([img] * 3), options=VolumeOptions(z_pad=0))  # smoothing: no-op
    flat = engine.segment(img)
    assert len(res.boxes) == len(flat.boxes)
    windows = np.unique(res.boxes[:, [1, 2, 4, 5]], axis=0)
    np.testing.assert_array_equal(windows, np.unique(flat.boxes, axis=0))
    for z in range(3):
        np.testing.assert_array_equal(res.mask[z], flat.mask)


def test_chunks_on_threads_equal_the_in_memory_result(volume, tmp_path):
    vol, _ = volume
    engine = Engine(make_threshold_model(S), "cpu")
    whole = segment_volume(engine, vol)
    label = omezarr.create(tmp_path / "v.ome.zarr", SHAPE, 48, z_chunk=4)
    out = VolumeChunked(label.levels[0], chunk=48, z_chunk=4, threads=2)
    res = drive(walk_volume(engine, vol, output=out))
    assert res.counts["chunks"] > 4
    np.testing.assert_array_equal(np.asarray(label.levels[0][:]) > 0, whole.mask)
    np.testing.assert_array_equal(res.boxes, whole.boxes)


def test_an_edit_refines_only_the_changed_box_and_refuses_only_its_place(volume):
    vol, _ = volume
    engine = Engine(make_threshold_model(S), "cpu")
    first = segment_volume(engine, vol)
    known = {box_key(b): p for b, p in zip(first.boxes, first.probs, strict=True)}
    boxes = first.boxes.copy()
    old = boxes[0].copy()
    boxes[0] = [old[0], old[1] + 6, old[2] - 4, old[3] - 1, old[4] + 6, old[5] - 4]  # moved, shortened
    changed = np.stack([old, boxes[0]])
    out = VolumeInMemory(known, base=first.mask, changed=changed)
    edited = drive(walk_volume(engine, vol, boxes, stats=first.stats, output=out))
    assert edited.counts["refined"] == 1 and edited.counts["slice_crops"] == boxes[0, 3] - boxes[0, 0]
    again = segment_volume(engine, vol, boxes)
    np.testing.assert_array_equal(edited.mask, again.mask)
    outside = np.ones(SHAPE, bool)
    for z0, y0, x0, z1, y1, x1 in changed:
        outside[z0:z1, y0:y1, x0:x1] = False
    np.testing.assert_array_equal(edited.mask[outside], first.mask[outside])


def test_volume_inputs_are_checked():
    with pytest.raises(ValueError, match="not \\(Z, H, W\\)"):
        VolumeSource(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="z_pad"):
        VolumeOptions(z_pad=-1)
    with pytest.raises(ValueError, match="unknown volume normalisation"):
        VolumeOptions(norm="global")
    src = VolumeSource([np.zeros((3, 64, 64), np.uint8), np.zeros((3, 32, 32), np.uint8),
                        np.zeros((1, 16, 16), np.uint8)])
    assert src.shape == (3, 64, 64) and len(src.levels) == 2  # a level that also halves z is not used


def test_3d_label_image_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((20, 700, 600)) > 0.999).astype(np.uint8)
    path = omezarr.save_label_image(tmp_path / "v.ome.zarr", labels)
    image = omezarr.open_label_image(path)
    assert [lv.shape for lv in image.levels] == [(20, 700, 600), (20, 350, 300)]
    np.testing.assert_array_equal(image.levels[0][:], labels)
    np.testing.assert_array_equal(image.levels[1][:], omezarr.max_pool2(labels))


def test_a_dask_cluster_reopens_the_volume_and_gives_the_same_chunks(volume, tmp_path):
    distributed = pytest.importorskip("distributed")
    import tifffile

    from napari_segthenseg.engine.reader import open_image

    vol, _ = volume
    path = tmp_path / "vol.ome.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    engine = Engine(make_tiny_model(S, channels=1, seed=1), "cpu")
    src = VolumeSource(open_image(path, volume=True).levels, name=str(path))
    local = omezarr.create(tmp_path / "local.ome.zarr", SHAPE, 64, z_chunk=4)
    drive(walk_volume(engine, src, output=VolumeChunked(local.levels[0], 64, 4)))
    remote = omezarr.create(tmp_path / "cluster.ome.zarr", SHAPE, 64, z_chunk=4)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = drive(walk_volume(engine, src, output=VolumeChunked(remote.levels[0], 64, 4, client=client,
                                                                  source_path=str(path))))
    assert res.counts["chunks"] > 1 and len(res.boxes)
    np.testing.assert_array_equal(np.asarray(local.levels[0][:]), np.asarray(remote.levels[0][:]))


def test_a_drifting_object_is_cut_into_tracks_padded_only_at_its_ends():
    """A tube moving 3 px per slice: one 26-connected object. growth=None: one box whose window
    covers its whole path (SPEC 2d's rule); growth=1: boxes whose window stays as tight as the
    tube, chained along z, padded in z only where the object begins and ends."""
    from napari_segthenseg.engine.tracks import track_boxes

    mask = np.zeros((12, 64, 64), bool)
    for z in range(1, 11):
        mask[z, 10:18, 5 + 3 * z:13 + 3 * z] = True
    one = track_boxes(mask, lambda b: b, None)
    assert one.boxes.tolist() == [[1, 10, 8, 11, 18, 43]] and one.depth.tolist() == [10]
    cut = track_boxes(mask, lambda b: b, 1.0)
    assert len(cut.boxes) > 3 and (cut.boxes[:, 5] - cut.boxes[:, 2] <= 8).all()
    assert sorted(cut.boxes[:, [0, 3]].ravel().tolist())[0] == 1 and cut.boxes[:, 3].max() == 11
    assert (cut.depth == 10).all()  # every track knows its object's depth (for min_slices)
    boxes = finalize_boxes_3d(cut.boxes, mask.shape, 2, 1, objects=cut.objects)
    starts, ends = sorted(boxes[:, 0].tolist()), sorted(boxes[:, 3].tolist())
    raw_starts, raw_ends = sorted(cut.boxes[:, 0].tolist()), sorted(cut.boxes[:, 3].tolist())
    assert starts == [0, *raw_starts[1:]] and ends == [*raw_ends[:-1], 12]


def test_the_average_along_z_keeps_empty_slices_and_thin_objects():
    from napari_segthenseg.engine.volume_out import smoothed

    probs = np.zeros((5, 4, 4), np.float32)
    probs[1:4] = 0.9
    probs[2, 0, 0] = 0.0  # a hole on one slice is filled from its neighbours
    probs[3, 3, 3] = 0.0
    assert smoothed(probs, 2, 1)[0, 0] == pytest.approx(0.6)
    np.testing.assert_array_equal(smoothed(probs, 0, 2), probs[0])  # empty stays empty
    thin = np.zeros((3, 4, 4), np.float32)
    thin[1] = 0.8
    np.testing.assert_array_equal(smoothed(thin, 1, 1), thin[1])  # one slice: not erased


def test_slices_beyond_the_trained_size_are_read_whole_at_the_trained_scale(volume):
    """Slices twice the training images' side: each read whole at the trained scale with one window
    (as a training image), batched; larger ones: tiles with local windows, slice by slice."""
    from napari_segthenseg.engine.scale import TrainedScale
    from napari_segthenseg.engine.volume import describe_plan, whole_slices

    vol, objects = volume  # 96 x 128 slices
    model = make_threshold_model(S)
    model.settings.trained_scale = TrainedScale(median=2.0, low=2.0, high=2.0, aspect=1.0, window=64)
    engine = Engine(model, "cpu")
    plan = engine.plan(SHAPE[1:])
    assert plan.tiled and plan.scale == 2.0 and whole_slices(plan, SHAPE[1:])
    assert describe_plan(plan, SHAPE[1:]) == "each slice whole at 2 image px per rough px"
    res = segment_volume(engine, vol, options=VolumeOptions(z_smooth=0))
    assert res.rough.mask.shape == (SHAPE[0], 48, 64) and res.counts["rough_px"] == SHAPE[0] * 48 * 64
    assert len(res.boxes) == 3 and dice(res.mask, np.any(list(objects.values()), axis=0)) > 0.9
    big = np.pad(vol, ((0, 0), (0, 64), (0, 64)), constant_values=20)  # 160 x 192: beyond 2 x 64
    assert not whole_slices(engine.plan(big.shape[1:]), big.shape[1:])
    tiled = segment_volume(engine, big, options=VolumeOptions(z_smooth=0))
    assert len(tiled.boxes) == 3
