"""Train on your own data set converted by code/dataloaders/convert_dataset.py: any --method, classes from dataset.json.

    python code/dataloaders/convert_dataset.py --input Dataset042_Prostate --out data/Prostate42 --image_size 256
    python code/train_custom.py --root_path data/Prostate42 [--method sscd|bcp|abd|labeled_only] [--labelnum K]

--labelnum counts cases: the labeled set is every slice of the first --labelnum cases of train.list
(default: all of them). The unlabeled pool is every other training slice, including every slice of the
cases in unlabeled.list, which have no label on disk. The class count comes from dataset.json
(--num_classes is not a flag here). Every flag of the ACDC/PROMISE12 trainers applies.
"""
import argparse
import sys
from pathlib import Path

import yaml

from common.errors import run_cli
from dataloaders.converted import read_dataset_info
from dataloaders.dataset import read_list
from training.cli import sscd_parser, train_main


def dataset_defaults(argv):
    """(number of classes, number of labeled training cases) of the --root_path in ``argv`` (or in its
    ``--config`` YAML). A --num_classes on the command line is refused; one in the YAML (a saved
    config.yaml) only when it differs from dataset.json's."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--root_path", "--num_classes", "--config"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    words = sys.argv[1:] if argv is None else argv
    if "-h" in words or "--help" in words:
        return None, None  # the help text needs no data set
    if known.num_classes is not None:
        raise SystemExit(f"--num_classes {known.num_classes}: the class count comes from --root_path's dataset.json")
    values = {}
    if known.config and Path(known.config).is_file():  # an unreadable --config is reported by parse_args
        try:
            values = yaml.safe_load(Path(known.config).read_text()) or {}
        except yaml.YAMLError:
            values = {}
    values = values if isinstance(values, dict) else {}
    root = known.root_path or values.get("root_path")
    if not root:
        raise SystemExit("--root_path is required: a folder written by code/dataloaders/convert_dataset.py")
    info = read_dataset_info(root)
    if values.get("num_classes") not in (None, info["num_classes"]):
        raise SystemExit(f"--config {known.config}: num_classes {values['num_classes']}, but {root}/dataset.json "
                         f"has {info['num_classes']} classes")
    return int(info["num_classes"]), len(read_list(root, "train.list"))


def build_parser(num_classes=None, labelnum=None):
    """The trainer's flags, --num_classes and --labelnum defaulting to the data set's (``dataset_defaults``;
    None: unknown, as in --help and docs/flags.md)."""
    parser = sscd_parser("CUSTOM", __doc__.splitlines()[0], defaults=(num_classes, labelnum))
    helps = {"root_path": "a folder written by code/dataloaders/convert_dataset.py (required)",
             "num_classes": "not a flag here: the class count of --root_path's dataset.json",
             "labelnum": "labeled cases, the first of train.list (default: all of them)"}
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
    return parser


def main(argv=None):
    return train_main("CUSTOM", __doc__.splitlines()[0], argv, parser=build_parser(*dataset_defaults(argv)))


if __name__ == "__main__":
    run_cli(main)
