"""The GPU check in one command: the CUDA test suite, the benchmark and two short real trainings.

    bash bench/device_check.sh --out $OUT/device_check.json      # on a CUDA machine
    bash bench/device_check.sh --dry_run --out /tmp/dry.json       # anywhere: the same phases, CPU, tiny

Phases, in order, within ``--budget_s`` (default 540 s = 9 minutes) of wall time:

1. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (at most 120 s; all skipped in the dry run);
2. ``bench``: ``bench/bench_train.py`` at 256^2, batch 24, fast and plain paths (a time-boxed share);
3. ``sscd``: a short SSCD run (``code/train_ACDC_SSCD.py``: pre-training with the SDA, then the five
   curriculum stages) and 4. ``labeled_only`` (``code/train_ACDC_supervised.py``), both on ``--data``
   (real ACDC, 7 labeled patients, validated on val.list), sized from the benchmark's rates (``size_runs``:
   start-up, per-phase warm-up, every validation and checkpoint write counted) and each killed at its share.

It always leaves its results: ``--out`` is rewritten (atomically) when each phase starts and ends, with
every phase's return code, time, log path and, for a phase that failed or timed out, the tail of its
log; a training that was killed reports the last validation its log shows. The logs (and each run's
``validations.jsonl``) are in ``<out stem>_logs/`` beside ``--out``; the children's output is echoed to
stdout with the phase's name as it comes. The exit status is 1 when a phase failed.

``--dry_run`` runs every phase on the CPU at 32^2, batch 4, on a small generated ACDC-layout set: the
check is known to work before device time is spent on it (a test runs it end to end, and one in which a
phase is made to fail with ``--inject_failure``). The JSON format is in bench/README.md ("Device check").

Helpers used by device_check.sh: ``--missing`` prints the wheels of required modules that do not import
here, ``--missing_optional`` those of optional ones; ``--pack_data DIR`` copies a subset of ACDC that
fits the device's 64 MiB working-tree limit into DIR.

Only the standard library is imported at the top: ``--missing`` must run before the requirements are.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = 2
# module -> the distribution (wheel name) that provides it; torch is assumed present. The training and
# validation path imports no SimpleITK, medpy or tensorboardX (tests/test_device_check.py checks it).
REQUIRED = {"numpy": "numpy", "scipy": "scipy", "h5py": "h5py", "yaml": "pyyaml", "tqdm": "tqdm"}
# optional: pytest runs the cuda_tests phase (skipped without it); tensorboardX writes tensorboard logs
OPTIONAL = {"pytest": "pytest", "tensorboardX": "tensorboardx"}
# where the ACDC root is looked for when --data is not given (the first that exists)
DATA_CANDIDATES = ("../shared/data/ACDC", "shared/data/ACDC", ".device_data/ACDC")
# the run on the device and its CPU dry run
FULL = {"device": "cuda", "image_size": 256, "batch_size": 24, "budget_s": 540.0,
        "bench": ["--iterations", "10", "--repeats", "2", "--warmup", "3"],
        "feed": ["--feed_workers", "0", "2", "4", "8", "--feed_seconds", "4"]}
DRY = {"device": "cpu", "image_size": 32, "batch_size": 4, "budget_s": 16.0,
       "bench": ["--iterations", "1", "--repeats", "1", "--warmup", "1", "--threads", "1"],
       "feed": ["--feed_workers", "0", "1", "--feed_seconds", "0.5"]}
PHASES = ("cuda_tests", "bench", "disk_feed", "sscd", "labeled_only")
FEED_S = 60.0  # the disk feed phase's limit
CUDA_TESTS_S = 120.0  # the CUDA suite's limit
BENCH_SHARE = 0.4   # of the budget left after the CUDA suite, at most, for the benchmark
SSCD_SHARE = 0.65   # of what is left after the benchmark; the labeled-only run gets the rest
MARGIN = 0.1        # of the budget, kept free when the runs are sized
STARTUP_S = {"cuda": 25.0, "cpu": 4.0}  # a trainer process's start: imports, CUDA context, data into memory
PHASE_START_S = {"cuda": 8.0, "cpu": 1.0}  # each training phase's start: networks, cuDNN autotuning, first steps
CHECKPOINT_S = {"cuda": 1.0, "cpu": 0.3}  # one checkpoint write (last.pth, and best.pth when it improved)
# the least time a run is given before it is killed: the dry run's tiny runs are mostly start-up
MIN_TIMEOUT_S = {"cuda": 30.0, "cpu": 120.0}
LABELNUM = {"full": 7, "dry": 1}  # labeled patients (ACDC table: 136 and 32 slices)
STAGES = 5
MAX_PACK_MIB = 40.0  # --pack_data's limit: the device takes 64 MiB with the carried wheels
TAIL_LINES = 40      # log lines kept in the JSON of a phase that failed or timed out
# the rates used to size the trainings when the benchmark failed (the JSON says so: "rates": "assumed")
ASSUMED_RATES = {"cuda": {"pretrain_it_s": 10.0, "pretrain_sda_it_s": 6.0, "self_train_it_s": 2.0, "val_s": 3.0},
                 "cpu": {"pretrain_it_s": 5.0, "pretrain_sda_it_s": 3.0, "self_train_it_s": 1.0, "val_s": 0.5}}


def missing_wheels(modules=None):
    """The distributions (wheel names) of ``modules`` (default ``REQUIRED``) whose module cannot be found."""
    out = []
    for module, wheel in (REQUIRED if modules is None else modules).items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            found = False
        if not found:
            out.append(wheel)
    return out


def pack_data(source, dest, slices):
    """Copy an ACDC subset into ``dest``: the lists, the val volumes and the first ``slices`` ids of
    train_slices.list (the 136 labeled slices of 7 patients and unlabeled ones after them). Refused
    (SystemExit, and ``dest`` removed) when it comes to more than ``MAX_PACK_MIB``."""
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
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2 ** 20
    if size > MAX_PACK_MIB:
        shutil.rmtree(dest)
        raise SystemExit(f"--pack_data {dest}: {slices} slices come to {size:.1f} MiB, more than the "
                         f"{MAX_PACK_MIB:.0f} MiB that leave room for the wheels in the device's 64 MiB; "
                         f"give fewer --slices")
    print(f"{dest}: {slices} training slices and {len((source / 'val.list').read_text().split())} val volumes, "
          f"{size:.1f} MiB")


def find_data(given):
    if given:
        return Path(given)
    for candidate in DATA_CANDIDATES:
        path = REPO / candidate
        if (path / "train_slices.list").is_file():
            return path
    raise SystemExit(f"no ACDC root found in {DATA_CANDIDATES} (relative to {REPO}): give --data, or make a "
                     f"subset with --pack_data .device_data/ACDC (bench/README.md)")


def _pump(stream, log, prefix, lines):
    """Copy a child's output line by line to ``log`` (flushed) and to stdout, keeping the lines."""
    for line in stream:
        log.write(line)
        log.flush()
        lines.append(line.rstrip("\n"))
        print(f"[{prefix}] {line}", end="" if line.endswith("\n") else "\n", flush=True)


