"""Own data that an archive really holds (issue 41): each case was a silently wrong result, a lost file
or a misleading error on the code before this file; each test fails there."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import predict
import test_custom
import train_custom
from conftest import CODE
from dataloaders import convert_dataset
from dataloaders.volume_io import slice_axis
from own_data import error_of, make_nnunet, phantom, random_custom_checkpoint, write_image

SPACING = (0.8, 0.8, 3.0)


def convert(raw, out, *flags):
    return convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "32", *flags])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_custom_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pth", 32)


def predicted(path, out, checkpoint, *flags):
    predict.main(["-i", str(path), "-o", str(out), "--checkpoint", str(checkpoint), "--device", "cpu", *flags])
    maps = [p for p in out.iterdir() if not p.name.startswith("predict")]
    assert len(maps) == 1
    return sitk.GetArrayFromImage(sitk.ReadImage(str(maps[0])))


# ------------------------------------------------------------------ 1. the slice axis

def test_spacings_within_a_tolerance_cut_along_the_same_axis(tmp_path, checkpoint):
    image = phantom((6, 64, 64), seed=1)[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_image(image, tmp_path / "a" / "x.mha", (1.0, 1.0, 1.0))
    b = write_image(image, tmp_path / "b" / "x.mha", (1.0, 1.0000001, 1.0))
    assert np.array_equal(predicted(a, tmp_path / "pa", checkpoint), predicted(b, tmp_path / "pb", checkpoint))
    assert slice_axis((1.0, 1.0000001, 1.0), "largest_spacing") == 2
    assert slice_axis((1.0, 1.01, 1.0), "largest_spacing") == 1  # a real difference still decides


def test_an_axis_of_one_voxel_is_the_slice_axis(tmp_path, checkpoint):
    assert slice_axis((1.2, 1.2, 1.0), "largest_spacing", (64, 64, 1)) == 2
    assert slice_axis((3.0, 1.0, 1.0), "largest_spacing", (40, 64, 1)) == 2
    with pytest.raises(ValueError, match="slice axis x: the image has 1 voxel"):
        slice_axis((1.0, 1.0, 1.0), "x", (64, 64, 1))
    single = write_image(phantom((1, 64, 64), seed=2)[0], tmp_path / "one.mha", (1.2, 1.2, 1.0))
    assert predicted(single, tmp_path / "p", checkpoint).shape == (1, 64, 64)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_zero_or_nan_nifti_voxel_size_is_refused(tmp_path, checkpoint, value):
    """ITK reads a pixdim of 0 or NaN as 1 mm (the slice axis switched, the written header said 1 mm)."""
    path = write_image(phantom((6, 40, 40), seed=3)[0], tmp_path / "z.nii", (1.0, 1.0, 10.0))
    raw = bytearray(path.read_bytes())
    raw[76 + 12:76 + 16] = struct.pack("<f", value)  # pixdim[3]
    path.write_bytes(bytes(raw))
    assert error_of(predict.main, ["-i", str(path), "-o", str(tmp_path / "p"), "--checkpoint", str(checkpoint),
                                   "--device", "cpu"]) == (
        f"error: {path}: voxel size [1.0, 1.0, {value}] in its NIfTI header (pixdim); expected positive finite "
        f"sizes (ITK would read 0 or NaN as 1 mm)")


def test_cases_cut_along_different_axes_are_named_in_a_warning(tmp_path, caplog):
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=0, shape_zyx=(6, 36, 40))
    image, label = phantom((6, 36, 40), seed=1)
    write_image(image, raw / "imagesTr" / "case_01_0000.nii.gz", (3.5, 0.8, 3.0))
    write_image(label, raw / "labelsTr" / "case_01.nii.gz", (3.5, 0.8, 3.0))
    with caplog.at_level("WARNING"):
        convert(raw, tmp_path / "out", "--val_cases", "case_02")
    assert ("the cases are cut along different axes (z: 2 case(s) (case_00, case_02); x: 1 case(s) (case_01)): "
            "training mixes slice orientations; give --slice_axis x|y|z to cut every case alike") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        convert(raw, tmp_path / "out_z", "--val_cases", "case_02", "--slice_axis", "z")
    assert "different axes" not in caplog.text


# ------------------------------------------------------------------ 2. predict output folders

def other_checkpoint(checkpoint, path, scale):
    """The same card, other weights (the output convolution scaled): another model's label maps."""
    import torch
    from common.checkpoint import save_checkpoint
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: (v * scale if k.startswith("out_conv") else v) for k, v in state["model"].items()}
    save_checkpoint(state, path)
    return path


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(8):
        write_image(phantom((6, 36, 40), seed=30 + k)[0], folder / f"s{k}.mha", SPACING)
    return folder


