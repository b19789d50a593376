"""PROMISE12 preprocessing and geometry round trip (generated MetaImage volumes, optional real data)."""
import json
import logging
import math

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from common.geometry import (
    load_volume_meta,
    resize_slices,
    restore_original_geometry,
    write_label_image,
)
from conftest import skip_without_real_data
from dataloaders.preprocess_promise12 import (
    convention_splits,
    equalize_slice,
    normalize_slice,
    preprocess_promise12,
    read_case_list,
)

SIZE_XYZ = (40, 36, 5)
SPACING = (0.6, 0.6, 3.0)
ORIGIN = (-12.5, 30.25, 7.0)
ANGLE = math.radians(30)
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), 0.0,
             math.sin(ANGLE), math.cos(ANGLE), 0.0,
             0.0, 0.0, 1.0)


def blob_label(size_xyz=SIZE_XYZ):
    """(z, y, x) uint8 ellipse through every slice, centred in-plane."""
    nx, ny, nz = size_xyz
    y, x = np.mgrid[:ny, :nx]
    inside = ((y - ny / 2) / (ny / 3.5)) ** 2 + ((x - nx / 2) / (nx / 3.5)) ** 2 <= 1
    return np.repeat(inside[None], nz, axis=0).astype(np.uint8)


def write_case(folder, case, size_xyz=SIZE_XYZ, label=None, seg_origin=ORIGIN, ext=".mhd",
               compress=True, seed=0):
    """Write CaseXX image (uint16, textured, bright blob) and segmentation with shared geometry."""
    label = blob_label(size_xyz) if label is None else label
    rng = np.random.default_rng(seed)
    image = rng.integers(100, 400, size=label.shape) + 800 * (label > 0)
    image[:, :, : size_xyz[0] // 4] += 300  # a brighter band: gives CLAHE something to equalise
    for array, name, origin in ((image.astype(np.uint16), case, ORIGIN),
                                (label, f"{case}_segmentation", seg_origin)):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(SPACING)
        img.SetOrigin(origin)
        img.SetDirection(DIRECTION)
        sitk.WriteImage(img, str(folder / f"{name}{ext}"), compress)
    return image, label


def read_h5(path):
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()]


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    return folder


def test_round_trip_restores_original_geometry(raw, tmp_path):
    _, label = write_case(raw, "Case00")
    out = tmp_path / "out"
    summary = preprocess_promise12(raw, out, image_size=32)
    assert summary["splits"] == {"train": ["Case00"], "val": [], "test": []}

    image, lab = read_h5(out / "data" / "Case00.h5")
    assert image.shape == lab.shape == (5, 32, 32)
    assert image.dtype == np.float32 and lab.dtype == np.uint8
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(lab)) <= {0, 1} and lab.sum() > 0
    assert (out / "train_slices.list").read_text().split() == [f"Case00_slice_{k}" for k in range(5)]
    slice_image, slice_label = read_h5(out / "data" / "slices" / "Case00_slice_3.h5")
    np.testing.assert_array_equal(slice_image, image[3])
    np.testing.assert_array_equal(slice_label, lab[3])

    meta = load_volume_meta(out / "data" / "Case00.h5")
    # stored grid: z unchanged, y = 0.6 * 36 / 32, x = 0.6 * 40 / 32 (array order)
    np.testing.assert_allclose(meta["spacing"], (3.0, 0.675, 0.75))
    np.testing.assert_allclose(meta["orig_spacing"], SPACING)
    np.testing.assert_allclose(meta["origin"], ORIGIN)
    np.testing.assert_allclose(meta["direction"], DIRECTION, atol=1e-12)
    assert meta["orig_size"] == SIZE_XYZ

    path = write_label_image(lab, meta, tmp_path / "pred.nii.gz")
    back = sitk.ReadImage(str(path))
    source = sitk.ReadImage(str(raw / "Case00.mhd"))
    assert back.GetSize() == source.GetSize() == SIZE_XYZ
    np.testing.assert_allclose(back.GetSpacing(), source.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), atol=1e-5)
    restored = sitk.GetArrayFromImage(back)
    assert restored.dtype == np.uint8
    assert dice(restored, label) >= 0.9


