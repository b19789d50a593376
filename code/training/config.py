"""Command-line flags shared by every trainer, an optional YAML config, and run folders.

Precedence: built-in defaults < ``--config file.yaml`` < flags given on the command line.
The resolved configuration is saved as ``config.yaml`` beside the checkpoints.
"""
import argparse
import math
import os
from pathlib import Path

import yaml


def base_parser(description, dataset, num_classes, labelnum):
    """A parser with the flags every trainer shares (names as in SSL4MIS/BCP/ABD/SSCD)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values (command-line flags override it)")
    p.add_argument("--root_path", default=None,
                   help=f"{dataset} data root; when omitted a small synthetic data set in the same layout is "
                        f"generated under data/ and used")
    p.add_argument("--exp", default=f"{dataset}_run", help="experiment name (part of the default --save_dir)")
    p.add_argument("--save_dir", default=None, help="output folder (default model/<exp>_<labelnum>_labeled)")
    p.add_argument("--labelnum", type=int, default=labelnum, help="labeled patients/cases")
    p.add_argument("--num_classes", type=int, default=num_classes)
    p.add_argument("--image_size", type=int, default=256, help="network input size (slices are resized to it)")
    p.add_argument("--max_iterations", type=int, default=30000, help="training iterations")
    p.add_argument("--batch_size", type=int, default=24, help="labeled + unlabeled slices per iteration")
    p.add_argument("--labeled_bs", type=int, default=12, help="labeled slices per iteration")
    p.add_argument("--base_lr", type=float, default=0.01, help="SGD learning rate (constant, as the reference)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val_interval", type=int, default=200, help="validate on val.list every N iterations")
    p.add_argument("--log_interval", type=int, default=20, help="log scalars (and check the loss) every N iterations")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --save_dir from its last.pth (the run's settings must not change)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --save_dir (without it, and without --resume, a folder "
                        "that holds a run is refused)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--aug_device", choices=["device", "loader"], default="device",
                   help="augment batched on --device, or per sample in DataLoader workers")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers: they augment (--aug_device loader) or read the batches ahead from disk "
                        "(--data_cache disk); 0: in the training process. Default: 0 on a CPU --device with "
                        "--aug_device device, where workers would take cores from the step (bench/README.md), else 2")
    p.add_argument("--data_cache", choices=["auto", "memory", "disk"], default="auto",
                   help="memory: every training slice is read at start-up and kept (in GPU memory with --aug_device "
                        "device); disk: slices are read when a batch needs them, so memory and start-up do not grow "
                        "with the pool; auto: memory where the pool fits (docs/own_data.md#large-unlabeled-pools)")
    p.add_argument("--deterministic", type=int, default=None, choices=[0, 1],
                   help="1: cuDNN deterministic algorithms, no autotuning (and torch's deterministic algorithms on "
                        "CUDA; CUDA training is still not bit-identical: docs/gpu.md); default: 0 on CUDA, 1 on the "
                        "CPU (where runs are bit-identical either way)")
    p.add_argument("--batch_scope", choices=["global", "rank"], default="global",
                   help="under torchrun with N ranks: global: --batch_size and --labeled_bs are the whole step's "
                        "batch, each rank draws 1/N of it (the one-GPU recipe, same --base_lr); rank: each rank "
                        "draws --batch_size, an N times larger step at an unscaled --base_lr (docs/gpu.md)")
    g = p.add_argument_group("speed and scale (bench/README.md)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision of the network forwards (losses in float32); auto: bf16 on CUDA and on "
                        "CPUs with native bf16 (AVX512-BF16, AMX), off (fp32) on other CPUs, where bf16 is emulated "
                        "and ~10x slower; fp16 adds a gradient scaler")
    g.add_argument("--channels_last", choices=["auto", "on", "off"], default="auto",
                   help="NHWC memory format for the networks and their inputs; auto: on (faster on CUDA "
                        "and, measured, on the CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network forwards (falls back to eager with a warning if it fails)")
    g.add_argument("--lcc", choices=["auto", "device", "scipy"], default="auto",
                   help="largest-component filter of the pseudo-labels: on the training device or with "
                        "scipy on the CPU (equal results); auto: device on CUDA, scipy on the CPU (faster there)")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun: SyncBatchNorm in the students (batch statistics over all ranks; CUDA only)")
    return p


def _cuda():
    import torch
    return torch.cuda.is_available()


def parse_args(parser, argv=None, presets=None):
    """Parse flags: built-in defaults < the ``--method`` preset < ``--config`` YAML < command line.

    ``presets`` maps a ``--method`` value to the flag defaults it sets; a preset only sets
    flags, so every value stays overridable and the saved config shows the resolved values.
    """
    values = {}
    # the preset and YAML values are this parse's defaults only: a parser used again starts clean
    saved = [a.default for a in parser._actions], dict(parser._defaults)
    try:
        pre, _ = parser.parse_known_args(argv)
        if pre.config:
            values = load_config_file(parser, pre.config)
            parser.set_defaults(**values)
        if presets is not None:
            method = parser.parse_known_args(argv)[0].method
            parser.set_defaults(**presets[method])
            parser.set_defaults(**values)
        args = parser.parse_args(argv)
    finally:
        for action, default in zip(parser._actions, saved[0]):
            action.default = default
        parser._defaults.clear()
        parser._defaults.update(saved[1])
    for action in parser._actions:  # argparse does not check defaults (YAML values) against choices
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(f"--{action.dest} {value!r}: expected one of {list(action.choices)}")
    for flag in POSITIVE_FLAGS:
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            parser.error(f"--{flag} {value}: expected a positive number")
    if not math.isfinite(args.base_lr):
        parser.error(f"--base_lr {args.base_lr}: expected a finite learning rate")
    if args.num_classes < 2:
        parser.error(f"--num_classes {args.num_classes}: expected at least 2 (background and one structure)")
    if args.num_workers is None:
        args.num_workers = default_workers(args.device, args.aug_device)
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: expected 0 or more")
    if not 0 < args.labeled_bs <= args.batch_size:
        parser.error(f"--labeled_bs {args.labeled_bs} must be in 1..--batch_size ({args.batch_size})")
    if args.image_size % 16:
        parser.error(f"--image_size {args.image_size} must be divisible by 16")
    if args.sync_bn and not str(args.device).startswith("cuda"):
        parser.error(f"--sync_bn: SyncBatchNorm needs CUDA devices, got --device {args.device}")
    try:
        per_rank_batch(args.batch_size, args.labeled_bs, launcher_world_size(), args.batch_scope)
    except ValueError as err:
        parser.error(str(err))
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --save_dir, --overwrite replaces it: give one of them")
    return args


def default_workers(device, aug_device):
    """``--num_workers`` when not given: 0 where the only work of the workers would be reading batches
    ahead and the step itself runs on the CPU's cores (a worker competes with it: +8 % per ACDC step
    on 2 cores against +2 % in the training process, bench/README.md), 2 otherwise."""
    return 0 if str(device).startswith("cpu") and aug_device == "device" else 2


def launcher_world_size():
    """The number of ranks torchrun starts (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_rank_batch(batch_size, labeled_bs, world, scope):
    """``(batch_size, labeled_bs)`` that each of ``world`` ranks draws per step: the flags themselves
    with ``scope`` 'rank' (the step's batch is ``world`` times larger), the flags divided by
    ``world`` with 'global' (ValueError naming the flags when they do not divide)."""
    if scope == "rank" or world == 1:
        return batch_size, labeled_bs
    if batch_size % world or labeled_bs % world:
        raise ValueError(f"--batch_scope global: --batch_size {batch_size} and --labeled_bs {labeled_bs} must be "
                         f"divisible by the {world} ranks (or give --batch_scope rank: {batch_size} per rank)")
    return batch_size // world, labeled_bs // world


# what a run's config.yaml holds besides flags (derived or recorded): ignored when it is given as --config
DERIVED_KEYS = frozenset({"total_iterations", "world_size", "data_fingerprint", "model_card"})
# flags that must be > 0 (budgets, sizes, rates); checked before anything is built or written
POSITIVE_FLAGS = ("image_size", "batch_size", "labeled_bs", "labelnum", "max_iterations", "val_interval",
                  "log_interval", "base_lr")


def _type_name(action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "true or false"
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


def _yaml_value(action, value):
    """``value`` from a YAML file converted to what the command line would give for ``action``,
    or None if it has the wrong type (a bool for a number, a float for an integer, a list, ...)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return value if isinstance(value, bool) else None
    if action.nargs not in (None, "?") or isinstance(value, (bool, list, dict)):
        return None
    if action.type is int:
        return value if isinstance(value, int) else None
    if action.type is float:
        return float(value) if isinstance(value, (int, float)) else None
    if action.type in (None, str):
        return value if isinstance(value, str) else None
    return None


def load_config_file(parser, path):
    """The flag values of a YAML ``--config`` file, each checked against its flag's type (and, later
    in ``parse_args``, its choices); ``parser.error`` naming the file and the key otherwise.
    ``null`` is accepted for flags whose default is None."""
    path = Path(path)
    if not path.is_file():
        parser.error(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        parser.error(f"--config {path}:{where}: not valid YAML ({problem})")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--config {path}: cannot be read ({err})")
    values = values or {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    values = {k: v for k, v in values.items() if k not in DERIVED_KEYS}  # a run's saved config.yaml
    stages = values.get("stage_iterations")
    if isinstance(stages, list) and stages:  # a saved config.yaml holds the per-stage list it resolved
        if values.get("max_iterations") is not None:
            del values["stage_iterations"]  # derived from --max_iterations
        elif len(set(stages)) == 1:
            values["stage_iterations"] = stages[0]
    unknown = sorted(str(k) for k in set(values) - set(actions))
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    checked = {}
    for key, value in values.items():
        action = actions[key]
        if value is None and action.default is None:
            checked[key] = None
            continue
        converted = _yaml_value(action, value)
        if converted is None:
            parser.error(f"--config {path}: key '{key}': expected {_type_name(action)}, got {value!r} "
                         f"({type(value).__name__})")
        checked[key] = converted
    return checked


def resolve_save_dir(args):
    """``--save_dir`` or ``model/<exp>_<labelnum>_labeled``."""
    return Path(args.save_dir or os.path.join("model", f"{args.exp}_{args.labelnum}_labeled"))


def save_config_dict(config, folder):
    """Write a run's resolved flags (and recorded facts) to ``folder/config.yaml``, atomically."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = Path(folder) / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "model_card"}, sort_keys=True))
    os.replace(tmp, Path(folder) / "config.yaml")
    return config


def save_config(args, folder):
    """Write the resolved flags to ``folder/config.yaml`` and return them as a dict."""
    return save_config_dict(dict(vars(args)), folder)
