"""Tests for training.engine + the supervised trainer: outputs, resume, non-finite losses, SIGKILL."""
import hashlib
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train_ACDC_supervised
from common.checkpoint import load_checkpoint
import training.engine
from training.engine import NonFiniteLoss, close_logger, get_logger, train_loop
import training.run

SCRIPT = Path(__file__).resolve().parents[1] / "code" / "train_ACDC_supervised.py"



def tiny_args(root, save_dir, iterations, val_interval, log_interval=2, *extra):
    return ["--root_path", str(root), "--save_dir", str(save_dir), "--image_size", "32",
            "--batch_size", "2", "--labeled_bs", "2", "--labelnum", "1",
            "--max_iterations", str(iterations), "--val_interval", str(val_interval),
            "--log_interval", str(log_interval), "--device", "cpu", "--num_workers", "0",
            "--aug_device", "device", *extra]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def val_dices(log_text):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"it (\d+) val Dice ([\d.]+)", log_text)}


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("engine") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ACDC_supervised.main(tiny_args(synthetic_root, save, 6, 3))
    finally:
        torch.set_num_threads(threads)
    return save


def test_run_writes_its_outputs(finished_run, synthetic_root):
    save = finished_run
    for name in ("best.pth", "last.pth", "log.txt", "config.yaml"):
        assert (save / name).is_file(), name
    events = list((save / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    last = load_checkpoint(save / "last.pth")
    assert last["iteration"] == 6 and last["finished"] is True
    assert last["num_classes"] == 4
    assert set(last["optimizers"]) == {"model"}
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    log = (save / "log.txt").read_text()
    dices = val_dices(log)
    assert sorted(dices) == [3, 6]
    best = load_checkpoint(save / "best.pth")
    assert best["iteration"] == last["best_iteration"] == best["best_iteration"]
    assert best["iteration"] in dices
    assert last["best_dice"] == pytest.approx(max(dices.values()), abs=1e-4)
    config = yaml.safe_load((save / "config.yaml").read_text())
    assert config["image_size"] == 32 and config["max_iterations"] == 6
    assert config["root_path"] == str(synthetic_root) and config["labeled_bs"] == 2
    assert last["config"] == {**config, "model_card": last["config"]["model_card"]}  # config.yaml + what predict needs
    assert last["config"]["model_card"]["classes"] == ["background", "RV", "Myo", "LV"]


def test_resume_after_finished_run_does_nothing(finished_run, synthetic_root):
    save = finished_run
    before = {n: digest(save / n) for n in ("last.pth", "best.pth")}
    tb_before = sorted(p.name for p in (save / "tb").iterdir())
    log_before = (save / "log.txt").read_text()
    train_ACDC_supervised.main(tiny_args(synthetic_root, save, 6, 3, 2, "--resume"))
    assert {n: digest(save / n) for n in ("last.pth", "best.pth")} == before
    assert sorted(p.name for p in (save / "tb").iterdir()) == tb_before
    added = (save / "log.txt").read_text()[len(log_before):]
    assert f"resumed from {save / 'last.pth'} at iteration 6" in added
    assert not re.search(r"\bit \d+/", added) and "val Dice" not in added.split("resumed from")[0]
    assert val_dices(added) == {}


def test_non_finite_loss_stops_naming_first_bad_iteration(synthetic_root, tmp_path, monkeypatch):
    calls = []
    real = training.run.ce_dice_loss

    def nan_from_five(logits, target, num_classes):
        calls.append(1)
        loss = real(logits, target, num_classes)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(training.run, "ce_dice_loss", nan_from_five)
    save = tmp_path / "nan"
    # validation (and checkpoints) at 2, 4, 6, ...; the loss is checked at 4 (log) and 2, 4, 6 (val)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at iteration 5\b.*last\.pth") as err:
        train_ACDC_supervised.main(tiny_args(synthetic_root, save, 20, 2, 4))
    assert str(save / "last.pth") in str(err.value)
    assert len(calls) == 6  # detected at the first check after iteration 5
    last = load_checkpoint(save / "last.pth")
    assert last["iteration"] == 4 and not last["finished"]
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert load_checkpoint(save / "best.pth")["iteration"] <= 4


class Tiny(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def test_train_loop_reports_first_bad_iteration_even_if_it_recovers(tmp_path):
    """An infinite loss at iteration 3 only, checked at iteration 8: the error names 3."""
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(it):
        value = math.inf if it == 3 else 1.0 / it
        return {"loss": model.w.sum() * 0 + value, "part": torch.tensor(float(it))}

    with pytest.raises(NonFiniteLoss, match=r"iteration 3; stopping\. No checkpoint was written"):
        train_loop(save_dir=tmp_path, iterations=20, step=step, models={"model": model},
                   optimizers={"model": opt}, validate=lambda: (0.5, {}), config={},
                   val_interval=8, log_interval=100)
    assert not (tmp_path / "last.pth").exists()  # first validation would have been at 8


def test_train_loop_validation_and_best_selection(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scores = iter([0.2, 0.7, 0.4])
    seen = []
    train_loop(save_dir=tmp_path, iterations=7, step=lambda it: {"loss": model.w.sum() * 0 + 1.0},
               models={"model": model}, optimizers={"model": opt}, validate=lambda: (next(scores), {"x": 1.0}),
               config={"a": 1}, val_interval=3, log_interval=1, on_validate=lambda w, it: seen.append(it))
    assert seen == [3, 6, 7]  # every val_interval and at the end
    best, last = load_checkpoint(tmp_path / "best.pth"), load_checkpoint(tmp_path / "last.pth")
    assert best["iteration"] == 6 and best["best_dice"] == pytest.approx(0.7)
    assert last["iteration"] == 7 and last["best_iteration"] == 6 and last["finished"]


def test_seconds_per_iteration_exclude_validation(tmp_path, monkeypatch):
    """A fake clock: 1 s per step, 100 s per validation; every logged rate must be 1 s/it."""
    clock = [0.0]

    class FakeTime:
        @staticmethod
        def time():
            return clock[0]

    monkeypatch.setattr(training.engine, "time", FakeTime)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(it):
        clock[0] += 1.0
        return {"loss": model.w.sum() * 0 + 1.0}

    def validate():
        clock[0] += 100.0
        return 0.5, {}

    logger = get_logger(tmp_path, "clock")
    try:
        train_loop(save_dir=tmp_path, iterations=8, step=step, models={"model": model}, optimizers={"model": opt},
                   validate=validate, config={}, val_interval=4, log_interval=2, logger=logger)
    finally:
        close_logger(logger)
    rates = re.findall(r"it \d+/8 .*\(([\d.]+)s/it\)", (tmp_path / "log.txt").read_text())
    assert rates == ["1.000"] * 4


def _rng_run(save_dir, iterations, crash_at=None):
    """train_loop on a tiny model whose step draws from the global torch RNG; returns (weights, draws)."""
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    draws = {}

    def step(it):
        if it == crash_at:
            raise KeyboardInterrupt  # the process dies here
        x = torch.rand(3)
        draws[it] = x.tolist()
        loss = (model.w * x).sum() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss}

    train_loop(save_dir=save_dir, iterations=iterations, step=step, models={"model": model},
               optimizers={"model": opt}, validate=lambda: (float(-model.w.detach().sum()), {}), config={},
               val_interval=2, log_interval=2, resume=True)
    return model.w.detach().clone(), draws


def test_resume_continues_exactly(tmp_path):
    """Killed after the iteration-4 checkpoint, resumed: weights, optimizer and RNG continue as if
    the run had never stopped."""
    torch.manual_seed(0)
    w_full, draws_full = _rng_run(tmp_path / "full", 7)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _rng_run(tmp_path / "cut", 7, crash_at=6)
    torch.manual_seed(123)  # a fresh process: different RNG until the checkpoint restores it
    w_resumed, draws_resumed = _rng_run(tmp_path / "cut", 7)
    assert sorted(draws_resumed) == [5, 6, 7]
    assert all(draws_resumed[i] == draws_full[i] for i in (5, 6, 7))
    assert torch.equal(w_resumed, w_full)
    assert load_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == 7


def test_sigkill_then_resume(synthetic_root, tmp_path):
    save = tmp_path / "killed"
    out = open(tmp_path / "child.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny_args(synthetic_root, save, 100000, 2)],
                            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        reached = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            if (save / "last.pth").is_file():
                reached = load_checkpoint(save / "last.pth")["iteration"]
                if reached >= 2:
                    break
            time.sleep(0.2)
        assert reached is not None and reached >= 2, "no checkpoint within the time limit"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
        out.close()
    assert proc.returncode == -9
    state = load_checkpoint(save / "last.pth")
    start = state["iteration"]
    assert start >= 2 and start % 2 == 0 and not state["finished"]
    log_before = (save / "log.txt").read_text()

    train_ACDC_supervised.main(tiny_args(synthetic_root, save, start + 3, 2, 2, "--resume"))
    added = (save / "log.txt").read_text()[len(log_before):]
    assert f"resumed from {save / 'last.pth'} at iteration {start}" in added
    logged = [int(i) for i in re.findall(r"\bit (\d+)/", added)]
    assert logged and min(logged) > start and max(logged) == start + 3
    final = load_checkpoint(save / "last.pth")
    assert final["iteration"] == start + 3 and final["finished"]
    assert final["best_iteration"] >= state["best_iteration"]