def test_resize_slices_exact_shapes_and_identity():
    rng = np.random.default_rng(1)
    for h, w, s in ((320, 320, 256), (384, 384, 256), (37, 23, 32), (5, 7, 64)):
        vol = rng.random((2, h, w))
        assert resize_slices(vol, (s, s), order=1).shape == (2, s, s)
        assert resize_slices(vol, (s, s), order=0).shape == (2, s, s)
    # pixel centres aligned: [0, 1] -> sample points -0.25, 0.25, 0.75, 1.25 (edges clamped)
    np.testing.assert_allclose(resize_slices(np.array([[[0.0, 1.0]]]), (1, 4), order=1),
                               [[[0.0, 0.25, 0.75, 1.0]]])
    labels = rng.integers(0, 2, size=(3, 8, 8))
    up = resize_slices(labels, (16, 16), order=0)
    # nearest upsampling by 2 duplicates each pixel; downsampling back recovers the input
    np.testing.assert_array_equal(up, labels.repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_array_equal(resize_slices(up, (8, 8), order=0), labels)
    with pytest.raises(ValueError, match="order"):
        resize_slices(labels, (4, 4), order=3)


def test_restore_original_geometry_checks_slice_count():
    meta = {"orig_size": (12, 10, 4)}
    restored = restore_original_geometry(np.ones((4, 16, 16), np.uint8), meta)
    assert restored.shape == (4, 10, 12) and restored.min() == 1
    with pytest.raises(ValueError, match="3 slices"):
        restore_original_geometry(np.ones((3, 16, 16), np.uint8), meta)
    with pytest.raises(ValueError, match="orig_size"):
        restore_original_geometry(np.ones((3, 16, 16), np.uint8), {})


def test_write_label_image_without_full_meta(tmp_path):
    pred = np.zeros((3, 6, 5), np.uint8)
    pred[1, 2:4, 1:3] = 2
    plain = sitk.ReadImage(str(write_label_image(pred, None, tmp_path / "plain.nii.gz")))
    assert plain.GetSize() == (5, 6, 3)
    assert plain.GetSpacing() == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain), pred)
    acdc = sitk.ReadImage(str(write_label_image(pred, {"spacing": (10.0, 1.5, 1.25)}, tmp_path / "a.nii.gz")))
    np.testing.assert_allclose(acdc.GetSpacing(), (1.25, 1.5, 10.0))
    with pytest.raises(ValueError, match="integers"):
        write_label_image(pred - 1.0, None, tmp_path / "bad.nii.gz")


def test_normalize_constant_slice_gives_zeros():
    out = normalize_slice(np.full((7, 9), 123.0))
    assert out.shape == (7, 9)
    assert not np.isnan(out).any() and np.all(out == 0)
    assert np.all(equalize_slice(out, 2) == 0)


def test_normalize_ramp_hand_computed():
    ramp = np.arange(201, dtype=np.float64).reshape(3, 67)
    out = normalize_slice(ramp)
    # 0.5th / 99.5th percentiles of 0..200 are 1 and 199: (x - 1) / 198, clipped to [0, 1]
    flat = out.ravel()
    assert flat[0] == 0.0 and flat[1] == 0.0 and flat[200] == 1.0 and flat[199] == 1.0
    assert flat[100] == pytest.approx(0.5)
    assert flat[50] == pytest.approx(49 / 198)
    assert out.min() == 0.0 and out.max() == 1.0


