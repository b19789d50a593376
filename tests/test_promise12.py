"""The PROMISE12 path end to end: MetaImage cases -> preprocessing -> SSCD training -> test_PROMISE12.

- generated .mhd/.nii.gz cases with non-trivial geometry (anisotropic, non-square, rotated, off-centre
  gland): preprocessing keeps shape, spacing and labels, and test_PROMISE12 writes predictions that
  overlay the source images (size, spacing, origin, direction, and the gland itself);
- a tiny SSCD run and its evaluation, on a subset of the real prostate cases when SSCD_SHARED_DATA is
  set, else on the generated cases (so the end-to-end test always runs).
"""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import test_PROMISE12
import train_PROMISE12_SSCD
from common.checkpoint import load_checkpoint
from common.geometry import load_volume_meta
from conftest import load_script
from dataloaders.dataset import TrainData, read_list
from dataloaders.preprocess_promise12 import preprocess_promise12
import evaluation.testing
from test_preprocess_promise12 import dice, read_h5
from evaluation.metrics import METRIC_NAMES, binary_metrics

SIZE = 32  # network and preprocessing size of every run here
SPACING = (0.6, 0.55, 3.0)  # (x, y, z), anisotropic in-plane
ANGLE = math.radians(20)
DIRECTION = (math.cos(ANGLE), 0.0, math.sin(ANGLE), 0.0, 1.0, 0.0, -math.sin(ANGLE), 0.0, math.cos(ANGLE))
# case -> (size (x, y, z), file extension, compressed); train.list order is not numeric on purpose
GENERATED = {"Case03": ((52, 40, 6), ".mhd", True), "Case00": ((48, 40, 6), ".mhd", False),
             "Case01": ((44, 44, 5), ".mhd", True), "Case35": ((48, 40, 6), ".nii.gz", True)}
SPLITS = {"train": ["Case03", "Case00", "Case01"], "val": ["Case35"], "test": ["Case40"]}  # Case40: no files
REAL_CASES = {"train": ["Case00", "Case01", "Case03"], "val": ["Case02"]}  # real train.list starts 00 01 03



def gland(size_xyz, seed, every_slice):
    """(z, y, x) uint8: an off-centre ellipsoid gland, in every slice or absent from the first and last."""
    nx, ny, nz = size_xyz
    rng = np.random.default_rng(seed)
    cx, cy = nx * rng.uniform(0.65, 0.7), ny * rng.uniform(0.3, 0.35)
    z, y, x = np.mgrid[:nz, :ny, :nx]
    depth = nz * 0.75 if every_slice else nz / 3
    inside = ((x - cx) / (nx / 5)) ** 2 + ((y - cy) / (ny / 6)) ** 2 + ((z - (nz - 1) / 2) / depth) ** 2 <= 1
    if not every_slice:
        inside[[0, -1]] = False
    return inside.astype(np.uint8)


