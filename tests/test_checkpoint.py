"""Tests for utils.checkpoint: atomic writes, safe loading, corrupt and mismatched files, RNG state."""
import os
import random

import numpy as np
import pytest
import torch

from networks.unet import build_model
from utils import checkpoint as checkpoint_module
from utils.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from utils.engine import restore


def small_state(value=1.0):
    return {"model": {"w": torch.full((3, 2), value)}, "num_classes": 4, "iteration": 7,
            "best_dice": 0.5, "config": {"image_size": 32, "root_path": "x"}}


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    save_checkpoint(small_state(2.0), path)
    state = load_checkpoint(path)
    assert state["format"] == FORMAT
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 2.0))
    assert state["iteration"] == 7 and state["config"] == {"image_size": 32, "root_path": "x"}
    assert sorted(os.listdir(path.parent)) == ["last.pth"]  # no temporary file left


def test_overwrite_leaves_no_temp_files(tmp_path):
    path = tmp_path / "last.pth"
    for v in range(3):
        save_checkpoint(small_state(float(v)), path)
    assert os.listdir(tmp_path) == ["last.pth"]
    assert float(load_checkpoint(path)["model"]["w"][0, 0]) == 2.0


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    """The disk fills while the bytes are written: the error names the file, the previous checkpoint
    is intact and no temporary file is left (a plain ``open(path, "wb")`` write fails all three)."""
    path = tmp_path / "last.pth"
    save_checkpoint(small_state(1.0), path)
    before = path.read_bytes()

    def disk_full(f, data):
        f.write(bytes(data[: len(data) // 2]))  # half of the payload reaches the file ...
        raise OSError(28, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(checkpoint_module, "write_bytes", disk_full)
    with pytest.raises(CheckpointError, match=r"last\.pth: cannot write the checkpoint \(no space left on device\)"):
        save_checkpoint(small_state(9.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert float(load_checkpoint(path)["model"]["w"][0, 0]) == 1.0
    assert os.listdir(tmp_path) == ["last.pth"]


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    def killed(f, data):
        f.write(bytes(data[:100]))
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(checkpoint_module, "write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(small_state(), tmp_path / "best.pth")
    assert os.listdir(tmp_path) == []


class Custom:
    def __init__(self):
        self.value = 3


class Evil:
    """Unpickling this runs ``open(marker, 'w')``: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_arbitrary_object_rejected(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"format": FORMAT, "model": {}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError, match="custom.pth: not a readable checkpoint"):
        load_checkpoint(path)


def test_malicious_pickle_not_executed(tmp_path):
    # the payload is live: unrestricted unpickling creates its marker
    probe_marker = tmp_path / "probe_marker"
    probe = tmp_path / "probe.pth"
    torch.save({"format": FORMAT, "model": {}, "x": Evil(probe_marker)}, probe)
    torch.load(probe, weights_only=False)["x"].close()
    assert probe_marker.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format": FORMAT, "model": {}, "x": Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(path)
    assert not marker.exists()


def test_random_bytes_rejected(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"noise\.pth: not a readable checkpoint"):
        load_checkpoint(path)


def test_truncated_file_rejected(tmp_path):
    path = tmp_path / "trunc.pth"
    save_checkpoint({"model": build_model(4).state_dict(), "num_classes": 4}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pth: not a readable checkpoint"):
        load_checkpoint(path)


def test_empty_and_missing_files_rejected(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"absent\.pth: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")


def test_foreign_dict_rejected(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"plain\.pth: not a checkpoint of this project"):
        load_checkpoint(path)
    torch.save(build_model(4).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(path)


def test_mismatched_weights_rejected(tmp_path):
    path = tmp_path / "two.pth"
    save_checkpoint({"model": build_model(2).state_dict(), "num_classes": 2}, path)
    state = load_checkpoint(path)
    model = build_model(4)
    with pytest.raises(CheckpointError, match=r"two\.pth: weights do not fit this network"):
        load_model_state(model, state["model"], path)
    # missing or unexpected keys are mismatches too
    partial = {k: v for k, v in state["model"].items() if not k.startswith("heads.")}
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model_state(build_model(2), partial, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model_state(build_model(2), {**state["model"], "extra.weight": torch.zeros(1)}, path)
    # a matching model loads, and the weights are the saved ones
    other = build_model(2)
    load_model_state(other, state["model"], path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state["model"].values()))


def test_restore_rejects_mismatched_run(tmp_path):
    """The trainer's resume path turns a 2-class last.pth into a CheckpointError for a 4-class run."""
    two = build_model(2)
    opt = torch.optim.SGD(two.parameters(), lr=0.1)
    save_checkpoint({"model": two.state_dict(), "models": {}, "optimizers": {"model": opt.state_dict()},
                     "num_classes": 2, "rng": rng_state(), "iteration": 3}, tmp_path / "last.pth")
    four = build_model(4)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        restore(tmp_path / "last.pth", {"model": four}, {"model": torch.optim.SGD(four.parameters(), lr=0.1)})


def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_state_round_trip_through_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _draw()
    path = tmp_path / "rng.pth"
    save_checkpoint({"model": {}, "rng": rng_state()}, path)
    first = _draw()
    second = _draw()
    assert first != second
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == first
    assert _draw() == second


def test_rng_state_survives_numpy_high_bits(tmp_path):
    """NumPy's MT state holds uint32 values >= 2**31: stored as int64 and restored exactly."""
    np.random.seed(12345)
    key = np.random.get_state()[1]
    assert key.max() >= 2**31
    state = rng_state()
    save_checkpoint({"model": {}, "rng": state}, tmp_path / "r.pth")
    np.random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    assert np.array_equal(np.random.get_state()[1], key)
