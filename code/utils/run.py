"""Run set-up shared by the trainers: dataset root (or the synthetic default), output folder,
logger, seeds, the saved config, how the networks are built and called (precision, memory
format, compilation, multi-process training; see bench/README.md), and the supervised
(labeled-only) training step."""
import contextlib
import json
import time
from pathlib import Path

import torch
import torch._dynamo.exc
import torch._inductor.exc

from dataloaders.converted import ConvertedTrainData
from dataloaders.dataset import (ACDC_LABELED_SLICES, TrainData, check_root, load_volumes, read_list,
                                 resolve_data_cache)
from dataloaders.synthetic import make_synthetic_acdc
from networks.unet import build_model
from utils import distributed, speed
from utils.config import per_rank_batch, resolve_save_dir, save_config_dict
from utils.checkpoint import os_cause, remove_stale_temporaries
from utils.curves import VAL_HISTORY
from utils.device import apply_backend_flags, backend_flags, resolve_deterministic
from utils.engine import ScalerState, close_logger, get_logger, open_log_file, seed_everything, train_loop
from utils.evaluation import Validator
from utils.losses import ce_dice_loss
from utils.model_card import model_card
from utils.run_folder import (RESUME_MAY_CHANGE, REUSE_MAY_CHANGE, RunLock, check_phases_in_order,
                              check_same_run, data_fingerprint, remove_outputs)

SYNTHETIC_ROOT = Path("data") / "synthetic_ACDC"
SYNTHETIC_PATIENTS = 20
# labeled-slice tables per dataset; None = count the slices of the first --labelnum cases
LABEL_TABLES = {"ACDC": ACDC_LABELED_SLICES, "PROMISE12": None, "CUSTOM": None}
# datasets whose raw files must be converted first: the command, shown when --root_path is not converted
PREPROCESS_COMMANDS = {"PROMISE12": "python code/dataloaders/preprocess_promise12.py --raw {root} --out <folder> "
                                    "--image_size {size}",
                       "CUSTOM": "python code/dataloaders/convert_dataset.py --input <your data> --out {root} "
                                 "--image_size {size}"}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# rank r draws its batches, boxes and dropout from seed + r * RANK_SEED_STRIDE (rank 0: the plain seeds)
RANK_SEED_STRIDE = 100003
# what a failing torch.compile raises at the first call; the forward then falls back to eager
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


def resolve_speed_flags(args, device):
    """Replace the ``auto`` values of --amp, --channels_last and --lcc by what ``device`` gets
    (saved so in config.yaml): bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs
    (``utils.speed.auto_amp``: emulated bf16 is ~9x slower than fp32); channels_last everywhere
    (faster on CUDA and, measured, on the CPU); the device LCC on CUDA, scipy on the CPU (faster
    there); --deterministic not given: ``utils.device.resolve_deterministic``. Also keeps freed host
    memory for reuse (``utils.speed.tune_host_allocator``)."""
    cuda = torch.device(device).type == "cuda"
    speed.tune_host_allocator()
    if args.amp == "auto":
        args.amp = speed.auto_amp(device)
    if args.channels_last == "auto":
        args.channels_last = "on"
    if args.lcc == "auto":
        args.lcc = "device" if cuda else "scipy"
    args.deterministic = resolve_deterministic(args.deterministic, device)
    return args


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


# written by a run from its start; they do not by themselves make a folder "hold a run" (no checkpoint)
RUN_RECORDS = ("config.yaml", "log.txt")
# what the supervised trainer writes in --save_dir
SUPERVISED_OUTPUTS = ("best.pth", "last.pth", "tb", VAL_HISTORY) + RUN_RECORDS


