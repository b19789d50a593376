"""Runs that cannot be silently changed, mixed or lost (issue 42): the run's identity (flags, rank
count, data fingerprint) in config.yaml and every checkpoint, compared on every resume and reuse of a
phase; extended budgets; nothing deleted before every check; a lock on the run folder; one line per
rank in log.txt when a run stops. Each test failed on the code before training/run_folder.py."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import train_ACDC_SSCD
import train_ACDC_supervised
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import run_cli
from conftest import REPO
import training.run
from training.run_folder import RunLock

TINY = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--device", "cpu", "--num_workers", "0",
        "--labelnum", "3", "--log_interval", "1", "--amp", "off"]
SSCD = [*TINY, "--patch_size", "8", "--pre_iterations", "2", "--stage_iterations", "1", "--val_interval", "2",
        "--hca_weights", "1,0,0,0;0,0,0,1"]


def supervised(root, save, iterations, *flags):
    return train_ACDC_supervised.main(["--root_path", str(root), "--save_dir", str(save), *TINY,
                                       "--max_iterations", str(iterations), "--val_interval", "2", *flags])


def sscd(root, save, *flags):
    return train_ACDC_SSCD.main(["--root_path", str(root), "--save_dir", str(save), *SSCD, *flags])


def weights(path):
    state = load_checkpoint(path)
    return torch.cat([t.float().flatten() for t in state["model"].values()])


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".run.lock"}


# ------------------------------------------------------------------ 1. the rank count

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank, port, root, save, fail):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    if fail and rank == 1:  # rank 1 meets a bad batch at its second loss
        calls, real = [], training.run.ce_dice_loss

        def failing(*args):
            calls.append(1)
            if len(calls) == 2:
                raise ValueError("bad batch on rank 1")
            return real(*args)
        training.run.ce_dice_loss = failing
    argv = ["--root_path", root, "--save_dir", save, *TINY, "--max_iterations", "4", "--val_interval", "2",
            "--batch_size", "8", "--labeled_bs", "4"]
    try:
        run_cli(train_ACDC_supervised.main, argv)
        outcome = "finished"
    except SystemExit as stop:
        outcome = str(stop.code)
    with open(f"{save}.outcome{rank}", "w") as f:
        f.write(outcome)


def test_resuming_with_another_rank_count_is_refused(synthetic_root, tmp_path):
    save = tmp_path / "run"
    mp.spawn(_two_ranks, args=(_free_port(), str(synthetic_root), str(save), False), nprocs=2, join=True)
    assert load_checkpoint(save / "last.pth")["config"]["world_size"] == 2
    before = snapshot(save)
    with pytest.raises(SystemExit, match=r"--resume: .* belongs to a run with other settings \(.*--world_size 2 -> 1"):
        train_ACDC_supervised.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *TINY,
                                    "--max_iterations", "6", "--val_interval", "2", "--batch_size", "8",
                                    "--labeled_bs", "4", "--resume"])
    assert snapshot(save) == before


# ------------------------------------------------------------------ 8. a failing rank

def test_a_failing_rank_stops_every_rank_with_one_line_each_in_log_txt(synthetic_root, tmp_path):
    save = tmp_path / "run"
    mp.spawn(_two_ranks, args=(_free_port(), str(synthetic_root), str(save), True), nprocs=2, join=True)
    outcome0, outcome1 = ((tmp_path / f"run.outcome{r}").read_text() for r in (0, 1))
    assert outcome1 == "error: bad batch on rank 1"
    assert outcome0 == f"rank 0: stopped because another rank failed; {save / 'log.txt'} names its error"
    log = (save / "log.txt").read_text()
    assert "rank 1: stopped by ValueError: bad batch on rank 1" in log
    assert "rank 0: stopped by another rank failed (its line is in log.txt)" in log
    assert "Traceback" not in log


# ------------------------------------------------------------------ 2. extending a finished run

def test_a_grown_budget_extends_a_finished_run(synthetic_root, tmp_path):
    supervised(synthetic_root, tmp_path / "short", 4)
    supervised(synthetic_root, tmp_path / "short", 8, "--resume")
    supervised(synthetic_root, tmp_path / "long", 8)
    last = load_checkpoint(tmp_path / "short" / "last.pth")
    assert last["iteration"] == 8 and last["finished"]
    assert torch.equal(weights(tmp_path / "short" / "last.pth"), weights(tmp_path / "long" / "last.pth"))
    with pytest.raises(SystemExit, match=r"finished at iteration 8; a budget of 6 would end it earlier"):
        supervised(synthetic_root, tmp_path / "short", 6, "--resume")


# ------------------------------------------------------------------ 3, 4. reused phases and lost configs

def test_start_stage_refuses_phases_of_another_configuration(synthetic_root, tmp_path):
    save = tmp_path / "run"
    sscd(synthetic_root, save)
    before = snapshot(save)
    message = r"--start_stage 2: .*belongs to a run with other settings \(--labelnum 3 -> 4, --seed 1337 -> 9\)"
    with pytest.raises(SystemExit, match=message):
        sscd(synthetic_root, save, "--labelnum", "4", "--seed", "9", "--start_stage", "2", "--overwrite")
    assert snapshot(save) == before


def test_resume_compares_the_checkpoints_when_config_yaml_is_gone(synthetic_root, tmp_path):
    save = tmp_path / "run"
    supervised(synthetic_root, save, 4)
    (save / "config.yaml").unlink()
    with pytest.raises(SystemExit, match=r"(best|last)\.pth belongs to a run with other settings \(--labelnum 3 -> 4, "
                                         r"--seed 1337 -> 2\)"):
        supervised(synthetic_root, save, 6, "--resume", "--seed", "2", "--labelnum", "4")


def test_a_flag_the_saved_run_did_not_record_is_not_taken_as_equal(synthetic_root, tmp_path):
    """A run from before a flag existed ran with whatever the code did then: resuming it under the
    flag's new default is refused, not assumed."""
    save = tmp_path / "run"
    sscd(synthetic_root, save, "--stage_iterations", "2")
    last = save / "stage_2" / "last.pth"
    state = load_checkpoint(last)
    del state["config"]["stage_init"]
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, last)
    config = yaml.safe_load((save / "config.yaml").read_text())
    del config["stage_init"]
    (save / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"--stage_init '\(not recorded\)' -> 'last'"):
        sscd(synthetic_root, save, "--stage_iterations", "2", "--resume")


