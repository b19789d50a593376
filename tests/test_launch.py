"""experiments/launch.py: every multi-run driver launches through submitit (issue 38). On the CPU with
submitit's local executor: runs at once, a preempted job requeued to the weights of an uninterrupted
run, a failing run reported while the others finish, a rerun that skips finished runs; the SLURM batch
script generated (no cluster here); --dataset CUSTOM for a converted folder."""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch

from common.checkpoint import load_checkpoint
from conftest import REPO, load_script

launch = load_script("experiments/launch.py")
run_table = load_script("experiments/run_table.py")
TINY = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--pre_iterations", "2",
        "--max_iterations", "5", "--val_interval", "2", "--log_interval", "2", "--amp", "off", "--num_workers", "0"]


def table(out, root, *flags, methods=("labeled_only",), labelnums=("3",), seeds=("1", "2")):
    return ["--root_path", str(root), "--out", str(out), "--methods", *methods, "--labelnums", *labelnums,
            "--seeds", *seeds, "--device", "cpu", "--no_published", *flags, "--", *TINY]


def times(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / launch.TIMES_FILE).read_text().splitlines()]


def test_local_jobs_run_at_once_and_a_rerun_trains_nothing_again(synthetic_root, tmp_path, capsys):
    out = tmp_path / "t"
    assert run_table.main(table(out, synthetic_root, "--launcher", "local", "--jobs", "2")) == 0
    train = [next(t for t in times(out / "runs" / f"ACDC_labeled_only_3_s{s}") if t["step"] == "train") for s in (1, 2)]
    assert max(t["start"] for t in train) < min(t["end"] for t in train)  # the two trainings overlapped
    assert all(t["omp_threads"] == "1" for t in train)  # two runs share the CPU: one thread each
    assert "| ACDC | labeled_only | 3 | 2 | val |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert run_table.main(table(out, synthetic_root, "--launcher", "local", "--jobs", "2")) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (") == 2 and "started (local job" not in printed
    assert all(len(times(out / "runs" / f"ACDC_labeled_only_3_s{s}")) == 2 for s in (1, 2))  # train + test, once


def test_a_failing_run_is_reported_with_its_log_while_the_others_finish(synthetic_root, tmp_path, capsys):
    out = tmp_path / "t"
    status = run_table.main(table(out, synthetic_root, "--launcher", "local", "--jobs", "2", labelnums=("3", "99"),
                                  seeds=("1",)))
    err = capsys.readouterr().err
    assert status == 1
    assert "[ACDC_labeled_only_99_s1] train FAILED (exit code 1)" in err and "--labelnum 99" in err
    assert (out / "runs" / "ACDC_labeled_only_3_s1" / "eval_val" / "summary.json").is_file()
    failed = json.loads((out / "runs" / "ACDC_labeled_only_99_s1" / launch.FAILED_FILE).read_text())
    assert failed["step"] == "train" and failed["returncode"] == 1


def _weights(path):
    state = load_checkpoint(path)
    return torch.cat([t.float().flatten() for t in state["model"].values()])


def job_processes(controller):
    """The task processes a local job's controller started (Linux /proc)."""
    children = Path(f"/proc/{controller}/task/{controller}/children")
    return [int(pid) for pid in children.read_text().split()] if children.is_file() else []


