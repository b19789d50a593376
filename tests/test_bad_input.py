"""Bad input and interrupted runs (issue 11): every case ends with an error naming the file or flag,
or is handled; nothing of an earlier run is lost; no corrupt checkpoint is ever saved."""
import errno
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

import train_ACDC_SSCD
import train_ACDC_supervised
from common import checkpoint as checkpoint_module
from common.checkpoint import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint
from conftest import CODE
from dataloaders.dataset import SliceCache, TrainData, load_volumes
from evaluation.inference import Validator
from training.config import base_parser, parse_args
from training.engine import NonFiniteWeights, train_loop
from training.speed import onednn_isa_cap

SUPERVISED = CODE / "train_ACDC_supervised.py"


def write_h5(path, image, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
    return path


def mini_root(tmp_path, classes=4, size=(20, 24)):
    """Two patients of two slices, one val volume; every class 0..classes-1 occurs in each."""
    root = tmp_path / "root"
    ids = [f"patient00{p}_frame01_slice_{s}" for p in (1, 2) for s in (1, 2)]
    h, w = size
    label = (np.arange(h * w).reshape(h, w) % classes).astype(np.uint8)
    rng = np.random.default_rng(0)
    for sid in ids:
        write_h5(root / "data" / "slices" / f"{sid}.h5", rng.random(size, dtype=np.float32), label)
    write_h5(root / "data" / "patient003_frame01.h5", rng.random((3, h, w), dtype=np.float32),
             np.stack([label] * 3))
    (root / "train_slices.list").write_text("\n".join(ids) + "\n")
    (root / "val.list").write_text("patient003_frame01\n")
    return root, ids


def tiny(root, save_dir, iterations=4, val_interval=2, *extra):
    return ["--root_path", str(root), "--save_dir", str(save_dir), "--image_size", "32", "--batch_size", "2",
            "--labeled_bs", "2", "--labelnum", "1", "--max_iterations", str(iterations),
            "--val_interval", str(val_interval), "--log_interval", "2", "--device", "cpu", "--num_workers", "0",
            *extra]


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("kind", ["slice", "volume"])
def test_float_label_values_refused(tmp_path, kind):
    root, ids = mini_root(tmp_path)
    path = (root / "data" / "slices" / f"{ids[1]}.h5") if kind == "slice" else root / "data" / "patient003_frame01.h5"
    with h5py.File(path, "r") as f:
        image, label = f["image"][()], f["label"][()].astype(np.float32)
    label.flat[7] = 1.5
    write_h5(path, image, label)
    load = (lambda: SliceCache(root, ids, 16, 4)) if kind == "slice" else (lambda: load_volumes(root, "val", 4))
    with pytest.raises(ValueError, match=rf"{path.name}: label holds non-integer values \(e\.g\. 1\.5\)"):
        load()
    label.flat[7] = 2.0  # integral floats are class indices
    write_h5(path, image, label)
    load()


@pytest.mark.parametrize("kind, bad", [("slice", np.nan), ("volume", np.inf), ("slice", -np.inf)])
def test_non_finite_image_refused_naming_the_file(tmp_path, kind, bad):
    root, ids = mini_root(tmp_path)
    path = (root / "data" / "slices" / f"{ids[2]}.h5") if kind == "slice" else root / "data" / "patient003_frame01.h5"
    with h5py.File(path, "r") as f:
        image, label = f["image"][()], f["label"][()]
    image.flat[3] = bad
    image.flat[5] = bad
    write_h5(path, image, label)
    load = (lambda: TrainData(root, 1, 16, 4)) if kind == "slice" else (lambda: load_volumes(root, "val", 4))
    with pytest.raises(ValueError, match=rf"{path.name}: the image holds 2 NaN/inf value\(s\)"):
        load()


def test_num_classes_above_the_data_refused(tmp_path):
    root, _ = mini_root(tmp_path, classes=4)
    with pytest.raises(ValueError, match=r"--num_classes 5: class\(es\) \[4\] occur in none of the 4 training slices"):
        TrainData(root, 1, 16, 5)
    data = TrainData(root, 1, 16, 4)
    assert data.absent_in_labeled == []


def test_class_absent_from_labeled_slices_is_reported(tmp_path):
    root, ids = mini_root(tmp_path, classes=4)
    for sid in ids[:2]:  # the labeled patient has no class 3
        path = root / "data" / "slices" / f"{sid}.h5"
        with h5py.File(path, "r") as f:
            image, label = f["image"][()], f["label"][()]
        write_h5(path, image, np.where(label == 3, 0, label).astype(np.uint8))
    assert TrainData(root, 1, 16, 4).absent_in_labeled == [3]


class Background(torch.nn.Module):
    """Predicts class 0 everywhere."""

    def forward(self, x):
        return torch.cat([torch.ones_like(x), torch.zeros_like(x).repeat(1, 3, 1, 1)], dim=1)


def test_class_absent_from_every_val_volume_does_not_raise_the_score(caplog):
    label = np.zeros((2, 8, 8), np.uint8)
    label[:, :4] = 1
    label[:, 6:] = 2  # no class 3 anywhere
    volumes = [{"case": "v", "image": np.zeros((2, 8, 8), np.float32), "label": label, "attrs": {}}]
    import logging
    logger = logging.getLogger("test_absent_class")
    with caplog.at_level(logging.WARNING, logger="test_absent_class"):
        score, scalars = Validator(volumes, 4, 16, "cpu", logger=logger)(Background())
    # classes 1, 2 never predicted: Dice 0; class 3 absent from both: 1 per convention, not in the score
    assert scalars == {"dice_class1": 0.0, "dice_class2": 0.0, "dice_class3": 1.0}
    assert score == 0.0  # before: (0 + 0 + 1) / 3
    assert any("class(es) [3] occur in no validation volume" in r.getMessage() for r in caplog.records)
    empty = [{"case": "v", "image": np.zeros((2, 8, 8), np.float32), "label": np.zeros((2, 8, 8), np.uint8),
              "attrs": {}}]
    with pytest.raises(ValueError, match="no foreground class 1..3 occurs"):
        Validator(empty, 4, 16, "cpu")


# ------------------------------------------------------------------ configuration


def parser():
    return base_parser("test", "ACDC", num_classes=4, labelnum=7)


@pytest.mark.parametrize("text, message", [
    ("resume: 'no'\n", "key 'resume': expected true or false, got 'no' (str)"),
    ("image_size: 64.0\n", "key 'image_size': expected an integer, got 64.0 (float)"),
    ("base_lr: true\n", "key 'base_lr': expected a number, got True (bool)"),
    ("exp: [a, b]\n", "key 'exp': expected a string, got ['a', 'b'] (list)"),
    ("image_size: 64\nbase_lr: [0.1\n", "not valid YAML"),
])
def test_yaml_values_are_type_checked_naming_file_and_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(cfg)])
    err = capsys.readouterr().err
    assert f"--config {cfg}" in err and message in err and "<unicode string>" not in err


