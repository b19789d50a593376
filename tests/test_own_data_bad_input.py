"""Bad own-data input: one line naming the file (or flag) and what was expected, before anything is
written, and nothing already written lost (issue 26's list)."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import predict
import test_custom
import train_custom
from common.checkpoint import load_checkpoint, save_checkpoint
from dataloaders import convert_dataset
from own_data import error_of, make_nnunet, phantom, write_image

SPACING = (0.8, 0.8, 3.0)


def converting(raw, out, *flags):
    return error_of(convert_dataset.main, ["--input", str(raw), "--out", str(out), "--image_size", "32", *flags])


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "Dataset002_Bad"
    make_nnunet(folder, n_labeled=3, n_unlabeled=1)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(nnU-Net folder, converted root, a tiny checkpoint trained on it)."""
    base = tmp_path_factory.mktemp("bad")
    make_nnunet(base / "raw", n_labeled=3, n_unlabeled=1)
    convert_dataset.main(["--input", str(base / "raw"), "--out", str(base / "conv"), "--image_size", "32",
                          "--val_cases", "case_02"])
    final = train_custom.main(["--root_path", str(base / "conv"), "--save_dir", str(base / "run"), "--image_size", "32",
                               "--batch_size", "4", "--labeled_bs", "2", "--method", "labeled_only",
                               "--pre_iterations", "2", "--stage_iterations", "1", "--hca_weights", "0,0,0,1",
                               "--device", "cpu", "--num_workers", "0", "--val_interval", "3"])
    return base / "raw", base / "conv", final


def test_label_without_image(raw, tmp_path):
    shutil.copy(raw / "labelsTr" / "case_00.nii.gz", raw / "labelsTr" / "ghost.nii.gz")
    ghost = raw / "labelsTr" / "ghost.nii.gz"
    assert converting(raw, tmp_path / "out") == (f"error: {ghost}: a label without an image "
                                                 f"(expected imagesTr/ghost_0000.nii.gz)")


def test_unlabeled_case_named_like_an_input_case_names_both_files(raw, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(raw / "imagesTr" / "case_01_0000.nii.gz", extra / "case_01.nii.gz")
    assert converting(raw, tmp_path / "out", "--unlabeled", str(extra)) == (
        f"error: {extra / 'case_01.nii.gz'}: case case_01 is also {raw / 'imagesTr' / 'case_01_0000.nii.gz'}; "
        f"unlabeled cases need their own names")


def test_split_naming_a_case_without_label(raw, tmp_path):
    message = converting(raw, tmp_path / "out", "--val_cases", "nolabel_00")
    assert message.startswith("error: --val_cases: nolabel_00 is not a labeled case of the input")


def test_label_values_outside_dataset_json(raw, tmp_path):
    image, label = phantom((6, 36, 40), seed=1)
    label[0, 0, 0] = 7
    path = write_image(label, raw / "labelsTr" / "case_01.nii.gz", SPACING)
    assert converting(raw, tmp_path / "out") == (f"error: {path}: label values [0, 1, 2, 7]; expected 0..2 "
                                                 f"(background, outer, core)")


def test_geometry_mismatch(raw, tmp_path):
    path = write_image(phantom((6, 36, 40), seed=1)[1], raw / "labelsTr" / "case_01.nii.gz", (0.8, 0.9, 3.0))
    message = converting(raw, tmp_path / "out")
    assert message.startswith(f"error: {path}: spacing (0.8, 0.9, 3) differs from the image's")
    write_image(phantom((6, 30, 40), seed=1)[1], path, SPACING)
    assert converting(raw, tmp_path / "out").startswith(f"error: {path}: size (40, 30, 6) differs from the image's")


def test_four_d_and_multi_channel_images(raw, tmp_path):
    path = raw / "imagesTr" / "case_01_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 36, 40), np.int16), isVector=False), str(path))
    assert "a 4-D image of size (40, 36, 6, 2); expected a 3-D single-channel image" in converting(raw, tmp_path / "o")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 36, 40, 3), np.uint8), isVector=True), str(path))
    assert converting(raw, tmp_path / "o") == (f"error: {path}: 3 channels per voxel (RGB or vector image); expected "
                                               f"a single-channel 3-D image (multi-channel input is not supported, "
                                               f"see docs/own_data.md)")
    info = json.loads((raw / "dataset.json").read_text())
    info["channel_names"] = {"0": "T2", "1": "ADC"}
    (raw / "dataset.json").write_text(json.dumps(info))
    assert "channel_names has 2 channels" in converting(raw, tmp_path / "o")


