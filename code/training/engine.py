"""The training loop every trainer shares: steps, logging, validation, atomic checkpoints, resume.

A trainer supplies ``step(iteration) -> dict of 0-d loss tensors`` (forward, backward and
optimizer step done inside, the total under key ``"loss"``), the modules and optimizers to
save, and ``validate() -> (score, scalars)`` for the model written as ``"model"``. The loop
writes ``last.pth`` (every validation) and ``best.pth`` (best score on val.list) into
``save_dir``; ``resume=True`` continues from ``last.pth``. Losses stay on the device between
log intervals: the only host synchronisation is at logging/validation time, where a
non-finite loss stops the run naming the first bad iteration (the checkpoints on disk are
from before it).

Under torchrun (``training.distributed``) every rank runs the steps; the logged losses are means
over the ranks, a non-finite loss on any rank stops all of them, and only rank 0 validates,
writes tensorboard and checkpoints; the ranks meet at a barrier before returning, so the
checkpoints exist for whatever the caller loads next.
"""
import json
import logging
import logging.handlers
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import (CheckpointError, load_checkpoint, load_model_state, remove_stale_temporaries, rng_state,
                              save_checkpoint, set_rng_state)
from common.errors import DataReadError
from training import distributed
from training.device import fit_generator_state, match_state_layout

# one JSON record per validation in every train_loop folder (reporting.curves reads them)
VAL_HISTORY = "validations.jsonl"

try:  # optional: the GPU machine of the device check has no tensorboardX (validations.jsonl has the curves)
    from tensorboardX import SummaryWriter
except ImportError:
    try:  # torch's own writer, where the tensorboard package is installed
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        SummaryWriter = None


class NonFiniteLoss(RuntimeError):
    """Raised when a loss becomes NaN or infinite."""
    user_error = True  # the scripts end with its message (common.errors.run_cli)


class NonFiniteWeights(NonFiniteLoss):
    """Raised when a weight or BatchNorm statistic becomes NaN or infinite (the loss may stay finite)."""


def first_nonfinite(models):
    """``'<model>.<tensor>'`` of the first floating-point parameter or buffer (BatchNorm running
    statistics included) of ``models`` (name -> module) that holds a NaN or inf, else None.
    One host read when everything is finite."""
    named = [(f"{key}.{n}", t) for key, m in models.items() for n, t in m.state_dict().items()
             if t.is_floating_point()]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    return next(n for n, t in named if not bool(torch.isfinite(t).all()))


def seed_everything(seed):
    """Seed Python, NumPy and torch (the backend flags: ``training.device.apply_backend_flags``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NullWriter:
    """Stands in for a SummaryWriter where neither tensorboardX nor tensorboard is installed."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_image(self, *args, **kwargs):
        pass

    def close(self):
        pass


def summary_writer(folder, logger=None):
    """A tensorboardX (else torch.utils.tensorboard) SummaryWriter on ``folder``, or a ``NullWriter``
    (with a logged warning) when neither tensorboardX nor tensorboard is installed."""
    if SummaryWriter is not None:
        return SummaryWriter(str(folder))
    if logger:
        logger.warning(f"neither tensorboardX nor tensorboard is installed: no tensorboard logs in {folder} "
                       f"(the validations are in {VAL_HISTORY} and log.txt)")
    return NullWriter()


