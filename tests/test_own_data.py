"""Own data sets: conversion (nnU-Net raw and images/labels folders, truly unlabeled cases), training
with every --method on a pool whose unlabeled slices have no label on disk, testing, and predict.py
reproducing the test script's predictions voxel for voxel in the input's geometry."""
import json
import shutil

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import predict
import test_custom
import train_custom
from common.checkpoint import load_checkpoint, save_checkpoint
from dataloaders import convert_dataset
from dataloaders.converted import ConvertedTrainData
from dataloaders.dataset import UNLABELED
from dataloaders.volume_io import from_slices, preprocess_image, slice_axis, to_slices
from networks.unet import build_model
from own_data import make_nnunet, phantom, write_image

SIZE = 32
# the test scripts' slices per forward (evaluation.inference.predict_volume): predict.py is compared with them at
# the same batch, whose convolutions round alike on every CPU (another batch size may run other oneDNN
# kernels, and a random network's near-tie voxels then flip: seen on an AVX2-only EPYC)
TEST_BATCH = 64
TINY = ["--image_size", str(SIZE), "--batch_size", "4", "--labeled_bs", "2", "--device", "cpu", "--num_workers", "0",
        "--log_interval", "2", "--val_interval", "2", "--amp", "off"]


def convert(raw, out, *flags):
    return convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", str(SIZE), *flags])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(raw nnU-Net folder, names, extra unlabeled folder, converted root)."""
    base = tmp_path_factory.mktemp("own")
    names = make_nnunet(base / "Dataset001_Phantom")
    extra = base / "more_unlabeled"
    extra.mkdir()
    write_image(phantom((6, 36, 40), seed=50)[0], extra / "extra_01.mha", (0.8, 0.8, 3.0))
    convert(base / "Dataset001_Phantom", base / "converted", "--unlabeled", str(extra), "--val_cases", "case_04")
    return base / "Dataset001_Phantom", names, extra, base / "converted"


def test_conversion_layout_lists_and_recipe(dataset):
    raw, names, _, root = dataset
    info = json.loads((root / "dataset.json").read_text())
    assert info["classes"] == ["background", "outer", "core"] and info["num_classes"] == 3
    assert info["preprocessing"] == {"normalization": "percentile_minmax", "percentiles": [0.5, 99.5],
                                     "slice_axis": "largest_spacing", "size": SIZE}
    assert info["splits"]["val"] == ["case_04"] and info["predict_only_cases"] == ["new_00"]
    train = (root / "train.list").read_text().split()
    assert sorted(train) == ["case_00", "case_01", "case_02", "case_03"] and train == info["splits"]["train"]
    assert (root / "unlabeled.list").read_text().split() == ["extra_01", "nolabel_00", "nolabel_01"]
    slices = (root / "train_slices.list").read_text().split()
    assert len(slices) == 7 * 6 and slices[: 4 * 6] == [f"{c}_slice_{k}" for c in train for k in range(6)]
    # the stored volume is the recipe applied to the raw image (what predict.py replays)
    image = sitk.ReadImage(str(raw / "imagesTr" / "case_04_0000.nii.gz"))
    with h5py.File(root / "data" / "case_04.h5") as f:
        stored, label = f["image"][:], f["label"][:]
        assert int(f.attrs["slice_axis"]) == 2 and tuple(f.attrs["orig_size"]) == image.GetSize()
    assert np.array_equal(stored, preprocess_image(image, info["preprocessing"])[0])
    assert stored.shape == (6, SIZE, SIZE) and stored.dtype == np.float32
    array = sitk.GetArrayFromImage(image).astype(np.float64)  # the recipe by hand: volume percentiles, then resize
    low, high = np.percentile(array, [0.5, 99.5])
    by_hand = ndimage.zoom((np.clip(array[3], low, high) - low) / (high - low), (SIZE / 36, SIZE / 40), order=1,
                           grid_mode=True, mode="nearest")
    assert np.allclose(stored[3], by_hand, atol=1e-6) and 0 <= stored.min() < 0.1 and 0.9 < stored.max() <= 1
    assert set(np.unique(label)) == {0, 1, 2}


def test_unlabeled_cases_have_no_label_anywhere_on_disk(dataset):
    raw, names, extra, root = dataset
    labelless = names["unlabeled"] + ["extra_01"]
    assert not any((raw / "labelsTr" / f"{c}.nii.gz").exists() for c in labelless)
    assert not list(extra.glob("*label*"))
    for case in labelless:
        assert not (root / "data" / f"{case}.h5").exists()
        for k in range(6):
            with h5py.File(root / "data" / "slices" / f"{case}_slice_{k}.h5") as f:
                assert list(f.keys()) == ["image"]
    # their training-cache labels are the placeholder, never a file's label
    data = ConvertedTrainData(root, 2, SIZE, 3)
    ids = data.cache.ids
    assert len(data.labeled) == 12 and len(data.unlabeled) == 30
    for i, sid in enumerate(ids):
        is_labelless = sid.rsplit("_slice_", 1)[0] in labelless
        assert bool((data.cache.labels[i] == UNLABELED).all()) == is_labelless, sid


