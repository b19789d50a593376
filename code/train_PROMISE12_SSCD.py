"""SSCD on prostate MRI in the PROMISE12 layout (2 classes): pre-training with the SDA, then the curriculum stages.

    python code/dataloaders/preprocess_promise12.py --raw <PROMISE12-layout folder> --out data/PROMISE12 --image_size 256
    python code/train_PROMISE12_SSCD.py --root_path data/PROMISE12 --labelnum 7

--labelnum counts cases: the labeled set is every slice of the first --labelnum cases of train.list.
"""
from utils.config import base_parser, parse_args
from utils.run import Run
from utils.sscd_train import PRESETS, add_sscd_args, check_sscd_args, train_sscd


def main(argv=None):
    parser = add_sscd_args(base_parser(__doc__.splitlines()[0], "PROMISE12", num_classes=2, labelnum=7))
    parser.set_defaults(exp="PROMISE12_SSCD", max_iterations=None)
    args = parse_args(parser, argv, PRESETS)
    stages = check_sscd_args(parser, args)
    run = Run(args, "PROMISE12")
    try:
        final = train_sscd(run, stages)
        run.logger.info(f"final model: {final}")
    finally:
        run.close()
    return final


if __name__ == "__main__":
    main()