def test_clahe_changes_image_only_when_on(raw, tmp_path):
    write_case(raw, "Case00")
    plain = preprocess_promise12(raw, tmp_path / "plain", image_size=32)
    eq = preprocess_promise12(raw, tmp_path / "eq", image_size=32, clahe=True)
    assert plain["clahe"] is False and eq["clahe"] is True
    assert json.loads((tmp_path / "eq" / "dataset.json").read_text())["clahe"] is True
    img_plain, lab_plain = read_h5(tmp_path / "plain" / "data" / "Case00.h5")
    img_eq, lab_eq = read_h5(tmp_path / "eq" / "data" / "Case00.h5")
    np.testing.assert_array_equal(lab_plain, lab_eq)
    assert img_eq.min() >= 0.0 and img_eq.max() <= 1.0
    assert np.abs(img_eq - img_plain).mean() > 0.02

    # off = exactly bilinear resize + robust normalisation, nothing else
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Case00.mhd"))).astype(np.float64)
    expected = np.stack([normalize_slice(s) for s in resize_slices(source, (32, 32), 1)])
    np.testing.assert_allclose(img_plain, expected.astype(np.float32))
    with h5py.File(tmp_path / "eq" / "data" / "Case00.h5", "r") as f:
        assert bool(f.attrs["clahe"]) and int(f.attrs["image_size"]) == 32


def test_convention_splits():
    ids = [f"Case{k:02d}" for k in range(49, -1, -1)]
    splits = convention_splits(ids)
    assert splits["train"] == [f"Case{k:02d}" for k in range(35)]
    assert splits["val"] == [f"Case{k:02d}" for k in range(35, 40)]
    assert splits["test"] == [f"Case{k:02d}" for k in range(40, 50)]
    with pytest.raises(ValueError, match="Case50"):
        convention_splits(["Case50"])


def test_convention_applied_without_lists(raw, tmp_path):
    for k, case in enumerate(("Case36", "Case02", "Case41")):
        write_case(raw, case, size_xyz=(12, 10, 2), seed=k)
    out = tmp_path / "out"
    preprocess_promise12(raw, out, image_size=16)
    assert (out / "train.list").read_text().split() == ["Case02"]
    assert (out / "val.list").read_text().split() == ["Case36"]
    assert (out / "test.list").read_text().split() == ["Case41"]
    assert (out / "train_slices.list").read_text().split() == ["Case02_slice_0", "Case02_slice_1"]
    assert sorted(p.name for p in (out / "data").glob("*.h5")) == ["Case02.h5", "Case36.h5", "Case41.h5"]
    assert json.loads((out / "dataset.json").read_text())["split_source"] == "convention"