def maps_of(out):
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("s*.mha"))}


def test_an_interrupted_overwrite_run_never_leaves_the_old_models_maps(tmp_path, scans, checkpoint, monkeypatch):
    model_l, model_s = checkpoint, other_checkpoint(checkpoint, tmp_path / "s.pth", -3.0)
    out, reference = tmp_path / "out", tmp_path / "ref"
    run = ["-i", str(scans), "--device", "cpu"]
    predict.main([*run, "-o", str(out), "--checkpoint", str(model_l)])
    predict.main([*run, "-o", str(reference), "--checkpoint", str(model_s)])
    assert any(not np.array_equal(a, b) for a, b in zip(maps_of(out).values(), maps_of(reference).values()))
    written, real_write = [], predict.write_case

    def dies_after_three(*args):
        if len(written) == 3:
            raise KeyboardInterrupt  # as a kill between two cases
        real_write(*args)
        written.append(args[1])

    monkeypatch.setattr(predict, "write_case", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        predict.main([*run, "-o", str(out), "--checkpoint", str(model_s), "--overwrite"])
    assert json.loads((out / "predict.json").read_text())["state"] == "running"
    monkeypatch.setattr(predict, "write_case", real_write)
    predict.main([*run, "-o", str(out), "--checkpoint", str(model_s)])
    now, expected = maps_of(out), maps_of(reference)
    assert now.keys() == expected.keys() and all(np.array_equal(now[k], expected[k]) for k in now)
    assert json.loads((out / "predict.json").read_text())["state"] == "complete"


def test_a_checkpoint_replaced_at_the_same_path_is_refused(tmp_path, scans, checkpoint):
    best = tmp_path / "run" / "best.pth"
    best.parent.mkdir()
    shutil.copy(checkpoint, best)
    first = tmp_path / "first"
    first.mkdir()
    for k in range(3):
        shutil.copy(scans / f"s{k}.mha", first / f"s{k}.mha")
    out = tmp_path / "out"
    predict.main(["-i", str(first), "-o", str(out), "--checkpoint", str(best), "--device", "cpu"])
    other_checkpoint(checkpoint, best, 2.0)  # retrained: best.pth replaced
    message = error_of(predict.main, ["-i", str(scans), "-o", str(out), "--checkpoint", str(best), "--device", "cpu"])
    assert message.startswith(f"error: -o {out}: holds label maps of another run (checkpoint_sha256 ")
    assert message.endswith("give --overwrite to predict every case again, or another -o")


def test_label_maps_no_run_recorded_are_not_adopted(tmp_path, scans, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(scans / "s0.mha", out / "s0.mha")  # looks like a finished case
    message = error_of(predict.main, ["-i", str(scans), "-o", str(out), "--checkpoint", str(checkpoint),
                                      "--device", "cpu"])
    assert message == (f"error: -o {out}: holds 1 label map(s) that no predict.py run recorded (s0.mha); give "
                       f"--overwrite to predict them again, or another -o")


def test_a_changed_input_is_predicted_again(tmp_path, scans, checkpoint, capsys):
    out = tmp_path / "out"
    args = ["-i", str(scans), "-o", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"]
    predict.main(args)
    write_image(phantom((6, 36, 40), seed=99)[0], scans / "s2.mha", SPACING)  # the scan was replaced
    capsys.readouterr()
    predict.main(args)
    assert "predicted 1 case(s), skipped 7 already in" in capsys.readouterr().out


# ------------------------------------------------------------------ 4, 5, 7, 10: names

def plain(folder, names, labeled=None):
    """A plain images/ + labels/ folder of small phantoms named ``names`` (labels for ``labeled``)."""
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        image, label = phantom((6, 36, 40), seed=40 + k)
        write_image(image, folder / "images" / f"{name}.nii.gz", SPACING)
        if labeled is None or name in labeled:
            write_image(label, folder / "labels" / f"{name}.nii.gz", SPACING)
    return folder


def test_case_names_with_outer_white_space_are_refused(tmp_path):
    raw = plain(tmp_path / "raw", ["c1", "c2", "c3 "])
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32"])
    assert message == (f"error: {raw / 'images' / 'c3 .nii.gz'}: case name 'c3 ' begins or ends with white space (or "
                       f"holds a tab or line break); the split lists could not name it: rename the file")


def test_a_second_channel_in_the_unlabeled_folder_is_refused(tmp_path):
    raw = plain(tmp_path / "raw", ["c1", "c2", "c3"])
    extra = tmp_path / "extra"
    extra.mkdir()
    for suffix in ("_0000", "_0001"):
        write_image(phantom((6, 36, 40), seed=5)[0], extra / f"u1{suffix}.nii.gz", SPACING)
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32",
                                              "--unlabeled", str(extra)])
    assert message == (f"error: {extra / 'u1_0001.nii.gz'}: a second input channel of case u1 (_0001); expected one "
                       f"channel per case ({{case}}.ext or {{case}}_0000.ext), as in imagesTr")


def test_a_case_in_imagests_and_imagestr_is_refused(tmp_path):
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=0)
    shutil.copy(raw / "imagesTr" / "case_01_0000.nii.gz", raw / "imagesTs" / "case_01_0000.nii.gz")
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32"])
    assert message == (f"error: {raw / 'imagesTs' / 'case_01_0000.nii.gz'}: case case_01 is in imagesTs and in "
                       f"imagesTr (case_01_0000.nii.gz); a test case must not be a training case")