def get_logger(save_dir, name, quiet=False, hold_file=False):
    """A logger writing to ``save_dir/log.txt`` and stdout (handlers replaced, never duplicated);
    ``quiet`` (the ranks other than 0): warnings only, to stdout only. ``hold_file``: what is logged
    goes to stdout now and into log.txt when ``open_log_file`` is called (after a start's checks, so a
    refused start leaves an earlier run's log.txt as it was)."""
    logger = logging.getLogger(f"sscd.{name}.{Path(save_dir).resolve()}.{'quiet' if quiet else 'main'}")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    close_logger(logger)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if not quiet:
        handlers.append(logging.handlers.MemoryHandler(1 << 20, flushLevel=logging.CRITICAL + 1) if hold_file
                        else logging.FileHandler(Path(save_dir) / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def open_log_file(logger, save_dir):
    """Start writing ``logger``'s records to ``save_dir/log.txt``, beginning with those it held."""
    held = [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    if not held and any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        return
    file_handler = logging.FileHandler(Path(save_dir) / "log.txt")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    for handler in held:
        handler.setTarget(file_handler)
        handler.flush()
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(file_handler)


def close_logger(logger):
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class GeneratorState:
    """A ``torch.Generator`` as a resumable (``state_dict`` / ``load_state_dict``) for train_loop.
    A state saved on another device type re-seeds the generator (``training.device.fit_generator_state``);
    ``load_state_dict`` then returns the one-line note, else None."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        fitted, note = fit_generator_state(self.generator, state["state"])
        self.generator.set_state(fitted)
        return note


class ScalerState:
    """The fp16 GradScaler (scale, growth tracker) as a resumable: a resumed fp16 run continues at
    its scale instead of restarting at 65536. A state saved without a scaler (--amp bf16/off before
    the resume) leaves a fresh scaler; a saved one is ignored by a disabled scaler."""

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def load_resumable(obj, saved):
    """``obj.load_state_dict(saved)``; a ``torch.Generator`` that ``obj`` keeps as ``.generator``
    (the batch stream's augmentation generator) first gets its saved ``"generator"`` state fitted to
    its device (``fit_generator_state``). Returns the note of a re-seeded generator, or None."""
    note = None
    generator = getattr(obj, "generator", None)
    if (isinstance(generator, torch.Generator) and not isinstance(obj, GeneratorState) and isinstance(saved, dict)
            and saved.get("generator") is not None):
        fitted, note = fit_generator_state(generator, saved["generator"])
        saved = {**saved, "generator": fitted}
    returned = obj.load_state_dict(saved)
    return returned if isinstance(returned, str) else note


def rank_state(resumables):
    """What each rank draws from: its resumables' states (batch stream, generators) and its RNG."""
    return {"resumables": {k: r.state_dict() for k, r in (resumables or {}).items()}, "rng": rng_state()}


def _state(models, optimizers, iteration, best, config, finished, resumables=None, val=None, ranks=None):
    """The checkpoint dict; ``ranks``: every rank's ``rank_state`` (rank 0's also as "resumables"
    and "rng", the single-process format), stored as "ranks" when there are several."""
    main = models["model"]
    ranks = ranks or [rank_state(resumables)]
    return {
        "resumables": ranks[0]["resumables"],
        "ranks": ranks[1:],  # ranks 1.. of a torchrun run (empty in a single process)
        "val": val or {},  # this iteration's validation: {"dice": mean, "dice_class<c>": ...}
        "model": main.state_dict(),
        "models": {k: m.state_dict() for k, m in models.items() if k != "model"},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "iteration": iteration,
        "best_dice": best[0],
        "best_iteration": best[1],
        "num_classes": main.num_classes,
        "config": config,
        "rng": ranks[0]["rng"],
        "finished": finished,
    }


def restore(path, models, optimizers):
    """Load models, optimizers and RNG from a checkpoint written by ``train_loop`` (the RNG of this
    rank: ``rank_saved_state``; the optimizer state in its parameters' memory format)."""
    state = load_checkpoint(path)
    load_model_state(models["model"], state["model"], path)
    for key, module in models.items():
        if key == "model":
            continue
        if key not in state.get("models", {}):
            raise CheckpointError(f"{path}: has no '{key}' weights; it was not written by this trainer")
        load_model_state(module, state["models"][key], path)
    for key, opt in optimizers.items():
        if key not in state.get("optimizers", {}):
            raise CheckpointError(f"{path}: has no optimizer state '{key}'")
        try:
            opt.load_state_dict(state["optimizers"][key])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer state '{key}' does not fit ({err})") from err
        match_state_layout(opt)  # a resume may change --channels_last
    saved = rank_saved_state(state, distributed.rank())
    if saved is not None:
        set_rng_state(saved["rng"])
    return state


def rank_saved_state(state, rank):
    """This rank's ``{"resumables", "rng"}`` in checkpoint ``state``, or None when the run that
    wrote it had fewer ranks (this rank then keeps its freshly seeded streams)."""
    if rank == 0:
        return {"resumables": state.get("resumables", {}), "rng": state["rng"]}
    ranks = state.get("ranks") or []
    return ranks[rank - 1] if rank - 1 < len(ranks) else None


def train_loop(*, save_dir, iterations, step, models, optimizers, validate, config,
               val_interval, log_interval, resume=False, logger=None, name="train", on_validate=None,
               resumables=None, validate_start=False, offset=0):
    """Run ``iterations`` steps with validation and checkpoints; returns the final state dict.

    ``on_validate(writer, iteration)`` may add images to tensorboard at each validation.
    ``resumables``: name -> object with ``state_dict()`` / ``load_state_dict()`` (the batch stream,
    the step's generators) saved in every checkpoint and restored on resume, so a resumed run
    draws the same batches and random boxes as an uninterrupted one.
    ``validate_start``: also validate (and checkpoint) the starting weights, as iteration 0, so
    that ``best.pth`` can be the start when no step improves on it.
    Every validation appends ``{"phase": name, "iteration", "total_iteration": offset + iteration,
    "dice", "dice_class<c>"...}`` to ``save_dir/validations.jsonl`` (the learning curves; a record
    repeated by a resume has the same phase and iteration, and the later one counts).
    """
    main_rank = distributed.is_main()
    save_dir = Path(save_dir)
    if main_rank:
        _prepare_folder(save_dir, name, logger)
    last_path = save_dir / "last.pth"
    start, best = 0, (-1.0, -1)
    if resume and last_path.is_file():
        state = restore(last_path, models, optimizers)
        start, best = state["iteration"], (state["best_dice"], state["best_iteration"])
        _restore_resumables(state, resumables, last_path, name, logger)
        if logger:
            logger.info(f"[{name}] resumed from {last_path} at iteration {start} (best val Dice {best[0]:.4f})")
        if state.get("finished") and iterations <= start:
            if iterations < start:
                raise SystemExit(f"--resume: [{name}] {last_path} finished at iteration {start}; a budget of "
                                 f"{iterations} would end it earlier: give at least {start}, or start a new run")
            return state
        if state.get("finished") and logger:
            logger.info(f"[{name}] extending the finished run from {start} to {iterations} iterations")
        validate_start = False  # the restored run has validated its start already
    writer = summary_writer(save_dir / "tb", logger) if main_rank else None
    saver = _ValidateAndSave(save_dir=save_dir, name=name, iterations=iterations, offset=offset, models=models,
                             optimizers=optimizers, validate=validate, config=config, resumables=resumables,
                             writer=writer, on_validate=on_validate, logger=logger, best=best)

    def check_weights(it):  # never validate or save a model whose weights or statistics overflowed
        bad_tensor = first_nonfinite(models)
        if bad_tensor is not None:
            raise NonFiniteWeights(f"[{name}] non-finite values in {bad_tensor} at iteration {it} (the "
                                   f"loss stayed finite; lower --base_lr); stopping. {_last_good(last_path)}")

    device_sums, count = {}, 0
    first_bad = None
    it = start
    try:
        if validate_start:
            check_weights(0)
            validate_on_main(saver, 0, resumables)
        t0, wait0 = time.time(), _waited(resumables)
        for it in tqdm(range(start + 1, iterations + 1), initial=start, total=iterations, desc=name,
                       dynamic_ncols=True, disable=not sys.stderr.isatty()):
            for m in models.values():
                m.train()
            try:
                losses = step(it)
            except DataReadError as err:  # raised before the step changed anything: save iteration it - 1
                raise SystemExit(_save_before_read_error(err, it - 1, last_path, models, optimizers, saver, config,
                                                         resumables)) from None
            bad = ~torch.isfinite(losses["loss"].detach())
            first_bad = torch.where(bad, it, -1) if first_bad is None else torch.where(
                (first_bad < 0) & bad, it, first_bad)
            for k, v in losses.items():
                device_sums[k] = device_sums.get(k, 0) + v.detach().float()
            count += 1
            is_val = it % val_interval == 0 or it == iterations
            if it % log_interval == 0 or is_val:
                elapsed, waited = time.time() - t0, _waited(resumables) - wait0
                _log_losses(name, it, iterations, _gather(first_bad, device_sums, count), optimizers, writer,
                            logger, elapsed / max(count, 1), last_path, waited / max(elapsed, 1e-9))
                device_sums, count, t0, wait0 = {}, 0, time.time(), _waited(resumables)
            if is_val:
                check_weights(it)
                validate_on_main(saver, it, resumables)
                t0, wait0 = time.time(), _waited(resumables)  # the next s/it excludes validation and checkpoints
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier()
    return _state(models, optimizers, it, saver.best, config, finished=True, resumables=resumables)


def _prepare_folder(save_dir, name, logger):
    """Create ``save_dir`` and remove the temporary files of an interrupted checkpoint write (rank 0)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(save_dir)
    if stale and logger:
        logger.warning(f"[{name}] removed temporary files of an interrupted checkpoint write in {save_dir}: "
                       f"{', '.join(stale)}")


def _waited(resumables):
    """Seconds the batch stream has waited for batches read from disk or by loader workers (0 for the
    in-memory device path)."""
    return getattr((resumables or {}).get("stream"), "wait_seconds", 0.0)


def _log_losses(name, it, iterations, gathered, optimizers, writer, logger, seconds_per_it, last_path, wait_share=0.0):
    """Log one interval's mean losses (``gathered`` = ``_gather``'s result) to tensorboard (rank 0:
    ``writer``) and the log; a non-finite loss in the interval stops the run naming its first iteration.
    ``wait_share``: the part of the interval spent waiting for batches (shown when above zero)."""
    bad_it, means = gathered
    if bad_it >= 0:
        raise NonFiniteLoss(f"[{name}] non-finite loss at iteration {bad_it}; stopping. {_last_good(last_path)}")
    if writer is not None:
        for k, v in means.items():
            writer.add_scalar(f"{name}/{k}", v, it)
        for key, opt in optimizers.items():
            writer.add_scalar(f"{name}/lr_{key}", opt.param_groups[0]["lr"], it)
    if logger:
        text = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        wait = f", batch wait {100 * wait_share:.1f}%" if wait_share > 0 else ""
        logger.info(f"[{name}] it {it}/{iterations} {text} ({seconds_per_it:.3f}s/it{wait})")


class _ValidateAndSave:
    """Rank 0's validation of ``train_loop``: validate, log, append to validations.jsonl, write
    ``best.pth`` (on improvement) and ``last.pth``. ``best`` is ``(score, iteration)`` so far.
    Called as ``saver(iteration, ranks)``, ``ranks`` every rank's resumable state (``rank_state``)."""

    def __init__(self, *, save_dir, name, iterations, offset, models, optimizers, validate, config, resumables,
                 writer, on_validate, logger, best):
        self.save_dir, self.name, self.iterations, self.offset = save_dir, name, iterations, offset
        self.models, self.optimizers, self.validate, self.config = models, optimizers, validate, config
        self.resumables, self.writer, self.on_validate, self.logger = resumables, writer, on_validate, logger
        self.best = best

    def __call__(self, it, ranks):
        name, writer = self.name, self.writer
        for m in self.models.values():
            m.eval()
        t_val = time.time()
        score, scalars = self.validate()
        t_val = time.time() - t_val
        for k, v in scalars.items():
            writer.add_scalar(f"{name}/val_{k}", v, it)
        writer.add_scalar(f"{name}/val_dice", score, it)
        if self.on_validate:
            self.on_validate(writer, it)
        improved = score > self.best[0]
        if improved:
            self.best = (score, it)
        ranks = [rank_state(self.resumables)] + ranks[1:]  # rank 0's RNG as it is after validating
        state = _state(self.models, self.optimizers, it, self.best, self.config, finished=it == self.iterations,
                       resumables=self.resumables, val={"dice": score, **scalars}, ranks=ranks)
        record = {"phase": name, "iteration": it, "total_iteration": self.offset + it, "dice": score, **scalars}
        with open(self.save_dir / VAL_HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            save_checkpoint(state, self.save_dir / "best.pth")
        save_checkpoint(state, self.save_dir / "last.pth")
        if self.logger:
            self.logger.info(f"[{name}] it {it} val Dice {score:.4f} (best {self.best[0]:.4f} at {self.best[1]}; "
                             f"validation {t_val:.2f}s)")


def validate_on_main(validate_and_save, it, resumables):
    """Every rank's streams and RNG gathered to rank 0, which validates and writes the checkpoints;
    an error there (a failing validation, a full disk) stops every rank at once with its message
    (``distributed.raise_if_main_failed``) instead of leaving the others waiting in a collective."""
    ranks = distributed.gather_to_main(rank_state(resumables))
    error = None
    if distributed.is_main():
        try:
            validate_and_save(it, ranks)
        except Exception as err:  # handed to every rank, then re-raised on this one
            error = err
    distributed.raise_if_main_failed(error)


def _restore_resumables(state, resumables, path, name, logger):
    """Load this rank's saved resumable states (``rank_saved_state``) into ``resumables``."""
    rank = distributed.rank()
    saved = rank_saved_state(state, rank)
    if saved is None:
        if logger and resumables:
            logger.warning(f"[{name}] {path} was written by a run with fewer ranks: rank {rank} starts its batch "
                           f"stream and generators afresh")
        return
    for key, obj in (resumables or {}).items():
        if key in saved["resumables"]:
            note = load_resumable(obj, saved["resumables"][key])
            if note and logger:
                logger.warning(f"[{name}] {path} '{key}': {note}")
        elif logger:
            logger.warning(f"[{name}] {path} has no '{key}' state (older checkpoint): it restarts")


def _save_before_read_error(err, it, last_path, models, optimizers, saver, config, resumables):
    """Write ``last.pth`` at iteration ``it`` (the state before the batch that could not be read) and
    return the line that stops the run. Under torchrun the other ranks are in a collective: the run
    stops on the last validation's ``last.pth`` instead."""
    if distributed.world_size() > 1:
        return f"{err}; {_last_good(last_path)} (the last validation): repair the file, then rerun with --resume"
    save_checkpoint(_state(models, optimizers, it, saver.best, config, finished=False, resumables=resumables),
                    last_path)
    return f"{err}; {last_path} holds iteration {it}: repair or replace the file, then rerun with --resume"


def _last_good(last_path):
    return f"The last good checkpoint is {last_path}" if last_path.is_file() else "No checkpoint was written"


def _gather(first_bad, device_sums, count):
    """(first non-finite iteration or -1, {loss: mean}) over this log interval and every rank:
    one host read (two small all-reduces under torchrun)."""
    keys = list(device_sums)
    sums = distributed.all_reduce(torch.stack([device_sums[k] for k in keys]))
    never = 2 ** 31  # above any iteration count, exact as a double
    bad = distributed.all_reduce(torch.where(first_bad < 0, never, first_bad).to(torch.int64).view(1), "min")
    values = torch.cat([sums.double(), bad.double()]).tolist()
    bad_it = int(values[-1])
    means = {k: v / (count * distributed.world_size()) for k, v in zip(keys, values[:-1])}
    return (-1 if bad_it == never else bad_it), means
