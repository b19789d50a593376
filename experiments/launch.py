"""One launcher for every driver that trains several runs: submitit executors (local processes, SLURM,
or in this process for tests), a job per run that trains it (resuming a started run) and evaluates it,
requeued with ``--resume`` when SLURM preempts it or its time runs out.

``--launcher local`` runs ``--jobs`` jobs at once on this machine: on a CPU each with one torch thread,
on a machine with GPUs each on its own ``--gpus_per_run`` GPUs (default: as many jobs as GPUs allow).
``--launcher slurm`` submits every job to SLURM (``--partition``, ``--timeout_min``, ``--gpus_per_run``,
``--slurm key=value`` for any other sbatch parameter) and waits for them. ``--launcher debug`` runs the
jobs one after the other in this process (tests). The state of a sweep is its runs' folders: a finished
run is never trained again, a run whose job is still held by a process (its ``.run.lock``) is left to it.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "slurm", "debug")
JOB_FILE = "job.json"  # the submitit job of a run: id, launcher, folder (written when submitted)
MAX_TIMEOUTS = 100  # requeues after a time-out before a job gives up (preemptions are not counted)


def add_launcher_args(p):
    """The launcher flags of every multi-run driver (docs/flags.md)."""
    g = p.add_argument_group("launcher (experiments/launch.py; docs/clusters.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: jobs on this machine; slurm: sbatch through submitit; debug: in this process")
    g.add_argument("--jobs", type=int, default=None,
                   help="local: runs at once (default: the GPUs / --gpus_per_run, else 1); each gets one CPU thread "
                        "when they share a CPU")
    g.add_argument("--gpus_per_run", type=int, default=None,
                   help="GPUs of one run (default: 1 where CUDA is available, else 0)")
    g.add_argument("--timeout_min", type=int, default=24 * 60, help="a job's time limit; at its end the job is "
                   "requeued and resumes from its last checkpoint")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch parameter (repeatable), e.g. --slurm account=lab --slurm qos=normal")
    return p


def forwarded(args):
    """The launcher flags of ``args`` as a command line, for a driver that calls run_table."""
    flags = ["--launcher", args.launcher, "--timeout_min", str(args.timeout_min)]
    flags += ["--jobs", str(args.jobs)] if args.jobs is not None else []
    flags += ["--gpus_per_run", str(args.gpus_per_run)] if args.gpus_per_run is not None else []
    flags += ["--partition", args.partition] if args.partition else []
    for item in args.slurm:
        flags += ["--slurm", item]
    return flags


def check_launcher_args(parser, args):
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected 1 or more")
    if args.gpus_per_run is not None and args.gpus_per_run < 0:
        parser.error(f"--gpus_per_run {args.gpus_per_run}: expected 0 or more")
    bad = [item for item in args.slurm if "=" not in item]
    if bad:
        parser.error(f"--slurm {bad[0]!r}: expected KEY=VALUE")
    if args.launcher != "slurm" and (args.partition or args.slurm):
        parser.error("--partition and --slurm are SLURM parameters: give --launcher slurm")


def gpu_count():
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def gpus_per_run(args):
    return args.gpus_per_run if args.gpus_per_run is not None else (1 if gpu_count() else 0)


def concurrency(args):
    """How many local jobs run at once."""
    per_run = gpus_per_run(args)
    if args.jobs is not None:
        return args.jobs
    return max(1, gpu_count() // per_run) if per_run else 1


def one_thread_env():
    """The environment of runs that share the cores: OMP_NUM_THREADS=1 unless it is set."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_env(args):
    """The environment of a sweep's runs: ``one_thread_env()`` when several local CPU runs share this
    machine's cores, else None (the caller's)."""
    shared_cpu = args.launcher != "slurm" and not gpus_per_run(args) and concurrency(args) > 1
    return one_thread_env() if shared_cpu else None


def execute(command, log_path, env=None):
    """Run ``command`` from the repository root with its output in ``log_path``; its exit code.
    The child is stopped with its job (``RunJob.checkpoint``) through ``execute.current``."""
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        execute.current = child
        try:
            return child.wait()
        finally:
            execute.current = None


execute.current = None


FAILED_FILE = "FAILED.json"
TRAINED_FILE = "TRAINED"  # written by a job once its training step is done
TIMES_FILE = "run_table_times.jsonl"  # seconds of every finished step of a run


