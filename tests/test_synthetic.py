"""Tests for dataloaders.synthetic: layout, content invariants, determinism, reuse rules."""
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from conftest import skip_without_real_data
from dataloaders.synthetic import (
    MARKER,
    SPACING,
    is_complete,
    make_synthetic_acdc,
    main,
    patient_volumes,
)

SCRIPT = Path(__file__).resolve().parents[1] / "code" / "dataloaders" / "synthetic.py"


def read_list(path):
    return path.read_text().split()


def load(path):
    with h5py.File(path, "r") as f:
        return f["image"][:], f["label"][:], dict(f.attrs)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    return make_synthetic_acdc(tmp_path_factory.mktemp("syn") / "ACDC")


def volumes(root):
    for name in ("train.list", "val.list", "test.list"):
        for case in read_list(root / name):
            yield case, load(root / "data" / f"{case}.h5")


def test_lists_and_files_consistent(default_set):
    root = default_set
    train, val, test = (read_list(root / n) for n in ("train.list", "val.list", "test.list"))
    slices = read_list(root / "train_slices.list")
    # 12 patients: 7 train, 3 val, 2 test; two frames each; 6 slices per volume.
    assert (len(train), len(val), len(test), len(slices)) == (14, 6, 4, 84)
    assert train[:4] == ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02"]
    assert val[0] == "patient008_frame01" and test[-1] == "patient012_frame02"
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)
    # Numbered from 1 like the released set (its list names ..._slice_1 .. ..._slice_D).
    assert slices == [f"{v}_slice_{k}" for v in train for k in range(1, 7)]
    # The first 12 slices are exactly patient001 (the "first N slices = first K patients" rule).
    assert {s.split("_")[0] for s in slices[:12]} == {"patient001"}
    assert all(re.fullmatch(r"patient\d{3}_frame0[12]_slice_\d+", s) for s in slices)
    for s in slices:
        assert (root / "data" / "slices" / f"{s}.h5").is_file()
    for v in train + val + test:
        assert (root / "data" / f"{v}.h5").is_file()
    assert is_complete(root)
    assert json.loads((root / MARKER).read_text())["n_patients"] == 12


def test_shapes_dtypes_ranges(default_set):
    root = default_set
    for case, (image, label, attrs) in volumes(root):
        assert image.shape == label.shape == (6, 96, 88)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.min() == 0.0 and image.max() == 1.0
        assert set(np.unique(label)) == {0, 1, 2, 3}, case
        np.testing.assert_array_equal(attrs["spacing"], SPACING)
    # Slice files are exactly the slices of their volume.
    image, label, _ = load(root / "data" / "patient003_frame02.h5")
    s_image, s_label, _ = load(root / "data" / "slices" / "patient003_frame02_slice_5.h5")
    assert s_image.shape == (96, 88) and s_image.dtype == np.float32 and s_label.dtype == np.uint8
    np.testing.assert_array_equal(s_image, image[4])
    np.testing.assert_array_equal(s_label, label[4])


def test_anatomy_invariants(default_set):
    cross = ndimage.generate_binary_structure(2, 1)
    for case, (image, label, _) in volumes(default_set):
        for z, sl in enumerate(label):
            lv, myo, rv = sl == 3, sl == 2, sl == 1
            # The myocardium encloses the LV: 3 pixels around the LV are LV or myocardium only.
            grown = ndimage.binary_dilation(lv, cross, iterations=3)
            assert np.isin(sl[grown], (2, 3)).all(), (case, z)
            # The LV is one connected blob; the RV touches the myocardium.
            assert ndimage.label(lv)[1] == 1, (case, z)
            assert (ndimage.binary_dilation(rv, cross) & myo).any(), (case, z)
        # Apex (last slice) smaller than base (first slice).
        assert (label[-1] == 3).sum() < (label[0] == 3).sum(), case
        # Contrast: blood pools brighter than myocardium.
        assert image[label == 3].mean() > image[label == 2].mean() + 0.3, case
        assert image[label == 1].mean() > image[label == 2].mean() + 0.3, case


def test_ed_larger_than_es(default_set):
    volumes_by_id = dict(volumes(default_set))
    for p in range(1, 13):
        ed = volumes_by_id[f"patient{p:03d}_frame01"][1]
        es = volumes_by_id[f"patient{p:03d}_frame02"][1]
        assert (ed == 3).sum() > (es == 3).sum()
        assert (ed == 1).sum() > (es == 1).sum()


