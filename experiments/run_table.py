"""Run the comparison table: methods x labeled counts x seeds, one training budget, then the report.

    python experiments/run_table.py --dataset ACDC --root_path data/ACDC --methods labeled_only bcp abd sscd \\
        --labelnums 3 7 --seeds 1 2 3 --split val --out results/acdc -- --image_size 256 --max_iterations 30000

Every run is two subprocesses, launched from the repository root:

    python code/train_<dataset>_SSCD.py --method M --labelnum N --seed S --save_dir OUT/runs/<dataset>_M_N_sS \\
        [--root_path R] [--device D] <flags after -->
    python code/test_<dataset>.py --checkpoint OUT/runs/<run>/best.pth --split <split> \\
        --out OUT/runs/<run>/eval_<split> --no_predictions [--root_path R] [--device D]

The flags after ``--`` go to every trainer unchanged (the same budget for every method). A run whose
``eval_<split>/summary.json`` exists is skipped, so an interrupted table resumes where it stopped (a run
folder that holds a started run is trained with ``--resume``, one still held by a running job is left
to it); a run whose training finished (marker ``TRAINED``) but whose evaluation did not is only evaluated. Each
subprocess's output goes to ``run_table_<step>.log`` in the run folder, and each finished step's
seconds to ``run_table_times.jsonl``. A failed step writes
``FAILED.json`` there (step, command, exit code, log), the table goes on with the next run, the report
lists the failure and the script exits with status 1 at the end. ``--dry_run`` prints the commands
(and, with ``--launcher slurm``, the batch script) and runs nothing. The report (``code/reporting/report.py``)
writes ``OUT/results.md``, ``OUT/results.csv`` and ``OUT/learning_curves.png`` (every run's logged
validations against its total iteration, the stage boundaries dotted) and ``OUT/learning_curves_mean.png``
(one line per method: the mean over seeds with a ±std band).

Every run is one job of ``experiments/launch.py`` (submitit): ``--launcher local`` trains ``--jobs`` runs at
once on this machine (one thread each on a CPU, one GPU each where there are GPUs), ``--launcher slurm``
submits them to SLURM, where a preempted or timed-out job is requeued and its trainer resumes
(docs/clusters.md). ``--dataset CUSTOM`` takes a folder converted by convert_dataset.py (classes from its
dataset.json): the labeled-only / BCP / ABD / SSCD table of your own data.

Fair by construction: every method gets the same flags after ``--`` (so the same iterations: give the
self-training budget as ``--max_iterations``, which each method splits over its own stages;
``--stage_iterations`` is refused for a mix of methods), the same ``--val_interval``, stage starts
validated (``--validate_stage_start on``), and its own fresh run folder (the trainers refuse a folder
that holds another run; an unfinished one is resumed).
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "code") not in sys.path:
    sys.path.insert(0, str(REPO / "code"))
sys.path.insert(0, str(REPO / "experiments"))
import launch  # noqa: E402
from reporting.report import EXPECTED_FILE, build_report, run_name  # noqa: E402

DATASETS = ("ACDC", "PROMISE12", "CUSTOM")
METHODS = ("labeled_only", "bcp", "abd", "sscd")
#: trainer flags run_table sets itself (per run) and therefore refuses after --
RESERVED = ("--method", "--labelnum", "--seed", "--save_dir", "--root_path", "--device", "--resume")


def split_passthrough(argv):
    """``(own flags, trainer flags)``: everything after the first ``--`` goes to the trainers."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _list(values, kind, name):
    """Values given as separate words and/or comma-separated."""
    out = []
    for v in values:
        for item in str(v).split(","):
            if item.strip():
                try:
                    out.append(kind(item.strip()))
                except ValueError:
                    raise SystemExit(f"run_table: {name} {item!r}: expected {kind.__name__}") from None
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] [-- trainer flags]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="ACDC")
    p.add_argument("--root_path", default=None,
                   help="data root (ACDC default: the trainers' synthetic data under data/)")
    p.add_argument("--methods", nargs="+", default=["labeled_only", "sscd"], help=f"any of {', '.join(METHODS)}")
    p.add_argument("--labelnums", nargs="+", default=["7"], help="labeled patients/cases")
    p.add_argument("--seeds", nargs="+", default=["1337"])
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="evaluation split (test is withheld here; the trainers select on val)")
    p.add_argument("--out", required=True, help="output folder: runs/ and results.md, results.csv")
    p.add_argument("--device", default=None, help="passed to trainers and test scripts (default: theirs)")
    p.add_argument("--no_published", action="store_true", help="leave the published ACDC rows out of the report")
    p.add_argument("--dry_run", action="store_true", help="print the commands (and the SLURM batch script), run nothing")
    return launch.add_launcher_args(p)


