"""SSCD on ACDC: pre-training with the SDA, then the curriculum stages (HCA, Decouple, CGSR).

    python code/train_ACDC_SSCD.py --root_path data/ACDC --labelnum 7
"""
from utils.config import base_parser, parse_args
from utils.run import Run
from utils.sscd_train import PRESETS, add_sscd_args, check_sscd_args, train_sscd


def main(argv=None):
    parser = add_sscd_args(base_parser(__doc__.splitlines()[0], "ACDC", num_classes=4, labelnum=7))
    parser.set_defaults(exp="ACDC_SSCD", max_iterations=None)
    args = parse_args(parser, argv, PRESETS)
    stages = check_sscd_args(parser, args)
    run = Run(args, "ACDC")
    try:
        final = train_sscd(run, stages)
        run.logger.info(f"final model: {final}")
    finally:
        run.close()
    return final


if __name__ == "__main__":
    main()
