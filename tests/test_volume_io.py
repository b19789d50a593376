"""dataloaders.volume_io on hand-made volumes: each normalisation of a recipe (the one predict.py replays
on a new scan), the slice-axis rule, the recipe check, the label stack and the blank-image reasons, each
against values computed here (what the mutation run of docs/mutation.md found unchecked)."""
import struct
import warnings

import h5py

import numpy as np
import pytest
import SimpleITK as sitk

from common.geometry import resize_slices
from dataloaders import image_check
from dataloaders.preprocess_promise12 import preprocess_arrays
from dataloaders.volume_io import (DEFAULT_PERCENTILES, blank_reason, check_image_header, check_recipe,
                                   export_h5_volume, from_slices, geometry_meta, image_ending, preprocess_image,
                                   preprocess_label, slice_axis, to_slices)

RNG = np.random.default_rng(7)
VOLUME = RNG.integers(-50, 400, size=(3, 6, 5)).astype(np.int16)  # (z, y, x): 3 slices of 6 x 5


def itk(array, spacing=(1.0, 1.0, 3.0)):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(spacing)
    return image


def recipe(normalization, size=None, **extra):
    return {"normalization": normalization, "slice_axis": "largest_spacing", "size": size, **extra}


# ------------------------------------------------------------------ the three normalisations

def test_minmax_maps_the_volume_range_to_zero_one_at_native_size():
    volume, axis = preprocess_image(itk(VOLUME), recipe("minmax"))
    lo, hi = float(VOLUME.min()), float(VOLUME.max())
    assert axis == 2 and volume.dtype == np.float32 and volume.shape == VOLUME.shape
    np.testing.assert_allclose(volume, (VOLUME - lo) / (hi - lo), atol=1e-7)
    assert volume.min() == 0 and volume.max() == 1


def test_minmax_resizes_bilinearly_to_the_recipe_size():
    volume, _ = preprocess_image(itk(VOLUME), recipe("minmax", size=8))
    lo, hi = float(VOLUME.min()), float(VOLUME.max())
    expected = resize_slices((VOLUME - lo) / (hi - lo), (8, 8), order=1)
    assert volume.shape == (3, 8, 8) and volume.dtype == np.float32
    np.testing.assert_allclose(volume, expected, atol=1e-6)
    nearest = resize_slices((VOLUME - lo) / (hi - lo), (8, 8), order=0)
    assert not np.allclose(volume, nearest, atol=1e-3)  # the interpolation order matters on these values


@pytest.mark.parametrize("normalization", ["minmax", "percentile_minmax"])
def test_a_constant_volume_becomes_zeros_without_an_error(normalization):
    volume, _ = preprocess_image(itk(np.full((2, 4, 4), 7, np.int16)), recipe(normalization))
    assert volume.dtype == np.float32 and volume.shape == (2, 4, 4) and not volume.any()


def test_percentile_minmax_clips_to_the_volume_percentiles():
    volume, _ = preprocess_image(itk(VOLUME), recipe("percentile_minmax", percentiles=[10, 90]))
    low, high = np.percentile(VOLUME, [10, 90])
    np.testing.assert_allclose(volume, (np.clip(VOLUME, low, high) - low) / (high - low), atol=1e-6)
    assert volume.shape == VOLUME.shape and volume.dtype == np.float32


def test_percentile_minmax_defaults_to_the_documented_percentiles_and_resizes():
    default, _ = preprocess_image(itk(VOLUME), recipe("percentile_minmax", size=8))
    explicit, _ = preprocess_image(itk(VOLUME), recipe("percentile_minmax", size=8,
                                                       percentiles=list(DEFAULT_PERCENTILES)))
    other, _ = preprocess_image(itk(VOLUME), recipe("percentile_minmax", size=8, percentiles=[10, 90]))
    assert default.shape == (3, 8, 8)
    np.testing.assert_array_equal(default, explicit)
    assert not np.allclose(default, other)


@pytest.mark.parametrize("clahe", [False, True])
def test_promise12_slice_is_the_promise12_preprocessing_itself(clahe):
    volume, axis = preprocess_image(itk(VOLUME), recipe("promise12_slice", size=16, clahe=clahe))
    expected, _ = preprocess_arrays(VOLUME, np.zeros(VOLUME.shape, np.uint8), 16, clahe)
    assert axis == 2 and volume.shape == (3, 16, 16)
    np.testing.assert_array_equal(volume, expected)


