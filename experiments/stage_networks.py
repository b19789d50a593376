"""The val Dice of every network each SSCD stage ends with: student 1 (the model the run selects
from), student 2 (the strong-view student, the cross-term teacher of student 1) and the EMA teacher
(the pseudo-label source), read from each stage's ``last.pth``.

The runs' selection only ever scores student 1; this shows whether the networks that supervise it
are better or worse than it. Each network is scored as the trainer validates (``evaluation.inference.
Validator`` on ``--split`` at the run's image size, with its saved ``--amp`` and ``--channels_last``),
on the CPU. Per run it prints one line with every stage's three scores; then the mean over runs per
stage (over the runs that hold the network) and the mean difference of student 2 and of the teacher
to student 1 (points of Dice, and in how many stage ends it is positive). The last line is one JSON
object.

    python experiments/stage_networks.py --root_path ../shared/data/ACDC \
        --runs DIR/runs/ACDC_sscd_7_s1 DIR/runs/ACDC_sscd_7_s2
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
from common.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from dataloaders.dataset import load_volumes  # noqa: E402
from evaluation.inference import Validator  # noqa: E402
from networks.unet import build_model  # noqa: E402
from reporting.report import read_config  # noqa: E402
from training.run import Forward  # noqa: E402
from training.run_start import AMP_DTYPES  # noqa: E402

NETWORKS = ("student_1", "student_2", "teacher")


def stage_weights(state):
    """``{network: state_dict}`` of one stage checkpoint (student 2 absent with one student)."""
    models = state.get("models", {})
    out = {"student_1": state["model"], "student_2": models.get("model_2"), "teacher": models.get("teacher")}
    return {k: v for k, v in out.items() if v is not None}


def score_run(run_dir, root, split):
    """``[(stage, {network: val Dice})]`` for every ``stage_<k>/last.pth`` of one run, in stage order."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run folder)")
    config = read_config(run_dir)
    stages = sorted((p for p in run_dir.glob("stage_*") if (p / "last.pth").is_file()),
                    key=lambda p: int(p.name.split("_")[1]))
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no stage_<k>/last.pth (no finished curriculum stage)")
    num_classes, size = int(config["num_classes"]), int(config["image_size"])
    validator = Validator(load_volumes(root or config["root_path"], split, num_classes), num_classes, size, "cpu")
    amp, channels_last = AMP_DTYPES[config.get("amp", "off")], config.get("channels_last") == "on"
    model = build_model(num_classes).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = []
    for folder in stages:
        try:
            state = load_checkpoint(folder / "last.pth")
        except CheckpointError as err:
            raise FileNotFoundError(str(err)) from err
        scores = {}
        for name, weights in stage_weights(state).items():
            model.load_state_dict(weights)
            scores[name] = validator(Forward(model, amp, channels_last))[0]
        out.append((folder.name, scores))
    return out


def summarise(results):
    """Per stage the mean score of each network over the runs, and the differences (in points) of
    student 2 and the teacher to student 1 over every stage end: ``(mean, positive, count)``."""
    per_stage, diffs = {}, {"student_2": [], "teacher": []}
    for stages in results.values():
        for stage, scores in stages:
            for name, value in scores.items():
                per_stage.setdefault(stage, {}).setdefault(name, []).append(value)
            for name in diffs:
                if name in scores:
                    diffs[name].append(100 * (scores[name] - scores["student_1"]))
    means = {stage: {name: float(np.mean(v)) for name, v in nets.items()} for stage, nets in per_stage.items()}
    gaps = {name: (float(np.mean(d)), int(sum(x > 0 for x in d)), len(d)) for name, d in diffs.items() if d}
    return means, gaps


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="SSCD run folders (holding stage_<k>/last.pth)")
    p.add_argument("--root_path", default=None, help="processed dataset root (default: the run's --root_path)")
    p.add_argument("--split", default="val", help="val, or test where it is not withheld")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads}: expected 1 or more")
        torch.set_num_threads(args.threads)
    results = {}
    for run in args.runs:
        try:
            results[run] = score_run(run, args.root_path, args.split)
        except (FileNotFoundError, ValueError, KeyError) as err:
            p.error(f"--runs {run}: {err}")
        print(f"{run}: " + " | ".join(f"{stage} " + " ".join(f"{scores[n]:.3f}" if n in scores else "—"
                                                             for n in NETWORKS) for stage, scores in results[run]))
    means, gaps = summarise(results)
    print("| stage | " + " | ".join(NETWORKS) + " |")
    print("|---" * (len(NETWORKS) + 1) + "|")
    for stage, nets in means.items():
        print(f"| {stage} | " + " | ".join(f"{100 * nets[n]:.1f}" if n in nets else "—" for n in NETWORKS) + " |")
    for name, (mean, positive, count) in gaps.items():
        print(f"{name} - student_1: {mean:+.1f} points on average, above it at {positive} of {count} stage ends")
    print(json.dumps({"runs": {r: dict(s) for r, s in results.items()}, "means": means,
                      "gaps": {k: list(v) for k, v in gaps.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