def write_generated(folder):
    """The GENERATED cases (uint16 image: noise, a bright band, a brighter gland) plus split lists.

    Training cases have gland-free end slices (like real stacks); the validation case has the gland
    in every slice, so that a per-slice intensity threshold segments it (per-slice min-max turns the
    noise of a gland-free slice into [0, 1])."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, (case, (size_xyz, ext, compress)) in enumerate(GENERATED.items()):
        label = gland(size_xyz, seed=i, every_slice=case in SPLITS["val"])
        rng = np.random.default_rng(100 + i)
        image = rng.integers(100, 300, size=label.shape) + 900 * label.astype(np.int64)
        image[:, :, : size_xyz[0] // 5] += 250
        origin = (-40.0 + 3 * i, 12.5 - i, 7.25 * i)
        for array, name in ((image.astype(np.uint16), case), (label, f"{case}_segmentation")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(SPACING)
            img.SetOrigin(origin)
            img.SetDirection(DIRECTION)
            sitk.WriteImage(img, str(folder / f"{name}{ext}"), compress)
        labels[case] = label
    for split, cases in SPLITS.items():
        (folder / f"{split}.list").write_text("".join(f"{c}\n" for c in cases))
    return labels


def source_path(raw, case):
    return next(p for p in (raw / f"{case}.mhd", raw / f"{case}.nii.gz") if p.is_file())


def segmentation_path(raw, case):
    return next(p for p in (raw / f"{case}_segmentation.mhd", raw / f"{case}_segmentation.nii.gz") if p.is_file())


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_written_geometry(pred_path, source):
    """The prediction has the source image's grid, as SimpleITK reads both; returns its array."""
    pred, src = sitk.ReadImage(str(pred_path)), sitk.ReadImage(str(source))
    assert pred.GetSize() == src.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), src.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(pred.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pred.GetDirection(), src.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(pred)
    assert array.dtype == np.uint8 and set(np.unique(array)) <= {0, 1}
    return array


def check_outputs(out, cases, root):
    """summary.json / cases.csv: the gland's four metrics, voxels and mm, consistent with each other."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["gland"] and summary["cases"] == len(cases) and summary["split"] == "val"
    for m in (*METRIC_NAMES, "hd95_mm", "asd_mm"):
        assert len(summary[m]["per_class"]) == 1 and summary[m]["mean"] == summary[m]["per_class"][0]
    rows = read_rows(out / "cases.csv")
    assert [r["case"] for r in rows] == cases
    for m in (*METRIC_NAMES, "hd95_mm", "asd_mm"):
        column = [float(r[f"{m}_gland"]) for r in rows]
        assert np.mean(column) == pytest.approx(summary[m]["mean"], abs=1e-5)
    for r in rows:
        assert 0 <= float(r["jaccard_gland"]) <= float(r["dice_gland"]) <= 1
        # mm distances are the voxel distances scaled by the stored spacing: between min and max of it
        spacing = load_volume_meta(root / "data" / f"{r['case']}.h5")["spacing"]
        for m in ("hd95", "asd"):
            vox, mm = float(r[f"{m}_gland"]), float(r[f"{m}_mm_gland"])
            assert min(spacing) * vox - 1e-4 <= mm <= max(spacing) * vox + 1e-4
    return summary, rows


def check_rows_against(rows, root, raw, predict):
    """Each cases.csv row equals medpy's metrics of ``predict(stored image)`` against the stored label,
    in voxels and in mm with the stored grid's spacing derived here from the SOURCE file's geometry."""
    for r in rows:
        image, label = read_h5(root / "data" / f"{r['case']}.h5")
        pred = predict(image)
        src = sitk.ReadImage(str(source_path(raw, r["case"])))
        (sx, sy, sz), (nx, ny, _) = src.GetSpacing(), src.GetSize()
        spacing = (sz, sy * ny / SIZE, sx * nx / SIZE)
        vox, mm = binary_metrics(pred == 1, label == 1), binary_metrics(pred == 1, label == 1, spacing)
        for m in METRIC_NAMES:
            assert float(r[f"{m}_gland"]) == pytest.approx(vox[m], abs=1e-5)
        for m in ("hd95", "asd"):
            assert float(r[f"{m}_mm_gland"]) == pytest.approx(mm[m], abs=1e-5)


@torch.no_grad()
def network_prediction(model):
    """Argmax of ``model`` slice by slice (the stored slices already have the network size)."""
    return lambda image: model(torch.from_numpy(image)[:, None]).argmax(1).numpy()


class Threshold(torch.nn.Module):
    """A 2-class 'network' that calls a pixel gland when its intensity exceeds ``t``."""

    num_classes = 2

    def __init__(self, t=0.6):
        super().__init__()
        self.t = t

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x - self.t], dim=1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(raw folder, preprocessed root, source labels) of the generated cases."""
    base = tmp_path_factory.mktemp("promise12_generated")
    labels = write_generated(base / "raw")
    summary = preprocess_promise12(base / "raw", base / "data", image_size=SIZE)
    assert summary["withheld_test_cases"] == ["Case40"]
    return base / "raw", base / "data", labels


def test_generated_preprocessing_keeps_shape_spacing_labels(generated):
    raw, root, labels = generated
    assert read_list(root, "train.list") == SPLITS["train"] and read_list(root, "val.list") == SPLITS["val"]
    assert (root / "test.list").read_text().split() == []
    slices = read_list(root, "train_slices.list")
    assert slices == [f"{c}_slice_{k}" for c in SPLITS["train"] for k in range(GENERATED[c][0][2])]
    for case, label in labels.items():
        image, lab = read_h5(root / "data" / f"{case}.h5")
        nx, ny, nz = GENERATED[case][0]
        assert image.shape == lab.shape == (nz, SIZE, SIZE) and lab.dtype == np.uint8
        assert 0 <= image.min() and image.max() <= 1
        assert set(np.unique(lab)) == {0, 1}
        # the gland is in exactly the source's slices
        np.testing.assert_array_equal(lab.any(axis=(1, 2)), label.any(axis=(1, 2)))
        meta = load_volume_meta(root / "data" / f"{case}.h5")
        assert meta["orig_size"] == (nx, ny, nz)
        np.testing.assert_allclose(meta["orig_spacing"], SPACING, rtol=1e-6)
        np.testing.assert_allclose(meta["direction"], DIRECTION, atol=1e-6)
        np.testing.assert_allclose(meta["origin"], sitk.ReadImage(str(source_path(raw, case))).GetOrigin())
        np.testing.assert_allclose(meta["spacing"], (SPACING[2], SPACING[1] * ny / SIZE, SPACING[0] * nx / SIZE))


def test_prediction_overlays_the_source_image(generated, tmp_path, monkeypatch):
    """test_PROMISE12 with a thresholding 'network': its written prediction must cover the source
    segmentation in the source grid (a flip, transpose or shift of the off-centre gland would not)."""
    raw, root, labels = generated
    monkeypatch.setattr(evaluation.testing, "load_trained_model", lambda path, device: (
        Threshold().eval(), {"num_classes": 2, "config": {"image_size": SIZE, "root_path": str(root)}}))
    out = tmp_path / "eval"
    returned = test_PROMISE12.main(["--checkpoint", str(tmp_path / "oracle.pth"), "--split", "val",
                                    "--out", str(out), "--device", "cpu", "--workers", "0"])
    summary, rows = check_outputs(out, SPLITS["val"], root)
    assert summary == json.loads(json.dumps(returned))
    assert summary["dice"]["mean"] > 0.9 and summary["hd95"]["mean"] < 3
    check_rows_against(rows, root, raw, lambda image: (image > Threshold().t).astype(np.uint8))
    assert "PROMISE12 layout" in summary["data"] and str(raw.resolve()) in summary["data"]
    pred = check_written_geometry(out / "predictions" / "Case35_pred.nii.gz", source_path(raw, "Case35"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation_path(raw, "Case35"))))
    assert dice(pred, truth) > 0.85
    assert dice(pred, truth[:, ::-1]) < 0.5 and dice(pred, truth[:, :, ::-1]) < 0.5


