"""Stage-1 ablation of the cross-term fixes: one curriculum stage from one pre-trained checkpoint,
per variant and seed, on val.list.

Each variant is the published SSCD stage (no cross-term ramp-up) plus some flags, or this code's
default stage (``cross_rampup 0.5``) without one component (``VARIANTS``); every run trains stage 1
(HCA weights 1,0,0,0) for ``--stage_iterations`` from ``--init_checkpoint``, validating at the start
and every ``--val_interval``. Runs are resumable (a started one resumes; a finished one is read back)
and are jobs of experiments/launch.py (``--launcher local``: ``--jobs`` at a time, one thread each on a
CPU; ``--launcher slurm``). The table gives, per variant, mean ± std over seeds of the
val Dice at the start, after each validation, their mean after the start, and the best; the last
line is one JSON object.

    python experiments/ablate_stage.py --root_path ../shared/data/ACDC --init_checkpoint PRE/pretrain/best.pth \\
        --out /tmp/ablation --seeds 1337 2
    python experiments/ablate_stage.py --dataset PROMISE12 --root_path P12 --init_checkpoint ... --out ... --base_lr 0.05
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
sys.path.insert(0, str(REPO / "experiments"))
import launch  # noqa: E402
from reporting.curves import read_history  # noqa: E402

VARIANTS = {
    "published": ["--cross_rampup", "0"],
    "cross_cutout exclude": ["--cross_rampup", "0", "--cross_cutout", "exclude"],
    "cross_bn frozen": ["--cross_rampup", "0", "--cross_bn", "frozen"],
    "teacher_mode train": ["--cross_rampup", "0", "--teacher_mode", "train"],
    "cross_rampup 0.5": ["--cross_rampup", "0.5"],
    "all three fixes": ["--cross_cutout", "exclude", "--cross_bn", "frozen", "--cross_rampup", "0.5"],
    # what each component of the (default) stage costs or brings
    "no centre disc": ["--center_disc_stages", "0"],
    "no CGSR": ["--displacement", "none"],
    "one student (BCP stage)": ["--students", "1", "--displacement", "none"],
}


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("ACDC", "PROMISE12"), default="ACDC",
                   help="which trainer runs the stage (code/train_<dataset>_SSCD.py)")
    p.add_argument("--root_path", required=True)
    p.add_argument("--init_checkpoint", required=True, help="the pre-trained model every run starts from")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[1337, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of {list(VARIANTS)}")
    p.add_argument("--labelnum", type=int, default=7)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--stage_iterations", type=int, default=120)
    p.add_argument("--val_interval", type=int, default=40)
    p.add_argument("--base_lr", type=float, default=0.025)
    launch.add_launcher_args(p).set_defaults(jobs=2)
    return p


def main(argv=None):
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants {unknown}: expected any of {list(VARIANTS)}")
    out = Path(args.out)
    runs = [(v, s, out / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', v).strip('_')}_s{s}") for v in args.variants
            for s in args.seeds]
    env = launch.run_env(args)
    trainer = REPO / "code" / f"train_{args.dataset}_SSCD.py"

    def job(run):
        variant, seed, folder = run
        command = [sys.executable, str(trainer), "--root_path", args.root_path,
                   "--labelnum", str(args.labelnum), "--image_size", str(args.image_size), "--batch_size", "8",
                   "--labeled_bs", "4", "--start_stage", "1", "--init_checkpoint", args.init_checkpoint,
                   "--hca_weights", "1,0,0,0", "--stage_iterations", str(args.stage_iterations),
                   "--val_interval", str(args.val_interval), "--log_interval", "40", "--base_lr", str(args.base_lr),
                   "--seed", str(seed), "--device", "cpu", "--save_dir", str(folder), *VARIANTS[variant], *extra]
        steps = [{"name": "train", "command": command, "outputs": [folder / "best.pth"],
                  "marker": folder / launch.TRAINED_FILE}]
        return launch.RunJob(f"{variant} seed {seed}", folder, steps, env)

    results = launch.launch([job(run) for run in runs], args, out / "submitit")
    codes = [r.get("returncode") for r in results]
    for (variant, seed, _), code in zip(runs, codes):
        print(f"{variant} seed {seed}: exit {code}", flush=True)
    table = {}
    for (variant, seed, folder), code in zip(runs, codes):
        history = [h for h in read_history(folder) if h["phase"] == "stage_1"]
        if code or not history:
            print(f"{variant} seed {seed}: failed (see {folder / 'run_table_train.log'})", file=sys.stderr)
            continue
        table.setdefault(variant, []).append([h["dice"] for h in history])
    steps = list(range(0, args.stage_iterations + 1, args.val_interval))
    head = f"{'variant':<22}" + "".join(f"{'it ' + str(i):>15}" for i in steps) + f"{'mean after 0':>15}{'best':>15}"
    print(head)
    summary = {}
    for variant, curves in table.items():
        arr = np.asarray(curves)  # seeds x validations
        cols = [arr[:, k] for k in range(arr.shape[1])] + [arr[:, 1:].mean(1), arr.max(1)]
        cells = [f"{c.mean():.3f} ± {c.std(ddof=1) if len(c) > 1 else float('nan'):.3f}" for c in cols]
        print(f"{variant:<22}" + "".join(f"{c:>15}" for c in cells))
        summary[variant] = {"curves": arr.round(4).tolist(), "mean_after_start": round(float(cols[-2].mean()), 4),
                            "best": round(float(cols[-1].mean()), 4)}
    print(json.dumps({"dataset": args.dataset, "seeds": args.seeds, "stage_iterations": args.stage_iterations,
                      "base_lr": args.base_lr, "variants": summary}))
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
