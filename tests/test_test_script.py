"""Tests for test_ACDC.py / evaluation.testing / evaluation.inference: end to end on the val volumes of
``acdc_root`` (real ACDC when SSCD_SHARED_DATA is set) with a freshly trained tiny model (no
accuracy claim), checkpoint portability, slice-wise prediction and the 3-D LCC."""
import csv
import json

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.serialization
from scipy import ndimage

import test_ACDC
import train_ACDC_supervised
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dataloaders.dataset import read_list
from evaluation.inference import predict_volume
from evaluation.metrics import METRIC_NAMES, case_metrics
from evaluation.testing import largest_component_3d, load_trained_model
from networks.unet import build_model

NUM_CLASSES = 4
CLASSES = ("RV", "Myo", "LV")
STRUCTURE = np.ones((3, 3, 3))



@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory):
    """best.pth of a 40-iteration supervised run on the synthetic set (image size 32): enough for
    non-empty predictions, so the distance metrics run on real surfaces."""
    save = tmp_path_factory.mktemp("test_script") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ACDC_supervised.main([
            "--root_path", str(synthetic_root), "--save_dir", str(save), "--image_size", "32",
            "--batch_size", "4", "--labeled_bs", "4", "--labelnum", "1", "--base_lr", "0.05",
            "--max_iterations", "40", "--val_interval", "20", "--log_interval", "20",
            "--device", "cpu", "--num_workers", "0", "--aug_device", "device"])
    finally:
        torch.set_num_threads(threads)
    return save / "best.pth"


def read_h5(path):
    with h5py.File(path, "r") as f:
        return f["image"][:], f["label"][:]


def read_cases(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_summary(summary, split, n_cases):
    metric_keys = {k for k, v in summary.items() if isinstance(v, dict)}
    assert metric_keys - {"hd95_mm", "asd_mm"} == set(METRIC_NAMES)
    for key in metric_keys:
        entry = summary[key]
        assert set(entry) == {"per_class", "mean"}
        assert len(entry["per_class"]) == 3 and all(np.isfinite(entry["per_class"]))
        assert entry["mean"] == pytest.approx(np.mean(entry["per_class"]))
    for key in ("dice", "jaccard"):
        assert all(0 <= v <= 1 for v in summary[key]["per_class"])
    assert summary["split"] == split and summary["cases"] == n_cases
    assert summary["classes"] == list(CLASSES)


def test_end_to_end_on_val(acdc_root, checkpoint, tmp_path):
    out = tmp_path / "eval"
    returned = test_ACDC.main(["--checkpoint", str(checkpoint), "--root_path", str(acdc_root), "--split", "val",
                               "--out", str(out), "--device", "cpu", "--workers", "2"])
    cases = read_list(acdc_root, "val.list")
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    check_summary(summary, "val", len(cases))
    assert summary["lcc"] is False and summary["image_size"] == 32

    rows = read_cases(out / "cases.csv")
    assert [r["case"] for r in rows] == cases
    expected_cols = {"case", "mean_dice"} | {f"{m}_{c}" for c in CLASSES for m in METRIC_NAMES}
    assert expected_cols <= set(rows[0])
    # the summary is the mean over the per-case rows
    for m in METRIC_NAMES:
        per_class = [np.mean([float(r[f"{m}_{c}"]) for r in rows]) for c in CLASSES]
        assert np.allclose(per_class, summary[m]["per_class"], atol=1e-5)

    files = sorted(p.name for p in (out / "predictions").iterdir())
    assert files == sorted(f"{c}_pred.nii.gz" for c in cases)
    model, _ = load_trained_model(checkpoint, "cpu")
    model = model.to(memory_format=torch.channels_last)  # the test script's default
    foreground = 0
    for i, case in enumerate(cases):
        image, label = read_h5(acdc_root / "data" / f"{case}.h5")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"{case}_pred.nii.gz")))
        assert pred.shape == label.shape
        assert pred.min() >= 0 and pred.max() < NUM_CLASSES
        foreground += int((pred > 0).sum())
        if i == 0:
            # the written prediction is the model's, and its row is its metrics against the label
            assert np.array_equal(pred, predict_volume(model, image, 32, "cpu"))
            metrics = case_metrics(pred, label, NUM_CLASSES)
            for c, cls in zip(CLASSES, metrics):
                for m in METRIC_NAMES:
                    assert float(rows[0][f"{m}_{c}"]) == pytest.approx(cls[m], abs=1e-5)
    assert foreground > 0, "the tiny model predicted background only: the metrics ran on empty masks"