def stage_iterations_source(passthrough):
    """Where the trainer flags set ``--stage_iterations``: the flag itself, or the ``--config`` YAML
    that holds the key (named by its path); None when neither does."""
    if any(f.split("=")[0] == "--stage_iterations" for f in passthrough):
        return "--stage_iterations"
    for k, flag in enumerate(passthrough):
        path = flag.split("=", 1)[1] if flag.startswith("--config=") else (
            passthrough[k + 1] if flag == "--config" and k + 1 < len(passthrough) else None)
        if path and Path(path).is_file() and "stage_iterations" in (yaml.safe_load(Path(path).read_text()) or {}):
            return f"--config {path} (its stage_iterations)"
    return None


def parse_args(argv=None):
    """``(args, trainer_flags)``; methods, labelnums and seeds as validated lists."""
    own, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    args.methods = _list(args.methods, str, "--methods")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {unknown}: expected any of {list(METHODS)}")
    args.labelnums = _list(args.labelnums, int, "--labelnums")
    args.seeds = _list(args.seeds, int, "--seeds")
    for name in ("methods", "labelnums", "seeds"):
        values = getattr(args, name)
        if not values:
            parser.error(f"--{name}: give at least one value")
        if len(set(values)) != len(values):
            parser.error(f"--{name} {values}: repeated value")
    clash = [f for f in passthrough if f.split("=")[0] in RESERVED]
    if clash:
        parser.error(f"trainer flags {clash} are set by run_table itself (use its own --root_path/--device; "
                     f"--method/--labelnum/--seed come from --methods/--labelnums/--seeds)")
    launch.check_launcher_args(parser, args)
    staged = [m for m in args.methods if m != "labeled_only"]
    source = stage_iterations_source(passthrough)
    if len(staged) > 1 and source:
        parser.error(f"{source} gives {', '.join(staged)} different budgets (BCP/ABD run one stage, SSCD "
                     f"five): give --max_iterations, the self-training budget each method splits over its stages")
    if args.dataset != "ACDC" and args.root_path is None:
        parser.error(f"--root_path is required for {args.dataset} (synthetic data exist for ACDC only)")
    if args.dataset == "CUSTOM" and not (Path(args.root_path) / "dataset.json").is_file():
        parser.error(f"--root_path {args.root_path}: no dataset.json; --dataset CUSTOM takes a folder converted by "
                     f"code/dataloaders/convert_dataset.py")
    args.out = Path(args.out).resolve()
    if args.root_path is not None:
        args.root_path = str(Path(args.root_path).resolve())
    return args, passthrough


def scripts(dataset):
    """(trainer, test script) paths relative to the repository root."""
    if dataset == "CUSTOM":
        return "code/train_custom.py", "code/test_custom.py"
    return f"code/train_{dataset}_SSCD.py", f"code/test_{dataset}.py"


def plan(args, passthrough):
    """One dict per run, in table order (labelnum, method, seed): ``name``, ``dir``, ``train`` and
    ``test`` (argument lists), ``summary`` (the file whose existence means done)."""
    train_script, test_script = scripts(args.dataset)
    extra = (["--root_path", args.root_path] if args.root_path else []) + \
            (["--device", args.device] if args.device else [])
    runs = []
    for labelnum in args.labelnums:
        for method in args.methods:
            for seed in args.seeds:
                name = run_name(args.dataset, method, labelnum, seed)
                run_dir = args.out / "runs" / name
                eval_dir = run_dir / f"eval_{args.split}"
                train = [sys.executable, train_script, "--method", method, "--labelnum", str(labelnum),
                         "--seed", str(seed), "--save_dir", str(run_dir), *extra, *passthrough]
                test = [sys.executable, test_script, "--checkpoint", str(run_dir / "best.pth"),
                        "--split", args.split, "--out", str(eval_dir), "--no_predictions", *extra]
                runs.append({"name": name, "dir": run_dir, "train": train, "test": test,
                             "summary": eval_dir / "summary.json"})
    return runs


