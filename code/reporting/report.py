"""The comparison table: aggregate evaluated runs into ``results.md`` and ``results.csv``.

A *runs folder* holds one folder per run, named ``<dataset>_<method>_<labelnum>_s<seed>``
(``experiments/run_table.py`` writes them), each with the trainer's ``config.yaml`` and, per
evaluated split, ``eval_<split>/summary.json`` and ``eval_<split>/cases.csv`` (from
``code/test_<dataset>.py``).

Per run (one seed), the value of a metric is the mean over cases and foreground classes: the
summary's ``"mean"``, recomputed here from ``cases.csv`` and checked against ``summary.json``.
Per (dataset, method, labelnum, split) the table gives mean +- sample standard deviation
(ddof=1) of these values over the seeds; per class likewise (CSV). Dice and Jaccard are in
percent, HD95 and ASD in voxels (as the published tables), plus mm when every run has them.

Runs that are missing or failed are reported, never silently dropped: a run folder without the
evaluation (``FAILED.json`` written by run_table.py gives the reason), a folder whose files
are inconsistent, and runs named in ``expected_runs.json`` (run_table.py) that have no folder.

``--published`` adds the ACDC rows quoted from the papers (docs PEERS.md §1), marked as quoted,
with their source and the protocol caveat.

    python code/reporting/report.py --runs OUT/runs --out OUT [--published] [--split val]
"""
import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import yaml

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:  # run as a script: python code/reporting/report.py
    sys.path.insert(0, CODE_DIR)
from reporting.curves import plot_learning_curves, plot_mean_curves, read_history  # noqa: E402

METRICS = ("dice", "jaccard", "hd95", "asd")
MM_METRICS = ("hd95", "asd")
PERCENT = {"dice", "jaccard"}
#: column stem per metric in results.csv (unit in the name)
CSV_STEM = {"dice": "dice_pct", "jaccard": "jaccard_pct", "hd95": "hd95_vox", "asd": "asd_vox"}
MD_HEAD = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95": "HD95 (vox)", "asd": "ASD (vox)"}
METHOD_ORDER = ("labeled_only", "bcp", "abd", "beta_fft", "sscd")
METHOD_NAMES = {"labeled_only": "U-Net (labeled only)", "bcp": "BCP", "abd": "ABD", "beta_fft": "β-FFT",
                "sscd": "SSCD"}
RUN_NAME = re.compile(r"^(?P<dataset>[A-Za-z0-9]+)_(?P<method>[A-Za-z0-9_]+?)_(?P<labelnum>\d+)_s(?P<seed>\d+)$")
EXPECTED_FILE = "expected_runs.json"
FAILED_FILE = "FAILED.json"
CURVES_FILE = "learning_curves.png"  # val Dice against total iteration, one line per run
MEAN_CURVES_FILE = "learning_curves_mean.png"  # the same, one line per method: mean ± std over seeds
CHECK_TOL = 1e-5  # cases.csv holds 6 decimals; relative to max(1, |value|)