def test_empty_test_list_is_refused_with_the_reason(generated, tmp_path, monkeypatch):
    _, root, _ = generated
    monkeypatch.setattr(evaluation.testing, "load_trained_model", lambda path, device: (
        Threshold().eval(), {"num_classes": 2, "config": {"image_size": SIZE, "root_path": str(root)}}))
    with pytest.raises(SystemExit, match=r"test\.list is empty: .*withholds.*Case40.*--split val"):
        test_PROMISE12.main(["--checkpoint", str(tmp_path / "x.pth"), "--split", "test",
                             "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert not (tmp_path / "eval").exists()


def test_raw_folder_is_refused_with_the_preprocessing_command(generated, tmp_path):
    raw, _, _ = generated
    with pytest.raises(SystemExit, match=r"no train_slices\.list; .*preprocess_promise12\.py --raw"):
        train_PROMISE12_SSCD.main(["--root_path", str(raw), "--save_dir", str(tmp_path / "run"),
                                   "--image_size", str(SIZE), "--patch_size", "16", "--device", "cpu"])


@pytest.fixture(scope="module")
def source(real_prostate_root, generated, tmp_path_factory):
    """(raw folder, preprocessed root, train cases, val cases): 3 + 1 real cases, else the generated set."""
    if real_prostate_root is None:
        raw, root, _ = generated
        return raw, root, SPLITS["train"], SPLITS["val"]
    root = tmp_path_factory.mktemp("promise12_real") / "data"
    summary = preprocess_promise12(real_prostate_root, root, image_size=SIZE,
                                   cases=REAL_CASES["train"] + REAL_CASES["val"])
    assert summary["splits"] == {**REAL_CASES, "test": []} and len(summary["withheld_test_cases"]) == 8
    return real_prostate_root, root, REAL_CASES["train"], REAL_CASES["val"]


def tiny_run(root, save, *extra):
    return train_PROMISE12_SSCD.main([
        "--root_path", str(root), "--save_dir", str(save), "--image_size", str(SIZE), "--labelnum", "1",
        "--batch_size", "4", "--labeled_bs", "2", "--pre_iterations", "6", "--stage_iterations", "3",
        "--hca_weights", "1,0,0,0;0,0,0,1", "--patch_size", "16", "--val_interval", "3", "--log_interval", "3",
        "--base_lr", "0.05", "--device", "cpu", "--num_workers", "0", *extra])


def test_sscd_train_and_test_end_to_end(source, tmp_path):
    raw, root, train_cases, val_cases = source
    # labeled = every slice of the first --labelnum (1) case of train.list
    first_depth = load_volume_meta(root / "data" / f"{train_cases[0]}.h5")["orig_size"][2]
    assert len(TrainData(root, 1, SIZE, 2).labeled) == first_depth
    final = tiny_run(root, tmp_path / "run")
    assert final == tmp_path / "run" / "best.pth"
    for stage in ("pretrain", "stage_1", "stage_2"):
        assert (tmp_path / "run" / stage / "best.pth").is_file()
    assert not (tmp_path / "run" / "stage_3").exists()
    state = load_checkpoint(final)
    assert state["num_classes"] == 2 and state["config"]["exp"] == "PROMISE12_SSCD"
    assert state["config"]["labelnum"] == 1 and state["config"]["method"] == "sscd"
    assert state["model"]["out_conv.weight"].shape[0] == 2

    out = tmp_path / "eval"
    test_PROMISE12.main(["--checkpoint", str(final), "--split", "val", "--out", str(out), "--device", "cpu",
                         "--workers", "0", "--data_name", "the data under test"])
    summary, rows = check_outputs(out, val_cases, root)
    assert summary["data"] == "the data under test" and summary["image_size"] == SIZE
    model, _ = evaluation.testing.load_trained_model(final, "cpu")
    check_rows_against(rows, root, raw, network_prediction(model))
    for case in val_cases:
        check_written_geometry(out / "predictions" / f"{case}_pred.nii.gz", source_path(raw, case))
    with pytest.raises(SystemExit, match=r"test\.list is empty: .*withholds"):
        test_PROMISE12.main(["--checkpoint", str(final), "--split", "test", "--out", str(tmp_path / "t")])


def test_labeled_only_method_through_the_promise12_script(source, tmp_path):
    """--method labeled_only (the shared baseline) runs from this script: one supervised model."""
    _, root, _, _ = source
    final = tiny_run(root, tmp_path / "run", "--method", "labeled_only")
    assert final.is_file()
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["num_classes"] == 2 and state["config"]["method"] == "labeled_only"
    assert state["iteration"] == 6 + 2 * 3  # the semi-supervised budget: pre + stages
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "run" / "stage_1").exists()


def test_stage_ablation_runs_the_promise12_trainer(generated, tmp_path, capsys):
    """experiments/ablate_stage.py --dataset PROMISE12 trains stage 1 with the 2-class trainer, from the checkpoint."""
    ablate = load_script("experiments/ablate_stage.py")
    _, root, _ = generated
    tiny_run(root, tmp_path / "pre", "--amp", "off")
    start = load_checkpoint(tmp_path / "pre" / "pretrain" / "best.pth")["best_dice"]
    status = ablate.main(["--dataset", "PROMISE12", "--root_path", str(root), "--init_checkpoint",
                          str(tmp_path / "pre" / "pretrain" / "best.pth"), "--out", str(tmp_path / "abl"),
                          "--seeds", "1", "--variants", "no CGSR", "--labelnum", "1", "--image_size", str(SIZE),
                          "--stage_iterations", "2", "--val_interval", "1", "--amp", "off", "--patch_size", "16"])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "PROMISE12"
    curve = result["variants"]["no CGSR"]["curves"][0]
    assert len(curve) == 3 and curve[0] == pytest.approx(start, abs=1e-4)
    state = load_checkpoint(tmp_path / "abl" / "no_CGSR_s1" / "stage_1" / "last.pth")
    assert state["num_classes"] == 2 and state["config"]["exp"] == "PROMISE12_SSCD"
    assert state["config"]["displacement"] == "none" and state["config"]["start_stage"] == 1
