"""The test-script pipeline shared by test_ACDC.py and test_PROMISE12.py.

Loads a checkpoint (any device it was saved on), predicts every volume of ``--split``,
optionally keeps the largest 3-D connected component per class (``--lcc``), computes Dice,
Jaccard, HD95 and ASD per class with medpy (voxels; mm as well when the volumes carry a
spacing), prints a table and writes ``summary.json``, ``cases.csv`` and one ``.nii.gz``
prediction per case into ``--out``.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common.checkpoint import load_checkpoint, load_model_state
from common.geometry import load_volume_meta, write_label_image
from dataloaders.dataset import load_volumes
from evaluation.inference import evaluate_predictions, predict_volume, present_classes
from evaluation.metrics import METRIC_NAMES, summarize
from evaluation.model_card import data_source
from networks.unet import build_model


def test_parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a best.pth/last.pth written by a trainer")
    p.add_argument("--root_path", default=None, help="data root (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="select models on val, report once on test")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--lcc", action="store_true", help="keep only the largest 3-D connected component per class")
    p.add_argument("--workers", type=int, default=2, help="processes computing the metrics (0: in this process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_predictions", action="store_true", help="do not write .nii.gz predictions")
    p.add_argument("--channels_last", choices=["on", "off"], default="on",
                   help="memory format of the network: on = NHWC, as the trainers' validation and predict.py "
                        "(faster on CPUs and GPUs); off = the contiguous NCHW of releases before issue 26 "
                        "(a few voxels of near-tied logits may differ)")
    return p


def largest_component_3d(volume, num_classes):
    """Keep, for each foreground class, only its largest 26-connected component in the volume."""
    out = np.zeros_like(volume)
    for c in range(1, num_classes):
        labels, n = ndimage.label(volume == c, structure=np.ones((3, 3, 3)))
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            out[labels == 1 + int(np.argmax(sizes))] = c
    return out


def load_trained_model(path, device):
    """(model in eval mode, checkpoint state) from a trainer's checkpoint."""
    state = load_checkpoint(path, map_location="cpu")
    model = build_model(int(state["num_classes"]))
    load_model_state(model, state["model"], path)
    return model.to(device).eval(), state


def _table(summary, classes):
    head = f"{'class':<10}" + "".join(f"{m:>10}" for m in METRIC_NAMES)
    rows = [head]
    for i, name in enumerate(classes):
        rows.append(f"{name:<10}" + "".join(f"{summary[m]['per_class'][i]:>10.4f}" for m in METRIC_NAMES))
    rows.append(f"{'mean':<10}" + "".join(f"{summary[m]['mean']:>10.4f}" for m in METRIC_NAMES))
    return "\n".join(rows)


def _check_split_not_empty(root, split):
    """SystemExit with the reason when ``root/<split>.list`` exists but names no case (e.g. the
    preprocessing found the test cases withheld: dataset.json ``withheld_test_cases``)."""
    path = Path(root) / f"{split}.list"
    if not path.is_file() or path.read_text().split():
        return
    info = Path(root) / "dataset.json"
    recorded = json.loads(info.read_text()) if info.is_file() else {}
    withheld = recorded.get("withheld_test_cases", [])
    reason = (f"the source folder withholds its {split} cases ({' '.join(withheld)}: listed, no files), "
              f"so the preprocessing wrote none" if withheld else "no case to evaluate")
    remedy = (f"convert again naming labeled {split} cases (convert_dataset.py --{split}_cases or --splits)"
              if "preprocessing" in recorded and "split_source" in recorded
              else f"preprocess a data folder that has the {split} cases' images and segmentations")
    raise SystemExit(f"--split {split}: {path} is empty: {reason}. Evaluate on --split val, or {remedy}.")


def _check_not_trained_on(checkpoint, card, root, split):
    """ValueError when a case of ``root/<split>.list`` is one the checkpoint's model card lists among
    its training cases, for a root of the same source (e.g. a data set converted again with other
    splits)."""
    if card.get("training_source") is None or card["training_source"] != data_source(root):
        return  # another data set: equal names are other cases
    trained = set(card.get("training_cases") or ())
    path = Path(root) / f"{split}.list"
    seen = sorted(trained & set(path.read_text().split())) if path.is_file() else []
    if seen:
        raise ValueError(f"--split {split}: {', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''} of {path} "
                         f"{'is a case' if len(seen) == 1 else 'are cases'} {checkpoint} trained on (its model card "
                         f"lists its training cases); scoring {'it' if len(seen) == 1 else 'them'} would leak: "
                         f"evaluate on cases it never saw")