def test_promise12_slice_without_clahe_in_the_recipe_means_no_clahe():
    absent, _ = preprocess_image(itk(VOLUME), recipe("promise12_slice", size=16))
    without, _ = preprocess_image(itk(VOLUME), recipe("promise12_slice", size=16, clahe=False))
    with_clahe, _ = preprocess_image(itk(VOLUME), recipe("promise12_slice", size=16, clahe=True))
    np.testing.assert_array_equal(absent, without)
    assert not np.array_equal(absent, with_clahe)


def test_an_overflowing_normalisation_names_the_file_and_its_range():
    huge = np.array([[[-1e308, 1e308], [0, 1]], [[2, 3], [4, 5]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warnings are held back: the one line is the error
        with pytest.raises(ValueError) as err:
            preprocess_image(itk(huge), recipe("minmax"), path="scan.nrrd")
        assert str(err.value) == ("scan.nrrd: its intensities (-1e+308 .. 1e+308) overflow the normalisation; "
                                  "expected a finite range")
        with pytest.raises(ValueError) as err:
            preprocess_image(itk(huge), recipe("percentile_minmax", percentiles=[0, 100]))
        assert str(err.value).startswith("image: its intensities (-1e+308 .. 1e+308)")  # the default name


def test_minmax_of_a_full_int16_range_does_not_wrap():
    wide = np.array([[[-30000, 30000], [0, 15000]]] * 2, np.int16)
    volume, _ = preprocess_image(itk(wide), recipe("minmax"))
    np.testing.assert_allclose(volume[0], [[0, 1], [0.5, 0.75]], atol=1e-7)


def test_a_slice_axis_that_cannot_be_cut_names_the_file():
    with pytest.raises(ValueError) as err:
        preprocess_image(itk(np.zeros((4, 4, 1), np.int16)), {**recipe("minmax"), "slice_axis": "z"}, path="a.mha")
    assert str(err.value) == ("a.mha: slice axis z: the image has 1 voxel(s) along x; a slice needs at least 2 "
                              "in each in-plane direction")


# ------------------------------------------------------------------ the slice axis and the recipe

@pytest.mark.parametrize("spacing", [(1, 1, 0), (1, float("nan"), 1), (float("inf"), 1, 1), (1, -2, 1)])
def test_slice_axis_refuses_spacings_that_are_not_positive_and_finite(spacing):
    with pytest.raises(ValueError) as err:
        slice_axis(spacing, "largest_spacing")
    assert str(err.value) == f"voxel spacing {[float(s) for s in spacing]}: expected positive finite sizes"


def test_slice_axis_two_voxels_are_enough_one_is_not():
    assert slice_axis((1.0, 1.0, 3.0), "largest_spacing", (5, 2, 7)) == 2
    assert slice_axis((1.0, 1.0, 3.0), "largest_spacing", (5, 1, 7)) == 1
    with pytest.raises(ValueError) as err:
        slice_axis((1.0, 1.0, 3.0), "largest_spacing", (1, 1, 7))
    assert str(err.value) == "size [1, 1, 7]: fewer than 2 voxels along 2 axes; expected a 3-D volume"


def test_slice_axis_a_spacing_at_the_tie_tolerance_counts_as_the_largest():
    top = 3.0
    assert slice_axis((1.0, top, top * (1 - 1e-3)), "largest_spacing") == 2   # exactly at the tolerance
    assert slice_axis((1.0, top, top * (1 - 2e-3)), "largest_spacing") == 1   # beyond it


@pytest.mark.parametrize("change, message", [
    ({"normalization": "zscore"},
     "preprocessing normalization 'zscore': expected one of ['percentile_minmax', 'minmax', 'promise12_slice']"),
    ({"slice_axis": "w"}, "preprocessing slice_axis 'w': expected one of ['largest_spacing', 'x', 'y', 'z']"),
    ({"size": 7}, "preprocessing size 7: expected an integer >= 8 or null"),
    ({"size": 8.0}, "preprocessing size 8.0: expected an integer >= 8 or null"),
    ({"size": "256"}, "preprocessing size '256': expected an integer >= 8 or null"),
])
def test_check_recipe_names_the_field_and_what_was_expected(change, message):
    with pytest.raises(ValueError) as err:
        check_recipe({**recipe("minmax"), **change})
    assert str(err.value) == message


@pytest.mark.parametrize("size", [None, 8, 256])
def test_check_recipe_accepts_null_and_integers_from_8(size):
    assert check_recipe(recipe("minmax", size=size))["size"] == size


# ------------------------------------------------------------------ labels and blank images

def test_preprocess_label_is_a_nearest_uint8_stack():
    label = np.zeros((2, 4, 4), np.uint8)
    label[:, 1:3, 1:3] = 2
    native = preprocess_label(label, 2, None)
    assert native.dtype == np.uint8 and native.shape == (2, 4, 4)
    np.testing.assert_array_equal(native, label)
    resized = preprocess_label(label, 2, 8)
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 2}  # nearest: no value in between
    np.testing.assert_array_equal(resized, resize_slices(label, (8, 8), order=0))


def test_blank_reason_tells_a_constant_image_from_equal_percentiles():
    varied = itk(VOLUME)
    assert blank_reason(varied, preprocess_image(varied, recipe("minmax"))[0]) is None
    constant = itk(np.full((2, 3, 3), 7, np.int16))
    assert blank_reason(constant, np.zeros((2, 3, 3), np.float32)) == "constant image (every voxel 7)"
    one_voxel = itk(np.full((1, 1, 1), 4, np.int16))
    assert blank_reason(one_voxel, np.zeros((1, 1, 1), np.float32)) == "constant image (every voxel 4)"
    spike = np.zeros((4, 10, 10), np.int16)
    spike[0, 0, 0] = 5  # one voxel of 400: the 0.5 and 99.5 percentiles are both 0
    image = itk(spike)
    volume, _ = preprocess_image(image, recipe("percentile_minmax"))
    assert not volume.any()
    assert blank_reason(image, volume) == "its intensities normalise to one value (equal low and high percentiles)"
    assert blank_reason(constant, np.zeros((0, 3, 3), np.float32)) is None


# ------------------------------------------------------------------ the header check predict runs first

def test_check_image_header_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        check_image_header(tmp_path / "gone.nii.gz")
    assert str(err.value) == f"{tmp_path / 'gone.nii.gz'}: no such file"


def test_check_image_header_refuses_short_data_before_itk_reads(tmp_path):
    path = tmp_path / "cut.nii"
    sitk.WriteImage(itk(VOLUME), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError) as err:
        check_image_header(path)
    message = str(err.value)
    assert message.startswith(str(path)) and str(len(data) - 352) in message and "\n" not in message


def test_check_image_header_names_the_file_of_a_two_channel_image(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 4, 2), np.float32), isVector=True), str(path))
    with pytest.raises(ValueError) as err:
        check_image_header(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_check_image_header_names_a_two_dimensional_image_and_its_size(tmp_path):
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.int16)), str(path))
    with pytest.raises(ValueError) as err:
        check_image_header(path)
    assert str(err.value) == (f"{path}: a 2-D image of size (5, 4); expected a 3-D single-channel image (split "
                              f"4-D series into one file per volume)")