#: ACDC rows quoted from the papers (PEERS.md §1): (method, labeled patients, Dice %, Jaccard %,
#: HD95, ASD, source). Not reproduced here.
PUBLISHED_ACDC = (
    ("labeled_only", 3, 47.83, 37.01, 31.16, 12.62,
     "magic-fortune/OPMatch README.md (table copied from the BCP/ABD papers)"),
    ("labeled_only", 7, 79.41, 68.11, 9.35, 2.70,
     "magic-fortune/OPMatch README.md (table copied from the BCP/ABD papers)"),
    ("bcp", 3, 87.59, 78.67, 1.90, 0.67,
     "haung-hangdian/SSCD figure/results.png; OPMatch README; yyliu01/TraCoCo docs/results.md"),
    ("bcp", 7, 88.84, 80.62, 3.98, 1.17,
     "haung-hangdian/SSCD figure/results.png; OPMatch README; yyliu01/TraCoCo docs/results.md"),
    ("abd", 3, 88.96, 80.70, 1.57, 0.52,
     "magic-fortune/OPMatch README.md (SSCD figure/results.png prints Dice 86.86, inconsistent with its "
     "Jaccard: a typo)"),
    ("abd", 7, 89.81, 81.95, 1.46, 0.49, "magic-fortune/OPMatch README.md"),
    ("beta_fft", 3, 89.46, 81.46, 1.78, 0.50, "haung-hangdian/SSCD figure/results.png (only source)"),
    ("beta_fft", 7, 90.50, 83.12, 1.78, 0.55, "haung-hangdian/SSCD figure/results.png (only source)"),
    ("sscd", 3, 89.62, 81.71, 1.45, 0.46, "haung-hangdian/SSCD figure/results.png"),
    ("sscd", 7, 90.91, 83.73, 1.11, 0.28, "haung-hangdian/SSCD figure/results.png"),
)
PUBLISHED_PROTOCOL = (
    "Published protocol: ACDC (SSL4MIS split), a single run per method, reported on test.list (40 volumes) "
    "with the checkpoint selected on val.list (BCP, ABD, β-FFT; SSCD's released code selects on test.list), "
    "256×256 input, 30k self-training iterations at batch 24 (12 labeled + 12 unlabeled; BCP/ABD add 10k "
    "pre-training iterations, SSCD's code runs 5 stages × 80k), medpy HD95/ASD in voxels, an empty "
    "prediction scored HD95 = ASD = 0 by the reference test scripts (ours: the volume diagonal). Not comparable "
    "number for number with our rows: compare our protocol below.")


class RunProblem(Exception):
    """A run folder that cannot enter the table (missing, failed or inconsistent files)."""


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def run_name(dataset, method, labelnum, seed):
    """Folder name of a run: ``ACDC_sscd_7_s1337``."""
    return f"{dataset}_{method}_{int(labelnum)}_s{int(seed)}"


def parse_run_name(name):
    """``{'dataset', 'method', 'labelnum', 'seed'}`` from a run folder name, or None."""
    m = RUN_NAME.match(name)
    if not m:
        return None
    return {"dataset": m["dataset"], "method": m["method"], "labelnum": int(m["labelnum"]), "seed": int(m["seed"])}


def read_cases(path):
    """Parse a test script's cases.csv.

    Returns ``(cases, classes, values, mm)``: the case ids, the class names in column order,
    ``values[metric]`` an array (cases, classes) for every metric of METRICS, and ``mm`` the
    same for ``hd95``/``asd`` in mm (``{}`` when the file has no ``*_mm_*`` columns).
    """
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "case":
        raise RunProblem(f"{path}: expected a header starting with 'case'")
    header, body = rows[0], [r for r in rows[1:] if r]
    if not body:
        raise RunProblem(f"{path}: no case rows")
    columns = {}  # (metric, mm?, class) -> column index
    classes = []
    for i, col in enumerate(header[1:], start=1):
        if col == "mean_dice":
            continue
        metric, _, rest = col.partition("_")
        if metric not in METRICS or not rest:
            raise RunProblem(f"{path}: unexpected column {col!r}")
        mm = rest.startswith("mm_")
        cls = rest[3:] if mm else rest
        if not mm and cls not in classes:
            classes.append(cls)
        columns[(metric, mm, cls)] = i
    values, mm_values = {}, {}
    for metric in METRICS:
        missing = [c for c in classes if (metric, False, c) not in columns]
        if missing or not classes:
            raise RunProblem(f"{path}: no {metric} column for classes {missing or '(none)'}")
    try:
        for metric in METRICS:
            values[metric] = np.array([[float(r[columns[(metric, False, c)]]) for c in classes] for r in body])
        if all((m, True, c) in columns for m in MM_METRICS for c in classes):
            for metric in MM_METRICS:
                mm_values[metric] = np.array([[float(r[columns[(metric, True, c)]]) for c in classes]
                                              for r in body])
    except (ValueError, IndexError) as err:
        raise RunProblem(f"{path}: unreadable value ({err})") from err
    return [r[0] for r in body], classes, values, mm_values


def _close(a, b):
    return abs(a - b) <= CHECK_TOL * max(1.0, abs(a), abs(b))