def test_rerun_same_settings_accepted_other_settings_refused(dataset, tmp_path):
    raw, _, extra, root = dataset
    out = tmp_path / "conv"
    first = convert(raw, out, "--val_cases", "case_04")
    stamp = (out / "dataset.json").read_text()
    assert convert(raw, out, "--val_cases", "case_04")["splits"] == first["splits"]
    with pytest.raises(FileExistsError, match=r"other settings \(preprocessing.size: 32 there, 64 now\)"):
        convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "64", "--val_cases", "case_04"])
    assert (out / "dataset.json").read_text() == stamp  # refused: nothing changed
    convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "64", "--val_cases", "case_04",
                          "--overwrite"])
    assert json.loads((out / "dataset.json").read_text())["image_size"] == 64


def test_seeded_split_is_written_and_printed(dataset, tmp_path, capsys):
    raw = dataset[0]
    summary = convert(raw, tmp_path / "a", "--seed", "3")
    printed = capsys.readouterr().out
    assert summary["split_source"] == "seeded (--seed 3, --val_fraction 0.2)"
    assert f"val: {summary['splits']['val'][0]}" in printed and " ".join(summary["splits"]["train"]) in printed
    again = convert(raw, tmp_path / "b", "--seed", "3")
    assert again["splits"] == summary["splits"] and len(summary["splits"]["val"]) == 1


def test_slice_axis_follows_the_largest_spacing_and_round_trips(tmp_path):
    assert slice_axis((3.0, 0.8, 0.8), "largest_spacing") == 0
    assert slice_axis((1.0, 1.0, 1.0), "largest_spacing") == 2  # ties go to z
    assert slice_axis((0.5, 2.0, 2.0), "largest_spacing") == 2 and slice_axis((0.5, 2.0, 1.0), "z") == 2
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in range(3):
        stack = to_slices(array, axis)
        assert stack.shape[0] == array.shape[2 - axis] and np.array_equal(from_slices(stack, axis), array)
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=0, shape_zyx=(30, 28, 5), spacing=(3.0, 0.8, 0.8))
    convert(raw, tmp_path / "out", "--val_cases", "case_02")
    with h5py.File(tmp_path / "out" / "data" / "case_02.h5") as f:
        assert f["image"].shape == (5, SIZE, SIZE) and int(f.attrs["slice_axis"]) == 0
        assert np.allclose(f.attrs["spacing"], (3.0, 0.8 * 30 / SIZE, 0.8 * 28 / SIZE))


def tiny_train(root, save_dir, *flags):
    return train_custom.main(["--root_path", str(root), "--save_dir", str(save_dir), *TINY, *flags])


@pytest.mark.parametrize("method", ["sscd", "bcp", "abd", "labeled_only"])
def test_every_method_trains_on_label_less_cases(dataset, tmp_path, method):
    root = dataset[3]
    final = tiny_train(root, tmp_path / method, "--method", method, "--labelnum", "2", "--pre_iterations", "2",
                       "--stage_iterations", "2", "--hca_weights", "0,0,0,1", "--patch_size", "8")
    state = load_checkpoint(final)
    card = state["config"]["model_card"]
    assert card["classes"] == ["background", "outer", "core"] and card["dataset"] == "CUSTOM"
    assert card["preprocessing"]["size"] == SIZE and card["image_size"] == SIZE and card["input_channels"] == 1
    assert card["network"] == {"name": "unet", "in_chns": 1, "class_num": 3, "channels": [16, 32, 64, 128, 256]}
    assert state["num_classes"] == 3


def random_weights(path, seed=0):
    """Replace the weights of checkpoint ``path`` by a seeded random network's whose output biases
    centre each class's logits on a random input, so that its predictions hold several classes and a
    voxel-for-voxel comparison means something."""
    state = load_checkpoint(path)
    torch.manual_seed(seed)
    model = build_model(int(state["num_classes"])).eval()
    with torch.no_grad():
        model.out_conv.weight *= 100  # features, not the biases, decide the argmax
        size = state["config"]["model_card"]["image_size"]
        logits = model(torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(seed)))
        model.out_conv.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values
    state["model"] = model.state_dict()
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    return path