def test_check_image_header_refuses_a_negative_spacing_naming_the_file(tmp_path):
    path = tmp_path / "flip.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 3\nspacings: 1 -1 1\nencoding: raw\n"
                     b"endian: little\n\n" + np.zeros((3, 4, 4), np.int16).tobytes())
    with pytest.raises(ValueError) as err:
        check_image_header(path)
    assert str(err.value) == f"{path}: voxel spacing [1.0, -1.0, 1.0]; expected positive finite sizes"


def nifti2(path, array):
    """A NIfTI-2 file (540-byte header, int16 voxels at offset 544) written by hand."""
    head = bytearray(544)
    head[0:12] = struct.pack("<i", 540) + b"n+2\x00\r\n\x1a\n"
    head[12:16] = struct.pack("<hh", 4, 16)
    head[16:80] = struct.pack("<8q", 3, *reversed(array.shape), 1, 1, 1, 1)
    head[104:168] = struct.pack("<8d", 1, 1, 1, 2.5, 0, 0, 0, 0)
    head[168:192] = struct.pack("<qdd", 544, 1, 0)
    path.write_bytes(bytes(head) + array.astype("<i2").tobytes())


def test_check_image_header_says_what_itk_could_not_read(tmp_path):
    path = tmp_path / "two.nii"
    nifti2(path, VOLUME)
    for check in (check_image_header, image_check.read_image):  # ITK's words differ with its ImageIO named
        with pytest.raises(ValueError) as err:
            check(path)
        assert str(err.value) == (f"{path}: not a readable image (a NIfTI-2 file, which this SimpleITK does not "
                                  f"read: save it as NIfTI-1)")
    odd = tmp_path / "odd.nii"  # NIfTI-1 with a float128 datatype: sizes agree, ITK has no such component type
    sitk.WriteImage(itk(VOLUME), str(odd))
    data = bytearray(odd.read_bytes())
    data[70:74] = struct.pack("<hh", 1536, 128)
    odd.write_bytes(bytes(data[:352]) + bytes(16 * VOLUME.size))
    with pytest.raises(ValueError) as err:
        check_image_header(odd)
    assert str(err.value).startswith(f"{odd}: not a readable image (Unknown component type")  # ITK's own words
    assert "\n" not in str(err.value)