def test_plain_names_ending_in_four_digits_predict_as_their_own_cases(tmp_path):
    names = ["case_0000", "case_0001", "case_0002", "case_0003"]
    raw = plain(tmp_path / "raw", names)
    convert(raw, tmp_path / "conv", "--val_cases", "case_0003")
    final = train_custom.main(["--root_path", str(tmp_path / "conv"), "--save_dir", str(tmp_path / "run"),
                               "--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--method",
                               "labeled_only", "--pre_iterations", "2", "--stage_iterations", "1", "--hca_weights",
                               "0,0,0,1", "--device", "cpu", "--num_workers", "0", "--val_interval", "3"])
    predict.main(["-i", str(raw / "images"), "-o", str(tmp_path / "p"), "--checkpoint", str(final), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "p").glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(raw / "images" / "case_0000.nii.gz", lone / "case_0000.nii.gz")
    predict.main(["-i", str(lone), "-o", str(tmp_path / "p1"), "--checkpoint", str(final), "--device", "cpu"])
    assert [p.name for p in (tmp_path / "p1").glob("*.nii.gz")] == ["case_0000.nii.gz"]


# ------------------------------------------------------------------ 6. test_custom

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(raw folder, converted root, final checkpoint) of a tiny labeled-only run."""
    base = tmp_path_factory.mktemp("trained")
    raw = plain(base / "raw", ["c0", "c1", "c2", "c3"])
    convert(raw, base / "conv", "--val_cases", "c3")
    final = train_custom.main(["--root_path", str(base / "conv"), "--save_dir", str(base / "run"), "--image_size",
                               "32", "--batch_size", "4", "--labeled_bs", "2", "--method", "labeled_only",
                               "--pre_iterations", "2", "--stage_iterations", "1", "--hca_weights", "0,0,0,1",
                               "--device", "cpu", "--num_workers", "0", "--val_interval", "3"])
    return raw, base / "conv", final


def test_test_custom_refuses_data_prepared_otherwise(trained, tmp_path):
    raw, _, final = trained
    for flags, changed in ((["--image_size", "64"], "size: 32 in the model card, 64 in"),
                           (["--slice_axis", "y"], "slice_axis: 'largest_spacing' in the model card, 'y' in")):
        out = tmp_path / flags[1]
        convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "32", "--val_cases", "c3", *flags])
        message = error_of(test_custom.main, ["--checkpoint", str(final), "--root_path", str(out), "--split", "val",
                                              "--device", "cpu", "--workers", "0"])
        assert message.startswith(f"error: {final}: trained on data prepared otherwise (preprocessing ") and \
            changed in message, message


def test_test_custom_refuses_to_score_a_case_the_model_trained_on(trained, tmp_path):
    raw, _, final = trained
    out = tmp_path / "resplit"
    convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "32", "--val_cases", "c1"])
    message = error_of(test_custom.main, ["--checkpoint", str(final), "--root_path", str(out), "--split", "val",
                                          "--device", "cpu", "--workers", "0"])
    assert message == (f"error: --split val: c1 of {out / 'val.list'} is a case {final} trained on (its model card "
                       f"lists its training cases); scoring it would leak: evaluate on cases it never saw")


# ------------------------------------------------------------------ 8, 9: the converter's output folder

def test_a_rerun_refuses_an_out_holding_files_the_converter_did_not_write(trained, tmp_path):
    raw = trained[0]
    out = tmp_path / "out"
    convert(raw, out, "--val_cases", "c3")
    (out / "model" / "run1").mkdir(parents=True)
    (out / "model" / "run1" / "best.pth").write_bytes(b"weights")
    (out / "notes.txt").write_text("keep me")
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(out), "--image_size", "32",
                                              "--val_cases", "c3", "--overwrite"])
    assert message == (f"error: --out {out}: holds entries the converter did not write (model, notes.txt); a new "
                       f"conversion replaces the whole folder: move them out, or choose another --out")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model" / "run1" / "best.pth").is_file()


def test_work_folders_of_a_killed_conversion_are_removed(trained, tmp_path):
    raw = trained[0]
    script = CODE / "dataloaders" / "convert_dataset.py"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    child.wait()  # a pid that no longer runs
    stale = tmp_path / f".out.partial-{child.pid}"
    (stale / "data").mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getpid()}x"  # not a pid: never touched
    live.mkdir()
    subprocess.run([sys.executable, str(script), "--input", str(raw), "--out", str(tmp_path / "out"), "--image_size",
                    "32", "--val_cases", "c3"], check=True, capture_output=True)
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "dataset.json").is_file()


# ------------------------------------------------------------------ minor items

def test_split_flags_name_each_case_once_as_a_list_of_names(trained, tmp_path):
    raw = trained[0]
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32",
                                              "--val_cases", "c0,c0"])
    assert message == "error: --val_cases: c0 is named 2 times; expected each case once"
    (tmp_path / "s.json").write_text(json.dumps({"test": "c1"}))
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32",
                                              "--splits", str(tmp_path / "s.json")])
    assert message == f"error: --splits {tmp_path / 's.json'}: test is 'c1'; expected a list of case names"


def test_a_gzipped_mha_is_refused_not_skipped(trained, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(trained[0], raw)
    (raw / "images" / "c9.mha.gz").write_bytes(b"\x1f\x8b")
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32"])
    assert message.startswith(f"error: {raw / 'images' / 'c9.mha.gz'}: a gzip-compressed file this converter cannot "
                              f"read")


def test_a_missing_data_file_stops_predict_before_any_case_is_written(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        write_image(phantom((6, 36, 40), seed=k)[0], folder / f"s{k}.mhd", SPACING)
    next(p for p in folder.iterdir() if p.name.startswith("s2.") and p.suffix != ".mhd").unlink()  # its data file
    message = error_of(predict.main, ["-i", str(folder), "-o", str(tmp_path / "p"), "--checkpoint", str(trained[2]),
                                      "--device", "cpu"])
    assert message.startswith(f"error: {folder / 's2.mhd'}: its data file") and not (tmp_path / "p").exists()


# ------------------------------------------------------------------ found by an attack on the inputs (review)

def test_entries_named_like_images_that_are_not_files_are_refused(trained, tmp_path, checkpoint):
    raw = tmp_path / "raw"
    shutil.copytree(trained[0], raw)
    (raw / "labels" / "c2.nii.gz").unlink()
    (raw / "labels" / "c2.nii.gz").mkdir()  # would have made c2 silently unlabeled
    assert error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size",
                                           "32"]) == (f"error: {raw / 'labels' / 'c2.nii.gz'}: named like an image "
                                                      f"but not a readable file (in labels)")
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(raw / "images" / "c0.nii.gz", scans / "c0.nii.gz")
    (scans / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    assert error_of(predict.main, ["-i", str(scans), "-o", str(tmp_path / "p"), "--checkpoint", str(checkpoint),
                                   "--device", "cpu"]) == f"error: {scans / 'gone.nii.gz'}: named like an image but " \
                                                          f"not a readable file"


def test_predict_output_folder_records_after_failures_and_foreign_files(trained, tmp_path, checkpoint):
    raw, _, final = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    bad = phantom((6, 36, 40), seed=1)[0].astype(np.float32)
    bad[0, 0, 0] = np.nan
    write_image(bad, scans / "c0.nii.gz", SPACING)
    out = tmp_path / "out"
    error_of(predict.main, ["-i", str(scans), "-o", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"])
    write_image(phantom((6, 36, 40), seed=1)[0], scans / "c0.nii.gz", SPACING)  # fixed; another model now
    predict.main(["-i", str(scans), "-o", str(out), "--checkpoint", str(final), "--device", "cpu"])  # no map there
    assert (out / "c0.nii.gz").is_file()
    shutil.copy(raw / "images" / "c1.nii.gz", scans / "c1.nii.gz")
    (out / "c1.nii.gz").write_text("notes")  # a user's file named like a label map
    assert error_of(predict.main, ["-i", str(scans), "-o", str(out), "--checkpoint", str(final), "--device", "cpu"]) \
        == (f"error: -o {out}: holds 1 label map(s) that no predict.py run recorded (c1.nii.gz); give --overwrite to "
            f"predict them again, or another -o")
    assert (out / "c1.nii.gz").read_text() == "notes"


def test_predict_refuses_an_empty_case_name(tmp_path, checkpoint):
    write_image(phantom((6, 36, 40), seed=2)[0], tmp_path / "_0000.nii.gz", SPACING)
    assert error_of(predict.main, ["-i", str(tmp_path / "_0000.nii.gz"), "-o", str(tmp_path / "p"), "--checkpoint",
                                   str(checkpoint), "--device", "cpu"]) == \
        f"error: {tmp_path / '_0000.nii.gz'}: no case name before _0000.nii.gz; expected {{case}}.nii.gz"


def test_the_test_images_cannot_be_added_as_unlabeled_cases(tmp_path):
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=0)
    assert error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--image_size", "32",
                                           "--unlabeled", str(raw / "imagesTs")]) == (
        f"error: {raw / 'imagesTs' / 'new_00_0000.nii.gz'}: case new_00 is an imagesTs case of --input; a test case "
        f"must not be a training case (unlabeled ones included)")


def test_the_header_check_of_predict_ends_in_one_line_with_the_readers_cause(tmp_path, checkpoint, capfd):
    path = write_image(phantom((6, 36, 40), seed=3)[0], tmp_path / "m.mha", SPACING)
    text = path.read_bytes()
    header, rest = text.split(b"ElementDataFile", 1)
    lines = header.decode().splitlines()
    moved = [line for line in lines if line.startswith("TransformMatrix")] + \
        [line for line in lines if not line.startswith("TransformMatrix")]  # before NDims: MetaIO fails
    path.write_bytes(("\n".join(moved) + "\n").encode() + b"ElementDataFile" + rest)
    message = error_of(predict.main, ["-i", str(path), "-o", str(tmp_path / "p"), "--checkpoint", str(checkpoint),
                                      "--device", "cpu"])
    assert message.startswith(f"error: {path}: not a readable image (") and "No such file" not in message
    assert capfd.readouterr().err.count("\n") <= 1  # ITK's own lines were held back


def test_a_stored_geometry_that_does_not_fit_is_named_before_any_summary(trained, tmp_path):
    import h5py
    raw, _, final = trained
    root = tmp_path / "conv"
    convert(raw, root, "--val_cases", "c3")
    with h5py.File(root / "data" / "c3.h5", "a") as f:
        f.attrs["orig_size"] = [40, 36, 5]  # one slice fewer than the stored volume
    out = tmp_path / "eval"
    message = error_of(test_custom.main, ["--checkpoint", str(final), "--root_path", str(root), "--split", "val",
                                          "--device", "cpu", "--workers", "0", "--out", str(out)])
    assert message.startswith(f"error: {root / 'data' / 'c3.h5'}: its stored geometry does not fit its volume (")
    assert not (out / "summary.json").exists()