def speckled(label, seed):
    """The label plus, per class, a few isolated single voxels of that class far from it."""
    out = label.copy()
    rng = np.random.default_rng(seed)
    for c in range(1, NUM_CLASSES):
        for _ in range(3):
            z, y, x = rng.integers(0, label.shape[0]), rng.integers(0, 4), rng.integers(0, label.shape[2])
            out[z, y, x] = c
    return out


def test_lcc_run_keeps_one_component_per_class(acdc_root, checkpoint, tmp_path, monkeypatch):
    """--lcc end to end; predictions are replaced by speckled labels so that LCC has work to do."""
    import evaluation.testing

    volumes = {}

    def fake_predict(model, image, image_size, device):
        key = len(volumes)
        case = read_list(acdc_root, "val.list")[key]
        _, label = read_h5(acdc_root / "data" / f"{case}.h5")
        assert label.shape == image.shape
        volumes[case] = speckled(label, key)
        return volumes[case]

    monkeypatch.setattr(evaluation.testing, "predict_volume", fake_predict)
    out = tmp_path / "lcc"
    test_ACDC.main(["--checkpoint", str(checkpoint), "--root_path", str(acdc_root), "--split", "val",
                    "--out", str(out), "--device", "cpu", "--workers", "2", "--lcc"])
    summary = json.loads((out / "summary.json").read_text())
    cases = read_list(acdc_root, "val.list")
    check_summary(summary, "val", len(cases))
    assert summary["lcc"] is True
    assert summary["dice"]["mean"] > 0.5
    changed = 0
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"{case}_pred.nii.gz")))
        for c in range(1, NUM_CLASSES):
            assert ndimage.label(pred == c, structure=STRUCTURE)[1] <= 1, (case, c)
        assert np.array_equal(pred, largest_component_3d(volumes[case], NUM_CLASSES))
        changed += not np.array_equal(pred, volumes[case])
    assert changed == len(cases)  # every speckled volume was cleaned


def test_defaults_from_checkpoint_and_test_split(synthetic_root, checkpoint, tmp_path):
    """No --root_path: the checkpoint's data root is used; test.list is accepted; no predictions."""
    out = tmp_path / "test_split"
    summary = test_ACDC.main(["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out),
                              "--device", "cpu", "--workers", "0", "--no_predictions"])
    cases = read_list(synthetic_root, "test.list")
    check_summary(summary, "test", len(cases))
    assert [r["case"] for r in read_cases(out / "cases.csv")] == cases
    assert not (out / "predictions").exists()
    # the synthetic volumes carry a spacing: distances in mm are reported as well
    assert set(summary["hd95_mm"]) == {"per_class", "mean"} and "mm" in summary["distance_units"]


def test_default_output_folder(checkpoint, synthetic_root):
    test_ACDC.main(["--checkpoint", str(checkpoint), "--split", "val", "--device", "cpu", "--workers", "0",
                    "--no_predictions"])
    assert (checkpoint.parent / "eval_val" / "summary.json").is_file()


def test_wrong_number_of_classes_rejected(tmp_path, synthetic_root):
    path = tmp_path / "two.pth"
    save_checkpoint({"model": build_model(2).state_dict(), "num_classes": 2,
                     "config": {"root_path": str(synthetic_root), "image_size": 32}}, path)
    with pytest.raises(SystemExit, match="a 2-class model, expected 4 classes"):
        test_ACDC.main(["--checkpoint", str(path), "--split", "val", "--device", "cpu", "--out", str(tmp_path)])


