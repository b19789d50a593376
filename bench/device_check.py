"""The GPU check in one command: the benchmark and two short real trainings, written to one JSON file.

    bash bench/device_check.sh --out $OUT/device_check.json      # on a CUDA machine
    bash bench/device_check.sh --dry_run --out /tmp/dry.json       # anywhere: the same steps, CPU, tiny

In order, within ``--budget_s`` (default 540 s = 9 minutes) of wall time:

1. ``bench/bench_train.py`` at 256^2, batch 24, fast and plain paths (a time-boxed share of the budget);
2. a short SSCD run (``code/train_ACDC_SSCD.py``: pre-training with the SDA, then the five curriculum
   stages) and 3. a labeled-only run (``code/train_ACDC_supervised.py``), both on ``--data`` (real ACDC,
   7 labeled patients, validated on val.list), their iterations sized from the rates the benchmark just
   measured so that both end inside the budget (each is also killed at its share of it).

``--dry_run`` runs every step on the CPU at 32^2, batch 4, on a small generated ACDC-layout set with
a budget of a few seconds: the check is known to work before device time is spent on it (a test runs
it end to end). The JSON format is documented in bench/README.md ("Device check").

Helpers used by device_check.sh: ``--missing`` prints the wheels whose modules do not import here;
``--pack_data DIR`` copies a subset of ACDC that fits the device's 64 MiB working-tree limit into DIR.

Only the standard library is imported at the top: ``--missing`` must run before the requirements are.
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = 1
# module -> the distribution (wheel name) that provides it; torch is assumed present
REQUIRED = {"numpy": "numpy", "scipy": "scipy", "h5py": "h5py", "yaml": "pyyaml", "tqdm": "tqdm",
            "google.protobuf": "protobuf", "packaging": "packaging", "tensorboardX": "tensorboardx",
            "medpy": "medpy"}
# where the ACDC root is looked for when --data is not given (the first that exists)
DATA_CANDIDATES = ("../shared/data/ACDC", "shared/data/ACDC", ".device_data/ACDC")
# the run on the device and its CPU dry run
FULL = {"device": "cuda", "image_size": 256, "batch_size": 24, "budget_s": 540.0,
        "bench": ["--iterations", "10", "--repeats", "2", "--warmup", "3"]}
DRY = {"device": "cpu", "image_size": 32, "batch_size": 4, "budget_s": 16.0,
       "bench": ["--iterations", "1", "--repeats", "1", "--warmup", "1", "--threads", "1"]}
BENCH_SHARE = 0.4   # of the budget, at most, for the benchmark (it is killed after that)
SSCD_SHARE = 0.65   # of what is left after the benchmark; the labeled-only run gets the rest
MARGIN = 0.1        # of the budget, kept free when the runs are sized
STARTUP_S = {"cuda": 25.0, "cpu": 4.0}  # a trainer's start: imports, data into memory, first-step warm-up
# the least time a run is given before it is killed: the dry run's tiny runs are mostly start-up
MIN_TIMEOUT_S = {"cuda": 30.0, "cpu": 120.0}
LABELNUM = {"full": 7, "dry": 1}  # labeled patients (ACDC table: 136 and 32 slices)
STAGES = 5


def missing_wheels():
    """The distributions (wheel names) of ``REQUIRED`` whose module cannot be found."""
    out = []
    for module, wheel in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            found = False
        if not found:
            out.append(wheel)
    return out


def pack_data(source, dest, slices):
    """Copy an ACDC subset into ``dest``: the lists, the val volumes and the first ``slices`` ids of
    train_slices.list (the 136 labeled slices of 7 patients and unlabeled ones after them)."""
    source, dest = Path(source), Path(dest)
    ids = (source / "train_slices.list").read_text().split()
    if slices <= 136 or slices > len(ids):
        raise SystemExit(f"--slices {slices}: expected 137..{len(ids)} (7 labeled patients are 136 slices)")
    (dest / "data" / "slices").mkdir(parents=True, exist_ok=True)
    (dest / "train_slices.list").write_text("\n".join(ids[:slices]) + "\n")
    for name in ("train.list", "val.list", "test.list", "dataset.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    for case in (source / "val.list").read_text().split():
        shutil.copy2(source / "data" / f"{case}.h5", dest / "data" / f"{case}.h5")
    for sid in ids[:slices]:
        shutil.copy2(source / "data" / "slices" / f"{sid}.h5", dest / "data" / "slices" / f"{sid}.h5")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {slices} training slices and {len((source / 'val.list').read_text().split())} val volumes, "
          f"{size / 2 ** 20:.1f} MiB")


def find_data(given):
    if given:
        return Path(given)
    for candidate in DATA_CANDIDATES:
        path = REPO / candidate
        if (path / "train_slices.list").is_file():
            return path
    raise SystemExit(f"no ACDC root found in {DATA_CANDIDATES} (relative to {REPO}): give --data, or make a "
                     f"subset with --pack_data .device_data/ACDC (bench/README.md)")


def run_command(argv, timeout, log_path, env=None):
    """Run ``argv`` (cwd: the repository) with a timeout; stdout+stderr to ``log_path``. Returns
    ``(returncode or None when killed, seconds, last stdout line)``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            stdout, _ = proc.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            log.write(stdout or "")
            return None, time.perf_counter() - t0, ""
        log.write(stdout)
    lines = [line for line in stdout.splitlines() if line.strip()]
    return proc.returncode, time.perf_counter() - t0, lines[-1] if lines else ""