def test_yaml_hca_weights_list_is_refused(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"hca_weights": [1, 0, 0, 0]}))
    with pytest.raises(SystemExit):
        train_ACDC_SSCD.main(["--config", str(cfg), "--save_dir", str(tmp_path / "run")])
    assert "key 'hca_weights': expected a string, got [1, 0, 0, 0] (list)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_yaml_int_for_float_and_null_for_optional_accepted(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("base_lr: 1\nresume: false\nroot_path: null\n")
    args = parse_args(parser(), ["--config", str(cfg)])
    assert args.base_lr == 1.0 and isinstance(args.base_lr, float) and args.resume is False


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "0"], "--image_size 0: expected a positive number"),
    (["--stage_iterations", "0"], "--stage_iterations 0: every curriculum stage needs at least 1 iteration"),
    (["--pre_iterations", "-1"], "--pre_iterations -1: expected 0 or more"),
    (["--pre_iterations", "0"], "--pre_iterations 0 skips pre-training"),
    (["--base_lr", "0"], "--base_lr 0.0: expected a positive number"),
    (["--batch_size", "0"], "--batch_size 0: expected a positive number"),
    (["--ema_decay", "1.5"], "--ema_decay 1.5: expected 0.0..1.0"),
    (["--u_weight", "-1"], "--u_weight -1.0: expected >= 0.0"),
    (["--patch_size", "0"], "--patch_size 0: expected a positive region side"),
    (["--sda_start", "20", "--pre_iterations", "10"], "--sda_start 20: expected 0..--pre_iterations (10)"),
    (["--num_classes", "1"], "--num_classes 1: expected at least 2"),
    (["--start_stage", "2"], "--start_stage 2 starts from"),
    (["--init_checkpoint", "missing.pth", "--start_stage", "1"], "--init_checkpoint missing.pth: file not found"),
    (["--resume", "--overwrite"], "give one of them"),
])
def test_budget_and_range_flags_checked_before_anything_runs(tmp_path, capsys, flags, message):
    save = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_ACDC_SSCD.main(["--save_dir", str(save), *flags])
    assert message in capsys.readouterr().err
    assert not save.exists()  # refused before the run folder (or the synthetic data) was touched


