"""Training throughput of SSCD: the pre-training and self-training steps, validation, memory, FLOP/s.

Times the real steps of ``training.sscd_train`` (``pretrain_step``, ``stage_step`` of curriculum stage 1)
on one device for two input paths, interleaved block by block so that both see the same machine load:

* ``fast``: augmentation batched on the device, ``--amp auto`` (bf16 on CUDA and on CPUs with native
  bf16, fp32 elsewhere: ``training.speed.auto_amp``), channels_last, torch.compile (on CUDA), the LCC
  where it is faster (``--lcc auto``) and cudnn autotuning; each can be changed with the flags below;
* ``plain``: per-sample augmentation in ``--num_workers`` DataLoader workers, fp32, contiguous
  tensors, scipy LCC, eager (the paper repositories' path).

Warm-up iterations (and compilation) are excluded; each rate is that of the fastest of ``--repeats``
blocks (all block times are in the JSON). Pre-training is timed without and with the SDA
(on for the last 40 %). The data are a synthetic ACDC-layout set in a temporary folder (40 patients,
20 validation volumes of 10 slices at 216x256, like ACDC's) unless --root_path is given. The last
line is one JSON object (it names the CPU: model, torch's capability, native-bf16 flags); see
bench/README.md. Progress (which block of which path, how long it took) goes to stderr as it happens.
cuDNN autotuning/determinism and TF32 are process-wide: each path's own settings (``Run.backend_flags``)
are set again before each of its blocks, and the JSON records the settings its blocks ran under.

    python bench/bench_train.py --device cpu --image_size 128 --batch_size 8 --path both
    python bench/bench_train.py --device cuda --image_size 256 --batch_size 24 --path fast
"""
import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from dataloaders.synthetic import make_synthetic_acdc  # noqa: E402
from training.config import base_parser, parse_args  # noqa: E402
from training.device import apply_backend_flags, current_backend_flags  # noqa: E402
from training.run import Run  # noqa: E402
from training.speed import auto_amp, cpu_description  # noqa: E402
from training.sscd_train import PRESETS, add_sscd_args, check_sscd_args, pretrain_step, stage_step  # noqa: E402
from utils.sscd import parse_hca_schedule  # noqa: E402

SDA_FRACTION = 0.4  # the SDA is on after 60 % of pre-training
_START = time.perf_counter()


def progress(message):
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[bench {time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def bench_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=24, help="labeled + unlabeled slices (half each)")
    p.add_argument("--path", choices=["fast", "plain", "both"], default="both")
    p.add_argument("--root_path", default=None, help="an ACDC-layout root (default: synthetic, temporary)")
    p.add_argument("--labelnum", type=int, default=7)
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per block")
    p.add_argument("--repeats", type=int, default=3,
                   help="blocks per path, interleaved between the paths; rates are the fastest block's")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per step and path")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the plain path")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="fast path precision; auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
                        "else off (emulated bf16 is ~9x slower than fp32)")
    p.add_argument("--channels_last", choices=["on", "off"], default="on", help="fast path memory format")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fast path torch.compile; auto: on CUDA only (on the CPU it measured no faster, after "
                        "minutes of compilation)")
    p.add_argument("--lcc", choices=["auto", "device", "scipy"], default="auto", help="fast path LCC")
    p.add_argument("--pre_iterations", type=int, default=10000, help="projected run: pre-training")
    p.add_argument("--self_iterations", type=int, default=30000, help="projected run: self-training")
    p.add_argument("--val_interval", type=int, default=200, help="projected run: validation interval")
    return p


