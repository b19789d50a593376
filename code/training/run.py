"""What every trainer gets: a ``Run`` (started by ``training.run_start``: data, output folder, logger,
seeds, the saved config) and its parts, how the networks are built and called (precision, memory
format, compilation, multi-process training; see bench/README.md); and the supervised (labeled-only)
training step."""
import contextlib
import time

import torch
import torch._dynamo.exc
import torch._inductor.exc

from common.checkpoint import os_cause
from dataloaders.dataset import load_volumes
from evaluation.inference import Validator
from networks.unet import build_model
from training import distributed
from training.config import resolve_save_dir
from training.engine import VAL_HISTORY, ScalerState, close_logger, get_logger, train_loop
from training.run_folder import RunLock, data_fingerprint
from training.run_start import (LABEL_TABLES, RUN_RECORDS, build_train_data, find_data, plan_claim, split_batch,
                                start_writing)
from utils.losses import ce_dice_loss

# rank r draws its batches, boxes and dropout from seed + r * RANK_SEED_STRIDE (rank 0: the plain seeds)
RANK_SEED_STRIDE = 100003
# what a failing torch.compile raises at the first call; the forward then falls back to eager
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)
# what the supervised trainer writes in --save_dir
SUPERVISED_OUTPUTS = ("best.pth", "last.pth", "tb", VAL_HISTORY) + RUN_RECORDS


def _float(out):
    """Network outputs (a tensor, or logits and a list of head logits) as float32."""
    if isinstance(out, torch.Tensor):
        return out.float()
    logits, heads = out
    return logits.float(), [h.float() for h in heads]


class Forward:
    """``model(x, heads=...)`` as training calls it: the input in the model's memory format, the
    network under autocast (``amp_dtype``; None: fp32) with float32 outputs, so every loss is
    computed in float32; with ``compile``, through ``torch.compile`` (one graph per input shape
    and mode), falling back to eager for good, with a logged warning, if compilation fails."""

    def __init__(self, model, amp_dtype=None, channels_last=False, compile=False, logger=None):
        self.model, self.amp_dtype, self.channels_last, self.logger = model, amp_dtype, channels_last, logger
        self.compiled = self._compile() if compile else None

    def _compile(self):
        try:
            return torch.compile(self.model, dynamic=False)
        except (RuntimeError, *COMPILE_ERRORS) as err:  # e.g. torch.compile unsupported on this Python
            self._warn(err)
            return None

    def _warn(self, err):
        if self.logger:
            self.logger.warning(f"torch.compile failed, running eager instead: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}")

    def __call__(self, x, heads=False):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            if self.compiled is not None:
                try:
                    return _float(self.compiled(x, heads=heads))
                except COMPILE_ERRORS as err:
                    self._warn(err)
                    self.compiled = None
            return _float(self.model(x, heads=heads))