def test_empty_input_folder_and_unreadable_file(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    empty = tmp_path / "empty"
    assert converting(empty, tmp_path / "o") == f"error: --input {empty}: no image files found"
    (tmp_path / "empty" / "images" / "broken.nii.gz").write_bytes(b"not an image at all")
    message = converting(tmp_path / "empty", tmp_path / "o")
    assert message.startswith(f"error: {tmp_path / 'empty' / 'images' / 'broken.nii.gz'}: not a readable image")
    (tmp_path / "in").mkdir()
    assert error_of(predict.main, ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--checkpoint", "x.pth"]) \
        .startswith(f"error: -i {tmp_path / 'in'}: no image files")


def test_failed_conversion_keeps_the_previous_output(raw, tmp_path):
    out = tmp_path / "out"
    convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "32", "--val_cases", "case_02"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_image(phantom((6, 36, 40), seed=1)[1], raw / "labelsTr" / "case_01.nii.gz", (0.8, 0.9, 3.0))
    converting(raw, out, "--val_cases", "case_02")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".out.partial-*"))


def test_output_that_is_a_file(raw, tmp_path, trained):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert converting(raw, target) == f"error: --out {target}: is a file; expected a new or empty folder"
    _, _, final = trained
    message = error_of(predict.main, ["-i", str(raw / "imagesTs"), "-o", str(target), "--checkpoint", str(final)])
    assert message == f"error: -o {target}: is a file; expected a folder for the label maps"
    assert target.read_text() == "keep me"


def test_predict_refuses_extra_channels_and_4d_inputs(trained, tmp_path):
    raw, _, final = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(raw / "imagesTs" / "new_00_0000.nii.gz", inputs / "new_00_0000.nii.gz")
    shutil.copy(raw / "imagesTs" / "new_00_0000.nii.gz", inputs / "new_00_0001.nii.gz")
    args = ["-i", str(inputs), "-o", str(tmp_path / "out"), "--checkpoint", str(final)]
    assert error_of(predict.main, args).startswith(f"error: {inputs / 'new_00_0001.nii.gz'}: a second input channel")
    (inputs / "new_00_0001.nii.gz").unlink()
    series = sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.int16), isVector=False)
    sitk.WriteImage(series, str(inputs / "series.nii.gz"))
    assert error_of(predict.main, args).startswith(f"error: {inputs / 'series.nii.gz'}: a 4-D image")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_checkpoint_that_does_not_fit(trained, tmp_path):
    raw, root, final = trained
    state = load_checkpoint(final)
    other = {k: v for k, v in state.items() if k != "format"}
    other["config"] = {**state["config"], "model_card": {**state["config"]["model_card"],
                                                         "classes": ["background", "gland"]}}
    save_checkpoint(other, tmp_path / "two.pth")
    message = error_of(test_custom.main, ["--checkpoint", str(tmp_path / "two.pth"), "--root_path", str(root),
                                          "--device", "cpu"])
    assert message == (f"error: {tmp_path / 'two.pth'}: a model of classes ['background', 'gland'], but "
                       f"{root}/dataset.json has ['background', 'outer', 'core']; expected a checkpoint trained on "
                       f"this data set")
    args = ["-i", str(raw / "imagesTs"), "-o", str(tmp_path / "p"), "--checkpoint", str(tmp_path / "two.pth")]
    assert error_of(predict.main, args) == f"error: {tmp_path / 'two.pth'}: 3 output classes, the card names 2"
    card = state["config"]["model_card"]
    other["config"] = {**state["config"], "model_card": {**card, "network": {**card["network"], "channels": [8, 16]}}}
    save_checkpoint(other, tmp_path / "narrow.pth")
    args[-1] = str(tmp_path / "narrow.pth")
    assert error_of(predict.main, args) == (f"error: {tmp_path / 'narrow.pth'}: a unet network of widths [8, 16]; "
                                            f"this code builds the unet of widths [16, 32, 64, 128, 256]")
    other["config"] = {k: v for k, v in state["config"].items() if k != "model_card"}
    save_checkpoint(other, tmp_path / "old.pth")
    args[-1] = str(tmp_path / "old.pth")
    assert error_of(predict.main, args).startswith(f"error: {tmp_path / 'old.pth'}: no model card")


