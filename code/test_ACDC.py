"""Evaluate an ACDC checkpoint: Dice, Jaccard, HD95, ASD per class (RV, Myo, LV) and mean.

    python code/test_ACDC.py --checkpoint model/ACDC_SSCD_7_labeled/best.pth --split test
"""
from common.errors import run_cli
from evaluation.testing import run_test, test_parser

CLASSES = ("RV", "Myo", "LV")


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    return test_parser(__doc__.splitlines()[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_test(args, CLASSES)


if __name__ == "__main__":
    run_cli(main)