@pytest.fixture
def finished(synthetic_root, tmp_path):
    save = tmp_path / "run"
    train_ACDC_supervised.main(tiny(synthetic_root, save))
    return save


def test_resume_with_changed_settings_refused(finished, synthetic_root, capsys):
    before = (finished / "config.yaml").read_text()
    with pytest.raises(SystemExit) as err:
        train_ACDC_supervised.main(tiny(synthetic_root, finished, 4, 2, "--resume", "--base_lr", "0.05",
                                        "--seed", "3"))
    assert "--base_lr 0.01 -> 0.05" in str(err.value) and "--seed 1337 -> 3" in str(err.value)
    assert (finished / "config.yaml").read_text() == before  # nothing rewritten
    # flags that do not alter the run may change
    train_ACDC_supervised.main(tiny(synthetic_root, finished, 4, 1, "--resume", "--log_interval", "1",
                                    "--amp", "off", "--channels_last", "off"))
    resumed = yaml.safe_load((finished / "config.yaml").read_text())
    assert resumed["val_interval"] == 1 and resumed["amp"] == "off"


def test_failed_resume_leaves_config_unchanged(finished, synthetic_root):
    before = (finished / "config.yaml").read_text()
    with pytest.raises(SystemExit, match="--num_classes 4 -> 2"):
        train_ACDC_supervised.main(tiny(synthetic_root, finished, 4, 2, "--resume", "--num_classes", "2"))
    assert (finished / "config.yaml").read_text() == before


# ------------------------------------------------------------------ runs and checkpoints


def test_rerun_into_a_run_folder_refused_unless_overwrite(finished, synthetic_root):
    best = (finished / "best.pth").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run \(best\.pth, last\.pth, tb, validations\.jsonl\): "
                                         r"pass --resume"):
        train_ACDC_supervised.main(tiny(synthetic_root, finished, 2, 2))
    assert (finished / "best.pth").read_bytes() == best
    (finished / "log.txt").write_text("OLD RUN\n")
    train_ACDC_supervised.main(tiny(synthetic_root, finished, 2, 2, "--overwrite"))
    assert load_checkpoint(finished / "last.pth")["iteration"] == 2
    log = (finished / "log.txt").read_text()
    assert "OLD RUN" not in log
    assert (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN cap "
            f"{onednn_isa_cap() or 'none'}, torch threads "
            f"{torch.get_num_threads()}: runs with other kernels or another thread count may differ") in log
    assert "--overwrite: removed best.pth, last.pth, tb, validations.jsonl, config.yaml, log.txt" in log