def run_test(args, class_names, describe_data=None):
    """Evaluate ``args.checkpoint`` on ``args.split``; returns the summary dict (also written).

    ``describe_data(root)`` optionally names the data set the results belong to: printed and
    stored as ``summary["data"]``.
    """
    device = torch.device(args.device)
    model, state = load_trained_model(args.checkpoint, device)
    if getattr(args, "channels_last", "on") == "on":
        model = model.to(memory_format=torch.channels_last)
    config = state.get("config", {})
    num_classes = int(state["num_classes"])
    if len(class_names) != num_classes - 1:
        raise SystemExit(f"{args.checkpoint}: a {num_classes}-class model, expected {len(class_names) + 1} classes")
    root = args.root_path or config.get("root_path")
    if not root:
        raise SystemExit("--root_path is required: the checkpoint does not record its data root")
    image_size = int(config.get("image_size", 256))
    out = Path(args.out or Path(args.checkpoint).parent / f"eval_{args.split}")
    _check_split_not_empty(root, args.split)
    _check_not_trained_on(args.checkpoint, config.get("model_card") or {}, root, args.split)
    volumes = load_volumes(root, args.split, num_classes)
    present = present_classes(volumes, num_classes)
    absent = [name for k, name in enumerate(class_names, start=1) if k not in present]
    if absent:
        print(f"WARNING: {', '.join(absent)} occur(s) in no {args.split} volume: such a class scores Dice 1 "
              f"when never predicted and raises the mean (summary.json 'absent_classes')")
    preds = []
    for v in volumes:
        pred = predict_volume(model, v["image"], image_size, device)
        preds.append(largest_component_3d(pred, num_classes) if args.lcc else pred)
    results = evaluate_predictions(preds, volumes, num_classes, args.workers)
    summary = summarize([r[0] for r in results])
    has_mm = all(r[1] is not None for r in results)
    if has_mm:
        mm = summarize([r[1] for r in results])
        summary["hd95_mm"], summary["asd_mm"] = mm["hd95"], mm["asd"]
    summary.update({"split": args.split, "cases": len(volumes), "checkpoint": str(args.checkpoint),
                    "lcc": bool(args.lcc), "image_size": image_size, "classes": list(class_names),
                    "absent_classes": absent,
                    "distance_units": "voxels" + (" (mm in *_mm)" if has_mm else "")})
    data_name = describe_data(root) if describe_data else None
    if data_name:
        summary["data"] = data_name
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_predictions:  # first: a volume whose stored geometry is wrong stops before any summary
        pred_dir = out / "predictions"
        pred_dir.mkdir(exist_ok=True)
        for v, pred in zip(volumes, preds):
            source = Path(root) / "data" / f"{v['case']}.h5"
            try:
                write_label_image(pred, load_volume_meta(source), pred_dir / f"{v['case']}_pred.nii.gz")
            except ValueError as err:
                raise ValueError(f"{source}: its stored geometry does not fit its volume ({err})") from None
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        cols = [f"{m}_{c}" for c in class_names for m in METRIC_NAMES]
        mm_cols = [f"{m}_mm_{c}" for c in class_names for m in ("hd95", "asd")] if has_mm else []
        writer.writerow(["case"] + cols + mm_cols + ["mean_dice"])
        for v, (vox, mmv) in zip(volumes, results):
            row = [v["case"]] + [f"{cls[m]:.6f}" for cls in vox for m in METRIC_NAMES]
            if has_mm:
                row += [f"{cls[m]:.6f}" for cls in mmv for m in ("hd95", "asd")]
            writer.writerow(row + [f"{np.mean([cls['dice'] for cls in vox]):.6f}"])
    if data_name:
        print(f"data: {data_name}")
    print(f"{args.split}: {len(volumes)} cases, checkpoint {args.checkpoint}"
          f" (distances in voxels{'; mm in summary.json' if has_mm else ''})")
    print(_table(summary, class_names))
    print(f"wrote {out / 'summary.json'}, {out / 'cases.csv'}")
    return summary