def test_a_preempted_job_is_requeued_and_resumes_to_the_same_weights(synthetic_root, tmp_path):
    """SLURM signals a job it preempts (or whose time runs out) with SIGUSR2: sent here to the local
    job's process once its trainer has written a checkpoint. The job stops its trainer, is requeued,
    and the trainer resumes: the final weights are those of an uninterrupted run."""
    def job(folder):
        command = [sys.executable, str(REPO / "code" / "train_ACDC_supervised.py"), "--root_path", str(synthetic_root),
                   "--save_dir", str(folder), "--image_size", "32", "--batch_size", "4", "--labeled_bs", "2",
                   "--labelnum", "3", "--max_iterations", "200", "--val_interval", "10", "--log_interval", "100",
                   "--amp", "off", "--device", "cpu", "--num_workers", "0"]
        steps = [{"name": "train", "command": command, "outputs": [folder / "best.pth"], "marker": folder / "TRAINED"}]
        return launch.RunJob(folder.name, folder, steps, launch.one_thread_env())

    parse = launch.add_launcher_args(argparse.ArgumentParser()).parse_args
    executor = launch.make_executor(parse(["--launcher", "local", "--gpus_per_run", "0"]), tmp_path / "submitit")
    cloudpickle.register_pickle_by_value(launch)
    cut = tmp_path / "cut"
    submitted = executor.submit(job(cut))
    deadline = time.time() + 180
    while time.time() < deadline and not (
            (cut / "last.pth").is_file() and load_checkpoint(cut / "last.pth")["iteration"] >= 10):
        time.sleep(0.05)
    at = load_checkpoint(cut / "last.pth")["iteration"]
    for pid in job_processes(int(submitted.job_id)):
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends before preempting a job
    assert submitted.result()["returncode"] == 0
    stdout = submitted.stdout() or ""
    assert "this job is preempted" in stdout and "Requeued job" in stdout
    assert f"resumed from {cut / 'last.pth'}" in (cut / "log.txt").read_text() and at < 200
    assert load_checkpoint(cut / "last.pth")["iteration"] == 200
    whole = tmp_path / "whole"
    assert launch.launch([job(whole)], parse(["--launcher", "debug"]), tmp_path / "debug")[0]["returncode"] == 0
    assert torch.equal(_weights(cut / "last.pth"), _weights(whole / "last.pth"))


def test_the_slurm_batch_script_carries_the_requests(synthetic_root, tmp_path, capsys):
    out = tmp_path / "t"
    assert run_table.main(table(out, synthetic_root, "--launcher", "slurm", "--partition", "gpu", "--gpus_per_run",
                                "1", "--timeout_min", "720", "--slurm", "account=lab", "--slurm", "qos=high",
                                "--dry_run")) == 0
    printed = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=720",
                 "#SBATCH --account=lab", "#SBATCH --qos=high", "submitit.core._submit"):
        assert line in printed, line
    assert "code/train_ACDC_SSCD.py --method labeled_only --labelnum 3 --seed 1" in printed


@pytest.mark.parametrize("bad, message", [
    (["--launcher", "local", "--partition", "gpu"], "SLURM parameters: give --launcher slurm"),
    (["--launcher", "slurm", "--slurm", "account"], "--slurm 'account': expected KEY=VALUE"),
    (["--jobs", "0"], "--jobs 0: expected 1 or more"),
])
def test_launcher_flags_are_checked(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        run_table.main(["--out", str(tmp_path / "t"), *bad, "--dry_run"])
    assert message in capsys.readouterr().err


def test_a_converted_data_set_gets_its_table_in_one_command(tmp_path):
    from dataloaders import convert_dataset
    from own_data import make_nnunet
    make_nnunet(tmp_path / "raw", n_labeled=4, n_unlabeled=2)
    convert_dataset.main(["--input", str(tmp_path / "raw"), "--out", str(tmp_path / "conv"), "--image_size", "32",
                          "--val_cases", "case_03"])
    out = tmp_path / "t"
    argv = ["--dataset", "CUSTOM", "--root_path", str(tmp_path / "conv"), "--out", str(out), "--methods",
            "labeled_only", "sscd", "--labelnums", "2", "--seeds", "1", "--device", "cpu", "--launcher", "debug",
            "--", *TINY, "--patch_size", "8"]
    assert run_table.main(argv) == 0
    md = (out / "results.md").read_text()
    assert "| CUSTOM | labeled_only | 2 | 1 | val |" in md and "| CUSTOM | sscd | 2 | 1 | val |" in md
    summary = json.loads((out / "runs" / "CUSTOM_sscd_2_s1" / "eval_val" / "summary.json").read_text())
    assert summary["classes"] == ["outer", "core"]