class RunJob:
    """One run of a sweep as a submitit job. ``steps`` is a list of dicts, one after the other:
    ``name``, ``command`` (argv, run from the repository root through ``runner``, ``execute`` by default,
    its output in ``<run dir>/run_table_<name>.log``), ``outputs`` (files it must have written), ``marker``
    (a file written with the command when it succeeded: a requeued or rerun job skips a step whose
    marker and outputs exist). A train step gets ``--resume`` when its folder holds a started run. A
    failed step writes ``FAILED.json`` (step, command, exit code, log) and ends the job; its result
    dict says so. ``checkpoint`` (submitit calls it on preemption or time-out) stops the step in
    progress and requeues the same job, whose trainer then resumes from its last checkpoint (on the
    CPU to the weights of an uninterrupted run)."""

    def __init__(self, name, run_dir, steps, env=None, runner=None):
        self.name, self.run_dir, self.steps, self.env, self.runner = name, Path(run_dir), steps, env, runner

    def __call__(self):
        runner = self.runner or execute
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / FAILED_FILE).unlink(missing_ok=True)
        for step in self.steps:
            if step_done(step):
                continue
            command = list(step["command"])
            if step["name"] == "train" and started(self.run_dir) and "--resume" not in command:
                command.append("--resume")
            log = self.run_dir / f"run_table_{step['name']}.log"
            start = time.time()
            code = runner(command, log, self.env)
            missing = [str(o) for o in step.get("outputs", ()) if not Path(o).is_file()]
            if code != 0 or missing:
                failure = {"run": self.name, "step": step["name"], "returncode": code, "command": shlex.join(command),
                           "log": str(log)}
                if code == 0:
                    failure["problem"] = "exited 0 but wrote no " + ", ".join(Path(m).name for m in missing)
                (self.run_dir / FAILED_FILE).write_text(json.dumps(failure, indent=2))
                return {**failure, "seconds": round(time.time() - start, 1)}
            with open(self.run_dir / TIMES_FILE, "a") as f:  # one line per finished step (a resumed one adds one)
                f.write(json.dumps({"step": step["name"], "seconds": round(time.time() - start, 1),
                                    "start": round(start, 2), "end": round(time.time(), 2),
                                    "omp_threads": (self.env or os.environ).get("OMP_NUM_THREADS")}) + "\n")
            if step.get("marker"):
                Path(step["marker"]).write_text(shlex.join(command) + "\n")
        return {"run": self.name, "returncode": 0}

    def checkpoint(self, *args, **kwargs):
        import submitit
        child, execute.current = execute.current, None  # (a Popen cannot be pickled with the requeued job)
        stop(child)
        return submitit.helpers.DelayedSubmission(RunJob(self.name, self.run_dir, self.steps, self.env, self.runner))


def stop(child, grace_s=30):
    """Stop a step's process from inside a signal handler (the interrupted ``wait`` holds the Popen's
    lock, so neither ``wait`` nor ``poll`` would see it exit): SIGTERM, then SIGKILL after ``grace_s``.
    Its run folder's lock goes with it, so the requeued job can take the run."""
    if child is None:
        return
    try:
        child.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return  # exited (reaped later by the interrupted wait, or at exit)
            time.sleep(0.05)
        child.kill()
    except (ProcessLookupError, ChildProcessError):
        return


def step_done(step):
    """Whether a step finished before: its marker (when it has one) and all its outputs exist."""
    marker = step.get("marker")
    return (marker is None or Path(marker).is_file()) and bool(step.get("outputs")) and all(
        Path(o).is_file() for o in step["outputs"])


def started(run_dir):
    """Whether a run folder holds a started run (its config.yaml or a checkpoint): it is resumed."""
    run_dir = Path(run_dir)
    return (run_dir / "config.yaml").is_file() or any(run_dir.glob("*.pth")) or any(run_dir.glob("*/*.pth"))


def held_by(run_dir):
    """The process holding a run folder's lock (a job still running it), or None."""
    if str(REPO / "code") not in sys.path:
        sys.path.insert(0, str(REPO / "code"))
    from training.run_folder import RunLock
    path = Path(run_dir)
    if not (path / RunLock.NAME).is_file():
        return None
    try:
        RunLock(path).release()
        return None
    except SystemExit as busy:
        return str(busy)