def plain_folder(folder, labels):
    """An images/ + labels/ folder whose label files hold ``labels`` (name -> array) instead of the phantom's."""
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k, (case, label) in enumerate(labels.items()):
        image, _ = phantom(label.shape, seed=k)
        write_image(image, folder / "images" / f"{case}.nii.gz", SPACING)
        write_image(label, folder / "labels" / f"{case}.nii.gz", SPACING)
    return folder


def test_a_0_255_mask_without_class_names_is_refused(tmp_path):
    masks = {f"c{k}": (phantom((6, 36, 40), seed=k)[1] > 0).astype(np.uint8) * 255 for k in range(3)}
    folder = plain_folder(tmp_path / "plain", masks)
    assert converting(folder, tmp_path / "out") == ("error: label values [0, 255] over all label files: 1, 2, 3, "
                                                    f"4, 5, ... never occur (values above 1 in "
                                                    f"{folder / 'labels' / 'c0.nii.gz'} and 2 other file(s)); "
                                                    "expected classes 0..C-1 (remap the labels, or name the classes "
                                                    "with --class_names)")
    masks["c0"] = masks["c0"].astype(np.uint16) * 4  # 0/1020: beyond the uint8 class maps
    plain_folder(folder, masks)
    assert converting(folder, tmp_path / "out") == (f"error: {folder / 'labels' / 'c0.nii.gz'}: label holds the "
                                                    f"value 1020; expected class indices 0..255")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ending", [".mha", ".nii.gz", ".nii"])
def test_an_image_with_nan_is_refused_naming_it(tmp_path, trained, ending):
    """Convert and predict refuse a NaN voxel in every format, NIfTI included, whose ITK reader would
    have turned it into 0 (issue 41)."""
    raw = tmp_path / "Dataset003_NaN"
    make_nnunet(raw, n_labeled=3, n_unlabeled=1, ending=ending)
    image = phantom((6, 36, 40), seed=0)[0].astype(np.float32)
    image[2, 3, 4] = np.nan
    path = write_image(image, raw / "imagesTr" / f"case_00_0000{ending}", SPACING)
    expected = f"error: {path}: 1 NaN or infinite voxel(s); expected finite intensities"
    assert converting(raw, tmp_path / "out") == expected
    assert error_of(predict.main, ["-i", str(path), "-o", str(tmp_path / "p"), "--checkpoint", str(trained[2]),
                                   "--device", "cpu"]) == expected
    assert not (tmp_path / "out").exists() and not list((tmp_path / "p").glob("case_00*"))


def test_an_intensity_range_that_overflows_the_normalisation_is_refused(tmp_path, trained):
    image = phantom((6, 36, 40), seed=0)[0].astype(np.float64)
    image[:2], image[4:] = -1e308, 1e308  # percentiles at the extremes: high - low overflows
    path = write_image(image, tmp_path / "huge.mha", SPACING)
    message = error_of(predict.main, ["-i", str(path), "-o", str(tmp_path / "p"), "--checkpoint", str(trained[2]),
                                      "--device", "cpu"])
    assert message == (f"error: {path}: its intensities (-1e+308 .. 1e+308) overflow the normalisation; expected "
                       f"a finite range")


