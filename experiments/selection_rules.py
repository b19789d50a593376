"""What the model-selection rules do to a finished table: every run's logged validations re-read
under each rule, without training again.

For each finished run (its final ``best.pth`` written) under ``TABLE/runs`` (``experiments/run_table.py``
or ``experiments/compare_acdc.py`` output), its ``validations.jsonl`` records (``reporting.curves.read_history``)
give the val Dice the final model would have under:

- ``best_stage``: the best validation of the whole run (this code's default ``--final best_stage``
  with ``--validate_stage_start on``);
- ``last_stage``: the best validation of the last curriculum stage, its start included
  (``--final last_stage``);
- ``reference``: the last stage's best after its start (``--final last_stage --validate_stage_start
  off``, the published protocol, at this table's validation interval);
- ``pretrain``: the best pre-training validation, the model before any self-training.

The labeled-only baseline has one phase, so the first three rules give its best validation. The scores are the
trainer's selection score (mean foreground Dice on val.list at validation), not the test script's
metrics in ``results.md``. Per method and labeled count it prints mean ± std over seeds (in %) and, per
seed, the phase that holds the run's best validation; the last line is one JSON object.

    python experiments/selection_rules.py --table results/acdc_cpu
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
from reporting.curves import read_history  # noqa: E402

RULES = ("best_stage", "last_stage", "reference", "pretrain")


def rule_scores(history):
    """``{rule: score}`` for one run's validation records (``read_history``); a rule with no record
    (``pretrain`` for the labeled-only baseline) is left out; a run with a single phase scores its
    best under the three others. Also ``best_phase``: the phase of the best record (the
    earliest, on ties)."""
    if not history:
        raise ValueError("no validation records")
    phases = list(dict.fromkeys(r["phase"] for r in history))
    best = max(history, key=lambda r: float(r["dice"]))  # max keeps the first of equal scores
    out = {"best_stage": float(best["dice"]), "best_phase": best["phase"]}
    if len(phases) == 1:
        return {**out, "last_stage": out["best_stage"], "reference": out["best_stage"]}
    last = [r for r in history if r["phase"] == phases[-1]]
    out["last_stage"] = max(float(r["dice"]) for r in last)
    after_start = [float(r["dice"]) for r in last if int(r["iteration"]) > 0]
    if after_start:
        out["reference"] = max(after_start)
    pre = [float(r["dice"]) for r in history if r["phase"] == "pretrain"]
    if pre:
        out["pretrain"] = max(pre)
    return out


def collect(runs_dir):
    """``{(method, labelnum): [(seed, rule_scores), ...]}`` for every finished run folder (a
    config.yaml and the final best.pth) with at least one validation record, seeds in sorted order;
    also the names of the unfinished folders left out."""
    table, unfinished = {}, []
    for folder in sorted(p for p in Path(runs_dir).iterdir() if (p / "config.yaml").is_file()):
        if not (folder / "best.pth").is_file():
            unfinished.append(folder.name)
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        history = read_history(folder)
        if not history:
            continue
        key = (config.get("method", "?"), int(config.get("labelnum", 0)))
        table.setdefault(key, []).append((int(config.get("seed", 0)), rule_scores(history)))
    for runs in table.values():
        runs.sort(key=lambda item: item[0])
    return table, unfinished


def summarise(table):
    """Rows ``{method, labelnum, seeds, <rule>: (mean, std) in %, best_phases}`` (std NaN for one seed)."""
    rows = []
    for (method, labelnum), runs in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"method": method, "labelnum": labelnum, "seeds": [s for s, _ in runs],
               "best_phases": [r["best_phase"] for _, r in runs]}
        for rule in RULES:
            values = [100 * r[rule] for _, r in runs if rule in r]
            if len(values) == len(runs):
                arr = np.asarray(values)
                row[rule] = (float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan"))
        rows.append(row)
    return rows


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True, help="a run_table/compare_acdc output folder (holding runs/)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    runs_dir = Path(args.table) / "runs"
    if not runs_dir.is_dir():
        p.error(f"--table {args.table}: no runs/ folder in it")
    table, unfinished = collect(runs_dir)
    rows = summarise(table)
    if unfinished:
        print(f"left out, not finished (no final best.pth): {', '.join(unfinished)}")
    if not rows:
        p.error(f"--table {args.table}: no finished run under runs/ has a validation record")
    print("| labeled | method | seeds | " + " | ".join(RULES) + " | best phase per seed |")
    print("|---" * (len(RULES) + 4) + "|")
    for row in rows:
        cells = [f"{row[r][0]:.1f} ± {row[r][1]:.1f}" if r in row else "—" for r in RULES]
        print(f"| {row['labelnum']} | {row['method']} | {len(row['seeds'])} | " + " | ".join(cells)
              + f" | {', '.join(row['best_phases'])} |")
    print(json.dumps([{**row, **{r: [round(v, 2) for v in row[r]] for r in RULES if r in row}} for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
