"""SSCD on ACDC: pre-training with the SDA, then the curriculum stages (HCA, Decouple, CGSR).

    python code/train_ACDC_SSCD.py --root_path data/ACDC --labelnum 7
"""
from utils.cli import train_main
from utils.errors import run_cli


def main(argv=None):
    return train_main("ACDC", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    run_cli(main)