def test_check_image_header_returns_the_header_geometry(tmp_path):
    path = tmp_path / "ok.nrrd"
    image = itk(VOLUME, spacing=(0.5, 0.7, 2.5))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(path))
    reader = check_image_header(path)
    assert reader.GetSize() == (5, 6, 3) and reader.GetSpacing() == (0.5, 0.7, 2.5)
    assert reader.GetOrigin() == (1.0, 2.0, 3.0)


# ------------------------------------------------------------------ names, axes, geometry, export

@pytest.mark.parametrize("name, ending", [
    ("a.nii.gz", ".nii.gz"), ("B.NII.GZ", ".nii.gz"), ("c.nii", ".nii"), ("d.mha", ".mha"), ("e.mhd", ".mhd"),
    ("f.nrrd", ".nrrd"), ("g.nhdr", ".nhdr"), ("h.raw", None), ("i.gz", None), ("j.mha.gz", None), ("nii", None),
])
def test_image_ending_takes_the_longest_accepted_ending(name, ending):
    assert image_ending(name) == ending


@pytest.mark.parametrize("axis, first", [(0, (5, 3, 6)), (1, (6, 3, 5)), (2, (3, 6, 5))])
def test_slices_of_each_axis_come_first_and_go_back(axis, first):
    array = np.arange(3 * 6 * 5).reshape(3, 6, 5)  # (z, y, x)
    slices = to_slices(array, axis)
    assert slices.shape == first
    k = 2  # slice 2 of axis x is array[:, :, 2], of y array[:, 2, :], of z array[2]
    np.testing.assert_array_equal(slices[k], [array[:, :, k], array[:, k, :], array[k]][axis])
    np.testing.assert_array_equal(from_slices(slices, axis), array)


def test_geometry_meta_is_the_images_grid_in_plain_values():
    image = itk(VOLUME, spacing=(0.5, 0.75, 2.5))
    image.SetOrigin((1.0, -2.0, 3.5))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    meta = geometry_meta(image, np.int64(2))
    assert meta == {"orig_size": (5, 6, 3), "orig_spacing": (0.5, 0.75, 2.5), "origin": (1.0, -2.0, 3.5),
                    "direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0), "slice_axis": 2}
    assert type(meta["slice_axis"]) is int and all(type(v) is int for v in meta["orig_size"])
    assert all(type(v) is float for key in ("orig_spacing", "origin", "direction") for v in meta[key])


@pytest.mark.parametrize("stored", [True, False])
def test_export_h5_volume_writes_the_array_with_its_stored_spacing(tmp_path, stored):
    h5 = tmp_path / "case.h5"
    with h5py.File(h5, "w") as f:
        f["image"] = VOLUME.astype(np.float32)
        f["label"] = (VOLUME > 100).astype(np.uint8)
        if stored:
            f.attrs["spacing"] = np.array([10.0, 1.5, 1.25])  # array order (z, y, x)
    out = export_h5_volume(h5, tmp_path / "case.nii.gz")
    image = sitk.ReadImage(str(out))
    assert out == tmp_path / "case.nii.gz"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), VOLUME.astype(np.float32))
    assert image.GetSpacing() == ((1.25, 1.5, 10.0) if stored else (1.0, 1.0, 1.0))
    label = sitk.ReadImage(str(export_h5_volume(h5, tmp_path / "label.nii.gz", key="label")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), (VOLUME > 100).astype(np.uint8))
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # written compressed