def same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def check_predict_equals_test(raw_images, checkpoint, val_cases, root, out, ending=".nii.gz"):
    """test_custom's predictions of ``val_cases`` == predict.py's on the raw images, in their geometry."""
    test_custom.main(["--checkpoint", str(checkpoint), "--root_path", str(root), "--split", "val", "--out",
                      str(out / "eval"), "--device", "cpu", "--workers", "0"])
    inputs = out / "in"
    inputs.mkdir()
    for case in val_cases:
        shutil.copy(raw_images / f"{case}_0000{ending}", inputs / f"{case}_0000{ending}")
    predict.main(["-i", str(inputs), "-o", str(out / "pred"), "--checkpoint", str(checkpoint), "--device", "cpu",
                  "--batch_size", str(TEST_BATCH)])
    classes = set()
    for case in val_cases:
        mine = sitk.ReadImage(str(out / "pred" / f"{case}{ending}"))
        theirs = sitk.ReadImage(str(out / "eval" / "predictions" / f"{case}_pred.nii.gz"))
        source = sitk.ReadImage(str(inputs / f"{case}_0000{ending}"))
        assert np.array_equal(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(theirs)), case
        assert same_geometry(mine, source), case
        classes |= set(np.unique(sitk.GetArrayFromImage(mine)).tolist())
    return classes


def test_predict_matches_the_test_script_voxel_for_voxel(dataset, tmp_path):
    raw, _, _, root = dataset
    final = tiny_train(root, tmp_path / "run", "--pre_iterations", "4", "--stage_iterations", "2", "--hca_weights",
                       "0,0,0,1", "--patch_size", "8")
    check_predict_equals_test(raw / "imagesTr", final, ["case_04"], root, tmp_path / "trained")
    noisy = random_weights(shutil.copy(final, tmp_path / "random.pth"))
    classes = check_predict_equals_test(raw / "imagesTr", noisy, ["case_04"], root, tmp_path / "random")
    assert len(classes) >= 2  # a non-trivial prediction


def test_predict_slices_along_x_back_in_the_input_geometry(tmp_path):
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=1, shape_zyx=(30, 28, 5), spacing=(3.0, 0.8, 0.8), ending=".mha")
    convert(raw, tmp_path / "conv", "--val_cases", "case_02")
    final = tiny_train(tmp_path / "conv", tmp_path / "run", "--method", "labeled_only", "--pre_iterations", "2",
                       "--stage_iterations", "2", "--hca_weights", "0,0,0,1")
    random_weights(final)
    classes = check_predict_equals_test(raw / "imagesTr", final, ["case_02"], tmp_path / "conv", tmp_path,
                                        ending=".mha")
    assert len(classes) >= 2


def test_predict_resumes_skips_finished_and_writes_probabilities(dataset, tmp_path, capsys):
    raw, _, _, root = dataset
    final = tiny_train(root, tmp_path / "run", "--method", "labeled_only", "--pre_iterations", "2",
                       "--stage_iterations", "2", "--hca_weights", "0,0,0,1")
    random_weights(final)
    out = tmp_path / "pred"
    args = ["-i", str(raw / "imagesTs"), "-o", str(out), "--checkpoint", str(final), "--device", "cpu"]
    predict.main(args + ["--save_probabilities", "--batch_size", "2"])
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "new_00.nii.gz")))
    probs = np.load(out / "new_00.npz")["probabilities"]
    assert probs.shape == (3, *label.shape) and np.allclose(probs.sum(axis=0), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(axis=0), label)
    (out / ".partial-new_00.nii.gz").write_bytes(b"half")  # an interrupted write
    (out / ".partial-notes.txt").write_text("a user's file")  # not predict's: kept
    stamp = (out / "new_00.nii.gz").stat().st_mtime_ns
    predict.main(args)
    assert "skipped 1 already in" in capsys.readouterr().out
    assert (out / "new_00.nii.gz").stat().st_mtime_ns == stamp and not (out / ".partial-new_00.nii.gz").exists()
    assert (out / ".partial-notes.txt").read_text() == "a user's file"
    (out / "new_00.npz").unlink()
    predict.main(args + ["--save_probabilities"])  # a finished case without the asked-for probabilities is redone
    assert np.array_equal(np.load(out / "new_00.npz")["probabilities"], probs)
    predict.main(args + ["--overwrite", "--batch_size", "5"])
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "new_00.nii.gz"))), label)
    predict.main(args + ["--overwrite", "--amp", "bf16", "--channels_last", "on"])
    fast = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "new_00.nii.gz")))
    assert (fast == label).mean() > 0.95  # bf16 may move a few voxels, not the segmentation
    predict.main(args + ["--overwrite", "--tta", "flip", "--lcc", "--save_probabilities"])
    flipped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "new_00.nii.gz")))
    tta = np.load(out / "new_00.npz")["probabilities"]
    check_flip_average(final, raw / "imagesTs" / "new_00_0000.nii.gz", tta)
    check_largest_components(flipped, tta.argmax(axis=0))


