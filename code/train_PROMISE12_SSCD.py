"""SSCD on prostate MRI in the PROMISE12 layout (2 classes): pre-training with the SDA, then the curriculum stages.

    python code/dataloaders/preprocess_promise12.py --raw <PROMISE12-layout folder> --out data/PROMISE12 --image_size 256
    python code/train_PROMISE12_SSCD.py --root_path data/PROMISE12 --labelnum 7

--labelnum counts cases: the labeled set is every slice of the first --labelnum cases of train.list.
"""
from common.errors import run_cli
from training.cli import sscd_parser, train_main


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    return sscd_parser("PROMISE12", __doc__.splitlines()[0])


def main(argv=None):
    return train_main("PROMISE12", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    run_cli(main)
