"""Tests for dataloaders.preprocess_acdc on small NIfTI volumes in the official ACDC layout."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import skip_without_real_data
from dataloaders.preprocess_acdc import main, minmax_normalize, preprocess_acdc, slice_id

SCRIPT = Path(__file__).resolve().parents[1] / "code" / "dataloaders" / "preprocess_acdc.py"
SPACING_XYZ = (1.25, 1.5, 10.0)  # NIfTI / SimpleITK order (x, y, z)
# patient -> (subfolder, depth, raw frame numbers of ED and ES)
PATIENTS = {
    "patient001": ("training", 3, (1, 12)),
    "patient002": ("training", 4, (1, 14)),
    "patient003": ("testing", 2, (1, 9)),
}


def write_nifti(path, array, spacing=SPACING_XYZ):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def make_raw(root, seed=0):
    """Official layout with random images and labels; returns {(patient, raw frame): (image, label)}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for patient, (sub, depth, frames) in PATIENTS.items():
        folder = root / sub / patient
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {frames[0]}\nES: {frames[1]}\n")
        (folder / f"{patient}_4d.nii.gz").write_bytes(b"not read")
        for frame in frames:
            image = rng.integers(10, 900, size=(depth, 12, 10)).astype(np.int16)
            label = rng.integers(0, 4, size=(depth, 12, 10)).astype(np.uint8)
            write_nifti(folder / f"{patient}_frame{frame:02d}.nii.gz", image)
            write_nifti(folder / f"{patient}_frame{frame:02d}_gt.nii.gz", label)
            arrays[(patient, frame)] = (image, label)
    return arrays


def load(path):
    with h5py.File(path, "r") as f:
        return f["image"][:], f["label"][:], dict(f.attrs)


def read_list(path):
    return path.read_text().split()


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "ACDC_raw"
    return root, make_raw(root)


def test_minmax_normalize():
    np.testing.assert_allclose(minmax_normalize([[2.0, 4.0], [6.0, 10.0]]), [[0, 0.25], [0.5, 1]])
    constant = minmax_normalize(np.full((2, 3, 3), 7))
    assert constant.dtype == np.float32 and not constant.any()


def test_slice_ids_start_at_one():
    assert slice_id("patient001_frame01", 0) == "patient001_frame01_slice_1"


def test_conversion_without_splits(raw, tmp_path):
    root, arrays = raw
    out = tmp_path / "out"
    summary = preprocess_acdc(root, out)
    volumes = [f"patient00{p}_frame0{f}" for p in (1, 2, 3) for f in (1, 2)]
    assert summary == {
        "out": str(out), "volumes": 6, "slices": 2 * (3 + 4 + 2), "train.list": 6, "train_slices.list": 18,
    }
    assert read_list(out / "train.list") == volumes
    assert not (out / "val.list").exists() and not (out / "test.list").exists()
    for patient, (_, depth, frames) in PATIENTS.items():
        for ordinal, frame in enumerate(frames, start=1):
            raw_image, raw_label = arrays[(patient, frame)]
            image, label, attrs = load(out / "data" / f"{patient}_frame0{ordinal}.h5")
            assert image.shape == label.shape == (depth, 12, 10)
            assert image.dtype == np.float32 and label.dtype == np.uint8
            assert image.min() == 0.0 and image.max() == 1.0
            expected = (raw_image - raw_image.min()) / (raw_image.max() - raw_image.min())
            np.testing.assert_allclose(image, expected, rtol=1e-6)
            np.testing.assert_array_equal(label, raw_label)
            np.testing.assert_array_equal(attrs["spacing"], (10.0, 1.5, 1.25))
    slices = read_list(out / "train_slices.list")
    assert slices[:4] == [
        "patient001_frame01_slice_1", "patient001_frame01_slice_2", "patient001_frame01_slice_3",
        "patient001_frame02_slice_1",
    ]
    assert len(list((out / "data" / "slices").glob("*.h5"))) == len(slices) == 18
    image, label, _ = load(out / "data" / "patient002_frame02.h5")
    s_image, s_label, _ = load(out / "data" / "slices" / "patient002_frame02_slice_4.h5")
    np.testing.assert_array_equal(s_image, image[3])
    np.testing.assert_array_equal(s_label, label[3])


def test_constant_volume_gives_zeros(tmp_path):
    folder = tmp_path / "raw" / "patient001"
    folder.mkdir(parents=True)
    for frame in (1, 10):
        write_nifti(folder / f"patient001_frame{frame:02d}.nii.gz", np.full((2, 6, 6), 300, np.int16))
        write_nifti(folder / f"patient001_frame{frame:02d}_gt.nii.gz", np.zeros((2, 6, 6), np.uint8))
    preprocess_acdc(tmp_path / "raw", tmp_path / "out")
    image, _, _ = load(tmp_path / "out" / "data" / "patient001_frame01.h5")
    assert np.isfinite(image).all() and not image.any()


