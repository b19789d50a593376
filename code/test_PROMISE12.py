"""Evaluate a prostate (PROMISE12-layout) checkpoint: Dice, Jaccard, HD95, ASD of the gland per case and mean.

    python code/test_PROMISE12.py --checkpoint model/PROMISE12_SSCD_7_labeled/best.pth --split val

Distances in voxels of the preprocessed grid and in mm (summary.json, cases.csv); predictions are
written as .nii.gz in the original geometry of each case (size, spacing, origin, direction).
Results carry the name of the data they were computed on (--data_name, default: the layout and the
source folder recorded in dataset.json): name them after the source data set, e.g.
"NCI-ISBI 2013 prostate (PROMISE12 layout)", never "PROMISE12" unless it is the challenge data.
"""
import json
from pathlib import Path

from common.errors import run_cli
from evaluation.testing import run_test, test_parser

CLASSES = ("gland",)


def describe(root, name=None):
    """The data name the results are reported under: ``name``, else layout + recorded source folder."""
    if name:
        return name
    info = Path(root) / "dataset.json"
    source = json.loads(info.read_text()).get("source") if info.is_file() else None
    return f"prostate MRI in the PROMISE12 layout, preprocessed from {source or Path(root).resolve()}"


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    parser = test_parser(__doc__.splitlines()[0])
    parser.add_argument("--data_name", default=None,
                        help="name of the data set the results are reported under "
                             "(e.g. 'NCI-ISBI 2013 prostate (PROMISE12 layout)')")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_test(args, CLASSES, describe_data=lambda root: describe(root, args.data_name))


if __name__ == "__main__":
    run_cli(main)
