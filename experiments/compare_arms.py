"""Ablation arms side by side: evaluated runs from several table folders, each under its own label.

An arm is ``LABEL=TABLE[:METHOD]``: the runs under ``TABLE/runs`` (``experiments/run_table.py`` or
``experiments/compare_acdc.py`` output) whose config has ``--labelnum`` and, if given, ``METHOD``. Variants of
one method trained into separate ``--out`` folders (the folder names repeat the method, so one table
cannot hold them) are compared here. Per arm it prints the seeds, the val Dice of the final model
(``eval_<split>/summary.json``, the test script's mean Dice; mean ± std over seeds, in %), the mean of
the run's own validations from total iteration ``--window_from`` on (stage starts left out: they
repeat the previous model), and, against each ``--reference`` arm, the per-seed difference of the
final Dice over the seeds both arms hold (mean ± std, and in how many seeds the arm is ahead). Seeds are paired
because a seed fixes the data order and, for arms that share a pre-training, the starting model.
With ``--figure`` it writes the arms' mean learning curves (``reporting.curves.plot_mean_curves``).
The last line is a JSON array of the rows (an undefined std, of one seed, is null).

    python experiments/compare_arms.py --labelnum 7 --reference labeled-only SSCD --window_from 1800 \\
        --arm "labeled-only=results/acdc_cpu_2400:labeled_only" --arm "SSCD=results/acdc_cpu_2400:sscd" \\
        --arm "one student=results/abl_onestudent" --figure curves.png
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
from reporting.curves import plot_mean_curves, read_history  # noqa: E402
from reporting.report import mean_std, read_config  # noqa: E402


def parse_arm(text):
    """``(label, table, method or None)`` from ``LABEL=TABLE[:METHOD]``."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"--arm {text!r}: expected LABEL=TABLE[:METHOD]")
    table, _, method = rest.partition(":")
    return label, Path(table), method or None


def window_mean(history, start):
    """Mean val Dice of the records at total iteration >= ``start``, without the stage starts
    (iteration 0 of a phase after the first); NaN when none is left."""
    first = history[0]["phase"] if history else None
    values = [float(r["dice"]) for r in history if int(r["total_iteration"]) >= start
              and not (r["phase"] != first and int(r["iteration"]) == 0)]
    return float(np.mean(values)) if values else float("nan")


def arm_runs(table, method, labelnum, split):
    """``{seed: {"dice", "history", "config"}}`` for the evaluated runs of one arm."""
    runs_dir = table / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{table}: no runs/ folder in it")
    out = {}
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "config.yaml").is_file()):
        config = read_config(folder)
        summary = folder / f"eval_{split}" / "summary.json"
        if int(config.get("labelnum", -1)) != labelnum or (method and config.get("method") != method) \
                or not summary.is_file():
            continue
        if config.get("seed") is None:
            raise ValueError(f"{folder / 'config.yaml'}: no seed")
        seed = int(config["seed"])
        if seed in out:
            raise ValueError(f"{table}: two runs with seed {seed} ({folder.name}); give the arm a METHOD")
        out[seed] = {"dice": 100 * float(json.loads(summary.read_text())["dice"]["mean"]),
                     "history": read_history(folder), "config": config}
    return out


def summarise(arms, references, window_from):
    """One row per arm: label, seeds, final (mean, std), per_seed, window (mean, std) in %, and per
    reference arm (``paired[ref]``) the per-seed difference of the final Dice over the seeds both
    hold: ``{"diff": (mean, std), "ahead": k, "seeds": [...]}``."""
    rows = []
    for label, runs in arms.items():
        seeds = sorted(runs)
        row = {"arm": label, "seeds": seeds, "final": mean_std([runs[s]["dice"] for s in seeds]),
               "per_seed": {s: round(runs[s]["dice"], 1) for s in seeds},
               "window": mean_std([100 * window_mean(runs[s]["history"], window_from) for s in seeds]),
               "paired": {}}
        for ref in references:
            common = [s for s in seeds if s in arms[ref]]
            if ref != label and common:
                diffs = [runs[s]["dice"] - arms[ref][s]["dice"] for s in common]
                row["paired"][ref] = {"diff": mean_std(diffs), "ahead": sum(d > 0 for d in diffs), "seeds": common}
        rows.append(row)
    return rows


def _json_safe(value):
    """``value`` with every NaN float replaced by None (strict JSON)."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _cell(pair):
    mean, std = pair
    return "—" if np.isnan(mean) else f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _paired_cell(pair):
    if pair is None:
        return "—"
    mean, std = pair["diff"]
    return f"{mean:+.1f}" + ("" if np.isnan(std) else f" ± {std:.1f}") + f", {pair['ahead']} of {len(pair['seeds'])}"


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, help="LABEL=TABLE[:METHOD], one per arm")
    p.add_argument("--labelnum", type=int, required=True, help="the labeled count to compare")
    p.add_argument("--reference", nargs="+", default=[], help="labels of the arms the others are paired against")
    p.add_argument("--window_from", type=int, default=0,
                   help="total iteration from which the validations are averaged")
    p.add_argument("--split", default="val", help="evaluation split of the final model")
    p.add_argument("--figure", default=None, help="PNG of the arms' mean learning curves")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    arms = {}
    for text in args.arm:
        try:
            label, table, method = parse_arm(text)
            if label in arms:
                raise ValueError(f"--arm {text!r}: the label {label!r} is given twice")
            arms[label] = arm_runs(table, method, args.labelnum, args.split)
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
        if not arms[label]:
            p.error(f"--arm {text!r}: no evaluated run with --labelnum {args.labelnum}"
                    + (f" and method {method}" if method else "") + f" under {table / 'runs'}")
    for ref in args.reference:
        if ref not in arms:
            p.error(f"--reference {ref!r}: not one of the arm labels {list(arms)}")
    rows = summarise(arms, args.reference, args.window_from)
    print(f"| arm | seeds | final val Dice (%) | per seed | mean val Dice from it {args.window_from} (%) | "
          + "".join(f"vs {ref}: paired difference, seeds ahead | " for ref in args.reference))
    print("|---" * (5 + len(args.reference)) + "|")
    for r in rows:
        cells = [_paired_cell(r["paired"].get(ref)) for ref in args.reference]
        per_seed = ", ".join(f"s{k} {v}" for k, v in r["per_seed"].items())
        print(f"| {r['arm']} | {len(r['seeds'])} | {_cell(r['final'])} | {per_seed} | {_cell(r['window'])} | "
              + "".join(c + " | " for c in cells))
    if args.figure:
        curves = [{"method": label, "labelnum": args.labelnum, "config": run["config"], "history": run["history"]}
                  for label, runs in arms.items() for run in runs.values()]
        plot_mean_curves(curves, args.figure, order=list(arms))
        print(f"figure: {args.figure}")
    print(json.dumps(_json_safe(rows), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