def test_missing_root_rejected(tmp_path):
    path = tmp_path / "noroot.pth"
    save_checkpoint({"model": build_model(4).state_dict(), "num_classes": 4, "config": {}}, path)
    with pytest.raises(SystemExit, match="--root_path is required"):
        test_ACDC.main(["--checkpoint", str(path), "--split", "val", "--device", "cpu", "--out", str(tmp_path)])


def test_mismatched_checkpoint_weights_rejected(tmp_path):
    path = tmp_path / "bad.pth"
    save_checkpoint({"model": build_model(2).state_dict(), "num_classes": 4}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pth: weights do not fit"):
        load_trained_model(path, "cpu")


def test_cuda_saved_checkpoint_loads_on_cpu(tmp_path, monkeypatch):
    """Storages tagged 'cuda:0' (as torch.save writes them from a GPU) load on the CPU."""
    model = build_model(4)
    path = tmp_path / "cuda.pth"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint({"model": model.state_dict(), "num_classes": 4, "config": {"image_size": 32}}, path)
    if not torch.cuda.is_available():  # the file really does name a CUDA device
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    state = load_checkpoint(path)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    loaded, _ = load_trained_model(path, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not loaded.training


class Constant(torch.nn.Module):
    """Logits favouring class ``cls`` everywhere."""

    def __init__(self, cls, num_classes=4):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.cls] = 1.0
        return logits


@pytest.mark.parametrize("cls", [0, 2, 3])
def test_predict_volume_constant_model(cls):
    image = np.random.default_rng(0).random((7, 37, 53), dtype=np.float32)
    model = Constant(cls)
    pred = predict_volume(model, image, 32, "cpu", batch_size=3)
    assert pred.shape == image.shape and pred.dtype == np.uint8
    assert (pred == cls).all()
    assert model.calls == [(3, 1, 32, 32), (3, 1, 32, 32), (1, 1, 32, 32)]  # every slice, batched


def test_predict_volume_maps_back_slice_by_slice():
    """A model that echoes its input's threshold gives the thresholded volume back (nearest both ways)."""

    class Threshold(torch.nn.Module):
        num_classes = 2

        def forward(self, x):
            return torch.cat([0.5 - x, x - 0.5], dim=1)

    image = np.zeros((3, 64, 96), np.float32)  # edges on even rows / columns divisible by 3
    image[0, 10:30, 9:42] = 1
    image[2, 32:, :24] = 1
    pred = predict_volume(Threshold(), image, 32, "cpu")
    assert np.array_equal(pred, (image > 0.5).astype(np.uint8))


def test_largest_component_3d_keeps_largest_blob_per_class():
    vol = np.zeros((6, 20, 20), np.uint8)
    vol[0:2, 0:3, 0:3] = 1      # class 1, 18 voxels
    vol[3:6, 10:15, 10:15] = 1  # class 1, 75 voxels: kept
    vol[0:3, 15:20, 0:4] = 2    # class 2, 60 voxels: kept
    vol[5, 0, 19] = 2           # class 2, 1 voxel
    vol[2, 8, 8] = 3            # class 3 only: kept as is
    out = largest_component_3d(vol, 4)
    expected = vol.copy()
    expected[0:2, 0:3, 0:3] = 0
    expected[5, 0, 19] = 0
    assert np.array_equal(out, expected) and out.dtype == vol.dtype


def test_largest_component_3d_is_26_connected_and_classwise():
    vol = np.zeros((4, 8, 8), np.uint8)
    vol[0, 0, 0] = vol[1, 1, 1] = vol[2, 2, 2] = 1   # diagonal chain: one 26-connected blob of 3
    vol[3, 6:8, 6:8] = 1                              # 4 voxels, separate: the largest
    vol[0, 4:6, 4:6] = 2                              # class 2 touches nothing of class 1
    out = largest_component_3d(vol, 3)
    assert (out == 1).sum() == 4 and (out[3, 6:8, 6:8] == 1).all()
    assert (out == 2).sum() == 4
    vol[3, 6:8, 6:8] = 0
    out = largest_component_3d(vol, 3)
    assert (out == 1).sum() == 3  # the diagonal chain survives whole
    assert not largest_component_3d(np.zeros((2, 3, 3), np.uint8), 4).any()