def write_splits(folder, train, val, test, slices=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train.list", train), ("val.list", val), ("test.list", test), ("train_slices.list", slices)):
        if ids is not None:
            (folder / name).write_text("\n".join(ids) + "\n")
    return folder


def test_conversion_with_splits(raw, tmp_path):
    root, _ = raw
    train = ["patient002_frame01", "patient002_frame02", "patient001_frame01", "patient001_frame02"]
    splits = write_splits(tmp_path / "splits", train, ["patient003_frame01", "patient003_frame02"], [])
    out = tmp_path / "out"
    summary = preprocess_acdc(root, out, splits)
    assert (summary["train.list"], summary["val.list"], summary["test.list"], summary["slices"]) == (4, 2, 0, 14)
    assert read_list(out / "train.list") == train
    assert read_list(out / "val.list") == ["patient003_frame01", "patient003_frame02"]
    assert read_list(out / "test.list") == []
    # Derived in train.list order; no slices for non-training volumes, but their volumes exist.
    slices = read_list(out / "train_slices.list")
    assert slices[0] == "patient002_frame01_slice_1" and slices[-1] == "patient001_frame02_slice_3"
    assert len(slices) == 14
    assert not list((out / "data" / "slices").glob("patient003*"))
    assert (out / "data" / "patient003_frame02.h5").is_file()


def test_canonical_train_slices_copied(raw, tmp_path):
    root, _ = raw
    train = ["patient001_frame01", "patient001_frame02"]
    canonical = ["patient001_frame02_slice_2", "patient001_frame01_slice_3", "patient001_frame01_slice_1"]
    splits = write_splits(tmp_path / "splits", train, [], [], canonical)
    preprocess_acdc(root, tmp_path / "out", splits)
    assert read_list(tmp_path / "out" / "train_slices.list") == canonical
    bad = write_splits(tmp_path / "bad", train, [], [], canonical + ["patient001_frame01_slice_9"])
    with pytest.raises(ValueError, match="patient001_frame01_slice_9"):
        preprocess_acdc(root, tmp_path / "out2", bad)


def test_split_errors(raw, tmp_path):
    root, _ = raw
    unknown = write_splits(tmp_path / "s1", ["patient001_frame01", "patient077_frame01"], [], [])
    with pytest.raises(ValueError, match=r"train\.list.*patient077_frame01"):
        preprocess_acdc(root, tmp_path / "o", unknown)
    twice = write_splits(tmp_path / "s2", ["patient001_frame01"], ["patient001_frame01"], [])
    with pytest.raises(ValueError, match="both train.list and val.list"):
        preprocess_acdc(root, tmp_path / "o", twice)
    incomplete = write_splits(tmp_path / "s3", ["patient001_frame01"], [], [])
    (incomplete / "test.list").unlink()
    with pytest.raises(FileNotFoundError, match="test.list"):
        preprocess_acdc(root, tmp_path / "o", incomplete)
    with pytest.raises(FileNotFoundError, match="splits folder"):
        preprocess_acdc(root, tmp_path / "o", tmp_path / "nowhere")


def test_raw_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_acdc(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no patientXXX folders"):
        preprocess_acdc(tmp_path / "empty", tmp_path / "out")


def test_image_without_gt(raw, tmp_path):
    root, _ = raw
    (root / "training" / "patient002" / "patient002_frame14_gt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient002_frame14\.nii\.gz has no annotation"):
        preprocess_acdc(root, tmp_path / "out")


def test_single_annotated_frame(raw, tmp_path):
    root, _ = raw
    folder = root / "testing" / "patient003"
    (folder / "patient003_frame09_gt.nii.gz").unlink()
    (folder / "patient003_frame09.nii.gz").unlink()
    with pytest.raises(ValueError, match="1 annotated frames.*expected 2"):
        preprocess_acdc(root, tmp_path / "out")


def test_shape_mismatch(raw, tmp_path):
    root, _ = raw
    gt = root / "training" / "patient001" / "patient001_frame12_gt.nii.gz"
    write_nifti(gt, np.zeros((3, 12, 11), np.uint8))
    with pytest.raises(ValueError, match=r"patient001_frame12\.nii\.gz has shape \(3, 12, 10\).*\(3, 12, 11\)"):
        preprocess_acdc(root, tmp_path / "out")


def test_bad_label_values(raw, tmp_path):
    root, _ = raw
    gt = root / "testing" / "patient003" / "patient003_frame01_gt.nii.gz"
    label = np.zeros((2, 12, 10), np.uint8)
    label[0, 0, 0] = 5
    write_nifti(gt, label)
    with pytest.raises(ValueError, match=r"patient003_frame01_gt\.nii\.gz holds label values \[5\]"):
        preprocess_acdc(root, tmp_path / "out")


def test_cli(raw, tmp_path):
    root, _ = raw
    main(["--raw", str(root), "--out", str(tmp_path / "a")])
    assert len(read_list(tmp_path / "a" / "train.list")) == 6
    splits = write_splits(tmp_path / "splits", ["patient003_frame01"], ["patient001_frame01"], ["patient002_frame02"])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--raw", str(root), "--out", str(tmp_path / "b"), "--splits", str(splits)],
        capture_output=True, text=True, check=True,
    )
    assert "volumes=6" in done.stdout and "train_slices.list=2" in done.stdout
    assert read_list(tmp_path / "b" / "test.list") == ["patient002_frame02"]


def test_real_slice_numbering_matches(real_acdc_root):
    """The released train_slices.list numbers each volume's slices 1..D, the convention written here."""
    skip_without_real_data(real_acdc_root, "real ACDC data")
    indices = {}
    for sid in read_list(real_acdc_root / "train_slices.list"):
        volume, k = sid.rsplit("_slice_", 1)
        indices.setdefault(volume, []).append(int(k))
    assert set(indices) == set(read_list(real_acdc_root / "train.list"))
    for volume, ks in indices.items():
        assert sorted(f"{volume}_slice_{k}" for k in ks) == sorted(slice_id(volume, i) for i in range(len(ks)))