def run_command(argv, timeout, log_path, prefix, env=None):
    """Run ``argv`` (cwd: the repository), killed after ``timeout`` s; its stdout and stderr go, as
    they come, to ``log_path`` and to stdout (prefixed ``[prefix]``). Returns ``(returncode or None
    when killed, seconds, output lines)``."""
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, prefix, lines), daemon=True)
        pump.start()
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        pump.join(timeout=10)
        if code is None:
            log.write(f"\n[device_check] killed after {timeout:.0f} s\n")
    return code, time.perf_counter() - t0, lines


def sscd_seconds(plan, rates, device):
    """Seconds the planned SSCD run takes at ``rates``: the process start, six training phases
    (pre-training, five stages) each with its start, its iterations, its validations (one every
    ``val_interval`` and one at its end, plus each stage's start with --validate_stage_start on)
    and a checkpoint write of up to two files per validation."""
    pre, every = plan["pre_iterations"], plan["val_interval"]
    base, rest = divmod(plan["self_iterations"], STAGES)  # utils.sscd.split_iterations: the rest to the last
    stages = [base + (k >= STAGES - rest) for k in range(STAGES)]
    validations = math.ceil(pre / every) + sum(math.ceil(n / every) + 1 for n in stages)
    return (STARTUP_S[device] + (1 + STAGES) * PHASE_START_S[device] + pre / rates["pretrain_sda_it_s"]
            + plan["self_iterations"] / rates["self_train_it_s"]
            + validations * (rates["val_s"] + 2 * CHECKPOINT_S[device]))


def labeled_only_seconds(plan, rates, device):
    """Seconds the planned labeled-only run takes at ``rates`` (same model as ``sscd_seconds``)."""
    n, every = plan["labeled_only_iterations"], plan["val_interval"]
    return (STARTUP_S[device] + PHASE_START_S[device] + n / rates["pretrain_it_s"]
            + math.ceil(n / every) * (rates["val_s"] + 2 * CHECKPOINT_S[device]))


