"""bench/device_check.sh: the one-command GPU check runs end to end in its CPU dry run and writes
the documented JSON; its run sizing fits the budget; its wheel check names what is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import device_check  # noqa: E402


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry_run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["format"] == device_check.FORMAT and result["dry_run"] is True and result["device"] == "cpu"
    assert set(result) == {"format", "dry_run", "device", "device_name", "data", "budget_s", "wall_s", "summary",
                           "plan", "sscd", "labeled_only", "bench", "work_dir"}
    summary = result["summary"]
    for key in ("fast_pretrain_it_s", "fast_pretrain_sda_it_s", "fast_self_train_it_s", "plain_self_train_it_s",
                "fast_projected_paper_run_h", "peak_memory_mb"):
        assert summary[key] > 0, key
    bench = result["bench"]
    assert (bench["image_size"], bench["batch_size"]) == (32, 4) and set(bench) >= {"fast", "plain", "cpu_model",
                                                                                    "cpu_capability", "cpu_bf16"}
    plan = result["plan"]
    for name, iterations in (("sscd", plan["pre_iterations"] + plan["self_iterations"]),
                             ("labeled_only", plan["labeled_only_iterations"])):
        run = result[name]
        assert run["returncode"] == 0 and not run["timed_out"], Path(run["log"]).read_text()[-3000:]
        assert run["iterations"] == iterations and run["it_s_wall"] > 0
        assert 0.0 <= run["val_dice"] <= 1.0 and len(run["val_dice_per_class"]) == 3
        assert summary[f"{name}_val_dice"] == run["val_dice"]
    assert plan["self_iterations"] >= device_check.STAGES and plan["pre_iterations"] >= 2
    assert json.loads(proc.stdout.splitlines()[-2]) == summary


@pytest.mark.parametrize("seconds", [150.0, 300.0, 480.0])
def test_runs_are_sized_to_fit_the_time_left(seconds):
    """At the rates the benchmark measured, the planned runs take at most their share of the time
    (the model of size_runs: start-up, iterations at the measured rates, two validations per part)."""
    rates = {"pretrain_it_s": 12.0, "pretrain_sda_it_s": 7.0, "self_train_it_s": 2.5, "val_s": 1.5}
    plan = device_check.size_runs(rates, seconds, "cuda")
    startup, val = device_check.STARTUP_S["cuda"], rates["val_s"]
    sscd = (startup + plan["pre_iterations"] / rates["pretrain_sda_it_s"]
            + plan["self_iterations"] / rates["self_train_it_s"] + (1 + device_check.STAGES) * 2 * val)
    supervised = startup + plan["labeled_only_iterations"] / rates["pretrain_it_s"] + 2 * val
    assert sscd <= device_check.SSCD_SHARE * seconds + 1e-6
    assert supervised <= (1 - device_check.SSCD_SHARE) * seconds + 1e-6
    assert plan["self_iterations"] == 3 * plan["pre_iterations"]  # the paper's 10k : 30k
    assert plan["sscd_timeout_s"] >= device_check.SSCD_SHARE * seconds


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