def plan_claim(save_dir, config, outputs, args, logger=None):
    """What this start may do in ``save_dir`` before anything there changes; returns the outputs
    (relative paths) that ``--overwrite`` will delete once every check has passed.

    * ``--resume``: the folder must hold a run, its config.yaml and every checkpoint in it must be of
      this run (``run_folder.check_same_run``) and its phases complete up to the last one started;
    * otherwise an output other than the ``RUN_RECORDS`` that exists is refused unless ``--overwrite``;
      earlier phases this start reuses (``--start_stage``) must be of this run too.
    """
    save_dir = Path(save_dir)
    phases = [o for o in outputs if o not in RUN_RECORDS and "." not in o]  # pretrain, stage_k folders
    if args.resume:
        if not check_same_run(save_dir, config, logger=logger):
            raise SystemExit(f"--resume: {save_dir} holds no run to resume (no config.yaml, no checkpoint); check "
                             f"--save_dir, or start the run without --resume")
        check_phases_in_order(save_dir, phases)
        return []
    existing = [name for name in outputs if (save_dir / name).exists()]
    results = [name for name in existing if name not in RUN_RECORDS]
    reused = [p.name for p in sorted(save_dir.iterdir()) if p.is_dir() and p.name not in outputs
              and any(p.glob("*.pth"))] if save_dir.is_dir() else []
    if reused:
        check_same_run(save_dir, config, names=reused, may_change=RESUME_MAY_CHANGE | REUSE_MAY_CHANGE,
                       what=f"--start_stage {getattr(args, 'start_stage', 0)}", logger=logger)
    if results and not args.overwrite:
        raise SystemExit(f"--save_dir {save_dir} already holds a run ({', '.join(results)}): pass --resume to "
                         f"continue it, --overwrite to replace it, or choose another --save_dir")
    return existing if results else []


