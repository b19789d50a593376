"""CPU-scale comparison on real ACDC: methods x labeled counts x seeds with one budget, via run_table.

Every method gets the same flags (128², batch 8 = 4 labeled + 4 unlabeled; the labeled-only baseline
trains on the 4 labeled slices), the same total iterations (``--pre_iterations`` + ``--max_iterations``
self-training, split over each method's stages; the baseline gets the sum), validation every
``--val_interval`` iterations and at each stage's start, and a fresh run folder. Runs go through
``experiments/run_table.py`` (the same code path as the full table), ``--jobs`` of them at once with one thread
each; the table is resumable (evaluated runs are skipped, unfinished ones resumed). It prints the
per-method mean ± std over seeds and ends with one JSON line ``{"<method>_<labelnum>": {"mean", "std",
"seeds"}, ...}`` (val Dice). ``results.md``, ``results.csv``, ``learning_curves.png`` and ``learning_curves_mean.png``
are in ``--out``.

    python experiments/compare_acdc.py --root_path ../shared/data/ACDC --out /tmp/compare_acdc
    python experiments/compare_acdc.py --root_path ../shared/data/ACDC --out /tmp/table --labelnums 3 7 \\
        --seeds 1 2 3 --methods labeled_only bcp abd sscd
"""
import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import launch  # noqa: E402
import run_table  # noqa: E402


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root_path", required=True, help="processed ACDC root")
    p.add_argument("--out", default="runs/compare_acdc", help="table folder (runs/, results.md, ...)")
    p.add_argument("--methods", nargs="+", default=["labeled_only", "sscd"])
    p.add_argument("--labelnums", nargs="+", default=["7"])
    p.add_argument("--seeds", nargs="+", default=["1337"])
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--pre_iterations", type=int, default=600)
    p.add_argument("--max_iterations", type=int, default=600, help="self-training iterations (split over stages)")
    p.add_argument("--val_interval", type=int, default=40)
    p.add_argument("--base_lr", type=float, default=0.05,
                   help="the same for all; higher than the 30k-iteration default 0.01 because the CPU budget is short")
    p.add_argument("--device", default="cpu")
    launch.add_launcher_args(p).set_defaults(jobs=2)
    return p


def main(argv=None, runner=None):
    """The comparison; ``runner`` replaces run_table's subprocess runner (tests)."""
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    flags = ["--image_size", str(args.image_size), "--batch_size", "8", "--labeled_bs", "4",
             "--pre_iterations", str(args.pre_iterations), "--max_iterations", str(args.max_iterations),
             "--val_interval", str(args.val_interval), "--log_interval", "50", "--base_lr", str(args.base_lr),
             *extra]
    table = ["--dataset", "ACDC", "--root_path", args.root_path, "--out", args.out, "--device", args.device,
             "--methods", *args.methods, "--labelnums", *args.labelnums, "--seeds", *args.seeds, "--split", "val",
             *launch.forwarded(args), "--no_published", "--", *flags]
    status = run_table.main(table, runner=runner)
    summary = {}
    with open(Path(args.out) / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("kind", "ours") != "ours" or not row.get("dice_pct_mean"):
                continue
            summary[f"{row['method']}_{row['labelnum']}"] = {
                "mean": round(float(row["dice_pct_mean"]) / 100, 4),
                "std": round(float(row["dice_pct_std"]) / 100, 4) if row.get("dice_pct_std") not in ("", "nan") else None,
                "seeds": row.get("seeds")}
    total = args.pre_iterations + args.max_iterations
    print(f"\nACDC val.list, {args.image_size}^2, {total} iterations per run, val every {args.val_interval}")
    for key, value in summary.items():
        std = f" ± {value['std']:.4f}" if value["std"] is not None else ""
        print(f"{key:<20} {value['mean']:.4f}{std}  (seeds {value['seeds']})")
    print(json.dumps({**summary, "iterations": total, "image_size": args.image_size, "split": "val",
                      "base_lr": args.base_lr, "val_interval": args.val_interval}))
    return status


if __name__ == "__main__":
    sys.exit(main())
