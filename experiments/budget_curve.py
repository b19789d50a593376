"""Does the semi-supervised gain grow with training? Methods on real ACDC at several total budgets.

For every budget B (total iterations) each method trains with ``experiments/compare_acdc.py``'s
protocol (128², batch 8 = 4 labeled + 4 unlabeled, validation every 40 iterations and at each stage
start, ``--final best_stage``, val.list), with the pre-training : self-training ratio of the
2400-iteration acceptance table, 1 : 1 (``--pre_iterations`` = ``--max_iterations`` = B / 2; the
labeled-only baseline trains B iterations). Each method keeps the self-training rate chosen for it by
that table (``STAGE_LR``: the better of 0.05 and 0.01 over seeds 1-3 at the same label count), unless
``--stage_lr METHOD=RATE`` says otherwise. Runs go to ``OUT/it<B>/<method>`` (one ``compare_acdc``
table each, resumable: rerun the same command to continue; runs resume only with the thread count they
started with, one thread each here). Every start appends the machine (CPU model, threads, commit) to
``OUT/machines.jsonl``.

The analysis (also alone, ``--analyse``) reads every evaluated run and writes ``OUT/budget_curve.md``
(per budget and method: final val Dice mean ± std and per seed, run times; paired per-seed
differences against ``--references``), ``OUT/budget_curve.json``, ``OUT/budget_curve.png`` (final val
Dice against total iterations, one line per method, ±std bars) and ``OUT/learning_curves_<B>.png``
(mean learning curves of the methods at each measured budget). A point measured elsewhere (another
machine or folder, whose run folders are gone) joins the table and figure with ``--recorded FILE``: a JSON file
``{"budget": B, "source": "...", "dice": {method: {seed: val Dice in %}}, "minutes": {method: {seed: m}}}``
("minutes" optional); it is drawn with open markers and its source is written in the table.

    python experiments/budget_curve.py --root_path ../shared/data/ACDC --out results/budget_7 \\
        --budgets 2400 4800 9600 --methods labeled_only bcp sscd --labelnum 7 --seeds 1 2 3
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "code"))
import compare_acdc  # noqa: E402
import launch  # noqa: E402
from compare_arms import arm_runs, summarise  # noqa: E402
from launch import TIMES_FILE  # noqa: E402
from reporting.report import run_name  # noqa: E402

#: (method, labelnum) -> --stage_lr chosen by the 2400-iteration acceptance table (docs/results.md §1.5);
#: None: every phase at --base_lr (0.05 in compare_acdc). Labeled-only's 0.01 would apply after B / 2.
STAGE_LR = {("labeled_only", 3): None, ("labeled_only", 7): None, ("bcp", 3): 0.01, ("bcp", 7): None,
            ("abd", 3): 0.01, ("abd", 7): 0.01, ("sscd", 3): 0.01, ("sscd", 7): 0.01}


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_path", default=None, help="processed ACDC root (needed unless --analyse)")
    p.add_argument("--out", required=True, help="folder of the tables (it<B>/<method>/) and the analysis")
    p.add_argument("--budgets", type=int, nargs="+", default=[2400, 4800, 9600],
                   help="total iterations per run (even; pre-training and self-training get half each)")
    p.add_argument("--methods", nargs="+", default=["labeled_only", "bcp", "sscd"],
                   choices=["labeled_only", "bcp", "abd", "sscd"])
    p.add_argument("--labelnum", type=int, default=7, choices=[3, 7])
    p.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    p.add_argument("--stage_lr", action="append", default=[], metavar="METHOD=RATE",
                   help="another self-training rate for METHOD ('none': --base_lr for every phase)")
    p.add_argument("--references", nargs="+", default=["labeled_only", "bcp"],
                   help="methods the others are paired against, per budget")
    p.add_argument("--recorded", action="append", default=[], metavar="FILE",
                   help="JSON file of a point measured elsewhere (see the docstring); repeatable")
    p.add_argument("--analyse", action="store_true", help="only read the finished runs and write the analysis")
    launch.add_launcher_args(p).set_defaults(jobs=2)
    return p


def stage_lrs(methods, labelnum, overrides):
    """``{method: rate or None}``: the table's choice, replaced by ``METHOD=RATE`` overrides."""
    rates = {m: STAGE_LR[(m, labelnum)] for m in methods}
    for text in overrides:
        method, sep, value = text.partition("=")
        if not sep or method not in rates:
            raise ValueError(f"--stage_lr {text!r}: expected METHOD=RATE with METHOD one of {list(rates)}")
        try:
            rates[method] = None if value.lower() == "none" else float(value)
        except ValueError:
            raise ValueError(f"--stage_lr {text!r}: {value!r} is not a number or 'none'") from None
    return rates