def trainer_argv(a, path, root, save_dir):
    """The trainer flags of one path."""
    argv = ["--root_path", str(root), "--save_dir", str(save_dir), "--image_size", str(a.image_size),
            "--batch_size", str(a.batch_size), "--labeled_bs", str(a.batch_size // 2), "--labelnum", str(a.labelnum),
            "--patch_size", str(a.image_size // 8), "--device", a.device]
    if path == "plain":
        return argv + ["--aug_device", "loader", "--num_workers", str(a.num_workers), "--amp", "off",
                       "--channels_last", "off", "--lcc", "scipy", "--deterministic", "1"]
    return argv + ["--aug_device", "device", "--amp", a.amp, "--channels_last", a.channels_last, "--lcc", a.lcc,
                   "--deterministic", "0"] + (["--compile"] if compile_on(a) else [])


def compile_on(a):
    return a.compile == "on" or (a.compile == "auto" and a.device.startswith("cuda"))


def make_run(argv):
    parser = add_sscd_args(base_parser("bench", "ACDC", num_classes=4, labelnum=7))
    args = parse_args(parser, argv, PRESETS)
    check_sscd_args(parser, args)
    return Run(args, "ACDC")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BenchPath:
    """One input path: its run, steps and timings."""

    def __init__(self, name, run):
        self.name, self.run, self.data = name, run, run.train_data()
        self.volumes = run.val_volumes()
        self.times = {}
        self.flags_seen = []  # the backend settings each timed block ran under (distinct ones)
        self.it = 0

    def use_flags(self):
        """Set this path's process-wide backend settings (the other path may have changed them)."""
        apply_backend_flags(self.run.backend_flags)

    def time_block(self, key, step, n, first_it):
        """Seconds for ``n`` iterations of ``step`` (iteration numbers from ``first_it``)."""
        self.use_flags()
        if current_backend_flags() not in self.flags_seen:
            self.flags_seen.append(current_backend_flags())
        synchronize(self.run.device)
        t0 = time.perf_counter()
        for k in range(n):
            step(first_it + k)
        synchronize(self.run.device)
        seconds = time.perf_counter() - t0
        self.times.setdefault(key, []).append(seconds)
        progress(f"{self.name} {key} block {len(self.times[key])}: {n} it in {seconds:.2f} s ({seconds / n:.3f} s/it)")

    def rate(self, key, n):
        """Iterations per second of the fastest block (the least disturbed by other processes)."""
        return n / min(self.times[key])


def count_flops(step, it):
    """FLOPs of one step (convolutions and matmuls, forward and backward), run eagerly."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step(it)
    return counter.get_total_flops()


def peak_memory_mb(device):
    """Process-wide peak: CUDA max_memory_allocated, or the CPU high-water mark (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleave(paths, key, step_of, a, first_it):
    """Warm up every path, then time ``a.repeats`` blocks per path, alternating between paths."""
    for p in paths:
        p.use_flags()
        t0 = time.perf_counter()
        for k in range(a.warmup):
            step_of(p)(first_it + k)
        progress(f"{p.name} {key} warm-up: {a.warmup} it in {time.perf_counter() - t0:.2f} s")
    for _ in range(a.repeats):
        for p in paths:
            p.time_block(key, step_of(p), a.iterations, first_it + a.warmup)


def bench(a, root, folder):
    names = ["fast", "plain"] if a.path == "both" else [a.path]
    paths = [BenchPath(n, make_run(trainer_argv(a, n, root, Path(folder) / n))) for n in names]
    pre_steps = {}
    for p in paths:
        pre_steps[p.name], models, _ = pretrain_step(p.run, p.data)
        p.pre_model = models["model"]
        p.validate = p.run.validator(p.pre_model, p.volumes)
    sda_start = paths[0].run.args.sda_start
    interleave(paths, "pretrain", lambda p: pre_steps[p.name], a, 1)
    interleave(paths, "pretrain_sda", lambda p: pre_steps[p.name], a, sda_start + 1)
    weights = parse_hca_schedule(paths[0].run.args.hca_weights)[0]
    stage_steps = {}
    for p in paths:
        stage_steps[p.name] = stage_step(p.run, 1, weights, p.pre_model.state_dict(), "bench", p.data)[0]
    interleave(paths, "self_train", lambda p: stage_steps[p.name], a, 1)
    results = {}
    for p in paths:
        p.use_flags()
        t0 = time.perf_counter()
        flops = count_flops(pre_steps[p.name], sda_start + 1), count_flops(stage_steps[p.name], 1)
        progress(f"{p.name} FLOP count (one pre-training and one self-training step): "
                 f"{time.perf_counter() - t0:.2f} s")
        p.pre_model.eval()
        t0 = time.perf_counter()
        p.validate()  # warm-up (uploads the volumes)
        progress(f"{p.name} validation warm-up ({len(p.volumes)} volumes): {time.perf_counter() - t0:.2f} s")
        for _ in range(a.repeats):
            p.time_block("validation", lambda it: p.validate(), 1, 0)
        results[p.name] = summarize(p, a, min(p.times["validation"]), *flops)
        p.run.close()
    return results, peak_memory_mb(paths[0].run.device)


def summarize(p, a, val_s, pre_flops, self_flops):
    """The figures of one path, and the projected time of the paper's run at its rates."""
    pre, pre_sda, self_ = (p.rate(k, a.iterations) for k in ("pretrain", "pretrain_sda", "self_train"))
    pre_mean_s = (1 - SDA_FRACTION) / pre + SDA_FRACTION / pre_sda
    validations = (a.pre_iterations + a.self_iterations) // a.val_interval
    projected = a.pre_iterations * pre_mean_s + a.self_iterations / self_ + validations * val_s
    return {
        "pretrain_it_s": round(pre, 3), "pretrain_sda_it_s": round(pre_sda, 3), "self_train_it_s": round(self_, 3),
        "eval_volumes_s": round(len(p.volumes) / val_s, 2), "val_s": round(val_s, 3),
        "train_s_per_val_interval": round(a.val_interval / self_, 2),
        "flops_per_pretrain_step_sda": pre_flops, "flops_per_self_train_step": self_flops,
        "achieved_tflop_s_pretrain_sda": round(pre_flops * pre_sda / 1e12, 4),
        "achieved_tflop_s_self_train": round(self_flops * self_ / 1e12, 4),
        "projected_paper_run_h": round(projected / 3600, 3),
        "settings": {k: p.run.config[k] for k in ("aug_device", "amp", "channels_last", "compile", "lcc",
                                                   "deterministic")},
        "block_s": {k: [round(t, 3) for t in v] for k, v in p.times.items()},
        "backend_flags": p.flags_seen,
    }


def main(argv=None):
    a = bench_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    cpu = cpu_description()
    progress(f"CPU {cpu['cpu_model']} ({cpu['cpu_capability']}, native bf16: {cpu['cpu_bf16'] or 'none'}), "
             f"{torch.get_num_threads()} threads; fast path --amp {a.amp}"
             + (f" -> {auto_amp(a.device)}" if a.amp == "auto" else "") + f"; {a.image_size}^2, batch {a.batch_size}")
    with tempfile.TemporaryDirectory(prefix="sscd_bench_") as folder:
        root = a.root_path or make_synthetic_acdc(Path(folder) / "data", n_patients=40, n_val=10, n_test=2,
                                                  slices_per_volume=10, size=(216, 256))
        results, peak_mb = bench(a, root, folder)
    out = {"device": a.device, "device_name": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda")
           else cpu["cpu_model"], **cpu, "torch": torch.__version__, "platform": platform.platform(),
           "image_size": a.image_size, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
           "data": "synthetic" if a.root_path is None else str(a.root_path),
           "iterations_per_block": a.iterations, "repeats": a.repeats, "warmup": a.warmup,
           "load_avg_start": [round(x, 2) for x in load_before], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
           "peak_memory_mb": round(peak_mb, 1), **results}
    if len(results) == 2:
        out["speedup_self_train"] = round(results["fast"]["self_train_it_s"] / results["plain"]["self_train_it_s"], 2)
        out["speedup_pretrain_sda"] = round(results["fast"]["pretrain_sda_it_s"]
                                            / results["plain"]["pretrain_sda_it_s"], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