def read_config(run_dir):
    """The trainer's saved ``config.yaml`` of a run as a dict ({} when absent)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir, split):
    """One evaluated run: a dict with the run identity (dataset, method, labelnum, seed), ``split``,
    ``cases``, ``classes``, ``value[metric]`` (mean over cases and classes), ``per_class[metric]``,
    ``mm``/``mm_per_class`` (possibly empty), ``config`` and ``summary``.

    Raises RunProblem naming what is missing or inconsistent (including the reason from
    ``FAILED.json`` when the run failed).
    """
    run_dir = Path(run_dir)
    failed = run_dir / FAILED_FILE
    if failed.is_file():
        try:
            info = json.loads(failed.read_text())
        except json.JSONDecodeError:
            info = {}
        raise RunProblem(f"failed ({info.get('step', '?')} step, exit code {info.get('returncode', '?')}); "
                         f"log: {info.get('log', '?')}")
    eval_dir = run_dir / f"eval_{split}"
    summary_path, cases_path = eval_dir / "summary.json", eval_dir / "cases.csv"
    if not summary_path.is_file() or not cases_path.is_file():
        have = "best.pth present" if (run_dir / "best.pth").is_file() else "no best.pth"
        raise RunProblem(f"missing: no {eval_dir.name}/summary.json + cases.csv ({have})")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise RunProblem(f"{summary_path}: not JSON ({err})") from err
    cases, classes, values, mm = read_cases(cases_path)
    if summary.get("split", split) != split:
        raise RunProblem(f"{summary_path}: split {summary.get('split')!r}, expected {split!r}")
    if "cases" in summary and int(summary["cases"]) != len(cases):
        raise RunProblem(f"{summary_path}: {summary['cases']} cases, cases.csv has {len(cases)}")
    per_class = {m: values[m].mean(axis=0) for m in METRICS}
    for m in METRICS:
        stored = summary.get(m, {}).get("per_class")
        if stored is None or len(stored) != len(classes) \
                or not all(_close(a, b) for a, b in zip(stored, per_class[m])):
            raise RunProblem(f"{summary_path}: {m} per class {stored} does not match cases.csv "
                             f"{[round(float(v), 6) for v in per_class[m]]}")
    config = read_config(run_dir)
    ident = parse_run_name(run_dir.name) or {}
    for key in ("method", "labelnum", "seed"):
        if key in config and config[key] is not None:
            ident[key] = config[key]
    missing = [k for k in ("dataset", "method", "labelnum", "seed") if k not in ident]
    if missing:
        raise RunProblem(f"cannot tell the run's {missing}: name the folder <dataset>_<method>_<labelnum>_s<seed>")
    return {
        **ident, "labelnum": int(ident["labelnum"]), "seed": int(ident["seed"]), "dir": str(run_dir),
        "split": split, "cases": cases, "classes": classes,
        "value": {m: float(per_class[m].mean()) for m in METRICS},
        "per_class": {m: [float(v) for v in per_class[m]] for m in METRICS},
        "mm": {m: float(v.mean()) for m, v in mm.items()},
        "mm_per_class": {m: [float(x) for x in v.mean(axis=0)] for m, v in mm.items()},
        "config": config, "summary": summary,
    }


def collect(runs_dir, split=None):
    """All runs under ``runs_dir``: ``(runs, problems)``.

    ``split`` None takes every ``eval_<split>`` found (a folder with none counts as missing for
    'val'). ``problems`` is a list of ``{"run", "split", "problem"}`` dicts: failed or
    unevaluated folders, inconsistent files, and names from ``expected_runs.json`` with no folder.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"--runs {runs_dir}: no such folder")
    expected = {}
    exp_path = runs_dir / EXPECTED_FILE
    if exp_path.is_file():
        info = json.loads(exp_path.read_text())
        expected = {name: info.get("split", "val") for name in info.get("runs", [])}
    runs, problems = [], []
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir())
    for folder in folders:
        if split is not None:
            splits = [split]
        else:
            splits = sorted(p.name[len("eval_"):] for p in folder.glob("eval_*") if p.is_dir())
            splits = splits or [expected.get(folder.name, "val")]
        for s in splits:
            try:
                runs.append(load_run(folder, s))
            except RunProblem as err:
                problems.append({"run": folder.name, "split": s, "problem": str(err)})
    present = {p.name for p in folders}
    for name, s in expected.items():
        if name not in present:
            problems.append({"run": name, "split": split or s, "problem": "missing: the run folder does not exist"})
    return runs, problems


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def mean_std(values):
    """(mean, sample std with ddof=1) of a list; std is NaN for fewer than two values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _method_key(method):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _distinct(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def budget(config):
    """The training budget a run's config.yaml states, as a short string (what makes rows comparable)."""
    if not config:
        return "no config.yaml"
    iters = config.get("total_iterations")
    if iters is None:
        iters = config.get("max_iterations")
    parts = []
    if config.get("image_size") is not None:
        parts.append(f"{config['image_size']}²")
    if iters is not None:
        parts.append(f"{iters} it")
    if config.get("batch_size") is not None:
        parts.append(f"batch {config['batch_size']}/{config.get('labeled_bs', '?')} labeled")
    return ", ".join(parts) or "?"