def table_argv(args, budget, method, rate):
    """compare_acdc's command line for one (budget, method) table."""
    if budget <= 0 or budget % 2:
        raise ValueError(f"--budgets {budget}: expected a positive even number of iterations")
    argv = ["--root_path", str(args.root_path), "--out", str(Path(args.out) / f"it{budget}" / method),
            "--methods", method, "--labelnums", str(args.labelnum), "--seeds", *args.seeds,
            "--pre_iterations", str(budget // 2), "--max_iterations", str(budget // 2), *launch.forwarded(args)]
    return argv + ([] if rate is None else ["--stage_lr", str(rate)])


def record_machine(out, argv):
    """Append this start's CPU, thread policy and commit to ``out/machines.jsonl``."""
    from training.speed import cpu_description
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads_per_run": 1, **cpu_description(),
             "commit": commit.stdout.strip() or None, "argv": argv}
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "machines.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def attempt_seconds(log_text):
    """Seconds of each training attempt in a run's ``log.txt`` text: an attempt starts at its
    ``save_dir:`` line and lasts from its first ``[HH:MM:SS]`` stamp to its last (a stamp earlier
    than the one before it has passed midnight). The time between an interrupted attempt's last
    line and its end is not in the log, so not counted."""
    attempts, day, previous = [], 0, None
    for line in log_text.splitlines():
        match = re.match(r"\[(\d\d):(\d\d):(\d\d)\] ", line)
        if not match:
            continue
        h, m, s = (int(g) for g in match.groups())
        if line[match.end():].startswith("save_dir:") or not attempts:
            attempts.append([None, None])
            day, previous = 0, None
        if previous is not None and h * 3600 + m * 60 + s < previous:
            day += 1
        previous = h * 3600 + m * 60 + s
        stamp = day * 86400 + previous
        attempts[-1] = [stamp if attempts[-1][0] is None else attempts[-1][0], stamp]
    return [end - start for start, end in attempts]


def run_seconds(run_dir):
    """Training + evaluation seconds of a run, from run_table's ``run_table_times.jsonl`` (None if
    absent). A resumed run's training time there is the last attempt's only: its attempts in
    ``log.txt`` (``attempt_seconds``) are summed instead."""
    path = Path(run_dir) / TIMES_FILE
    if not path.is_file():
        return None
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    log = Path(run_dir) / "log.txt"
    if was_resumed(run_dir) and log.is_file():
        others = sum(step["seconds"] for step in steps if step["step"] != "train")
        return others + sum(attempt_seconds(log.read_text()))
    return sum(step["seconds"] for step in steps)


def was_resumed(run_dir):
    """Whether the training that finished was a resumed one (its time then leaves out the interrupted part)."""
    marker = Path(run_dir) / launch.TRAINED_FILE
    return marker.is_file() and "--resume" in marker.read_text().split()


def machines(out):
    """``{budget: "CPU model (capability)"}`` of the starts in ``out/machines.jsonl`` that ran each budget."""
    path = Path(out) / "machines.jsonl"
    found = {}
    for line in (path.read_text().splitlines() if path.is_file() else []):
        entry = json.loads(line)
        name = f"{entry.get('cpu_model')} ({entry.get('cpu_capability')})"
        for budget in build_parser().parse_args(entry.get("argv", [])).budgets:  # the defaults too
            found.setdefault(budget, set()).add(name)
    return {b: ", ".join(sorted(names)) for b, names in found.items()}


def load_recorded(path, methods):
    """``(budget, {method: {seed: run}}, source)`` of a point measured elsewhere (see the module docstring);
    runs have ``dice`` (%), ``seconds`` (None unless given) and no history."""
    try:
        record = json.loads(Path(path).read_text())
        budget, source, dice = int(record["budget"]), str(record["source"]), record["dice"]
        minutes = record.get("minutes", {})
        arms = {m: {int(s): {"dice": float(v), "history": [], "resumed": False,
                             "seconds": None if minutes.get(m, {}).get(s) is None else 60 * float(minutes[m][s])}
                    for s, v in dice[m].items()} for m in methods if m in dice}
    except FileNotFoundError:
        raise FileNotFoundError(f"--recorded {path}: no such file") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--recorded {path}: expected {{\"budget\": B, \"source\": ..., \"dice\": "
                         f"{{method: {{seed: %}}}}}} ({type(err).__name__}: {err})") from None
    if not arms:
        raise ValueError(f"--recorded {path}: no method of {methods} in its \"dice\"")
    return budget, arms, source


def collect(out, budgets, methods, labelnum):
    """``{budget: {method: {seed: run}}}`` of the evaluated runs (``compare_arms.arm_runs``), each run
    with its ``seconds``; budgets or methods without a table are left out."""
    found = {}
    for budget in budgets:
        for method in methods:
            table = Path(out) / f"it{budget}" / method
            if not (table / "runs").is_dir():
                continue
            runs = arm_runs(table, method, labelnum, "val")
            for seed, run in runs.items():
                run_dir = table / "runs" / run_name("ACDC", method, labelnum, seed)
                run["seconds"], run["resumed"] = run_seconds(run_dir), was_resumed(run_dir)
            if runs:
                found.setdefault(budget, {})[method] = runs
    return found


def analyse(out, budgets, methods, labelnum, references, recorded=()):
    """Write budget_curve.md/.json/.png and the learning curves of every measured budget; returns the rows."""
    found = collect(out, budgets, methods, labelnum)
    if not found:
        raise FileNotFoundError(f"{out}: no evaluated run under it<B>/<method>/runs for budgets {budgets}")
    cpus = machines(out)
    where = {b: cpus.get(b, "?") for b in found}
    points = dict(found)
    for path in recorded:
        budget, arms, source = load_recorded(path, methods)
        if budget in points:
            raise ValueError(f"--recorded {path}: budget {budget} is already measured under {out} or recorded twice")
        points[budget], where[budget] = arms, source
    rows = []
    for budget, arms in sorted(points.items()):
        refs = [r for r in references if r in arms]
        for row in summarise(arms, refs, 0):
            runs = [arms[row["arm"]][s] for s in row["seeds"]]
            minutes = [None if r["seconds"] is None else round(r["seconds"] / 60, 1) for r in runs]
            rows.append({"budget": budget, **row, "minutes": minutes, "resumed": [r["resumed"] for r in runs],
                         "machine": where[budget], "recorded": budget not in found})
    Path(out, "budget_curve.json").write_text(json.dumps(_finite(rows), indent=1, allow_nan=False))
    Path(out, "budget_curve.md").write_text(markdown(rows, references, labelnum))
    plot(rows, Path(out) / "budget_curve.png", labelnum)
    from reporting.curves import plot_mean_curves
    for budget, arms in found.items():
        curves = [{"method": m, "labelnum": labelnum, "config": run["config"], "history": run["history"]}
                  for m, runs in arms.items() for run in runs.values()]
        plot_mean_curves(curves, Path(out) / f"learning_curves_{budget}.png", order=list(arms))
    return rows


def _finite(value):
    """``value`` with NaN floats as None (strict JSON)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pm(pair, signed=False):
    mean, std = pair
    if mean != mean:
        return "—"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if std != std else f"{text} ± {std:.1f}"


def markdown(rows, references, labelnum):
    """The analysis table: one row per (budget, method)."""
    head = (f"ACDC, {labelnum} labeled, val Dice (%) of the final model\n\n| total iterations | method | seeds | "
            "final val Dice | per seed | minutes per run | "
            + "".join(f"vs {r}: paired difference, seeds ahead | " for r in references) + "machine |")
    lines = [head, "|---" * (7 + len(references)) + "|"]
    for r in rows:
        paired = [("—" if ref not in r["paired"] else
                   f"{_pm(r['paired'][ref]['diff'], True)}, {r['paired'][ref]['ahead']} of "
                   f"{len(r['paired'][ref]['seeds'])}") for ref in references]
        per_seed = ", ".join(f"s{s} {v}" for s, v in r["per_seed"].items())
        minutes = ", ".join(("?" if m is None else str(m)) + ("*" if resumed else "")
                            for m, resumed in zip(r["minutes"], r["resumed"]))
        lines.append(f"| {r['budget']} | {r['arm']} | {len(r['seeds'])} | {_pm(r['final'])} | {per_seed} | "
                     f"{minutes} | " + "".join(p + " | " for p in paired) + f"{r['machine']} |")
    notes = ["\nPaired differences are taken within one budget (one machine). "]
    if any(any(r["resumed"]) for r in rows):
        notes.append("\\* resumed after an interruption: the training time is summed over its attempts from the run's "
                     "log.txt; the seconds between an interrupted attempt's last log line and its end are not counted. ")
    if any(r["recorded"] for r in rows):
        notes.append("Recorded points (open markers in the figure) come from the source in their machine column.")
    return "\n".join(lines) + "\n" + "".join(notes).rstrip() + "\n"


def plot(rows, path, labelnum):
    """Final val Dice (mean ± std over seeds) against total iterations, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, method in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        mine = [r for r in rows if r["arm"] == method]
        std = [0.0 if r["final"][1] != r["final"][1] else r["final"][1] for r in mine]
        ax.errorbar([r["budget"] for r in mine], [r["final"][0] for r in mine], yerr=std, marker="o",
                    capsize=3, label=method, color=f"C{k}")  # the learning-curve figures' colours
        elsewhere = [r for r in mine if r["recorded"]]
        ax.plot([r["budget"] for r in elsewhere], [r["final"][0] for r in elsewhere], "o", mfc="white",
                mec=f"C{k}", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["budget"] for r in rows}), labels=[str(b) for b in sorted({r["budget"] for r in rows})])
    ax.set(xlabel="total iterations", ylabel="final val Dice (%)", title=f"ACDC, {labelnum} labeled")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, runner=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        rates = stage_lrs(args.methods, args.labelnum, args.stage_lr)
        tables = [(b, m, table_argv(args, b, m, rates[m])) for b in sorted(args.budgets) for m in args.methods]
    except ValueError as err:
        p.error(str(err))
    status = 0
    if not args.analyse:
        if not args.root_path:
            p.error("--root_path: required unless --analyse")
        record_machine(args.out, sys.argv[1:] if argv is None else list(argv))
        for budget, method, table in tables:  # cheaper budgets first: a stopped session leaves whole points
            print(f"== {budget} iterations, {method}: compare_acdc {' '.join(table)}", flush=True)
            status |= compare_acdc.main(table, runner=runner)
    try:
        rows = analyse(args.out, args.budgets, args.methods, args.labelnum, args.references, args.recorded)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    print(Path(args.out, "budget_curve.md").read_text())
    print(json.dumps(_finite(rows), allow_nan=False))
    return status


if __name__ == "__main__":
    sys.exit(main())
