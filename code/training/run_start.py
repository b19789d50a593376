"""A run's start-up, in the order ``training.run.Run`` calls it: where the data is (or the synthetic
default) and the speed flags it resolves to, what ``--overwrite`` / ``--resume`` may do in --save_dir
(``plan_claim``), each rank's batch, the training data, and what is written once every check has passed
(config.yaml, log.txt, seeds, backend flags, the model card). Each function takes the ``Run`` it sets up."""
import json
from pathlib import Path

import torch

from common.checkpoint import os_cause, remove_stale_temporaries
from dataloaders.converted import ConvertedTrainData
from dataloaders.dataset import ACDC_LABELED_SLICES, TrainData, check_root, read_list, resolve_data_cache
from dataloaders.synthetic import make_synthetic_acdc
from evaluation.model_card import model_card
from training import distributed, speed
from training.config import per_rank_batch, save_config_dict
from training.device import apply_backend_flags, backend_flags, resolve_deterministic
from training.engine import open_log_file, seed_everything
from training.run_folder import (RESUME_MAY_CHANGE, REUSE_MAY_CHANGE, check_phases_in_order, check_same_run,
                                 remove_outputs)

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
# written by a run from its start; they do not by themselves make a folder "hold a run" (no checkpoint)
RUN_RECORDS = ("config.yaml", "log.txt")


def resolve_speed_flags(args, device):
    """Replace the ``auto`` values of --amp, --channels_last and --lcc by what ``device`` gets
    (saved so in config.yaml): bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs
    (``training.speed.auto_amp``: emulated bf16 is ~9x slower than fp32); channels_last everywhere
    (faster on CUDA and, measured, on the CPU); the device LCC on CUDA, scipy on the CPU (faster
    there); --deterministic not given: ``training.device.resolve_deterministic``. Also keeps freed host
    memory for reuse (``training.speed.tune_host_allocator``)."""
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


def find_data(run):
    """The data root (or the synthetic default), its preprocessing, the resolved speed flags."""
    args, main = run.args, run.rank == 0
    run.synthetic = args.root_path is None
    if run.synthetic:
        if run.dataset != "ACDC":
            raise SystemExit(f"--root_path is required for {run.dataset} (see README: preprocessing)")
        if main:
            make_synthetic_acdc(SYNTHETIC_ROOT, n_patients=SYNTHETIC_PATIENTS)
        distributed.barrier()  # the other ranks read what rank 0 wrote
        args.root_path = str(SYNTHETIC_ROOT)
        run.logger.info(f"no --root_path given: using the synthetic ACDC-layout data in {args.root_path} "
                         f"({SYNTHETIC_PATIENTS} patients; --labelnum counts patients, not the ACDC table)")
    run.root = check_root(args.root_path).resolve()
    args.root_path = str(run.root)
    check_preprocessed(run)
    resolve_speed_flags(args, run.device)
    run.amp_dtype, run.channels_last = AMP_DTYPES[args.amp], args.channels_last == "on"
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp == "fp16")


def check_preprocessed(run):
    """Refuse a raw (unconverted) folder with the conversion command; warn when the slices were
    preprocessed at another size than --image_size (they would be resized again, nearest neighbour)."""
    command = PREPROCESS_COMMANDS.get(run.dataset)
    if command and not (run.root / "train_slices.list").is_file():
        raise SystemExit(f"--root_path {run.root}: no train_slices.list; convert the {run.dataset} files "
                         f"first: " + command.format(root=run.root, size=run.args.image_size))
    info = run.root / "dataset.json"
    if info.is_file():
        size = json.loads(info.read_text()).get("image_size")
        if size is not None and int(size) != run.args.image_size:
            run.logger.warning(f"{info}: slices were preprocessed at {size}x{size}, --image_size is "
                                f"{run.args.image_size}: they are resized again (nearest neighbour)")


def split_batch(run):
    """Under torchrun: set ``args.batch_size`` / ``args.labeled_bs`` to what each rank draws
    (``--batch_scope``; config.yaml keeps the flags as given) and log the step's whole batch."""
    a, world = run.args, run.world_size
    if world == 1:
        return
    a.batch_size, a.labeled_bs = per_rank_batch(a.batch_size, a.labeled_bs, world, a.batch_scope)
    run.logger.info(f"--batch_scope {a.batch_scope}: each of the {world} ranks draws {a.batch_size} slices "
                     f"({a.labeled_bs} labeled) per step, {world * a.batch_size} in all, at --base_lr {a.base_lr}"
                     + (" (not scaled with the ranks; docs/gpu.md)" if a.batch_scope == "rank" else ""))


def build_train_data(run):
    a = run.args
    table = None if run.synthetic else LABEL_TABLES[run.dataset]
    n_slices = len(read_list(run.root, "train_slices.list"))
    requested = a.data_cache
    a.data_cache, why = resolve_data_cache(requested, n_slices, a.image_size, run.device, a.aug_device,
                                           distributed.local_world_size())
    run.logger.info(f"--data_cache {requested}: {a.data_cache} ({why})")
    if run.dataset == "CUSTOM":  # converted data: unlabeled cases have no label on disk
        data = ConvertedTrainData(run.root, a.labelnum, a.image_size, a.num_classes, a.data_cache)
    else:
        data = TrainData(run.root, a.labelnum, a.image_size, a.num_classes, table, a.data_cache)
    if data.absent_in_labeled:
        run.logger.warning(f"WARNING: class(es) {data.absent_in_labeled} occur in none of the "
                            f"{len(data.labeled)} labeled slices (--labelnum {a.labelnum}): the supervised "
                            f"losses never see them")
    return data


def start_writing(run, removed):
    """Delete what --overwrite replaces, write config.yaml, open log.txt, seed the run."""
    args, main = run.args, run.rank == 0
    if main and removed:
        remove_outputs(run.save_dir, removed)
    distributed.barrier()
    stale = remove_stale_temporaries(run.save_dir) if main else []
    if main:
        try:
            save_config_dict(run.config, run.save_dir)
            open_log_file(run.logger, run.save_dir)
        except OSError as err:
            raise SystemExit(f"--save_dir {run.save_dir}: cannot write config.yaml ({os_cause(err)})") from None
    if removed:
        run.logger.info(f"--overwrite: removed {', '.join(removed)} from {run.save_dir}")
    if stale:
        run.logger.warning(f"removed temporary files of an interrupted checkpoint write in {run.save_dir}: "
                            f"{', '.join(stale)}")
    seed_everything(run.seed(args.seed))
    run.backend_flags = backend_flags(args.deterministic, args.amp, run.device)
    apply_backend_flags(run.backend_flags)
    # what predict.py needs (classes, preprocessing, network): in every checkpoint, not in config.yaml
    run.config["model_card"] = model_card(run.dataset if not run.synthetic else "ACDC", run.root,
                                           args.num_classes, args.image_size)
    run.logger.info(f"save_dir: {run.save_dir}" + (f" ({run.world_size} ranks)" if run.world_size > 1 else ""))
    run.logger.info(f"device {run.device}, --amp {args.amp}, --channels_last {args.channels_last}, --lcc {args.lcc}"
                     + (f" ({speed.cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                        f"oneDNN cap {speed.onednn_isa_cap() or 'none'}, torch threads {torch.get_num_threads()}: "
                        "runs with other kernels or another thread count may differ numerically, "
                        "docs/protocol.md#same-seed-same-run)"
                        if run.device.type == "cpu" else ""))
