"""CPU-scale comparison on real ACDC: labeled-only vs SSCD with the same budget.

Runs both trainers (7 labeled patients, 128x128, batch 8 = 4 labeled + 4 unlabeled for SSCD,
4 labeled for the baseline, the same total number of iterations), evaluates each best-on-val
checkpoint on val.list with code/test_ACDC.py, prints the two rows side by side and ends with one
JSON line ``{"labeled_only": x, "sscd": y, ...}`` (mean val Dice).

    python bench/compare_acdc.py --root_path ../shared/data/ACDC --out /tmp/compare_acdc
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_path", required=True, help="processed ACDC root")
    p.add_argument("--out", default="runs/compare_acdc", help="folder for both runs")
    p.add_argument("--labelnum", type=int, default=7)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--pre_iterations", type=int, default=600)
    p.add_argument("--stage_iterations", type=int, default=120)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--base_lr", type=float, default=0.05,
                   help="the same for both; higher than the 30k-iteration default 0.01 because the CPU budget is short")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential", action="store_true",
                   help="train one after the other with all threads (default: both at once, one thread each)")
    args, extra = p.parse_known_args(argv)
    out = Path(args.out)
    common = ["--root_path", args.root_path, "--labelnum", str(args.labelnum), "--image_size", str(args.image_size),
              "--batch_size", "8", "--labeled_bs", "4", "--pre_iterations", str(args.pre_iterations),
              "--stage_iterations", str(args.stage_iterations), "--patch_size", str(args.image_size // 8),
              "--val_interval", "100", "--log_interval", "50", "--seed", str(args.seed), "--device", args.device,
              "--base_lr", str(args.base_lr),
              "--resume", *extra]
    methods = ("labeled_only", "sscd")
    env = dict(os.environ) if args.sequential else {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    procs = []
    for method in methods:
        cmd = [sys.executable, str(REPO / "code" / "train_ACDC_SSCD.py"), "--method", method,
               "--save_dir", str(out / method), *common]
        procs.append(subprocess.Popen(cmd, env=env))
        if args.sequential and procs[-1].wait():
            raise SystemExit(f"{method} training failed")
    for method, proc in zip(methods, procs):
        if proc.wait():
            raise SystemExit(f"{method} training failed (exit {proc.returncode})")
    train_minutes = round((time.time() - t0) / 60, 1)
    results = {}
    for method in methods:
        run_dir = out / method
        subprocess.run([sys.executable, str(REPO / "code" / "test_ACDC.py"), "--checkpoint", str(run_dir / "best.pth"),
                        "--split", "val", "--out", str(run_dir / "eval_val"), "--no_predictions",
                        "--device", args.device], check=True)
        summary = json.loads((run_dir / "eval_val" / "summary.json").read_text())
        results[method] = {"dice": summary["dice"]["mean"], "dice_per_class": summary["dice"]["per_class"],
                           "hd95": summary["hd95"]["mean"], "asd": summary["asd"]["mean"]}
    total = args.pre_iterations + 5 * args.stage_iterations
    print(f"\nACDC val.list, {args.labelnum} labeled patients, {args.image_size}^2, {total} iterations each")
    print(f"{'method':<14}{'Dice':>8}{'RV':>8}{'Myo':>8}{'LV':>8}{'HD95':>8}{'ASD':>8}")
    for method, r in results.items():
        rv, myo, lv = r["dice_per_class"]
        print(f"{method:<14}{r['dice']:>8.4f}{rv:>8.4f}{myo:>8.4f}{lv:>8.4f}{r['hd95']:>8.2f}{r['asd']:>8.2f}")
    print(f"training wall time: {train_minutes} min")
    print(json.dumps({"labeled_only": results["labeled_only"]["dice"], "sscd": results["sscd"]["dice"],
                      "iterations": total, "image_size": args.image_size, "labelnum": args.labelnum,
                      "split": "val", "base_lr": args.base_lr, "train_minutes": train_minutes, "details": results}))


if __name__ == "__main__":
    main()