def test_lists_order_suffixes_and_withheld_test_cases(raw, tmp_path, caplog):
    for k, case in enumerate(("Case01", "Case03", "Case05", "Case07")):
        write_case(raw, case, size_xyz=(12, 10, 2), seed=k, ext=".nii.gz" if k == 3 else ".mhd")
    (raw / "train.list").write_text("Case03.mhd\n\nCase01\n")
    (raw / "val.list").write_text("Case05\n")
    (raw / "test.list").write_text("Case07\nCase09\nCase11\n")
    assert read_case_list(raw / "train.list") == ["Case03", "Case01"]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = preprocess_promise12(raw, out, image_size=16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Case09 Case11" in warnings[0]
    assert summary["withheld_test_cases"] == ["Case09", "Case11"]
    assert (out / "test.list").read_text().split() == ["Case07"]
    assert (out / "train_slices.list").read_text().split() == [
        "Case03_slice_0", "Case03_slice_1", "Case01_slice_0", "Case01_slice_1"]
    assert not (out / "data" / "Case09.h5").exists()


def test_missing_listed_case_is_an_error(raw, tmp_path):
    write_case(raw, "Case01", size_xyz=(12, 10, 2))
    (raw / "train.list").write_text("Case01\nCase04\n")
    (raw / "val.list").write_text("")
    (raw / "test.list").write_text("")
    with pytest.raises(FileNotFoundError, match=r"train\.list lists Case04"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)
    (raw / "train.list").write_text("Case01\n")
    (raw / "test.list").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.list"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)


def test_image_without_segmentation_is_refused(raw, tmp_path):
    write_case(raw, "Case00", size_xyz=(12, 10, 2))
    (raw / "Case00_segmentation.mhd").unlink()
    with pytest.raises(FileNotFoundError, match="Case00.mhd has no segmentation"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)


def test_geometry_mismatch_is_refused(raw, tmp_path):
    shifted = (ORIGIN[0] + 0.01, ORIGIN[1], ORIGIN[2])
    write_case(raw, "Case00", size_xyz=(12, 10, 2), seg_origin=shifted)
    with pytest.raises(ValueError, match="Case00_segmentation.mhd: origin"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)
    within = (ORIGIN[0] + 1e-4, ORIGIN[1], ORIGIN[2])
    write_case(raw, "Case00", size_xyz=(12, 10, 2), seg_origin=within)
    assert preprocess_promise12(raw, tmp_path / "out", image_size=16)["splits"]["train"] == ["Case00"]
    write_case(raw, "Case00", size_xyz=(12, 10, 2))
    small = sitk.GetImageFromArray(np.zeros((2, 10, 11), np.uint8))
    small.CopyInformation(sitk.ReadImage(str(raw / "Case00.mhd"))[:11, :, :])
    sitk.WriteImage(small, str(raw / "Case00_segmentation.mhd"))
    with pytest.raises(ValueError, match="size"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)


def test_image_that_is_not_3d_scalar_is_refused(raw, tmp_path):
    write_case(raw, "Case00", size_xyz=(12, 10, 2))
    flat = sitk.GetImageFromArray(np.zeros((10, 12), np.uint16))  # one 2-D slice in place of the volume
    sitk.WriteImage(flat, str(raw / "Case00.mhd"))
    with pytest.raises(ValueError, match=r"Case00.mhd: a 2-D image of size \(12, 10\); expected a 3-D"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)
    rgb = sitk.GetImageFromArray(np.zeros((2, 10, 12, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(raw / "Case00.mhd"))
    with pytest.raises(ValueError, match="Case00.mhd: 3 channels per voxel"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)


def test_label_value_two_is_refused(raw, tmp_path):
    label = blob_label((12, 10, 2))
    label[1, 5, 6] = 2
    write_case(raw, "Case00", size_xyz=(12, 10, 2), label=label)
    with pytest.raises(ValueError, match=r"Case00_segmentation.mhd: label values must be 0 or 1, found \[2\]"):
        preprocess_promise12(raw, tmp_path / "out", image_size=16)


def test_rerun_is_byte_identical(raw, tmp_path):
    write_case(raw, "Case00", size_xyz=(20, 18, 3))
    write_case(raw, "Case37", size_xyz=(20, 18, 2), seed=3)
    out = tmp_path / "out"

    def snapshot():
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    preprocess_promise12(raw, out, image_size=24, clahe=True)
    first = snapshot()
    preprocess_promise12(raw, out, image_size=24, clahe=True)
    second = snapshot()
    assert len(first) == 2 + 3 + 4 + 1 + 1  # volumes, slices, lists, dataset.json, slice_index.npz
    assert first == second
    arrays = [read_h5(out / "data" / "Case37.h5") for _ in range(2)]
    np.testing.assert_array_equal(arrays[0][0], arrays[1][0])


def test_real_prostate_two_cases(real_prostate_root, tmp_path, caplog):
    skip_without_real_data(real_prostate_root, "real prostate data")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = preprocess_promise12(real_prostate_root, out, image_size=64, cases=["Case00", "Case02"])
    assert summary["splits"] == {"train": ["Case00"], "val": ["Case02"], "test": []}
    assert len(summary["withheld_test_cases"]) == 8
    assert any("withheld" in r.getMessage() for r in caplog.records)
    # Case00: 320 x 320 x 15 at 0.6 x 0.6 x 4.0 mm; Case02: 320 x 320 x 24 at 0.625 x 0.625 x 3.6 mm
    for case, depth, spacing in (("Case00", 15, (4.0, 3.0, 3.0)), ("Case02", 24, (3.6, 3.125, 3.125))):
        image, label = read_h5(out / "data" / f"{case}.h5")
        assert image.shape == label.shape == (depth, 64, 64)
        assert image.min() >= 0.0 and image.max() <= 1.0 and np.isfinite(image).all()
        assert set(np.unique(label)) == {0, 1}
        assert 0.001 < label.mean() < 0.2  # the gland is present and small
        meta = load_volume_meta(out / "data" / f"{case}.h5")
        np.testing.assert_allclose(meta["spacing"], spacing, rtol=1e-6)
        assert meta["orig_size"] == (320, 320, depth)
    assert len((out / "train_slices.list").read_text().split()) == 15


# ------------------------------------------------------------------ found by mutation testing (docs/mutation.md)

@pytest.mark.parametrize("call,message", [
    (lambda: resize_slices(np.zeros((4, 4)), (2, 2), 0), r"^resize_slices expects a \(D, H, W\) array, got shape \(4, 4\)$"),
    (lambda: resize_slices(np.zeros((1, 4, 4)), (2, 0), 0), r"^resize_slices: output size must be positive, got \(2, 0\)$"),
    (lambda: resize_slices(np.zeros((1, 4, 4)), (0, 2), 0), r"^resize_slices: output size must be positive, got \(0, 2\)$"),
    (lambda: restore_original_geometry(np.zeros((4, 4)), {"orig_size": (4, 4, 1)}),
     r"^restore_original_geometry expects a \(D, S, S\) array, got shape \(4, 4\)$"),
    (lambda: restore_original_geometry(np.zeros((1, 4, 4)), {}), r"^restore_original_geometry: meta has no 'orig_size'"),
    (lambda: restore_original_geometry(np.zeros((1, 4, 4)), {"orig_size": (4, 4, 1), "slice_axis": 3}),
     r"^meta\['slice_axis'\] must be 0, 1 or 2, got 3$"),
    (lambda: write_label_image(np.zeros((4, 4)), None, "x.nii.gz"), r"^write_label_image expects a \(D, H, W\) array"),
    (lambda: write_label_image(np.full((1, 2, 2), 256), None, "x.nii.gz"),
     r"^write_label_image: labels must be integers in \[0, 255\]$"),
    (lambda: write_label_image(np.full((1, 2, 2), 1.5), None, "x.nii.gz"), r"labels must be integers in \[0, 255\]$"),
    (lambda: write_label_image(np.zeros((1, 2, 2)), {"orig_size": (2, 2, 1), "origin": (0, 0, 0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)},
                               "x.nii.gz"), r"^write_label_image: meta has 'orig_size' but no 'orig_spacing'$"),
] + [(lambda key=key, n=n: restore_original_geometry(np.zeros((1, 4, 4)), {"orig_size": (4, 4, 1), key: (1.0,) * (n - 1)}),
      rf"^meta\['{key}'\] must have {n} values, got {n - 1}$")
     for key, n in (("spacing", 3), ("orig_spacing", 3), ("origin", 3), ("direction", 9))])
def test_geometry_checks_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_label_image_bounds_dtype_compression_and_folders(tmp_path):
    path = write_label_image(np.full((1, 2, 3), 255, dtype=np.int64), None, tmp_path / "new" / "dir" / "l.nii.gz")
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == sitk.sitkUInt8 and int(sitk.GetArrayFromImage(written).max()) == 255
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip-compressed, as its ending says


def test_restore_along_each_slice_axis():
    pred = np.arange(2 * 4 * 4).reshape(2, 4, 4) % 3
    for axis, size in ((0, (2, 6, 4)), (1, (6, 2, 4)), (2, (6, 4, 2))):
        restored = restore_original_geometry(pred, {"orig_size": size, "slice_axis": axis})
        assert restored.shape == tuple(reversed(size))


def test_stored_sizes_load_as_integers(tmp_path):
    import h5py
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.attrs["orig_size"] = np.array([40.0, 36.0, 5.0])
        f.attrs["slice_axis"] = np.array([1.0])
        f.attrs["spacing"] = np.array([3, 1, 1])
    meta = load_volume_meta(tmp_path / "v.h5")
    assert meta["orig_size"] == (40, 36, 5) and all(type(v) is int for v in meta["orig_size"])
    assert meta["slice_axis"] == 1 and meta["spacing"] == (3.0, 1.0, 1.0) and type(meta["spacing"][0]) is float
    with pytest.raises(FileNotFoundError, match=r"^load_volume_meta: no such file .*missing.h5$"):
        load_volume_meta(tmp_path / "missing.h5")


def test_geometry_mismatch_message_shows_six_digits():
    from common.geometry import check_geometry
    image, label = sitk.Image(4, 4, 2, sitk.sitkUInt8), sitk.Image(4, 4, 2, sitk.sitkUInt8)
    label.SetSpacing((0.8, 0.9, 3.0))
    with pytest.raises(ValueError, match=r"^lab: spacing \(0.8, 0.9, 3\) differs from the image's \(1, 1, 1\) "
                                         r"\(tolerance 0.001; img\)$"):
        check_geometry(image, label, "img", "lab")


# ------------------------------------------------------------------ geometry edges (docs/mutation.md)

def test_resize_to_one_pixel_wide_or_high_is_allowed():
    volume = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    assert resize_slices(volume, (4, 1), order=0).shape == (2, 4, 1)
    assert resize_slices(volume, (1, 6), order=0).shape == (2, 1, 6)
    with pytest.raises(ValueError, match="output size must be positive"):
        resize_slices(volume, (4, 0), order=0)


def test_label_geometry_may_differ_by_exactly_the_tolerance():
    from common.geometry import GEOMETRY_TOLERANCE, check_geometry
    image = sitk.Image(4, 4, 2, sitk.sitkUInt8)
    label = sitk.Image(4, 4, 2, sitk.sitkUInt8)
    label.SetOrigin((GEOMETRY_TOLERANCE, 0.0, 0.0))
    check_geometry(image, label, "img.nii.gz", "lab.nii.gz")  # exactly at the tolerance: accepted
    label.SetOrigin((2 * GEOMETRY_TOLERANCE, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"^lab\.nii\.gz: origin \(0\.002, 0, 0\) differs"):
        check_geometry(image, label, "img.nii.gz", "lab.nii.gz")


def test_write_label_image_checks_orig_size_length_first(tmp_path):
    from common.geometry import write_label_image
    meta = {"orig_size": (4, 4), "orig_spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
            "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}
    with pytest.raises(ValueError, match=r"^meta\['orig_size'\] must have 3 values, got 2$"):
        write_label_image(np.zeros((2, 4, 4), np.uint8), meta, tmp_path / "p.nii.gz")


def test_written_labels_are_compressed_in_every_format(tmp_path):
    """A .mha / .nrrd prediction is stored compressed, as a .nii.gz one is (SimpleITK writes these raw
    unless asked); the voxels read back unchanged."""
    from common.geometry import write_label_image
    pred = np.zeros((8, 32, 32), np.uint8)
    pred[2:6, 8:24, 8:24] = 1
    for name, marker in (("p.mha", b"CompressedData = True"), ("p.nrrd", b"encoding: gzip")):
        path = write_label_image(pred, {}, tmp_path / name)
        assert marker in path.read_bytes()[:1000], name
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), pred)