def test_an_ignore_label_is_refused(raw, tmp_path):
    info = json.loads((raw / "dataset.json").read_text())
    info["labels"]["ignore"] = 3
    (raw / "dataset.json").write_text(json.dumps(info))
    assert converting(raw, tmp_path / "out").startswith(f"error: {raw / 'dataset.json'}: an 'ignore' label;")


def test_split_flags_and_files_do_not_mix(raw, tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"val": ["case_01"], "test": []}))
    assert converting(raw, tmp_path / "out", "--splits", str(splits), "--val_cases", "case_02") == \
        "error: --splits with --val_cases/--test_cases: give the split one way"
    splits.write_text(json.dumps({"val": [1], "test": []}))  # a number is not a case id of the input
    assert converting(raw, tmp_path / "out", "--splits", str(splits)) == \
        f"error: --splits {splits}: val is [1]; expected a list of case names"


def test_predict_refuses_its_input_folder_as_output(trained, tmp_path):
    raw, _, final = trained
    inputs = tmp_path / "scans"
    shutil.copytree(raw / "imagesTs", inputs)
    before = sorted(p.name for p in inputs.iterdir())
    message = error_of(predict.main, ["-i", str(inputs), "-o", str(inputs), "--checkpoint", str(final)])
    assert message.startswith(f"error: -o {inputs}: is the folder of the input images; expected another folder")
    assert sorted(p.name for p in inputs.iterdir()) == before  # nothing written, nothing replaced


def test_predict_refuses_to_mix_runs_in_one_output(trained, tmp_path):
    raw, _, final = trained
    out = tmp_path / "pred"
    args = ["-i", str(raw / "imagesTs"), "-o", str(out), "--checkpoint", str(final), "--device", "cpu"]
    predict.main(args)
    stamp = (out / "new_00.nii.gz").stat().st_mtime_ns
    message = error_of(predict.main, args + ["--tta", "flip"])
    assert message == (f"error: -o {out}: holds label maps of another run (tta 'none' there, 'flip' now); give "
                       f"--overwrite to predict every case again, or another -o")
    assert (out / "new_00.nii.gz").stat().st_mtime_ns == stamp
    assert json.loads((out / "predict.json").read_text())["tta"] == "none"
    predict.main(args + ["--tta", "flip", "--overwrite"])
    assert json.loads((out / "predict.json").read_text())["tta"] == "flip"


def test_train_custom_reads_the_root_from_its_config(trained, tmp_path):
    _, conv, _ = trained
    config = tmp_path / "run.yaml"
    config.write_text(f"root_path: {conv}\nnum_classes: 3\n")  # a saved config.yaml names both
    assert train_custom.dataset_defaults(["--config", str(config)]) == (3, 2)
    config.write_text(f"root_path: {conv}\nnum_classes: 4\n")
    with pytest.raises(SystemExit, match=f"num_classes 4, but {conv}/dataset.json has 3 classes"):
        train_custom.dataset_defaults(["--config", str(config)])
    with pytest.raises(SystemExit, match="--num_classes 3: the class count comes from --root_path's dataset.json"):
        train_custom.dataset_defaults(["--root_path", str(conv), "--num_classes", "3"])
    with pytest.raises(SystemExit, match="--root_path is required"):
        train_custom.dataset_defaults([])


def test_test_custom_on_an_empty_test_split_says_how_to_get_one(trained, tmp_path):
    _, conv, final = trained
    message = error_of(test_custom.main, ["--checkpoint", str(final), "--root_path", str(conv), "--out",
                                          str(tmp_path / "eval")])
    assert message == (f"--split test: {conv / 'test.list'} is empty: no case to evaluate. Evaluate on "
                       f"--split val, or convert again naming labeled test cases (convert_dataset.py --test_cases "
                       f"or --splits).")
