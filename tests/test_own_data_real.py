"""Acceptance on real data (synthetic when SSCD_SHARED_DATA is unset): predict.py reproduces
test_ACDC.py's predictions of the ACDC val volumes written as NIfTI, and the shared ACDC val volumes and
prostate cases written as nnU-Net raw data sets (some cases without labels) go through convert ->
SSCD training -> test_custom -> predict, with predict == test voxel for voxel, in the input geometry."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import predict
import test_ACDC
import train_ACDC_SSCD
from dataloaders import convert_dataset
from dataloaders.volume_io import export_h5_volume
from own_data import make_nnunet
from test_own_data import SIZE, check_predict_equals_test, random_weights, same_geometry, tiny_train
from common.checkpoint import load_checkpoint

PROSTATE_CASES = ["Case00", "Case01", "Case02", "Case03", "Case05"]  # 2 labeled, 1 val, 2 unlabeled


def val_cases(root, n=None):
    cases = (root / "val.list").read_text().split()
    return cases[:n] if n else cases


def check_acdc(root, checkpoint, tmp_path):
    """predict.py on the val volumes as NIfTI == test_ACDC.py's predictions; the classes predicted."""
    out = tmp_path / checkpoint.stem
    test_ACDC.main(["--checkpoint", str(checkpoint), "--root_path", str(root), "--split", "val", "--out",
                    str(out / "eval"), "--device", "cpu", "--workers", "0"])
    inputs = out / "in"
    inputs.mkdir(parents=True)
    for case in val_cases(root):
        export_h5_volume(root / "data" / f"{case}.h5", inputs / f"{case}_0000.nii.gz")
    predict.main(["-i", str(inputs), "-o", str(out / "pred"), "--checkpoint", str(checkpoint), "--device", "cpu"])
    classes = set()
    for case in val_cases(root):
        mine = sitk.ReadImage(str(out / "pred" / f"{case}.nii.gz"))
        theirs = sitk.ReadImage(str(out / "eval" / "predictions" / f"{case}_pred.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(theirs)), case
        assert same_geometry(mine, theirs), case
        classes |= set(np.unique(sitk.GetArrayFromImage(mine)).tolist())
    return classes


def test_predict_equals_test_acdc_on_the_val_volumes(acdc_root, tmp_path):
    final = train_ACDC_SSCD.main(["--root_path", str(acdc_root), "--save_dir", str(tmp_path / "run"), "--image_size",
                                  str(SIZE), "--batch_size", "4", "--labeled_bs", "2", "--labelnum", "3", "--method",
                                  "labeled_only", "--pre_iterations", "3", "--stage_iterations", "1", "--hca_weights",
                                  "0,0,0,1", "--device", "cpu", "--num_workers", "0", "--val_interval", "4"])
    card = load_checkpoint(final)["config"]["model_card"]
    assert card["classes"] == ["background", "RV", "Myo", "LV"] and card["preprocessing"]["normalization"] == "minmax"
    check_acdc(acdc_root, final, tmp_path)
    noisy = random_weights(shutil.copy(final, tmp_path / "random.pth"))
    assert len(check_acdc(acdc_root, noisy, tmp_path)) >= 2  # several classes predicted: a real comparison


def acdc_as_nnunet(root, folder):
    """The first 6 ACDC val volumes as an nnU-Net raw folder; 2 of them without labels."""
    cases = val_cases(root, 6)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for k, case in enumerate(cases):
        export_h5_volume(root / "data" / f"{case}.h5", folder / "imagesTr" / f"{case}_0000.nii.gz")
        if k < 4:
            export_h5_volume(root / "data" / f"{case}.h5", folder / "labelsTr" / f"{case}.nii.gz", key="label")
    info = {"channel_names": {"0": "cine MRI"}, "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3},
            "numTraining": 4, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(info))
    return cases[3], cases[4:]


def prostate_as_nnunet(source, folder):
    """Five shared prostate cases as an nnU-Net raw folder (2 without labels); generated phantoms
    without SSCD_SHARED_DATA."""
    if source is None:
        names = make_nnunet(folder, n_labeled=3, n_unlabeled=2)
        return names["labeled"][2], names["unlabeled"]
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for k, case in enumerate(PROSTATE_CASES):
        sitk.WriteImage(sitk.ReadImage(str(source / f"{case}.mhd")), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        if k < 3:
            sitk.WriteImage(sitk.ReadImage(str(source / f"{case}_segmentation.mhd")),
                            str(folder / "labelsTr" / f"{case}.nii.gz"))
    info = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "gland": 1}, "numTraining": 3,
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(info))
    return PROSTATE_CASES[2], PROSTATE_CASES[3:]


@pytest.mark.parametrize("source", ["acdc", "prostate"])
def test_real_data_end_to_end(source, acdc_root, real_prostate_root, tmp_path):
    raw = tmp_path / "Dataset100_Real"
    val, unlabeled = (acdc_as_nnunet(acdc_root, raw) if source == "acdc"
                      else prostate_as_nnunet(real_prostate_root, raw))
    summary = convert_dataset.main(["--input", str(raw), "--out", str(tmp_path / "conv"), "--image_size", str(SIZE),
                                    "--val_cases", val])
    assert summary["unlabeled"] == sorted(unlabeled) and summary["num_unlabeled_slices"] > 0
    final = tiny_train(tmp_path / "conv", tmp_path / "run", "--method", "sscd", "--pre_iterations", "4",
                       "--stage_iterations", "2", "--hca_weights", "0,0,0,1", "--patch_size", "8")
    check_predict_equals_test(raw / "imagesTr", final, [val], tmp_path / "conv", tmp_path / "trained")
    noisy = random_weights(shutil.copy(final, tmp_path / "random.pth"))
    assert len(check_predict_equals_test(raw / "imagesTr", noisy, [val], tmp_path / "conv", tmp_path / "random")) >= 2
