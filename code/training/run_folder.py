"""A run folder (``--save_dir``) belongs to one run: its identity, the lock of the process writing it,
and the checks a start makes before it changes anything there (``claim``).

The identity of a run is every resolved flag that changes the computation, the number of ranks
(``world_size``) and a fingerprint of its data root (``data_fingerprint``). It is saved in config.yaml
and, with the rest of the config, in every checkpoint, and compared on every ``--resume`` (with
config.yaml and with every checkpoint in the folder, so a lost config.yaml does not loosen the check)
and on every reuse of an earlier phase by ``--start_stage``. docs/protocol.md lists what may change.
"""
import fcntl
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from common.checkpoint import CheckpointError, load_checkpoint

# flags a resumed run may change: where and how fast it runs, how often it logs and validates, the
# supervised trainer's --max_iterations (a finished run is extended), and where the run folder and
# the data root are (a moved folder; the data are compared through their fingerprint)
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "config", "device", "num_workers", "log_interval",
                               "val_interval", "compile", "lcc", "amp", "channels_last", "max_iterations",
                               "deterministic", "save_dir", "exp", "root_path", "data_cache"})
# derived entries of a saved config that are not flags: compared through what they derive from
NOT_COMPARED = frozenset({"model_card", "stage", "hca_stage_weights"})
# what differs legitimately between a run and the one whose earlier phases it reuses (--start_stage k)
REUSE_MAY_CHANGE = frozenset({"start_stage", "init_checkpoint", "final"})
# facts an older run did not record: a start without them is compared on the rest, with a warning
RECORDED_FACTS = ("world_size", "data_fingerprint")
LIST_FILES = ("dataset.json", "train.list", "val.list", "test.list", "unlabeled.list", "train_slices.list")
MISSING = "(not recorded)"


def data_fingerprint(root):
    """SHA-256 over the names and contents of the split lists and dataset.json of a data root: which
    slices and cases a run reads (not every slice's voxels)."""
    digest = hashlib.sha256()
    for name in LIST_FILES:
        path = Path(root) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def identity_changes(saved, current, may_change=RESUME_MAY_CHANGE):
    """``[(key, saved value, current value)]`` for every key of either config outside ``may_change``
    whose values differ; a key the saved run did not record shows as ``MISSING`` (a flag added since:
    the run ran with whatever the code did then, which this code cannot know)."""
    keys = (set(saved) | set(current)) - set(may_change) - NOT_COMPARED
    return [(k, saved.get(k, MISSING), current.get(k, MISSING)) for k in sorted(keys)
            if saved.get(k, MISSING) != current.get(k, MISSING)]


def describe(changes):
    return ", ".join(f"--{k} {old!r} -> {new!r}" for k, old, new in changes)


def saved_configs(save_dir, names=None):
    """``[(path, config)]``: config.yaml and the config in every checkpoint in ``save_dir`` and its
    sub-folders (only those whose first path part is in ``names`` when given)."""
    save_dir, found = Path(save_dir), []
    path = save_dir / "config.yaml"
    if path.is_file() and (names is None or "config.yaml" in names):
        try:
            saved = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SystemExit(f"{path}: not readable YAML ({str(err).splitlines()[0]}); cannot check the run "
                             f"it belongs to") from None
        if isinstance(saved, dict):
            found.append((path, saved))
    for ckpt in sorted(save_dir.glob("*.pth")) + sorted(save_dir.glob("*/*.pth")):
        if names is not None and ckpt.relative_to(save_dir).parts[0] not in names:
            continue
        try:
            found.append((ckpt, load_checkpoint(ckpt).get("config") or {}))
        except CheckpointError as err:
            raise SystemExit(str(err)) from None
    return found


def check_same_run(save_dir, current, names=None, may_change=RESUME_MAY_CHANGE, what="--resume", logger=None):
    """SystemExit naming the file and every changed flag when a saved config in ``save_dir`` (config.yaml,
    checkpoints; ``names``: only these entries) is not this run's. Returns how many were compared."""
    found = saved_configs(save_dir, names)
    for path, saved in found:
        changes = identity_changes(saved, current, may_change)
        unrecorded = [k for k, old, _ in changes if k in RECORDED_FACTS and old == MISSING]
        if unrecorded and logger is not None:
            logger.warning(f"{path}: written before runs recorded {', '.join(unrecorded)}: not compared")
        changes = [c for c in changes if c[0] not in unrecorded]
        if changes:
            allowed = ", ".join(sorted(may_change - {"resume", "overwrite", "config"}))
            raise SystemExit(f"{what}: {path} belongs to a run with other settings ({describe(changes)}); only "
                             f"{allowed} may change. Use the flags of that run, or start a new run in another "
                             f"--save_dir (--overwrite would delete this one)")
    return len(found)


def check_phases_in_order(save_dir, phases):
    """SystemExit when a phase folder lacks a finished checkpoint while a later one holds checkpoints
    (built on the missing phase's weights): a resume would retrain it under later stages."""
    save_dir = Path(save_dir)
    for k, phase in enumerate(phases):
        last = save_dir / phase / "last.pth"
        done = last.is_file() and bool(load_checkpoint(last).get("finished"))
        later = [p for p in phases[k + 1:] if any((save_dir / p).glob("*.pth"))]
        if not done and later:
            raise SystemExit(f"--resume: {save_dir / phase} has no finished checkpoint, but {later[0]} holds "
                             f"checkpoints built on it; start the run again (--overwrite), or restore {phase}")


def remove_outputs(save_dir, outputs):
    """Delete the ``outputs`` (relative paths) that exist in ``save_dir``; returns their names."""
    removed = []
    for name in outputs:
        path = Path(save_dir) / name
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(name)
    return removed


class RunLock:
    """An exclusive lock on ``save_dir/.run.lock`` (``flock``): held by the process that writes the run
    folder, released on close and by the kernel when the process dies (kill -9 included), so a lock is
    never stale. The file names the holder (host, pid, start time) for the refusal message."""

    NAME = ".run.lock"

    def __init__(self, save_dir):
        self.path = Path(save_dir) / self.NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise SystemExit(f"--save_dir {save_dir}: in use by {holder}; wait for it to end, or choose another "
                             f"--save_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