def make_executor(args, folder, gpus=0):
    """The submitit executor of ``--launcher`` writing its logs under ``folder``."""
    import submitit
    folder = Path(folder)
    if args.launcher == "debug":
        return submitit.DebugExecutor(folder=folder)
    if args.launcher == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(timeout_min=args.timeout_min, gpus_per_node=gpus)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**slurm_parameters(args, gpus))
    return executor


def slurm_parameters(args, gpus):
    """The submitit parameters of a SLURM job of one run."""
    extra = dict(item.split("=", 1) for item in args.slurm)
    params = {"timeout_min": args.timeout_min, "gpus_per_node": gpus, "tasks_per_node": 1, "nodes": 1,
              "cpus_per_task": int(extra.pop("cpus_per_task", 8 if gpus else 1)), "name": "sscd_run"}
    if args.partition:
        params["slurm_partition"] = args.partition
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def sbatch_script(args, folder):
    """The batch script ``--launcher slurm`` would submit for a job (shown by ``--dry_run``)."""
    from submitit.slurm.slurm import _make_sbatch_string
    params = slurm_parameters(args, gpus_per_run(args))
    extra = params.get("slurm_additional_parameters")
    return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}", folder=folder,
                               job_name=params["name"], partition=params.get("slurm_partition"),
                               time=params["timeout_min"], gpus_per_node=params["gpus_per_node"] or None,
                               ntasks_per_node=1, cpus_per_task=params["cpus_per_task"],
                               additional_parameters=extra)


def launch(jobs, args, folder, log=print):
    """Run ``jobs`` ([RunJob]) with ``--launcher``; returns their results in order (a failed job gives its
    result dict with a non-zero ``returncode``, or ``error`` for an exception)."""
    if not jobs:
        return []
    if args.launcher == "debug":
        return [_result(job, make_executor(args, folder).submit(job)) for job in jobs]
    import cloudpickle  # the job process imports submitit, not this folder: send this module's code along
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    gpus = gpus_per_run(args)
    if args.launcher == "slurm":
        executor = make_executor(args, folder, gpus)
        submitted = [executor.submit(job) for job in jobs]
        for job, sub in zip(jobs, submitted):
            _record(job, sub, "slurm", folder)
            log(f"[{job.name}] submitted as SLURM job {sub.job_id}")
        return [_result(job, sub) for job, sub in zip(jobs, submitted)]
    return _launch_local(jobs, args, folder, gpus, log)


def _launch_local(jobs, args, folder, gpus, log):
    """Local jobs, ``concurrency(args)`` at a time, each on its own GPUs when there are any."""
    free = list(range(gpu_count()))
    width = concurrency(args)
    pending, running, results = list(enumerate(jobs)), {}, [None] * len(jobs)
    while pending or running:
        while pending and len(running) < width and (not gpus or len(free) >= gpus):
            k, job = pending.pop(0)
            devices, free = free[:gpus], free[gpus:]
            executor = make_executor(args, folder, gpus)
            if gpus:
                executor.update_parameters(visible_gpus=devices)
            sub = executor.submit(job)
            _record(job, sub, "local", folder)
            log(f"[{job.name}] started (local job {sub.job_id}" + (f", GPUs {devices})" if gpus else ")"))
            running[k] = (job, sub, devices)
        for k in [k for k, (_, sub, _) in running.items() if sub.done()]:
            job, sub, devices = running.pop(k)
            results[k] = _result(job, sub)
            free += devices
        time.sleep(0.5 if running else 0)
    return results


def _record(job, submitted, launcher, folder):
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / JOB_FILE).write_text(json.dumps(
        {"job_id": str(submitted.job_id), "launcher": launcher, "folder": str(folder)}))


def _result(job, submitted):
    try:
        return submitted.result()
    except Exception as err:  # the job itself failed (not the run's commands): one line of its cause
        text = str(err).strip().splitlines()
        return {"run": job.name, "returncode": None, "error": text[-1] if text else type(err).__name__,
                "log": str(getattr(submitted, "paths", None) and submitted.paths.stderr)}


def _parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = add_launcher_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--folder", default="submitit", help="where the jobs' logs go")
    return p


def main(argv=None):
    """``python experiments/launch.py --launcher slurm [flags]``: print the batch script of a job."""
    p = _parser()
    args = p.parse_args(argv)
    check_launcher_args(p, args)
    print(sbatch_script(args, Path(args.folder).resolve()))


if __name__ == "__main__":
    main()