def test_deterministic_given_seed(tmp_path, default_set):
    again = make_synthetic_acdc(tmp_path / "again")
    for case in read_list(default_set / "val.list"):
        a, b = load(default_set / "data" / f"{case}.h5"), load(again / "data" / f"{case}.h5")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    (img0, lab0), _ = patient_volumes(0, 1, 4, (64, 64))
    (img1, lab1), _ = patient_volumes(1, 1, 4, (64, 64))
    assert not np.array_equal(img0, img1) and not np.array_equal(lab0, lab1)


def test_reuse_overwrite_and_refusal(tmp_path):
    root = tmp_path / "set"
    kwargs = dict(n_patients=3, n_val=1, n_test=1, slices_per_volume=2, size=(40, 36))
    make_synthetic_acdc(root, **kwargs)
    probe = root / "data" / "slices" / "patient001_frame01_slice_1.h5"
    probe.write_bytes(b"edited")
    # Complete set with the same parameters: reused, nothing rewritten.
    make_synthetic_acdc(root, **kwargs)
    assert probe.read_bytes() == b"edited"
    # overwrite=True regenerates.
    make_synthetic_acdc(root, overwrite=True, **kwargs)
    assert probe.read_bytes() != b"edited"
    assert load(probe)[0].shape == (40, 36)
    # Incomplete set: regenerated even without overwrite.
    (root / "data" / "patient003_frame02.h5").unlink()
    make_synthetic_acdc(root, **kwargs)
    assert (root / "data" / "patient003_frame02.h5").is_file()
    # Different parameters: refused without overwrite; with it, stale files disappear.
    with pytest.raises(ValueError, match="overwrite=True"):
        make_synthetic_acdc(root, **{**kwargs, "n_patients": 2, "n_test": 0})
    make_synthetic_acdc(root, overwrite=True, **{**kwargs, "n_patients": 2, "n_test": 0})
    assert not (root / "data" / "patient003_frame01.h5").exists()
    assert read_list(root / "test.list") == []
    # A folder holding ACDC-layout files without the marker is never written into.
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "train.list").write_text("patient099_frame01\n")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="marker"):
            make_synthetic_acdc(foreign, overwrite=overwrite, **kwargs)
    assert (foreign / "train.list").read_text() == "patient099_frame01\n"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_patients=0), "n_patients"),
        (dict(n_patients=3, n_val=2, n_test=1), "training patient"),
        (dict(n_val=-1), "n_val"),
        (dict(slices_per_volume=0), "slices_per_volume"),
        (dict(size=(16, 88)), "size"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_acdc(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path):
    main(["--out", str(tmp_path / "a"), "--patients", "3", "--val", "1", "--test", "1",
          "--slices", "2", "--size", "40", "36", "--seed", "5"])
    assert len(read_list(tmp_path / "a" / "train_slices.list")) == 2 * 2
    assert json.loads((tmp_path / "a" / MARKER).read_text())["seed"] == 5
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "b"), "--patients", "2", "--val", "1", "--test", "0",
         "--slices", "1", "--size", "32", "32"],
        capture_output=True, text=True, check=True,
    )
    assert "synthetic ACDC" in done.stdout
    assert read_list(tmp_path / "b" / "val.list") == ["patient002_frame01", "patient002_frame02"]


def test_matches_real_layout(real_acdc_root, default_set):
    """The synthetic files have the keys, dtypes and dimensionality of the real processed ACDC."""
    skip_without_real_data(real_acdc_root, "real ACDC data")
    real_slice = read_list(real_acdc_root / "train_slices.list")[0]
    real_volume = read_list(real_acdc_root / "val.list")[0]
    pairs = [
        (
            real_acdc_root / "data" / "slices" / f"{real_slice}.h5",
            default_set / "data" / "slices" / "patient001_frame01_slice_1.h5",
        ),
        (real_acdc_root / "data" / f"{real_volume}.h5", default_set / "data" / "patient008_frame01.h5"),
    ]
    for real, synthetic in pairs:
        with h5py.File(real, "r") as r, h5py.File(synthetic, "r") as s:
            assert set(r.keys()) == set(s.keys()) == {"image", "label"}
            for key in ("image", "label"):
                assert r[key].dtype == s[key].dtype and r[key].ndim == s[key].ndim
    for name in ("train.list", "val.list", "train_slices.list"):
        pattern = r"patient\d{3}_frame0[12]" + (r"_slice_\d+" if "slices" in name else "")
        assert all(re.fullmatch(pattern, i) for i in read_list(real_acdc_root / name))
