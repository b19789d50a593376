"""bench/device_check.sh: the one-command GPU check runs end to end in its CPU dry run and writes
the documented JSON; its run sizing fits the budget; its wheel check names what is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import device_check  # noqa: E402


def _dry_run(tmp_path, *extra):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry_run", "--out", str(out), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_end_to_end(tmp_path):
    proc, out = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["format"] == device_check.FORMAT and result["dry_run"] is True and result["device"] == "cpu"
    assert result["status"] == "done" and result["failed_phases"] == [] and result["running"] is None
    assert list(result["phases"]) == list(device_check.PHASES)
    logs = Path(result["logs"])
    assert logs == tmp_path / "check_logs"  # beside --out
    for name, phase in result["phases"].items():
        assert phase["ok"] and phase["returncode"] == 0 and Path(phase["log"]) == logs / f"{name}.log"
        assert (logs / f"{name}.log").stat().st_size > 0 and "log_tail" not in phase
        assert f"device_check: {name} ok in" in proc.stdout  # progress on stdout as it happens
    tests = result["phases"]["cuda_tests"]["tests"]
    if torch.cuda.is_available():  # a GPU host (the device check itself): the CUDA suite runs and passes
        assert tests.get("passed", 0) >= 10 and not any(tests.get(k) for k in ("failed", "error", "errors")), tests
    else:  # the whole CUDA suite is skipped without a GPU
        assert set(tests) == {"skipped"} and tests["skipped"] >= 10
    summary = result["summary"]
    for key in ("fast_pretrain_it_s", "fast_pretrain_sda_it_s", "fast_self_train_it_s", "plain_self_train_it_s",
                "fast_projected_paper_run_h", "peak_memory_mb"):
        assert summary[key] > 0, key
    bench = result["phases"]["bench"]["result"]
    assert (bench["image_size"], bench["batch_size"]) == (32, 4) and set(bench) >= {"fast", "plain", "cpu_model",
                                                                                    "cpu_capability", "cpu_bf16"}
    plan = result["plan"]
    assert plan["rates"] == "measured"
    for name, iterations in (("sscd", plan["pre_iterations"] + plan["self_iterations"]),
                             ("labeled_only", plan["labeled_only_iterations"])):
        run = result["phases"][name]
        assert run["iterations"] == iterations and run["it_s_wall"] > 0
        assert 0.0 <= run["val_dice"] <= 1.0 and len(run["val_dice_per_class"]) == 3
        assert summary[f"{name}_val_dice"] == run["val_dice"]
        assert run["progress"]["best_val_dice"] is not None
    # validations: each part's end, and each stage's start (--validate_stage_start on)
    assert result["phases"]["sscd"]["progress"]["validations"] >= 1 + 2 * device_check.STAGES
    assert (logs / "sscd_stage_5_validations.jsonl").is_file()
    assert plan["self_iterations"] >= device_check.STAGES and plan["pre_iterations"] >= 2
    feed = summary["disk_feed_slices_per_s"]
    assert set(feed) == {"0_workers", "1_workers"} and min(feed.values()) > 0
    assert json.loads(proc.stdout.splitlines()[-2]) == summary


def test_a_failing_phase_still_leaves_the_json_and_its_log_tail(tmp_path):
    proc, out = _dry_run(tmp_path, "--inject_failure", "sscd")
    assert proc.returncode == 1
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and result["failed_phases"] == ["sscd"]
    sscd = result["phases"]["sscd"]
    assert sscd["ok"] is False and sscd["returncode"] == 2 and not sscd["timed_out"]
    assert any("unrecognized arguments: --no_such_flag_injected_by_device_check" in line for line in sscd["log_tail"])
    assert sscd["val_dice"] is None and result["summary"]["sscd_val_dice"] is None
    assert result["phases"]["labeled_only"]["ok"]  # the phases after it still ran
    assert "phases failed: sscd" in proc.stdout


def test_a_killed_phase_reports_what_its_log_shows(tmp_path):
    script = ("import time; print('[stage_1] it 3/40 loss=0.5', flush=True); "
              "print('[stage_1] it 4 val Dice 0.6100 (best 0.6100 at 4)', flush=True); "
              "print('[stage_2] it 2 val Dice 0.5800 (best 0.5800 at 2)', flush=True); time.sleep(60)")
    code, seconds, lines = device_check.run_command([sys.executable, "-c", script], 3, tmp_path / "k.log", "k")
    assert code is None and len(lines) == 3
    assert (tmp_path / "k.log").read_text().endswith("[device_check] killed after 3 s\n")
    assert device_check.log_progress(lines) == {"reached": {"phase": "stage_2", "iteration": 2}, "validations": 2,
                                                "last_val_dice": 0.58, "best_val_dice": 0.61}
    record = device_check.phase_record("sscd", code, seconds, lines, tmp_path / "k.log")
    assert record["timed_out"] and record["log_tail"] == lines


def test_sizing_counts_every_start_validation_and_checkpoint():
    """By hand, on CUDA: start-up 25 s, six phase starts of 8 s, 10 pre-training iterations at 5/s and
    32 self-training ones at 2/s (stages of 6, 6, 6, 7, 7); validations every 5: 2 in pre-training and
    2 + 2 + 2 + 2 + 2 in the stages plus their five starts, 17 in all, each 1 s plus two checkpoint
    writes of 1 s. The labeled-only run: its start, one phase start, 24 iterations at 12/s, 5 validations."""
    rates = {"pretrain_it_s": 12.0, "pretrain_sda_it_s": 5.0, "self_train_it_s": 2.0, "val_s": 1.0}
    plan = {"pre_iterations": 10, "self_iterations": 32, "val_interval": 5, "labeled_only_iterations": 24}
    assert device_check.sscd_seconds(plan, rates, "cuda") == 25 + 48 + 2 + 16 + 17 * 3
    assert device_check.labeled_only_seconds(plan, rates, "cuda") == 25 + 8 + 2 + 5 * 3
    assert device_check.sscd_plan(10) == {"pre_iterations": 10, "self_iterations": 30, "val_interval": 10}
    plan = device_check.size_runs(rates, 60.0, "cuda")  # nothing fits: the least runs, still validated
    assert (plan["pre_iterations"], plan["labeled_only_iterations"]) == (2, 2)


@pytest.mark.parametrize("seconds", [200.0, 300.0, 480.0])
def test_runs_are_sized_to_fit_the_time_left(seconds):
    """The planned runs fit their shares, and one more iteration would not."""
    rates = {"pretrain_it_s": 12.0, "pretrain_sda_it_s": 7.0, "self_train_it_s": 2.5, "val_s": 1.5}
    plan = device_check.size_runs(rates, seconds, "cuda")
    assert device_check.sscd_seconds(plan, rates, "cuda") <= device_check.SSCD_SHARE * seconds
    assert device_check.labeled_only_seconds(plan, rates, "cuda") <= (1 - device_check.SSCD_SHARE) * seconds
    assert plan["self_iterations"] == 3 * plan["pre_iterations"]  # the paper's 10k : 30k
    assert plan["sscd_timeout_s"] >= device_check.SSCD_SHARE * seconds
    bigger = {**device_check.sscd_plan(plan["pre_iterations"] + 1), "labeled_only_iterations": 0}
    assert device_check.sscd_seconds(bigger, rates, "cuda") > device_check.SSCD_SHARE * seconds
    more = {**plan, "labeled_only_iterations": plan["labeled_only_iterations"] + 1}
    assert device_check.labeled_only_seconds(more, rates, "cuda") > (1 - device_check.SSCD_SHARE) * seconds


def test_the_training_path_imports_no_simpleitk_medpy_or_tensorboardx():
    """The GPU machine has none of them: importing the trainers and the benchmark must not need them."""
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] in ('SimpleITK', 'medpy', 'tensorboardX'):\n"
               "            raise ModuleNotFoundError(name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "sys.path[:0] = ['code', 'bench']\n"
               "import train_ACDC_SSCD, train_ACDC_supervised, bench_train\n"
               "import training.engine\n"
               "print('imported', training.engine.SummaryWriter is None or training.engine.SummaryWriter.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported" in proc.stdout and "tensorboardX" not in proc.stdout


def test_missing_wheels_names_the_distribution(monkeypatch):
    monkeypatch.setattr(device_check, "REQUIRED", {"json": "json", "no_such_module_xyz": "no-such-wheel",
                                                   "no_such_parent_xyz.child": "child-wheel"})
    assert device_check.missing_wheels() == ["no-such-wheel", "child-wheel"]


def test_pack_data_copies_a_subset_that_trains(tmp_path):
    """The subset keeps the list order and every val volume, and loads as 7-patient ACDC training data."""
    sys.path.insert(0, str(REPO / "code"))
    from dataloaders.dataset import ACDC_LABELED_SLICES, TrainData, load_volumes
    from dataloaders.synthetic import make_synthetic_acdc
    source = make_synthetic_acdc(tmp_path / "source", n_patients=16, n_val=2, n_test=1, slices_per_volume=6,
                                 size=(40, 48))
    ids = (source / "train_slices.list").read_text().split()
    dest = tmp_path / "ACDC"
    for bad in (136, len(ids) + 1):
        with pytest.raises(SystemExit, match="--slices"):
            device_check.pack_data(source, dest, bad)
    device_check.pack_data(source, dest, 140)
    assert (dest / "train_slices.list").read_text().split() == ids[:140]
    assert [v["case"] for v in load_volumes(dest, "val", 4)] == [v["case"] for v in load_volumes(source, "val", 4)]
    data = TrainData(dest, 7, 32, 4, ACDC_LABELED_SLICES)
    assert (len(data.labeled), len(data.unlabeled)) == (136, 4)


def test_pack_data_refuses_a_subset_too_large_to_travel(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "code"))
    from dataloaders.synthetic import make_synthetic_acdc
    source = make_synthetic_acdc(tmp_path / "source", n_patients=16, n_val=2, n_test=1, slices_per_volume=6,
                                 size=(40, 48))
    monkeypatch.setattr(device_check, "MAX_PACK_MIB", 0.01)
    with pytest.raises(SystemExit, match=r"140 slices come to [0-9.]+ MiB, more than the 0 MiB"):
        device_check.pack_data(source, tmp_path / "ACDC", 140)
    assert not (tmp_path / "ACDC").exists()
