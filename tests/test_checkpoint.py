"""Tests for common.checkpoint: atomic writes, safe loading, corrupt and mismatched files, RNG state."""
import os
from pathlib import Path
import random

import numpy as np
import pytest
import torch

from common import checkpoint as checkpoint_module
from common.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from networks.unet import build_model
from training.engine import restore


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


# ------------------------------------------------------------------ found by mutation testing (docs/mutation.md)

def test_the_temporary_file_is_beside_the_checkpoint_and_named_as_a_temporary(tmp_path, monkeypatch):
    """The rename is atomic only within one folder, and remove_stale_temporaries recognises the name."""
    made = []
    real = checkpoint_module.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", spy)
    path = tmp_path / "deep" / "er" / "last.pth"  # folders that do not exist yet
    save_checkpoint(small_state(), path)
    assert made[0].parent == path.parent and made[0].name.startswith(".last.pth.")
    assert checkpoint_module.remove_stale_temporaries(path.parent) == []
    made[0].write_bytes(b"an interrupted write")
    assert checkpoint_module.remove_stale_temporaries(path.parent) == [made[0].name]


def test_write_errors_name_the_file_and_the_cause(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=rf"^{blocker / 'last.pth'}: cannot write the checkpoint \(file exists\)$"):
        save_checkpoint(small_state(), blocker / "last.pth")
    assert checkpoint_module.os_cause(ValueError("Plain Message")) == "Plain Message"
    assert checkpoint_module.os_cause(OSError("No Errno Given")) == "no errno given"


def test_unreadable_checkpoint_messages_are_one_clean_line(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"format": FORMAT, "model": {}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable checkpoint (UnpicklingError: ") and "\n" not in message
    assert "weights_only" not in message and "Check the documentation" not in message
    assert "This is an internal" not in message
    foreign = tmp_path / "foreign.pth"
    torch.save({"format": "other", "model": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth"):
        load_checkpoint(foreign)
    no_model = tmp_path / "no_model.pth"
    torch.save({"format": FORMAT}, no_model)
    with pytest.raises(CheckpointError, match="no_model.pth"):
        load_checkpoint(no_model)


def test_mismatched_weights_message_quotes_the_first_lines(tmp_path):
    model = build_model(4)
    state = {k: v for k, v in build_model(2).state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, state, "other.pth")
    message = str(info.value)
    assert message.startswith("other.pth: weights do not fit this network (Error(s) in loading state_dict for UNet:")
    assert "size mismatch for out_conv.weight" in message
    with pytest.raises(CheckpointError, match="Missing key"):
        load_model_state(model, {k: v for k, v in model.state_dict().items() if k != "out_conv.bias"}, "x.pth")


def test_numpy_gaussian_cache_survives_the_round_trip():
    np.random.seed(3)
    np.random.normal()  # leaves a cached second gaussian: has_gauss = 1
    state = rng_state()
    expected = [np.random.normal() for _ in range(3)]
    np.random.seed(99)
    set_rng_state(state)
    assert [np.random.normal() for _ in range(3)] == expected


def test_a_checkpoint_holding_a_class_names_the_class_not_the_way_around_the_check(tmp_path):
    """The reference saved ``args`` (an argparse.Namespace) into its checkpoints: the refusal names that
    global, and neither the advice to load with weights_only=False nor terminal colour codes."""
    import argparse
    path = tmp_path / "reference.pth"
    torch.save({"format": FORMAT, "model": {}, "args": argparse.Namespace(base_lr=0.01)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"{path}: not a readable checkpoint (UnpicklingError: Unsupported global: "
                               "GLOBAL argparse.Namespace was not an allowed global by default)")


def test_load_cause_drops_advice_lines_and_internal_error_tails():
    cause = checkpoint_module._load_cause
    advice = RuntimeError("Re-run torch.load with weights_only=False\n\n  zip archive: bad central directory. "
                          "This is an internal error\nCheck the documentation of torch.load")
    assert cause(advice) == "zip archive: bad central directory"
    assert cause(ValueError("weights_only is the problem\nCheck the documentation please")) == "ValueError"
    assert cause(EOFError()) == "EOFError"


def test_load_checkpoint_passes_map_location_and_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(small_state(3.0), path)
    seen = []

    def to_cpu(storage, location):
        seen.append(location)
        return storage

    assert torch.equal(load_checkpoint(path, map_location=to_cpu)["model"]["w"], torch.full((3, 2), 3.0))
    assert seen and set(seen) == {"cpu"}
    calls = []
    real = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_checkpoint(path)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_stale_temporaries_are_only_the_checkpoint_writer_s(tmp_path):
    """A user's 'best.pth.bak' or '.notes' is not a temporary of save_checkpoint and stays."""
    (tmp_path / "best.pth.bak").write_text("a user's copy")
    (tmp_path / ".notes").write_text("hidden, but not ours")
    (tmp_path / ".last.pth.x1y2").write_text("interrupted write")
    assert checkpoint_module.remove_stale_temporaries(tmp_path) == [".last.pth.x1y2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes", "best.pth.bak"]


class _FakeCuda:
    """Two GPUs' RNG states, for the CUDA branches of rng_state / set_rng_state on a CPU-only host
    (tests/test_cuda.py checks them on a real GPU)."""

    def __init__(self, count):
        self.count, self.set = count, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [torch.full((4,), i, dtype=torch.uint8) for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.set.append((state.tolist(), device)))


def test_cuda_rng_states_are_saved_and_restored_for_the_common_devices(monkeypatch):
    saved_on = _FakeCuda(2)
    saved_on.install(monkeypatch)
    state = rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[0] * 4, [1] * 4]
    set_rng_state(state)
    assert saved_on.set == [([0] * 4, 0), ([1] * 4, 1)]
    fewer = _FakeCuda(1)  # resumed on a machine with one GPU: only device 0 is restored
    fewer.install(monkeypatch)
    set_rng_state(state)
    assert fewer.set == [([0] * 4, 0)]
    without = {k: v for k, v in state.items() if k != "cuda"}  # a CPU checkpoint resumed on a GPU host
    set_rng_state(without)
    assert fewer.set == [([0] * 4, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in rng_state()
    set_rng_state(state)  # a GPU checkpoint resumed on a CPU host: the CUDA states are not touched
    assert fewer.set == [([0] * 4, 0)]


def test_mismatched_weights_message_is_the_first_four_lines_joined_by_spaces(tmp_path):
    model = build_model(4)
    state = dict(build_model(2).state_dict())
    with pytest.raises(RuntimeError) as plain:
        model.load_state_dict(state, strict=True)
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, state, "other.pth")
    first = str(plain.value).splitlines()[:4]
    assert len(str(plain.value).splitlines()) > 4
    assert str(info.value) == f"other.pth: weights do not fit this network ({' '.join(first)})"
    with pytest.raises(CheckpointError, match="Unexpected key"):
        load_model_state(model, {**model.state_dict(), "extra.weight": torch.zeros(1)}, "x.pth")


def test_load_cause_takes_the_unpickler_complaint_without_colour_codes():
    cause = checkpoint_module._load_cause
    err = RuntimeError("Weights only load failed.\n\t\x1b[1mWeightsUnpickler error: Unsupported global: GLOBAL a.B "
                       "(see WeightsUnpickler error: below)\x1b[0m. Please use `add_safe_globals`")
    assert cause(err) == "Unsupported global: GLOBAL a.B (see WeightsUnpickler error: below)"
