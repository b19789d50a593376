"""Write the shared prostate cases (PROMISE12 layout) as an nnU-Net v2 raw data set, with the labels of some
training cases left out (they become truly unlabeled cases), for docs/own_data.md's comparison.

    python experiments/prostate_as_nnunet.py --raw /path/to/prostate --out /tmp/Dataset001_Prostate --unlabeled 12

The first --unlabeled cases of train.list (in a --seed permutation) get no labelsTr file; val.list cases keep
theirs and are named in splits.json (pass it to convert_dataset.py --splits). Images are written losslessly
as .nii.gz (original intensities, spacing, origin, direction).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from common.errors import run_cli  # noqa: E402
from dataloaders.image_check import read_image  # noqa: E402


def read_list(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_dataset(raw, out, n_unlabeled, seed=0, cases=None):
    """Write ``out`` (imagesTr, labelsTr, dataset.json, splits.json); returns {"labeled", "unlabeled", "val"}."""
    raw, out = Path(raw), Path(out)
    train, val = read_list(raw / "train.list"), read_list(raw / "val.list")
    if cases is not None:
        train, val = [c for c in train if c in cases], [c for c in val if c in cases]
    if not 0 <= n_unlabeled < len(train):
        raise ValueError(f"--unlabeled {n_unlabeled}: expected 0..{len(train) - 1} (train.list has {len(train)} cases)")
    order = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    unlabeled = sorted(order[:n_unlabeled])
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    for case in train + val:
        sitk.WriteImage(read_image(raw / f"{case}.mhd"), str(out / "imagesTr" / f"{case}_0000.nii.gz"), True)
        if case not in unlabeled:
            sitk.WriteImage(read_image(raw / f"{case}_segmentation.mhd"),
                            str(out / "labelsTr" / f"{case}.nii.gz"), True)
    info = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "gland": 1},
            "numTraining": len(train) + len(val) - n_unlabeled, "file_ending": ".nii.gz",
            "name": "NCI-ISBI 2013 prostate (PROMISE12 layout), some labels removed"}
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "splits.json").write_text(json.dumps({"val": val, "test": []}) + "\n")
    return {"labeled": sorted(set(train) - set(unlabeled)), "unlabeled": unlabeled, "val": val}


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", required=True, help="the prostate folder (CaseXX.mhd, train.list, val.list)")
    p.add_argument("--out", required=True, help="the nnU-Net raw folder to write")
    p.add_argument("--unlabeled", type=int, default=12, help="training cases written without their label")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out}: exists; choose a new folder")
    result = write_dataset(args.raw, args.out, args.unlabeled, args.seed)
    print(f"wrote {args.out}: {len(result['labeled'])} labeled + {len(result['unlabeled'])} unlabeled training "
          f"cases, {len(result['val'])} val (splits.json); unlabeled: {' '.join(result['unlabeled'])}")


if __name__ == "__main__":
    run_cli(main)
