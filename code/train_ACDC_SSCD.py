"""SSCD on ACDC: pre-training with the SDA, then the curriculum stages (HCA, Decouple, CGSR).

    python code/train_ACDC_SSCD.py --root_path data/ACDC --labelnum 7
"""
from common.errors import run_cli
from training.cli import sscd_parser, train_main


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    return sscd_parser("ACDC", __doc__.splitlines()[0])


def main(argv=None):
    return train_main("ACDC", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    run_cli(main)