class RunParts:
    """The parts a trainer builds from its ``Run``: this rank's seeds, batch streams and generators,
    the networks on the device and how they are called, optimizers and the update step, validation."""

    def seed(self, base):
        """This rank's seed for ``base`` (``base`` itself in a single process)."""
        return base + self.rank * RANK_SEED_STRIDE

    def stream(self, data, labeled_bs, unlabeled_bs, strong, seed):
        """This rank's endless training batches (``TrainData.stream`` with the rank's seed)."""
        a = self.args
        return data.stream(labeled_bs, unlabeled_bs, self.device, a.aug_device, a.num_workers, strong=strong,
                           seed=self.seed(seed))

    def generator(self, seed):
        """A torch.Generator on the training device seeded for this rank."""
        return torch.Generator(device=self.device).manual_seed(self.seed(seed))

    def model(self, student=False):
        """The network on this rank's device, channels_last if on; a ``student`` gets SyncBatchNorm
        under torchrun with --sync_bn."""
        model = build_model(self.args.num_classes)
        if student and self.args.sync_bn:
            model = distributed.convert_sync_bn(model)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def forward(self, model, compile=None):
        """The ``Forward`` callable for ``model`` (``compile`` defaults to --compile)."""
        compile = self.args.compile if compile is None else compile
        return Forward(model, self.amp_dtype, self.channels_last, compile, self.logger)

    def parallel(self, students, find_unused):
        """``distributed.Parallel`` over the trained networks (a plain call in a single process)."""
        return distributed.Parallel(students, self.device, find_unused)

    def optimizer(self, model, lr=None):
        """SGD 0.01/0.9/1e-4 as the reference (``lr`` default --base_lr); the fused kernel on CUDA (one
        launch, and no host read for the fp16 gradient scaler)."""
        return torch.optim.SGD(model.parameters(), lr=self.args.base_lr if lr is None else lr, momentum=0.9,
                               weight_decay=1e-4, fused=True if self.device.type == "cuda" else None)

    def update(self, loss, optimizers, students):
        """Backward of ``loss`` (scaled with --amp fp16), one step of each optimizer, then the
        students' BatchNorm statistics averaged over the ranks (unless --sync_bn)."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        if not self.args.sync_bn:  # SyncBatchNorm's running statistics are equal on every rank already
            distributed.sync_buffers(students)

    def validator(self, model, volumes):
        """``validate()`` for train_loop: the Dice of ``model`` on ``volumes`` (eager, with the run's
        precision and memory format)."""
        a = self.args
        validator = Validator(volumes, a.num_classes, a.image_size, self.device, logger=self.logger)
        forward = self.forward(model, compile=False)
        return lambda: validator(forward)


class Run(RunParts):
    """Everything a trainer needs besides its own modules: args, root, save_dir, device, logger,
    config, and its training and validation data (built before anything in --save_dir changes)."""

    def __init__(self, args, dataset, outputs=SUPERVISED_OUTPUTS):
        """``outputs``: what this command writes in --save_dir (files and folders, relative); if one
        of them already holds checkpoints the folder is refused unless --resume or --overwrite."""
        if dataset not in LABEL_TABLES:
            raise ValueError(f"unknown dataset {dataset!r}")
        self.args, self.dataset, self.lock = args, dataset, None
        self.device = distributed.setup(args.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self._open_folder()
        try:
            find_data(self)
            removed = self._check_everything(outputs)
            start_writing(self, removed)
        except BaseException:
            self.close()
            raise

    def _open_folder(self):
        """Create --save_dir, lock it (rank 0) and log to stdout; log.txt is written once every check
        has passed (``run_start.start_writing``)."""
        main = self.rank == 0
        self.save_dir = resolve_save_dir(self.args)
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.save_dir) if main else None
        except OSError as err:
            raise SystemExit(f"--save_dir {self.save_dir}: cannot write there ({os_cause(err)})") from None
        self.logger = get_logger(self.save_dir, self.args.exp, quiet=not main, hold_file=True)

    def _check_everything(self, outputs):
        """Every check of this start, the run folder's and the data's, before anything there changes;
        returns what --overwrite will delete."""
        args = self.args
        self.config = {**vars(args), "world_size": self.world_size, "data_fingerprint": data_fingerprint(self.root)}
        removed = plan_claim(self.save_dir, self.config, outputs, args, self.logger)
        split_batch(self)
        self._data, self._volumes = build_train_data(self), load_volumes(self.root, "val", args.num_classes)
        distributed.barrier()  # every rank has checked its data before rank 0 deletes anything
        return removed

    def train_data(self):
        """The training slices (built and checked when the run started)."""
        return self._data

    def val_volumes(self):
        return self._volumes

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        """Close the run; when it stops on an error, every rank writes one line saying why into
        log.txt, and a rank stopped only because another failed ends with one line, not a traceback."""
        try:
            if err is not None:
                replacement = self.record_stop(err)
                if replacement is not None:
                    raise replacement from None
        finally:
            self.close()
        return False

    def record_stop(self, err):
        """Append ``rank r: stopped by <error>`` to log.txt; returns the SystemExit that replaces a
        collective error caused by another rank's failure (None otherwise)."""
        text = str(err.code if isinstance(err, SystemExit) else err).strip().splitlines()
        cause = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
        replacement = None
        if self.world_size > 1 and distributed.is_peer_failure(err):
            cause = "another rank failed (its line is in log.txt)"
            replacement = SystemExit(f"rank {self.rank}: stopped because another rank failed; "
                                     f"{self.save_dir / 'log.txt'} names its error")
        try:
            with open(self.save_dir / "log.txt", "a") as log:
                log.write(f"[{time.strftime('%H:%M:%S')}] rank {self.rank}: stopped by {cause}\n")
        except OSError:
            pass  # the error itself may be the unwritable folder
        return replacement

    def close(self):
        if getattr(self, "logger", None) is not None:
            close_logger(self.logger)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        distributed.teardown()


def train_supervised(run, iterations=None, lr_after=None):
    """Labeled-only baseline: CE + Dice on ``--labeled_bs`` labeled slices per iteration (weak aug),
    for ``iterations`` (default ``--max_iterations``); with ``lr_after = (n, lr)`` the learning rate
    is ``lr`` from iteration n + 1 on (the SSCD trainer's --stage_lr after --pre_iterations)."""
    a = run.args
    iterations = iterations or a.max_iterations
    data, volumes = run.train_data(), run.val_volumes()
    model = run.model(student=True)
    opt = run.optimizer(model)
    forward, parallel = run.forward(model), run.parallel([model], find_unused=True)  # the heads are unused
    stream = run.stream(data, a.labeled_bs, 0, strong=False, seed=a.seed)

    def step(it):
        if lr_after is not None and it > lr_after[0]:
            for group in opt.param_groups:
                group["lr"] = lr_after[1]
        batch = next(stream)
        loss = parallel(lambda: ce_dice_loss(forward(batch["image"]), batch["label"], a.num_classes))
        run.update(loss, [opt], [model])
        return {"loss": loss}

    state = train_loop(save_dir=run.save_dir, iterations=iterations, step=step, models={"model": model},
                       optimizers={"model": opt}, validate=run.validator(model, volumes), config=run.config,
                       val_interval=a.val_interval, log_interval=a.log_interval, resume=a.resume,
                       logger=run.logger, name="supervised",
                       resumables={"stream": stream, "scaler": ScalerState(run.scaler)})
    run.logger.info(f"best val Dice {state['best_dice']:.4f} at iteration {state['best_iteration']}; "
                    f"checkpoints in {run.save_dir} (best.pth, last.pth)")
    return state