class Run:
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
            self._find_data()
            removed = self._check_everything(outputs)
            self._start_writing(removed)
        except BaseException:
            self.close()
            raise

    def _open_folder(self):
        """Create --save_dir, lock it (rank 0) and log to stdout; log.txt is written once every check
        has passed (``_start_writing``)."""
        main = self.rank == 0
        self.save_dir = resolve_save_dir(self.args)
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.save_dir) if main else None
        except OSError as err:
            raise SystemExit(f"--save_dir {self.save_dir}: cannot write there ({os_cause(err)})") from None
        self.logger = get_logger(self.save_dir, self.args.exp, quiet=not main, hold_file=True)

    def _find_data(self):
        """The data root (or the synthetic default), its preprocessing, the resolved speed flags."""
        args, main = self.args, self.rank == 0
        self.synthetic = args.root_path is None
        if self.synthetic:
            if self.dataset != "ACDC":
                raise SystemExit(f"--root_path is required for {self.dataset} (see README: preprocessing)")
            if main:
                make_synthetic_acdc(SYNTHETIC_ROOT, n_patients=SYNTHETIC_PATIENTS)
            distributed.barrier()  # the other ranks read what rank 0 wrote
            args.root_path = str(SYNTHETIC_ROOT)
            self.logger.info(f"no --root_path given: using the synthetic ACDC-layout data in {args.root_path} "
                             f"({SYNTHETIC_PATIENTS} patients; --labelnum counts patients, not the ACDC table)")
        self.root = check_root(args.root_path).resolve()
        args.root_path = str(self.root)
        self._check_preprocessed()
        resolve_speed_flags(args, self.device)
        self.amp_dtype, self.channels_last = AMP_DTYPES[args.amp], args.channels_last == "on"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")

    def _check_everything(self, outputs):
        """Every check of this start, the run folder's and the data's, before anything there changes;
        returns what --overwrite will delete."""
        args = self.args
        self.config = {**vars(args), "world_size": self.world_size, "data_fingerprint": data_fingerprint(self.root)}
        removed = plan_claim(self.save_dir, self.config, outputs, args, self.logger)
        self._split_batch()
        self._data, self._volumes = self._build_train_data(), load_volumes(self.root, "val", args.num_classes)
        distributed.barrier()  # every rank has checked its data before rank 0 deletes anything
        return removed

    def _start_writing(self, removed):
        """Delete what --overwrite replaces, write config.yaml, open log.txt, seed the run."""
        args, main = self.args, self.rank == 0
        if main and removed:
            remove_outputs(self.save_dir, removed)
        distributed.barrier()
        stale = remove_stale_temporaries(self.save_dir) if main else []
        if main:
            try:
                save_config_dict(self.config, self.save_dir)
                open_log_file(self.logger, self.save_dir)
            except OSError as err:
                raise SystemExit(f"--save_dir {self.save_dir}: cannot write config.yaml ({os_cause(err)})") from None
        if removed:
            self.logger.info(f"--overwrite: removed {', '.join(removed)} from {self.save_dir}")
        if stale:
            self.logger.warning(f"removed temporary files of an interrupted checkpoint write in {self.save_dir}: "
                                f"{', '.join(stale)}")
        seed_everything(self.seed(args.seed))
        self.backend_flags = backend_flags(args.deterministic, args.amp, self.device)
        apply_backend_flags(self.backend_flags)
        # what predict.py needs (classes, preprocessing, network): in every checkpoint, not in config.yaml
        self.config["model_card"] = model_card(self.dataset if not self.synthetic else "ACDC", self.root,
                                               args.num_classes, args.image_size)
        self.logger.info(f"save_dir: {self.save_dir}" + (f" ({self.world_size} ranks)" if self.world_size > 1 else ""))
        self.logger.info(f"device {self.device}, --amp {args.amp}, --channels_last {args.channels_last}, --lcc {args.lcc}"
                         + (f" ({speed.cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                            f"oneDNN cap {speed.onednn_isa_cap() or 'none'}, torch threads {torch.get_num_threads()}: "
                            "runs with other kernels or another thread count may differ numerically, "
                            "docs/protocol.md#same-seed-same-run)"
                            if self.device.type == "cpu" else ""))

    def _split_batch(self):
        """Under torchrun: set ``args.batch_size`` / ``args.labeled_bs`` to what each rank draws
        (``--batch_scope``; config.yaml keeps the flags as given) and log the step's whole batch."""
        a, world = self.args, self.world_size
        if world == 1:
            return
        a.batch_size, a.labeled_bs = per_rank_batch(a.batch_size, a.labeled_bs, world, a.batch_scope)
        self.logger.info(f"--batch_scope {a.batch_scope}: each of the {world} ranks draws {a.batch_size} slices "
                         f"({a.labeled_bs} labeled) per step, {world * a.batch_size} in all, at --base_lr {a.base_lr}"
                         + (" (not scaled with the ranks; docs/gpu.md)" if a.batch_scope == "rank" else ""))

    def _check_preprocessed(self):
        """Refuse a raw (unconverted) folder with the conversion command; warn when the slices were
        preprocessed at another size than --image_size (they would be resized again, nearest neighbour)."""
        command = PREPROCESS_COMMANDS.get(self.dataset)
        if command and not (self.root / "train_slices.list").is_file():
            raise SystemExit(f"--root_path {self.root}: no train_slices.list; convert the {self.dataset} files "
                             f"first: " + command.format(root=self.root, size=self.args.image_size))
        info = self.root / "dataset.json"
        if info.is_file():
            size = json.loads(info.read_text()).get("image_size")
            if size is not None and int(size) != self.args.image_size:
                self.logger.warning(f"{info}: slices were preprocessed at {size}x{size}, --image_size is "
                                    f"{self.args.image_size}: they are resized again (nearest neighbour)")

    def _build_train_data(self):
        a = self.args
        table = None if self.synthetic else LABEL_TABLES[self.dataset]
        n_slices = len(read_list(self.root, "train_slices.list"))
        requested = a.data_cache
        a.data_cache, why = resolve_data_cache(requested, n_slices, a.image_size, self.device, a.aug_device,
                                               distributed.local_world_size())
        self.logger.info(f"--data_cache {requested}: {a.data_cache} ({why})")
        if self.dataset == "CUSTOM":  # converted data: unlabeled cases have no label on disk
            data = ConvertedTrainData(self.root, a.labelnum, a.image_size, a.num_classes, a.data_cache)
        else:
            data = TrainData(self.root, a.labelnum, a.image_size, a.num_classes, table, a.data_cache)
        if data.absent_in_labeled:
            self.logger.warning(f"WARNING: class(es) {data.absent_in_labeled} occur in none of the "
                                f"{len(data.labeled)} labeled slices (--labelnum {a.labelnum}): the supervised "
                                f"losses never see them")
        return data

    def train_data(self):
        """The training slices (built and checked when the run started)."""
        return self._data

    def val_volumes(self):
        return self._volumes

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