def test_sscd_start_stage_may_reuse_the_pretraining_folder(synthetic_root, tmp_path):
    flags = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--patch_size", "8", "--device",
             "cpu", "--num_workers", "0", "--log_interval", "1", "--labelnum", "3", "--pre_iterations", "2",
             "--stage_iterations", "1", "--val_interval", "2", "--hca_weights", "1,0,0,0;0,0,0,1"]
    save = tmp_path / "sscd"
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *flags])
    pre = (save / "pretrain" / "best.pth").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run \(best\.pth, stage_2\)"):
        train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *flags,
                              "--start_stage", "2"])
    with pytest.raises(SystemExit, match=r"--start_stage 2: .*pretrain.* belongs to a run with other settings "
                                         r"\(--seed 1337 -> 5\)"):  # reused phases of another configuration
        train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *flags,
                              "--start_stage", "2", "--overwrite", "--seed", "5"])
    assert (save / "stage_2" / "best.pth").is_file()  # refused before --overwrite deleted anything
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *flags,
                          "--start_stage", "2", "--overwrite"])
    assert (save / "pretrain" / "best.pth").read_bytes() == pre  # the stages before are kept
    assert (save / "stage_1" / "best.pth").is_file() and (save / "stage_2" / "best.pth").is_file()


class Net(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)


def test_non_finite_batchnorm_statistics_never_saved(tmp_path):
    """The loss stays finite while a running variance overflows (what --base_lr 30 does): the run
    stops naming the tensor and the iteration, and the checkpoints on disk are the last good ones."""
    model = Net()

    def step(it):
        if it == 3:
            model.bn.running_var.fill_(float("inf"))
        return {"loss": torch.tensor(1.0)}

    with pytest.raises(NonFiniteWeights, match=r"non-finite values in model\.bn\.running_var at iteration 4"):
        train_loop(save_dir=tmp_path, iterations=6, step=step, models={"model": model}, optimizers={},
                   validate=lambda: (0.5, {}), config={}, val_interval=2, log_interval=1)
    for name in ("best.pth", "last.pth"):
        state = load_checkpoint(tmp_path / name)
        assert state["iteration"] == 2 and torch.isfinite(state["model"]["bn.running_var"]).all()


def test_stale_temporary_files_removed_on_resume(finished, synthetic_root):
    stale = [finished / ".last.pth.k3j2x", finished / ".best.pth.q9"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    keep = finished / ".notes"
    keep.write_text("mine")
    train_ACDC_supervised.main(tiny(synthetic_root, finished, 4, 2, "--resume"))
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert "removed temporary files of an interrupted checkpoint write" in (finished / "log.txt").read_text()
    assert remove_stale_temporaries(finished / "missing") == []


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only file system")])
def test_write_errors_name_path_and_cause_and_keep_the_old_checkpoint(tmp_path, monkeypatch, code, cause):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, path)

    def fail(f, data):
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[code])

    monkeypatch.setattr(checkpoint_module, "write_bytes", fail)
    with pytest.raises(CheckpointError, match=rf"last\.pth: cannot write the checkpoint \({cause}\)"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "iteration": 2}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left


def test_invalid_save_dir_is_one_line(tmp_path, synthetic_root):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, str(SUPERVISED), *tiny(synthetic_root, blocker / "run")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--save_dir {blocker / 'run'}: cannot write there (not a directory)" in result.stderr