def status(run):
    """'done' (evaluation summary exists), 'trained' (training finished, evaluation missing) or 'todo'."""
    if run["summary"].is_file():
        return "done"
    if (run["dir"] / launch.TRAINED_FILE).is_file() and (run["dir"] / "best.pth").is_file():
        return "trained"
    return "todo"


def job_of(run, env=None, runner=None):
    """The launcher job of a run: train (unless trained; resumed when started), then evaluate."""
    steps = [{"name": "train", "command": run["train"], "outputs": [run["dir"] / "best.pth"],
              "marker": run["dir"] / launch.TRAINED_FILE},
             {"name": "test", "command": run["test"], "outputs": [run["summary"]]}]
    return launch.RunJob(run["name"], run["dir"], steps, env, runner)


def _tail(path, n=25):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def report_failures(results):
    """Print each failed job with its log's tail; returns the failures."""
    failures = [r for r in results if r and r.get("returncode") != 0]
    for f in failures:
        what = f"{f['step']} FAILED (exit code {f['returncode']})" if "step" in f else f"job FAILED ({f.get('error')})"
        print(f"[{f['run']}] {what}; log {f.get('log')}:\n{_tail(f.get('log'))}", file=sys.stderr, flush=True)
    return failures


def dry_run(args, runs):
    for s in [s for s in scripts(args.dataset) if not (REPO / s).is_file()]:
        print(f"# warning: {s} does not exist (yet)")
    for run in runs:
        state = status(run)
        if state == "done":
            print(f"# skip {run['name']}: {run['summary']} exists")
            continue
        if state == "trained":
            print(f"# {run['name']}: trained, evaluation only")
        else:
            print(shlex.join(run["train"]))
        print(shlex.join(run["test"]))
    if args.launcher == "slurm":
        print("# the batch script of each job (--launcher slurm):")
        print(launch.sbatch_script(args, args.out / "submitit"))
    return 0


def main(argv=None, runner=None):
    """Run (or with --dry_run print) the table; returns the exit status (1 if any run failed or is missing).
    ``runner`` (tests) replaces the subprocess runner; its jobs then run in this process (``debug``)."""
    args, passthrough = parse_args(argv)
    if runner is not None:
        args.launcher = "debug"
    runs = plan(args, passthrough)
    if args.dry_run:
        return dry_run(args, runs)
    missing = [s for s in scripts(args.dataset) if not (REPO / s).is_file()]
    if missing:
        print(f"run_table: {', '.join(missing)} not found in {REPO}", file=sys.stderr)
        return 2
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / EXPECTED_FILE).write_text(json.dumps(
        {"dataset": args.dataset, "split": args.split, "runs": [r["name"] for r in runs],
         "trainer_flags": passthrough, "root_path": args.root_path}, indent=2))
    env = launch.run_env(args)
    jobs = []
    for k, run in enumerate(runs, start=1):
        done = status(run) == "done"
        holder = None if done else launch.held_by(run["dir"])
        if done:
            print(f"[{k}/{len(runs)}] {run['name']}: skipped ({run['summary']} exists)", flush=True)
        elif holder:
            print(f"[{k}/{len(runs)}] {run['name']}: still running elsewhere ({holder}); left to that job", flush=True)
        else:
            jobs.append(job_of(run, env, runner))
    failures = report_failures(launch.launch(jobs, args, args.out / "submitit"))
    rows, problems = build_report(runs_dir, args.out, published=args.dataset == "ACDC" and not args.no_published,
                                  split=args.split)
    print(f"report: {args.out / 'results.md'}, {args.out / 'results.csv'} ({len(rows)} rows)")
    expected = {r["name"] for r in runs}
    open_problems = [p for p in problems if p["run"] in expected]
    for p in open_problems:
        print(f"NOT IN THE TABLE: {p['run']}: {p['problem']}", file=sys.stderr)
    if failures or open_problems:
        print(f"run_table: {len(failures)} run(s) failed in this invocation, {len(open_problems)} run(s) "
              f"missing from the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
