"""Labeled-only baseline on ACDC: the "U-Net (labeled only)" row of every results table.

    python code/train_ACDC_supervised.py --root_path data/ACDC --labelnum 7
"""
from common.errors import run_cli
from training.config import base_parser, parse_args
from training.run import Run, train_supervised


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    parser = base_parser(__doc__.splitlines()[0], "ACDC", num_classes=4, labelnum=7)
    parser.set_defaults(exp="ACDC_supervised")
    return parser


def main(argv=None):
    parser = build_parser()
    with Run(parse_args(parser, argv), "ACDC") as run:
        train_supervised(run)


if __name__ == "__main__":
    run_cli(main)