def aggregate(runs):
    """One row per (dataset, method, labelnum, split), sorted (dataset, labelnum, method order):
    dicts with ``seeds``, ``n_seeds``, ``n_cases``, ``classes``, ``mean``/``std`` per metric,
    ``class_mean``/``class_std`` (metric -> list), ``mm_mean``/``mm_std`` (when every run has mm),
    ``budget``, ``data`` and ``runs`` (the folders)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["method"], r["labelnum"], r["split"]), []).append(r)
    rows = []
    for (dataset, method, labelnum, split), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        classes = members[0]["classes"]
        if any(r["classes"] != classes for r in members):
            raise ValueError(f"{dataset} {method} {labelnum}: runs with different classes "
                             f"{_distinct([tuple(r['classes']) for r in members])}")
        row = {"dataset": dataset, "method": method, "labelnum": labelnum, "split": split,
               "seeds": [r["seed"] for r in members], "n_seeds": len(members), "classes": classes,
               "n_cases": _distinct([len(r["cases"]) for r in members]),
               "mean": {}, "std": {}, "class_mean": {}, "class_std": {}, "mm_mean": {}, "mm_std": {},
               "budget": "; ".join(_distinct([budget(r["config"]) for r in members])),
               "data": "; ".join(_distinct([str(r["summary"].get("data") or r["config"].get("root_path") or "?")
                                            for r in members])),
               "runs": [r["dir"] for r in members]}
        for m in METRICS:
            row["mean"][m], row["std"][m] = mean_std([r["value"][m] for r in members])
            per = [mean_std([r["per_class"][m][k] for r in members]) for k in range(len(classes))]
            row["class_mean"][m], row["class_std"][m] = [p[0] for p in per], [p[1] for p in per]
        if all(r["mm"] for r in members):
            for m in MM_METRICS:
                row["mm_mean"][m], row["mm_std"][m] = mean_std([r["mm"][m] for r in members])
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["labelnum"], _method_key(r["method"]), r["split"]))
    return rows


def published_rows():
    """The quoted ACDC rows as dicts (values already in the table units: %, voxels)."""
    return [{"dataset": "ACDC", "method": method, "labelnum": labelnum, "split": "test (published)",
             "values": dict(zip(METRICS, (dice, jaccard, hd95, asd))), "source": source}
            for method, labelnum, dice, jaccard, hd95, asd, source in PUBLISHED_ACDC]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _scale(metric):
    return 100.0 if metric in PERCENT else 1.0


def _fmt(x):
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _csv_num(x):
    return "" if x is None or not math.isfinite(x) else f"{x:.6g}"


def format_cell(mean, std, metric):
    """``'85.12 ± 1.03'`` in table units (Dice/Jaccard in %); ``'± –'`` with one seed."""
    s = _scale(metric)
    return f"{_fmt(mean * s)} ± {_fmt(std * s if std is not None else None)}"


def csv_rows(rows, published=()):
    """``(header, rows)`` of results.csv: our rows (kind 'ours') then quoted rows (kind 'published')."""
    classes = _distinct([c for r in rows for c in r["classes"]])
    has_mm = any(r["mm_mean"] for r in rows)
    header = ["kind", "dataset", "method", "labelnum", "split", "n_seeds", "seeds", "n_cases"]
    for m in METRICS:
        header += [f"{CSV_STEM[m]}_mean", f"{CSV_STEM[m]}_std"]
    for c in classes:
        for m in METRICS:
            header += [f"{CSV_STEM[m]}_{c}_mean", f"{CSV_STEM[m]}_{c}_std"]
    if has_mm:
        for m in MM_METRICS:
            header += [f"{m}_mm_mean", f"{m}_mm_std"]
    header += ["budget", "data", "source"]
    out = []
    for r in rows:
        line = {"kind": "ours", "dataset": r["dataset"], "method": r["method"], "labelnum": r["labelnum"],
                "split": r["split"], "n_seeds": r["n_seeds"], "seeds": " ".join(map(str, r["seeds"])),
                "n_cases": " ".join(map(str, r["n_cases"])), "budget": r["budget"], "data": r["data"],
                "source": "runs: " + " ".join(Path(d).name for d in r["runs"])}
        for m in METRICS:
            s = _scale(m)
            line[f"{CSV_STEM[m]}_mean"] = _csv_num(r["mean"][m] * s)
            line[f"{CSV_STEM[m]}_std"] = _csv_num(r["std"][m] * s)
            for k, c in enumerate(r["classes"]):
                line[f"{CSV_STEM[m]}_{c}_mean"] = _csv_num(r["class_mean"][m][k] * s)
                line[f"{CSV_STEM[m]}_{c}_std"] = _csv_num(r["class_std"][m][k] * s)
        for m in r["mm_mean"]:
            line[f"{m}_mm_mean"], line[f"{m}_mm_std"] = _csv_num(r["mm_mean"][m]), _csv_num(r["mm_std"][m])
        out.append([line.get(h, "") for h in header])
    for p in published:
        line = {"kind": "published", "dataset": p["dataset"], "method": p["method"], "labelnum": p["labelnum"],
                "split": p["split"], "n_seeds": 1, "budget": "published protocol (see results.md)",
                "source": "quoted: " + p["source"]}
        for m in METRICS:
            line[f"{CSV_STEM[m]}_mean"] = _csv_num(p["values"][m])
        out.append([line.get(h, "") for h in header])
    return header, out


def _protocol_lines(rows):
    lines = ["| Method | Labeled | Split | Cases | Seeds | Budget (config.yaml) | Data |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['labelnum']} | {r['split']} | {', '.join(map(str, r['n_cases']))} | "
                     f"{', '.join(map(str, r['seeds']))} | {r['budget']} | {r['data']} |")
    return lines


def render_markdown(rows, problems, published=()):
    """The text of results.md."""
    lines = ["# Results", ""]
    lines.append("Ours: per seed, the mean over evaluation cases and foreground classes (as summary.json "
                 "\"mean\"); the table gives mean ± sample standard deviation (ddof = 1) over seeds "
                 "(\"± –\": one seed). Dice and Jaccard in %, HD95 and ASD in voxels (medpy, no spacing; "
                 "a missed or hallucinated structure scores the volume diagonal).")
    lines.append("")
    head = "| Dataset | Method | Labeled | Seeds | Split | " + " | ".join(MD_HEAD[m] for m in METRICS) + " | Kind |"
    lines += [head, "|" + "---|" * (6 + len(METRICS))]
    entries = [(r["dataset"], r["labelnum"], 0, _method_key(r["method"]), r) for r in rows]
    entries += [(p["dataset"], p["labelnum"], 1, _method_key(p["method"]), p) for p in published]
    for *_, e in sorted(entries, key=lambda t: t[:4]):
        if "values" in e:  # quoted
            name = f"{METHOD_NAMES.get(e['method'], e['method'])} †"
            cells = " | ".join(_fmt(e["values"][m]) for m in METRICS)
            lines.append(f"| {e['dataset']} | {name} | {e['labelnum']} | paper | {e['split']} | {cells} "
                         f"| quoted † |")
        else:
            cells = " | ".join(format_cell(e["mean"][m], e["std"][m], m) for m in METRICS)
            lines.append(f"| {e['dataset']} | {e['method']} | {e['labelnum']} | {e['n_seeds']} | {e['split']} "
                         f"| {cells} | ours |")
    if not rows:
        lines += ["", "**No evaluated run.**"]
    mm_rows = [r for r in rows if r["mm_mean"]]
    if mm_rows:
        lines += ["", "Distances in mm (the volumes carry a spacing):", "",
                  "| Dataset | Method | Labeled | Split | HD95 (mm) | ASD (mm) |", "|---|---|---|---|---|---|"]
        for r in mm_rows:
            cells = " | ".join(f"{_fmt(r['mm_mean'][m])} ± {_fmt(r['mm_std'][m])}" for m in MM_METRICS)
            lines.append(f"| {r['dataset']} | {r['method']} | {r['labelnum']} | {r['split']} | {cells} |")
    if published:
        lines += ["", "† **Quoted from the papers, not run here** (one run each). Sources:", ""]
        for p in published:
            lines.append(f"- {METHOD_NAMES.get(p['method'], p['method'])}, {p['labelnum']} labeled: {p['source']}")
        lines += ["", PUBLISHED_PROTOCOL]
    if rows:
        lines += ["", "## Our protocol (from each run's config.yaml and summary.json)", ""] + _protocol_lines(rows)
    lines += ["", "## Missing or failed runs", ""]
    if problems:
        lines += [f"- `{p['run']}` ({p['split']}): {p['problem']}" for p in problems]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def build_report(runs_dir, out_dir, published=False, split=None):
    """Collect, aggregate and write ``out_dir/results.md``, ``out_dir/results.csv`` and the
    learning-curve figures ``out_dir/learning_curves.png`` (one line per run) and
    ``learning_curves_mean.png`` (mean ± std over seeds per method), from each run's logged validations.

    Returns ``(rows, problems)`` (see ``aggregate`` and ``collect``).
    """
    runs, problems = collect(runs_dir, split)
    rows = aggregate(runs)
    quoted = published_rows() if published else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(render_markdown(rows, problems, quoted))
    header, lines = csv_rows(rows, quoted)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    curves = curve_runs(runs_dir)
    plot_learning_curves(curves, out_dir / CURVES_FILE, order=METHOD_ORDER)
    plot_mean_curves(curves, out_dir / MEAN_CURVES_FILE, order=METHOD_ORDER)
    return rows, problems


def curve_runs(runs_dir):
    """Every run folder's identity, config and logged validations (``reporting.curves``), evaluated or
    not: the input of the learning-curve figure."""
    out = []
    for folder in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()):
        ident = parse_run_name(folder.name)
        if ident is None:
            continue
        out.append({**ident, "config": read_config(folder), "history": read_history(folder)})
    return out


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description="Aggregate evaluated runs into results.md and results.csv.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", required=True, help="folder holding the run folders (<dataset>_<method>_<n>_s<seed>)")
    p.add_argument("--out", required=True, help="folder to write results.md and results.csv into")
    p.add_argument("--published", action="store_true", help="add the published ACDC rows (quoted)")
    p.add_argument("--split", default=None, help="only this evaluation split (default: every eval_<split> found)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a run is missing or failed")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        rows, problems = build_report(args.runs, args.out, args.published, args.split)
    except (FileNotFoundError, ValueError) as err:
        p.exit(2, f"report: {err}\n")
    print(f"{len(rows)} rows from {sum(r['n_seeds'] for r in rows)} runs -> "
          f"{Path(args.out) / 'results.md'}, {Path(args.out) / 'results.csv'}")
    for prob in problems:
        print(f"WARNING: {prob['run']} ({prob['split']}): {prob['problem']}", file=sys.stderr)
    if problems and args.strict:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