def check_flip_average(checkpoint, path, saved):
    """``--tta flip`` probabilities == an oracle written here: the softmax of each in-plane flip of
    every slice, flipped back, averaged (a missing flip-back or a wrong axis fails)."""
    from dataloaders.dataset import resize_nearest
    from dataloaders.volume_io import geometry_meta, read_image
    from common.geometry import restore_original_geometry
    model, card = predict.load_predictor(checkpoint, torch.device("cpu"))
    image = read_image(path)
    volume, axis = preprocess_image(image, card["preprocessing"])
    size = card["image_size"]
    with torch.no_grad():
        x = resize_nearest(torch.as_tensor(volume), (size, size))[:, None]
        views = [torch.softmax(model(x), 1), torch.softmax(model(x.flip(-1)), 1).flip(-1),
                 torch.softmax(model(x.flip(-2)), 1).flip(-2), torch.softmax(model(x.flip(-2, -1)), 1).flip(-2, -1)]
        mean = resize_nearest(sum(views) / 4, volume.shape[-2:]).permute(1, 0, 2, 3).numpy()
    expected = np.stack([restore_original_geometry(c, geometry_meta(image, axis)) for c in mean])
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    without = resize_nearest(views[0], volume.shape[-2:]).permute(1, 0, 2, 3).numpy()
    assert np.abs(np.stack([restore_original_geometry(c, geometry_meta(image, axis)) for c in without])
                  - expected).max() > 1e-3  # the flips do change the probabilities: the check can fail


def check_largest_components(label, argmax):
    """``--lcc``: each class keeps one 26-connected component, a subset of the class's argmax voxels,
    and the argmax had more than one somewhere (so that the filter had something to remove)."""
    structure = np.ones((3, 3, 3))
    several = False
    for c in (1, 2):
        kept = label == c
        assert ndimage.label(kept, structure=structure)[1] <= 1 and not (kept & (argmax != c)).any()
        n = ndimage.label(argmax == c, structure=structure)[1]
        several |= n > 1
        if n:
            sizes = np.bincount(ndimage.label(argmax == c, structure=structure)[0].ravel())[1:]
            assert kept.sum() == sizes.max()  # the largest one
    assert several


def test_predict_case_names_follow_the_nnunet_channel_suffix(tmp_path):
    for name in ("a_0000.nii.gz", "scan_0001.mha", "b.nrrd", "notes.txt", "c.mhd", "c.zraw", "d.nhdr", "d.raw.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = predict.list_inputs(tmp_path)
    assert [(case, path.name, ending) for case, path, ending in cases] == [
        ("a", "a_0000.nii.gz", ".nii.gz"), ("b", "b.nrrd", ".nrrd"), ("c", "c.mhd", ".mhd"), ("d", "d.nhdr", ".nhdr"),
        ("scan_0001", "scan_0001.mha", ".mha")]
    assert predict.output_name("c", ".mhd") == "c.mha" and predict.output_name("a", ".nii.gz") == "a.nii.gz"
    assert predict.output_name("d", ".nhdr") == "d.nrrd"  # a header + data pair is written as one file


def test_predict_writes_a_header_and_data_input_as_one_file_that_survives_a_rerun(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_nnunet(raw, n_labeled=3, n_unlabeled=1, ending=".nhdr")  # .nhdr headers beside their data files
    assert any(p.name.startswith("new_00_0000") and not p.name.endswith(".nhdr") for p in (raw / "imagesTs").iterdir())
    convert(raw, tmp_path / "conv", "--val_cases", "case_02")
    final = tiny_train(tmp_path / "conv", tmp_path / "run", "--method", "labeled_only", "--pre_iterations", "2",
                       "--stage_iterations", "2", "--hca_weights", "0,0,0,1")
    args = ["-i", str(raw / "imagesTs"), "-o", str(tmp_path / "pred"), "--checkpoint", str(final), "--device", "cpu"]
    predict.main(args)
    predict.main(args)  # the rerun skips the case and must leave its file readable
    assert "skipped 1 already in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["new_00.nrrd", "predict.json", "predict_cases.jsonl"]
    written = sitk.ReadImage(str(tmp_path / "pred" / "new_00.nrrd"))
    assert same_geometry(written, sitk.ReadImage(str(raw / "imagesTs" / "new_00_0000.nhdr")))