def size_runs(rates, seconds, device):
    """Iterations of the SSCD and labeled-only runs that fit ``seconds`` at the measured ``rates``
    (the fast path's it/s and one validation's seconds from the benchmark).

    SSCD: pre-training and self-training 1 : 3 (the paper's 10k : 30k), the self-training split
    over the five stages, a validation every ``val_interval`` iterations and at the end of each part;
    labeled-only: the rest of the time at the pre-training rate (one forward of the labeled half).
    Returns a dict of the iteration counts and the time each run is allowed."""
    startup = STARTUP_S[device]
    sscd_s, sup_s = SSCD_SHARE * seconds, (1 - SSCD_SHARE) * seconds
    least = MIN_TIMEOUT_S[device]
    val_s = rates["val_s"]
    # SSCD: n_pre / pre + 3 n_pre / self + validations = sscd_s - 6 starts (pre-training + 5 stages)
    train_s = max(sscd_s - startup - (1 + STAGES) * 2 * val_s, 0.0)
    per_pre = 1 / rates["pretrain_sda_it_s"] + 3 / rates["self_train_it_s"]
    pre = max(2, int(train_s / per_pre))
    self_total = max(STAGES, 3 * pre)
    sup = max(2, int(max(sup_s - startup - 2 * val_s, 0.0) * rates["pretrain_it_s"]))
    return {"pre_iterations": pre, "self_iterations": self_total, "labeled_only_iterations": sup,
            "val_interval": max(1, math.ceil(max(pre, self_total // STAGES, sup) / 2)),
            "sscd_timeout_s": round(max(sscd_s, least), 1), "labeled_only_timeout_s": round(max(sup_s, least), 1)}


def final_dice(checkpoint):
    """``(val Dice, [per class])`` stored in a trainer's final checkpoint, or ``(None, [])``."""
    sys.path.insert(0, str(REPO / "code"))
    from utils.sscd_train import final_val_metrics
    if not Path(checkpoint).is_file():
        return None, []
    score, per_class = final_val_metrics(checkpoint, 4)
    return round(float(score), 4), [round(float(d), 4) for d in per_class]


def train_run(name, argv, timeout, folder, iterations):
    """One trainer subprocess: its return code, wall time, iterations per second (wall, validations
    and start included) and the val Dice stored in its final checkpoint."""
    code, seconds, _ = run_command([sys.executable, *argv], timeout, folder / f"{name}.log")
    score, per_class = final_dice(folder / name / "best.pth") if code == 0 else (None, [])
    return {"returncode": code, "timed_out": code is None, "wall_s": round(seconds, 1), "iterations": iterations,
            "it_s_wall": round(iterations / seconds, 3), "val_dice": score, "val_dice_per_class": per_class,
            "log": str(folder / f"{name}.log")}


def device_check(a):
    cfg = DRY if a.dry_run else FULL
    budget = a.budget_s or cfg["budget_s"]
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sscd_device_check_"))
    if a.dry_run:
        sys.path.insert(0, str(REPO / "code"))
        from dataloaders.synthetic import make_synthetic_acdc
        data = make_synthetic_acdc(work / "data", n_patients=8, n_val=2, n_test=1, slices_per_volume=6,
                                   size=(40, 48))
    else:
        data = find_data(a.data)
    size, batch, device = cfg["image_size"], cfg["batch_size"], cfg["device"]
    common = ["--root_path", str(data), "--image_size", str(size), "--batch_size", str(batch),
              "--labelnum", str(LABELNUM["dry" if a.dry_run else "full"]), "--device", device]
    bench_argv = [sys.executable, "bench/bench_train.py", *common, "--path", "both", "--compile", a.compile,
                  *cfg["bench"]]
    code, seconds, last = run_command(bench_argv, max(BENCH_SHARE * budget, MIN_TIMEOUT_S[device]),
                                      work / "bench.log")
    if code != 0 or not last.startswith("{"):
        raise SystemExit(f"device_check: the benchmark {'timed out' if code is None else f'failed ({code})'} "
                         f"after {seconds:.0f} s; see {work / 'bench.log'}")
    bench = json.loads(last)
    fast = bench["fast"]
    left = (1 - MARGIN) * budget - (time.perf_counter() - start)
    plan = size_runs(fast, left, device)
    labeled_bs = str(batch // 2)
    train = ["--labeled_bs", labeled_bs, "--log_interval", str(plan["val_interval"]),
             "--val_interval", str(plan["val_interval"]), *common]
    sscd = train_run("sscd", ["code/train_ACDC_SSCD.py", *train, "--save_dir", str(work / "sscd"),
                              "--pre_iterations", str(plan["pre_iterations"]),
                              "--max_iterations", str(plan["self_iterations"])],
                     plan["sscd_timeout_s"], work, plan["pre_iterations"] + plan["self_iterations"])
    supervised = train_run("labeled_only", ["code/train_ACDC_supervised.py", *train, "--save_dir",
                                            str(work / "labeled_only"),
                                            "--max_iterations", str(plan["labeled_only_iterations"])],
                           plan["labeled_only_timeout_s"], work, plan["labeled_only_iterations"])
    summary = {"fast_" + k: fast[k] for k in ("pretrain_it_s", "pretrain_sda_it_s", "self_train_it_s", "val_s",
                                              "projected_paper_run_h")}
    summary.update({"plain_" + k: bench["plain"][k] for k in ("pretrain_sda_it_s", "self_train_it_s",
                                                              "projected_paper_run_h")})
    summary.update(peak_memory_mb=bench["peak_memory_mb"], speedup_self_train=bench.get("speedup_self_train"),
                   sscd_val_dice=sscd["val_dice"], labeled_only_val_dice=supervised["val_dice"])
    return {"format": FORMAT, "dry_run": a.dry_run, "device": device, "device_name": bench["device_name"],
            "data": str(data), "budget_s": budget, "wall_s": round(time.perf_counter() - start, 1),
            "summary": summary, "plan": plan, "sscd": sscd, "labeled_only": supervised, "bench": bench,
            "work_dir": str(work)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry_run", action="store_true", help="CPU, 32^2, batch 4, generated data, a few seconds")
    p.add_argument("--out", default=str(REPO / "results" / "device_check.json"), help="the JSON file written")
    p.add_argument("--data", default=None, help=f"ACDC root (default: the first of {DATA_CANDIDATES} found)")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"wall-time budget of the whole check (default {FULL['budget_s']:.0f} s; dry run "
                        f"{DRY['budget_s']:.0f} s)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                   help="the benchmark's fast-path torch.compile; off by default: compiling every step's graphs "
                        "takes minutes, more than the budget can spare")
    p.add_argument("--missing", action="store_true", help="only print the wheels whose modules are missing")
    p.add_argument("--pack_data", default=None, metavar="DIR",
                   help="only copy an ACDC subset (from --data or the default root) into DIR and stop")
    p.add_argument("--slices", type=int, default=400, help="training slices of --pack_data")
    a = p.parse_args(argv)
    if a.missing:
        print(" ".join(missing_wheels()))
        return None
    if a.pack_data:
        pack_data(find_data(a.data), a.pack_data, a.slices)
        return None
    result = device_check(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]))
    print(f"device_check: {out} ({result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget)")
    return result


if __name__ == "__main__":
    main()