def test_corrupt_checkpoint_error_has_no_weights_only_hint(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"format": "sscd-checkpoint-v1", "model": Evil()}, tmp_path / "evil.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "evil.pth").read_bytes()[:40])
    for name in ("evil.pth", "cut.pth"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        text = str(err.value)
        assert f"{name}: not a readable checkpoint" in text
        assert "weights_only" not in text and "will likely succeed" not in text and "\n" not in text


def test_scripts_end_with_one_line_errors(tmp_path, synthetic_root):
    (tmp_path / "cut.pth").write_bytes(b"PK\3\4 not a checkpoint")
    result = subprocess.run([sys.executable, str(CODE / "test_ACDC.py"), "--checkpoint",
                             str(tmp_path / "cut.pth")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'cut.pth'}: not a readable")
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    path = root / "data" / "slices" / f"{(root / 'train_slices.list').read_text().split()[5]}.h5"
    with h5py.File(path, "r") as f:
        image, label = f["image"][()], f["label"][()]
    image[0, 0] = np.nan
    write_h5(path, image, label)
    result = subprocess.run([sys.executable, str(SUPERVISED), *tiny(root, tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {path}: the image holds 1 NaN/inf value(s)" in result.stderr


# ------------------------------------------------------------------ PROMISE12 preprocessing


def promise_raw(tmp_path):
    from test_preprocess_promise12 import write_case
    raw = tmp_path / "raw"
    raw.mkdir()
    write_case(raw, "Case00", size_xyz=(20, 18, 3))
    write_case(raw, "Case01", size_xyz=(20, 18, 2), seed=1)
    write_case(raw, "Case36", size_xyz=(20, 18, 2), seed=2)
    return raw


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_promise12_bad_case_refused_before_anything_is_written(tmp_path):
    from dataloaders.preprocess_promise12 import preprocess_promise12
    from test_preprocess_promise12 import blob_label, write_case
    raw = promise_raw(tmp_path)
    label = blob_label((20, 18, 2))
    label[1, 4, 4] = 2
    write_case(raw, "Case36", size_xyz=(20, 18, 2), label=label)  # the last case processed is bad
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="Case36_segmentation.mhd: label values must be 0 or 1"):
        preprocess_promise12(raw, out, image_size=16)
    assert not out.exists() and list(tmp_path.iterdir()) == [raw]  # no case, no partial folder


def test_promise12_failed_rerun_leaves_the_good_folder_intact(tmp_path):
    from dataloaders.preprocess_promise12 import preprocess_promise12
    raw = promise_raw(tmp_path)
    out = tmp_path / "out"
    preprocess_promise12(raw, out, image_size=32)
    good = snapshot(out)
    with pytest.raises(FileExistsError, match=r"other settings \(image_size: 32 there, 16 now\); pass --overwrite"):
        preprocess_promise12(raw, out, image_size=16)
    assert snapshot(out) == good
    (raw / "Case01_segmentation.mhd").unlink()  # fails mid-way: the old folder must stay whole
    with pytest.raises(FileNotFoundError, match="Case01.mhd has no segmentation"):
        preprocess_promise12(raw, out, image_size=16, overwrite=True)
    assert snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_promise12_overwrite_replaces_the_whole_folder(tmp_path):
    from dataloaders.preprocess_promise12 import preprocess_promise12
    raw = promise_raw(tmp_path)
    out = tmp_path / "out"
    preprocess_promise12(raw, out, image_size=32)
    preprocess_promise12(raw, out, image_size=16, overwrite=True)
    with h5py.File(out / "data" / "slices" / "Case00_slice_0.h5", "r") as f:
        assert f["image"].shape == (16, 16)
    assert all(h5py.File(p, "r")["image"].shape[-2:] == (16, 16) for p in (out / "data").rglob("*.h5"))


def test_promise12_cases_subset_into_a_full_folder_refused(tmp_path):
    from dataloaders.preprocess_promise12 import preprocess_promise12
    raw = promise_raw(tmp_path)
    out = tmp_path / "out"
    preprocess_promise12(raw, out, image_size=16)
    with pytest.raises(FileExistsError, match=r"splits: train 2/val 1/test 0 cases there, train 1/val 0/test 0 cases now"):
        preprocess_promise12(raw, out, image_size=16, cases=["Case00"])
    assert (out / "val.list").read_text().split() == ["Case36"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="holds no dataset.json, so it was not made by this script"):
        preprocess_promise12(raw, tmp_path / "mine", image_size=16)


def test_trainer_refuses_slices_of_another_size_than_declared(tmp_path):
    from dataloaders.preprocess_promise12 import preprocess_promise12
    raw = promise_raw(tmp_path)
    out = tmp_path / "out"
    preprocess_promise12(raw, out, image_size=32)
    stray = out / "data" / "slices" / "Case01_slice_1.h5"  # what a mixed folder used to hold
    write_h5(stray, np.zeros((16, 16), np.float32), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"Case01_slice_1\.h5: slices of 16x16, but the folder's dataset\.json "
                                         r"declares 32x32"):
        SliceCache(out, ["Case00_slice_0", "Case01_slice_1"], 32, 2)
