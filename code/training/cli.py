"""The command line of the SSCD trainers: one ``main`` shared by train_ACDC_SSCD.py and
train_PROMISE12_SSCD.py (they differ only by the dataset's class count and defaults)."""
from training.config import base_parser, parse_args
from training.run import Run
from training.sscd_train import PRESETS, add_sscd_args, check_sscd_args, final_val_metrics, run_outputs, train_sscd

# dataset -> (number of classes, default --labelnum)
DATASETS = {"ACDC": (4, 7), "PROMISE12": (2, 7)}


def sscd_parser(dataset, description, defaults=None):
    """The flags of an SSCD trainer for ``dataset`` (docs/flags.md is generated from this parser).
    ``defaults``: (number of classes, default --labelnum) of a dataset not in ``DATASETS`` (a
    converted folder: read from its dataset.json)."""
    num_classes, labelnum = defaults or DATASETS[dataset]
    parser = add_sscd_args(base_parser(description, dataset, num_classes=num_classes, labelnum=labelnum))
    parser.set_defaults(exp=f"{dataset}_SSCD", max_iterations=None)
    budget = next(a for a in parser._actions if a.dest == "max_iterations")
    budget.help = ("self-training iterations, split over the curriculum stages (replaces --stage_iterations; "
                   "labeled-only trains --pre_iterations + this); default: --stage_iterations per stage")
    return parser


def train_main(dataset, description, argv=None, parser=None):
    """Parse the flags (preset < --config < command line), run pre-training and every stage, and
    return the final checkpoint's path (also logged). ``parser``: default ``sscd_parser(dataset, description)``."""
    parser = parser or sscd_parser(dataset, description)
    args = parse_args(parser, argv, PRESETS)
    stages = check_sscd_args(parser, args)
    with Run(args, dataset, run_outputs(args, len(stages))) as run:
        final = train_sscd(run, stages)
        if run.rank == 0:
            score, per_class = final_val_metrics(final, args.num_classes)
            classes = ", ".join(f"class {k + 1} {d:.4f}" for k, d in enumerate(per_class))
            run.logger.info(f"final model: {final} (val Dice {score:.4f}: {classes})")
    return final