def sscd_plan(pre):
    """The SSCD run of ``pre`` pre-training iterations: self-training 3x as long (the paper's 10k :
    30k, at least one iteration per stage), each part validated at its end (and each stage at its
    start too): the validations and checkpoint writes are what a short run cannot spread."""
    self_total = max(STAGES, 3 * pre)
    return {"pre_iterations": pre, "self_iterations": self_total,
            "val_interval": max(pre, -(-self_total // STAGES))}


def _largest(fits, low, high):
    """The largest n in [low, high] with ``fits(n)`` (``fits`` true up to some n, false after;
    ``low`` when none fits)."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def size_runs(rates, seconds, device):
    """Iterations of the SSCD and labeled-only runs that fit ``seconds`` at the measured ``rates``
    (the fast path's it/s and one validation's seconds from the benchmark): the most that
    ``sscd_seconds`` / ``labeled_only_seconds`` fit into their shares (``SSCD_SHARE`` of the time
    for SSCD, ``sscd_plan``; the rest for the labeled-only run, at the same interval; at least 2
    iterations each, however long that takes). Returns a dict of the iteration counts, the
    validation interval and each run's time limit."""
    sscd_s, sup_s = SSCD_SHARE * seconds, (1 - SSCD_SHARE) * seconds
    pre = _largest(lambda n: sscd_seconds(sscd_plan(n), rates, device) <= sscd_s, 2,
                   max(2, int(sscd_s * rates["self_train_it_s"] / 3) + 1))
    plan = sscd_plan(pre)

    def sup_fits(n):
        return labeled_only_seconds({**plan, "labeled_only_iterations": n}, rates, device) <= sup_s
    plan["labeled_only_iterations"] = _largest(sup_fits, 2, max(2, int(sup_s * rates["pretrain_it_s"]) + 1))
    least = MIN_TIMEOUT_S[device]
    plan.update(sscd_timeout_s=round(max(sscd_s, least), 1), labeled_only_timeout_s=round(max(sup_s, least), 1))
    return plan


def final_dice(checkpoint):
    """``(val Dice, [per class])`` stored in a trainer's final checkpoint, or ``(None, [])``."""
    sys.path.insert(0, str(REPO / "code"))
    from training.sscd_train import final_val_metrics
    if not Path(checkpoint).is_file():
        return None, []
    score, per_class = final_val_metrics(checkpoint, 4)
    return round(float(score), 4), [round(float(d), 4) for d in per_class]


def log_progress(lines):
    """What a trainer's log shows: the last ``[phase] it N`` reached and its validations
    (``last_val_dice``, ``best_val_dice``; None before the first)."""
    reached, dices = None, []
    for line in lines:
        match = re.search(r"\[(\w+)\] it (\d+)", line)
        if match:
            reached = {"phase": match.group(1), "iteration": int(match.group(2))}
        dice = re.search(r"\] it \d+ val Dice ([0-9.]+)", line)
        if dice:
            dices.append(float(dice.group(1)))
    return {"reached": reached, "validations": len(dices), "last_val_dice": dices[-1] if dices else None,
            "best_val_dice": max(dices) if dices else None}


def phase_record(name, code, seconds, lines, log):
    """The JSON of a finished phase; the log's tail when it failed or was killed."""
    record = {"phase": name, "returncode": code, "timed_out": code is None, "wall_s": round(seconds, 1),
              "log": str(log), "ok": code == 0}
    if code != 0:
        record["log_tail"] = lines[-TAIL_LINES:]
    return record


class Check:
    """The check's state, written to ``out`` (atomically) whenever it changes: what ran, what it gave."""

    def __init__(self, a):
        self.a, self.cfg = a, DRY if a.dry_run else FULL
        self.device = self.cfg["device"]
        self.budget = a.budget_s or self.cfg["budget_s"]
        self.start = time.perf_counter()
        self.out = Path(a.out).resolve()
        self.logs = self.out.parent / f"{self.out.stem}_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="sscd_device_check_"))  # checkpoints: they stay here
        self.result = {"format": FORMAT, "dry_run": a.dry_run, "device": self.device, "device_name": None,
                       "budget_s": self.budget, "status": "running", "running": None, "failed_phases": [],
                       "logs": str(self.logs), "work_dir": str(self.work), "phases": {}, "summary": {}}

    def elapsed(self):
        return time.perf_counter() - self.start

    def write(self):
        """Rewrite ``out`` with the state so far (a temporary file renamed over it)."""
        self.result["wall_s"] = round(self.elapsed(), 1)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.out)

    def command(self, name, argv, timeout):
        """Run one phase's command (``--inject_failure name`` adds a flag it rejects); record and
        write its outcome. Returns ``(record, output lines)``."""
        if self.a.inject_failure == name:
            argv = [*argv, "--no_such_flag_injected_by_device_check"]
        self.result["running"] = name
        self.write()
        print(f"device_check: {name} (at most {timeout:.0f} s; {self.elapsed():.0f} s of {self.budget:.0f} s "
              f"used)", flush=True)
        log = self.logs / f"{name}.log"
        code, seconds, lines = run_command(argv, timeout, log, name)
        record = phase_record(name, code, seconds, lines, log)
        self.result["phases"][name] = record
        self.result["running"] = None
        if not record["ok"]:
            self.result["failed_phases"].append(name)
        print(f"device_check: {name} {'ok' if record['ok'] else 'timed out' if code is None else f'failed ({code})'} "
              f"in {seconds:.0f} s", flush=True)
        self.write()
        return record, lines

    def skip(self, name, reason):
        self.result["phases"][name] = {"phase": name, "skipped": reason, "ok": None}
        print(f"device_check: {name} skipped: {reason}", flush=True)
        self.write()


def cuda_tests_phase(check):
    """The CUDA suite (pytest -m cuda): passed/failed/skipped counts from pytest's summary line."""
    if missing_wheels(OPTIONAL)[:1] == ["pytest"]:
        return check.skip("cuda_tests", "pytest is not installed")
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    record, lines = check.command("cuda_tests", argv, max(min(CUDA_TESTS_S, check.budget / 3),
                                                          MIN_TIMEOUT_S[check.device]))
    counts = {}
    for line in lines[-5:]:
        for number, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line):
            counts[what] = int(number)
    record["tests"] = counts
    check.write()


def bench_phase(check, common):
    """The benchmark; returns its JSON (None when it failed) and records its figures."""
    argv = [sys.executable, "bench/bench_train.py", *common, "--path", "both", "--compile", check.a.compile,
            *check.cfg["bench"]]
    left = check.budget - check.elapsed()
    record, lines = check.command("bench", argv, max(BENCH_SHARE * left, MIN_TIMEOUT_S[check.device]))
    bench = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), None) if record["ok"] else None
    if bench is None:
        return None
    record["result"] = bench
    check.result["device_name"] = bench["device_name"]
    summary = {"fast_" + k: bench["fast"][k] for k in ("pretrain_it_s", "pretrain_sda_it_s", "self_train_it_s",
                                                        "val_s", "projected_paper_run_h")}
    summary.update({"plain_" + k: bench["plain"][k] for k in ("pretrain_sda_it_s", "self_train_it_s",
                                                              "projected_paper_run_h")})
    summary.update(peak_memory_mb=bench["peak_memory_mb"], speedup_self_train=bench.get("speedup_self_train"))
    check.result["summary"].update(summary)
    check.write()
    return bench


