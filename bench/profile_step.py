"""Profile of one training step (torch.profiler, CPU/CUDA operator times), to find where a step goes.

Builds the trainer's own ``pretrain_step`` (with the SDA) or ``stage_step`` (curriculum stage 1)
exactly as bench/bench_train.py does, runs ``--warmup`` untimed steps, then ``--steps`` profiled
ones, and prints the ``--top`` operators by self time (and the wall time per step):

    python bench/profile_step.py --root_path /work/shared/data/ACDC --image_size 256 --batch_size 8 \\
        --step self_train --threads 1
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_run, synchronize, trainer_argv  # noqa: E402
from dataloaders.synthetic import make_synthetic_acdc  # noqa: E402
from training.speed import cpu_description  # noqa: E402
from training.sscd_train import pretrain_step, stage_step  # noqa: E402
from utils.sscd import parse_hca_schedule  # noqa: E402


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--root_path", default=None, help="an ACDC-layout root (default: synthetic, temporary)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--labelnum", type=int, default=7)
    p.add_argument("--step", choices=["pretrain_sda", "self_train"], default="self_train")
    p.add_argument("--amp", default="off", help="the trainer's --amp (auto, bf16, fp16, off)")
    p.add_argument("--channels_last", default="auto", help="the trainer's --channels_last")
    p.add_argument("--lcc", default="auto", help="the trainer's --lcc")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="sscd_profile_") as folder:
        root = a.root_path or make_synthetic_acdc(Path(folder) / "data", n_patients=40, n_val=2, n_test=1,
                                                  slices_per_volume=10, size=(216, 256))
        bench_args = argparse.Namespace(image_size=a.image_size, batch_size=a.batch_size, labelnum=a.labelnum,
                                        device=a.device, amp=a.amp, channels_last=a.channels_last, lcc=a.lcc,
                                        compile="off")
        argv = trainer_argv(bench_args, "fast", root, Path(folder) / "run")
        run = make_run(argv)
        data = run.train_data()
        step, models, _ = pretrain_step(run, data)
        first = run.args.sda_start + 1
        if a.step == "self_train":
            weights = parse_hca_schedule(run.args.hca_weights)[0]
            step = stage_step(run, 1, weights, models["model"].state_dict(), "profile", data)[0]
            first = 1
        for k in range(a.warmup):
            step(first + k)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
        synchronize(run.device)
        t0, sys0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        with profile(activities=activities) as prof:
            for k in range(a.steps):
                step(first + a.warmup + k)
            synchronize(run.device)
        wall = (time.perf_counter() - t0) / a.steps
        system = (resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0) / a.steps
        settings = {k: run.config[k] for k in ("amp", "channels_last", "lcc")}
        run.close()
    sort = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    print(f"{a.step}: {wall:.2f} s/step under the profiler ({system:.2f} s of it system time), {a.image_size}^2, "
          f"batch {a.batch_size}, threads {torch.get_num_threads()}, {settings}, CPU {cpu_description()}")
    print(prof.key_averages().table(sort_by=sort, row_limit=a.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