# ------------------------------------------------------------------ 5. nothing deleted before the checks

def test_overwrite_deletes_nothing_when_the_data_check_fails(synthetic_root, tmp_path):
    save = tmp_path / "run"
    supervised(synthetic_root, save, 4)
    before = snapshot(save)
    with pytest.raises(ValueError, match="--labelnum 50"):
        supervised(synthetic_root, save, 4, "--labelnum", "50", "--overwrite")
    assert snapshot(save) == before


# ------------------------------------------------------------------ 6. the lock

def test_a_run_folder_in_use_is_refused_and_a_dead_holder_is_not(synthetic_root, tmp_path):
    save = tmp_path / "run"
    supervised(synthetic_root, save, 2)
    before = snapshot(save)
    holder = RunLock(save)  # another process writing this run
    try:
        for flags in (["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=rf"--save_dir {save}: in use by process {os.getpid()} on "):
                supervised(synthetic_root, save, 4, *flags)
        assert snapshot(save) == before
    finally:
        holder.release()
    killed = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'code')!r}); "
                               f"from training.run_folder import RunLock; RunLock({str(save)!r}); "
                               f"import time; time.sleep(60)"])
    try:
        for _ in range(100):  # until the child holds the lock
            if (save / ".run.lock").read_text().startswith(f"process {killed.pid}"):
                break
            __import__("time").sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    supervised(synthetic_root, save, 4, "--resume")  # a lock left by a killed process does not hold
    assert load_checkpoint(save / "last.pth")["iteration"] == 4


# ------------------------------------------------------------------ 7. where the run folder is

def test_a_moved_or_relatively_named_run_folder_resumes(synthetic_root, tmp_path, monkeypatch):
    save = tmp_path / "run"
    supervised(synthetic_root, save, 2)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(save, moved)
    supervised(synthetic_root, moved, 4, "--resume")
    assert load_checkpoint(moved / "last.pth")["iteration"] == 4
    monkeypatch.chdir(tmp_path)
    train_ACDC_supervised.main(["--root_path", str(synthetic_root), "--save_dir", "run", *TINY, "--max_iterations",
                                "4", "--val_interval", "2", "--resume"])
    assert load_checkpoint(save / "last.pth")["iteration"] == 4


def test_the_refusal_of_a_changed_run_does_not_suggest_deleting_it(synthetic_root, tmp_path):
    save = tmp_path / "run"
    supervised(synthetic_root, save, 2)
    with pytest.raises(SystemExit) as info:
        supervised(synthetic_root, save, 4, "--resume", "--seed", "4")
    assert "start a new run in another --save_dir (--overwrite would delete this one)" in str(info.value)


# ------------------------------------------------------------------ 9. minor

def test_resume_of_a_folder_without_a_run_is_refused(synthetic_root, tmp_path):
    with pytest.raises(SystemExit, match=r"--resume: .*typo holds no run to resume"):
        supervised(synthetic_root, tmp_path / "typo", 2, "--resume")
    assert not (tmp_path / "typo" / "config.yaml").exists()


def test_a_deleted_stage_under_later_stages_is_refused(synthetic_root, tmp_path):
    save = tmp_path / "run"
    sscd(synthetic_root, save)
    shutil.rmtree(save / "stage_1")
    with pytest.raises(SystemExit, match=r"stage_1 has no finished checkpoint, but stage_2 holds checkpoints built "
                                         r"on it"):
        sscd(synthetic_root, save, "--resume")


def test_a_saved_config_yaml_is_accepted_as_config(synthetic_root, tmp_path):
    save = tmp_path / "run"
    sscd(synthetic_root, save)
    again = tmp_path / "again"
    train_ACDC_SSCD.main(["--config", str(save / "config.yaml"), "--save_dir", str(again)])
    assert torch.equal(weights(save / "best.pth"), weights(again / "best.pth"))