def feed_phase(check, data):
    """Slices per second the disk data path (--data_cache disk) reads at the check's size, by the number of
    DataLoader workers: what a pool too large for memory can feed the GPU (the paper run needs ~500/s)."""
    argv = [sys.executable, "bench/bench_pool.py", "--feed", str(data), "--image_size", str(check.cfg["image_size"]),
            *check.cfg["feed"]]
    record, lines = check.command("disk_feed", argv, max(FEED_S, MIN_TIMEOUT_S[check.device] / 4))
    result = next((json.loads(line) for line in reversed(lines) if line.startswith('{"cpu"')), None)
    if result is not None:
        record["result"] = result
        check.result["summary"]["disk_feed_slices_per_s"] = result["feed_slices_per_s"]
    check.write()


def train_phase(check, name, argv, timeout, iterations):
    """One trainer subprocess: return code, wall time, iterations per wall second (start and
    validations included), the val Dice of its final checkpoint, what its log shows it reached (for
    a killed run, its last validation); its validations.jsonl files are copied beside the logs."""
    record, lines = check.command(name, [sys.executable, *argv], timeout)
    score, per_class = final_dice(check.work / name / "best.pth") if record["ok"] else (None, [])
    record.update(iterations=iterations, it_s_wall=round(iterations / max(record["wall_s"], 1e-3), 3),
                  val_dice=score, val_dice_per_class=per_class, progress=log_progress(lines))
    for k, history in enumerate(sorted((check.work / name).rglob("validations.jsonl"))):
        shutil.copy2(history, check.logs / f"{name}_{history.parent.name}_validations.jsonl")
    check.result["summary"][f"{name}_val_dice"] = score if score is not None else record["progress"]["last_val_dice"]
    check.write()
    return record


