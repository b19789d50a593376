"""Checkpoints: written atomically, read without arbitrary unpickling.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
``{"format": FORMAT, "model": state_dict, "num_classes": int, "config": {...},
"iteration": int, "best_dice": float, "rng": {...}, ...}`` plus whatever the trainer adds
(optimizer states, a second student, a teacher). ``torch.load(weights_only=True)`` reads it,
so a checkpoint from elsewhere cannot execute code.
"""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "sscd-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model/config it is used with."""


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by ``save_checkpoint`` (CUDA-saved ones load on a CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT!r} with a 'model')")
    return state


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
