"""Evaluate a checkpoint trained on a converted data set: Dice, Jaccard, HD95, ASD per class (names from its card).

    python code/test_custom.py --checkpoint model/CUSTOM_SSCD_15_labeled/best.pth --split val

Predictions are written as <case>_pred.nii.gz in the original geometry of each case (size, spacing,
origin, direction, slice axis); distances in voxels of the stored grid and in mm.
"""
from common.checkpoint import CheckpointError, load_checkpoint
from common.errors import run_cli
from dataloaders.converted import read_dataset_info
from evaluation.testing import run_test, test_parser


def class_names(path):
    """The foreground class names of a checkpoint's model card."""
    card = load_checkpoint(path).get("config", {}).get("model_card")
    if not card:
        raise CheckpointError(f"{path}: no model card (written before model cards existed); use test_ACDC.py or "
                              f"test_PROMISE12.py for it")
    return tuple(card["classes"][1:])


def check_fits(path, names, root):
    """CheckpointError unless the checkpoint's classes and preprocessing are those of the converted
    folder ``root`` (a model scores what it was trained on only on data prepared the same way)."""
    if root is None:
        return
    info = read_dataset_info(root)
    classes = info["classes"]
    if list(classes[1:]) != list(names):
        raise CheckpointError(f"{path}: a model of classes {['background', *names]}, but {root}/dataset.json has "
                              f"{classes}; expected a checkpoint trained on this data set")
    card = load_checkpoint(path).get("config", {}).get("model_card") or {}
    recipe, here = card.get("preprocessing") or {}, info.get("preprocessing") or {}
    changed = [f"{k}: {recipe.get(k)!r} in the model card, {here.get(k)!r} in {root}/dataset.json"
               for k in sorted(set(recipe) | set(here)) if recipe.get(k) != here.get(k)]
    if changed:
        raise CheckpointError(f"{path}: trained on data prepared otherwise (preprocessing {'; '.join(changed)}); "
                              f"convert the cases with the model's settings, or use predict.py on the raw images")


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    return test_parser(__doc__.splitlines()[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = class_names(args.checkpoint)
    check_fits(args.checkpoint, names, args.root_path or load_checkpoint(args.checkpoint)["config"].get("root_path"))
    return run_test(args, names)


if __name__ == "__main__":
    run_cli(main)