def device_check(a):
    check = Check(a)
    if a.dry_run:
        sys.path.insert(0, str(REPO / "code"))
        from dataloaders.synthetic import make_synthetic_acdc
        data = make_synthetic_acdc(check.work / "data", n_patients=8, n_val=2, n_test=1, slices_per_volume=6,
                                   size=(40, 48))
    else:
        data = find_data(a.data)
    check.result["data"] = str(data)
    size, batch, device = check.cfg["image_size"], check.cfg["batch_size"], check.device
    common = ["--root_path", str(data), "--image_size", str(size), "--batch_size", str(batch),
              "--labelnum", str(LABELNUM["dry" if a.dry_run else "full"]), "--device", device]
    cuda_tests_phase(check)
    bench = bench_phase(check, common)
    feed_phase(check, data)
    rates = bench["fast"] if bench else ASSUMED_RATES[device]
    plan = size_runs(rates, (1 - MARGIN) * check.budget - check.elapsed(), device)
    plan["rates"] = "measured" if bench else "assumed (the benchmark failed)"
    check.result["plan"] = plan
    train = ["--labeled_bs", str(batch // 2), "--log_interval", str(plan["val_interval"]),
             "--val_interval", str(plan["val_interval"]), *common]
    train_phase(check, "sscd", ["code/train_ACDC_SSCD.py", *train, "--save_dir", str(check.work / "sscd"),
                                "--pre_iterations", str(plan["pre_iterations"]),
                                "--max_iterations", str(plan["self_iterations"])],
                plan["sscd_timeout_s"], plan["pre_iterations"] + plan["self_iterations"])
    train_phase(check, "labeled_only", ["code/train_ACDC_supervised.py", *train, "--save_dir",
                                        str(check.work / "labeled_only"),
                                        "--max_iterations", str(plan["labeled_only_iterations"])],
                plan["labeled_only_timeout_s"], plan["labeled_only_iterations"])
    check.result["status"] = "failed" if check.result["failed_phases"] else "done"
    check.write()
    return check.result


def build_parser():
    """The device check's flags (nothing parsed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry_run", action="store_true", help="CPU, 32^2, batch 4, generated data, under a minute")
    p.add_argument("--out", default=None,
                   help="the JSON file written (after every phase; default results/device_check.json in the "
                        "repository); the logs go to <out stem>_logs/ beside it")
    p.add_argument("--data", default=None, help=f"ACDC root (default: the first of {DATA_CANDIDATES} found)")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"wall-time budget of the whole check (default {FULL['budget_s']:.0f} s; dry run "
                        f"{DRY['budget_s']:.0f} s)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                   help="the benchmark's fast-path torch.compile; off by default: compiling every step's graphs "
                        "takes minutes, more than the budget can spare (the CUDA suite compiles one forward)")
    p.add_argument("--inject_failure", choices=PHASES, default=None,
                   help="make this phase fail (its command gets a flag it rejects): checks that the JSON and "
                        "logs still come back")
    p.add_argument("--missing", action="store_true", help="only print the wheels of missing required modules")
    p.add_argument("--missing_optional", action="store_true",
                   help="only print the wheels of missing optional modules")
    p.add_argument("--pack_data", default=None, metavar="DIR",
                   help="only copy an ACDC subset (from --data or the default root) into DIR and stop")
    p.add_argument("--slices", type=int, default=360, help="training slices of --pack_data")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.out = a.out or str(REPO / "results" / "device_check.json")
    if a.missing or a.missing_optional:
        print(" ".join(missing_wheels(REQUIRED if a.missing else OPTIONAL)))
        return None
    if a.pack_data:
        pack_data(find_data(a.data), a.pack_data, a.slices)
        return None
    result = device_check(a)
    print(json.dumps(result["summary"]))
    print(f"device_check: {a.out} ({result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget; "
          f"{'phases failed: ' + ', '.join(result['failed_phases']) if result['failed_phases'] else 'all phases ok'})")
    if result["failed_phases"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
