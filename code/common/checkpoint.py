"""Checkpoints: written atomically, read without arbitrary unpickling.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
``{"format": FORMAT, "model": state_dict, "num_classes": int, "config": {...},
"iteration": int, "best_dice": float, "rng": {...}, ...}`` plus whatever the trainer adds
(optimizer states, a second student, a teacher). ``torch.load(weights_only=True)`` reads it,
so a checkpoint from elsewhere cannot execute code.
"""
import io
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "sscd-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written, or does not fit the model/config it is used with."""
    user_error = True  # the scripts end with its message (common.errors.run_cli)


TEMP_PREFIX = "."  # temporary files: .<name>.<random>, renamed to <name> once complete


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename).

    The checkpoint is serialised in memory first, so a full disk or a read-only folder surfaces
    as a ``CheckpointError`` naming the path and the cause; the file previously at ``path`` is then
    untouched and no temporary file is left behind.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write_bytes(f, buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({os_cause(err)})") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(f, data):
    """``f.write(data)`` (one place for the tests to simulate a full disk)."""
    f.write(data)


def os_cause(err):
    """A short reason for an OSError: 'no space left on device', 'read-only file system', ..."""
    return (err.strerror or str(err)).lower() if isinstance(err, OSError) else str(err)


def remove_stale_temporaries(folder):
    """Delete the temporary files that an interrupted ``save_checkpoint`` (SIGKILL, power loss)
    left in ``folder``; returns their names. Call it only where no other process is writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(TEMP_PREFIX)
             and ".pth." in p.name]
    for p in stale:
        p.unlink()
    return sorted(p.name for p in stale)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by ``save_checkpoint`` (CUDA-saved ones load on a CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_load_cause(err)})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT!r} with a 'model')")
    return state


def _load_cause(err):
    """The part of torch.load's error that says what is wrong with the file: the unpickler's own
    complaint ('Unsupported global: GLOBAL argparse.Namespace ...') where there is one, else its first
    line. Never the advice to re-run with ``weights_only=False``: that would switch off the very check
    that keeps a crafted checkpoint from executing code."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    keep = [line for line in lines
            if line and "weights_only" not in line and not line.startswith("Check the documentation")]
    return (keep or [type(err).__name__])[0].split(". This is an internal")[0]


def load_model_state(model, state_dict, source):
    """Load ``state_dict`` strictly into ``model``; a mismatch names ``source`` and the keys."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[:4]
        raise CheckpointError(f"{source}: weights do not fit this network ({' '.join(first)})") from err


def rng_state():
    """Python, NumPy and torch RNG states as checkpoint-safe values (lists and tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a checkpoint from a machine with more (or fewer)
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):  # GPUs: the common ones
            torch.cuda.set_rng_state(device_state, index)
