"""Unlabeled pools of real size: conversion time, start-up, peak memory, step rate and batch wait of the
in-memory and the disk data paths (``--data_cache``), at 10,000 / 50,000 / 200,000 slices.

    python bench/bench_pool.py --work /tmp/pools [--sizes 10000 50000 200000] [--image_size 128] \\
        [--out pool.json]                                  # pools generated and converted here
    python bench/bench_pool.py --acdc_root ../shared/data/ACDC --steps 30   # the ACDC step, both paths
    python bench/bench_pool.py --feed ROOT [--feed_workers 0 1 2]            # slices/s the disk path reads
    python bench/bench_pool.py --startup ROOT --sizes 10000 200000 [--rounds 3]  # start-up, nothing converted

Each pool is a converted data set (``convert_dataset.py``, timed with 1 and 2 workers) of 4 labeled
training cases, 1 validation case and unlabeled cases of 200 slices: ``--distinct`` generated volumes
linked under as many case names as the size needs (their contents repeat; every slice is still read,
converted and written). Each training run is a separate process (``train_custom.py``, SSCD, pre-training
then one stage, batch 8 at ``--image_size``) whose batch stream is timed: seconds from the process start
to the first batch, the stage's seconds per step and the share of it spent waiting for a batch, and the
process's peak RSS. Pools are deleted after their runs (``--keep`` keeps them).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
SLICES_PER_CASE = 200


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/sscd_pools", help="folder for the generated pools (deleted after use)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000], help="unlabeled pool sizes (slices)")
    p.add_argument("--image_size", type=int, default=128, help="slice size of the pools and the network")
    p.add_argument("--distinct", type=int, default=8, help="distinct generated unlabeled volumes")
    p.add_argument("--convert_workers", type=int, nargs="+", default=[1, 2], help="--workers values to time")
    p.add_argument("--memory_path", choices=["fits", "always", "never"], default="fits",
                   help="run the in-memory path where --data_cache auto would pick it, always, or never")
    p.add_argument("--acdc_root", default=None, help="instead: the ACDC step of both paths on this root")
    p.add_argument("--steps", type=int, default=8, help="self-training steps timed per run")
    p.add_argument("--feed", default=None, metavar="ROOT", help="instead: slices/s the disk path reads from ROOT")
    p.add_argument("--feed_workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers for --feed")
    p.add_argument("--feed_seconds", type=float, default=5.0, help="seconds per --feed measurement")
    p.add_argument("--startup", default=None, metavar="ROOT",
                   help="instead: seconds to the first batch on pools of --sizes slices linked from the converted "
                        "pool ROOT (a --keep pool; nothing converted), --rounds times, --num_workers 0 and 2")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --startup")
    p.add_argument("--keep", action="store_true", help="keep the converted pools")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one timed training run (JSON argv)
    return p


# ------------------------------------------------------------------ one timed training run (a child process)

def child(argv_json):
    """Run ``train_custom`` / ``train_ACDC_SSCD`` with ``argv`` and time its batch streams; prints JSON."""
    start = time.perf_counter()
    spec = json.loads(argv_json)
    from dataloaders.dataset import BatchStream
    stamps, real_next = [], BatchStream.__next__

    def timed(self):
        batch = real_next(self)
        stamps.append((time.perf_counter(), self.wait_seconds, id(self)))
        if spec.get("first_batch_only"):  # --startup: the time to the first batch is all that is wanted
            print(json.dumps({"first_batch_s": round(stamps[0][0] - start, 2)}), flush=True)
            os._exit(0)
        return batch

    BatchStream.__next__ = timed
    trainer = __import__(spec["trainer"])
    trainer.main(spec["argv"])
    stage = [s for s in stamps if s[2] == stamps[-1][2]][2:]  # the last stream (the stage), after 2 warm-up steps
    span = stage[-1][0] - stage[0][0]
    print(json.dumps({"first_batch_s": round(stamps[0][0] - start, 2),
                      "s_per_step": round(span / (len(stage) - 1), 4),
                      "wait_share": round((stage[-1][1] - stage[0][1]) / span, 4),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def timed_run(trainer, argv, first_batch_only=False):
    env = {**os.environ, "PYTHONPATH": str(REPO / "code")}
    spec = {"trainer": trainer, "argv": argv, "first_batch_only": first_batch_only}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"training run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_argv(root, save_dir, size, cache, steps, workers, labelnum=4):
    return ["--root_path", str(root), "--save_dir", str(save_dir), "--image_size", str(size), "--batch_size", "8",
            "--labeled_bs", "4", "--labelnum", str(labelnum), "--pre_iterations", "3", "--stage_iterations",
            str(steps + 2), "--hca_weights", "1,0,0,0", "--val_interval", "1000", "--log_interval", "1000",
            "--device", "cpu", "--data_cache", cache, "--num_workers", str(workers), "--overwrite"]


# ------------------------------------------------------------------ generated pools

def phantom_volume(shape, seed):
    """(int16 image, uint8 label) of an ellipsoid with a core, noise and a slow intensity ramp."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    c = rng.uniform(0.35, 0.65, 3) * np.array(shape)
    r = (((z - c[0]) / (0.3 * shape[0])) ** 2 + ((y - c[1]) / (0.25 * shape[1])) ** 2
         + ((x - c[2]) / (0.2 * shape[2])) ** 2)
    label = (r <= 1).astype(np.uint8) + (r <= 0.3)
    image = 200 + 400 * label.astype(np.float64) + 0.5 * x + rng.normal(0, 30, shape)
    return image.astype(np.int16), label


def write_volume(array, path, spacing=(1.0, 1.0, 2.5)):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)


def make_sources(work, size, distinct):
    """An nnU-Net raw folder (4 labeled training cases and 1 validation case of 20 slices) and
    ``distinct`` unlabeled volumes of SLICES_PER_CASE slices, all ``size`` x ``size`` in-plane."""
    raw = work / "raw"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for k in range(5):
        image, label = phantom_volume((20, size, size), seed=k)
        write_volume(image, raw / "imagesTr" / f"case_{k:02d}_0000.nii.gz")
        write_volume(label, raw / "labelsTr" / f"case_{k:02d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "outer": 1, "core": 2}}))
    volumes = work / "volumes"
    volumes.mkdir(exist_ok=True)
    for k in range(distinct):
        write_volume(phantom_volume((SLICES_PER_CASE, size, size), seed=100 + k)[0], volumes / f"v{k}.nii.gz")
    return raw, sorted(volumes.iterdir())


def link_pool(work, volumes, n_slices):
    """A folder of n_slices / SLICES_PER_CASE unlabeled cases, symbolic links to ``volumes`` in turn."""
    folder = work / f"unlabeled_{n_slices}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for k in range(n_slices // SLICES_PER_CASE):
        (folder / f"u{k:06d}.nii.gz").symlink_to(volumes[k % len(volumes)])
    return folder


# runs the converter and prints the peak RSS of its largest process (itself or a worker) in MiB
MEASURED = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")


def convert(raw, unlabeled, out, size, workers):
    """(seconds, peak RSS of the largest converter process in MiB) of one conversion."""
    start = time.perf_counter()
    command = [sys.executable, "code/dataloaders/convert_dataset.py", "--input", str(raw), "--unlabeled",
               str(unlabeled), "--out", str(out), "--image_size", str(size), "--val_cases", "case_04",
               "--workers", str(workers), "--overwrite"]
    peak = subprocess.run([sys.executable, "-c", MEASURED, *command], check=True, cwd=REPO, capture_output=True,
                          text=True).stdout.split()[-1]
    return round(time.perf_counter() - start, 1), round(float(peak), 1)


def pool_bench(a):
    from dataloaders.dataset import available_host_bytes, cache_bytes
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    raw, volumes = make_sources(work, a.image_size, a.distinct)
    rows = []
    for n in a.sizes:
        unlabeled, out = link_pool(work, volumes, n), work / f"pool_{n}"
        row = {"slices": n, "image_size": a.image_size}
        for w in a.convert_workers:
            shutil.rmtree(out, ignore_errors=True)
            row[f"convert_s_{w}w"], row[f"convert_peak_mb_{w}w"] = convert(raw, unlabeled, out, a.image_size, w)
            print(json.dumps({"pool": n, f"convert_s_{w}w": row[f"convert_s_{w}w"],
                              f"convert_peak_mb_{w}w": row[f"convert_peak_mb_{w}w"]}), flush=True)
        row["disk_gb"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9, 2)
        fits = cache_bytes(n + 80, a.image_size) <= 0.5 * available_host_bytes()
        for cache in ("disk", "memory"):
            if cache == "memory" and (a.memory_path == "never" or (a.memory_path == "fits" and not fits)):
                row["memory"] = f"not run: {cache_bytes(n + 80, a.image_size) / 2**30:.1f} GiB does not fit"
                continue
            row[cache] = timed_run("train_custom", train_argv(out, work / f"run_{n}_{cache}", a.image_size, cache,
                                                              a.steps, 2 if cache == "disk" else 0))
            print(json.dumps({"pool": n, cache: row[cache]}), flush=True)
        rows.append(row)
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows


# ------------------------------------------------------------------ the ACDC step and the feed rate

def acdc_bench(a):
    """The ACDC step at --image_size, batch 8 (device augmentation), both paths, workers 0 and 2."""
    work = Path(a.work)
    rows = {}
    for cache, workers in (("memory", 0), ("disk", 0), ("disk", 2)):
        argv = train_argv(a.acdc_root, work / f"acdc_{cache}_{workers}", a.image_size, cache, a.steps, workers, 7)
        rows[f"{cache}_{workers}w"] = timed_run("train_ACDC_SSCD", argv)
        print(json.dumps({f"{cache}_{workers}w": rows[f"{cache}_{workers}w"]}), flush=True)
    return rows


def feed_bench(a):
    """Slices per second ``DiskSlices`` delivers through the training DataLoader (batches of 24)."""
    import torch
    from dataloaders.dataset import DiskSlices, RawBatches, TwoStreamSampler, read_list
    ids = read_list(a.feed, "train_slices.list")
    source = DiskSlices(a.feed, ids, a.image_size, 256)
    rates = {}
    for workers in a.feed_workers:
        sampler = TwoStreamSampler(list(range(len(ids))), [], 24, 0, seed=0)
        loader = iter(torch.utils.data.DataLoader(RawBatches(source), sampler=sampler, batch_size=None,
                                                  num_workers=workers, generator=torch.Generator().manual_seed(0)))
        next(loader)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < a.feed_seconds:
            n += len(next(loader)[0])
        rates[f"{workers}_workers"] = round(n / (time.perf_counter() - start), 1)
        print(json.dumps({"feed_slices_per_s": rates}), flush=True)
    return rates


def linked_pool(source, n_slices, out):
    """A copy of the converted pool ``source`` whose unlabeled part is ``n_slices`` links to its
    unlabeled slice files (cases of 200 slices), with its own lists, dataset.json and slice index:
    start-up at any pool size without converting one."""
    from dataloaders.converted import read_dataset_info
    from dataloaders.slice_index import INDEX_NAME, write_root_index
    source, out = Path(source).resolve(), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "data" / "slices").mkdir(parents=True)
    for name in ("train.list", "val.list", "test.list"):
        shutil.copy(source / name, out / name)
    for volume in (source / "data").glob("*.h5"):
        (out / "data" / volume.name).symlink_to(volume)
    ids = (source / "train_slices.list").read_text().split()
    labeled_cases = set((source / "train.list").read_text().split())
    keep = [i for i, sid in enumerate(ids) if sid.rsplit("_slice_", 1)[0] in labeled_cases]
    pool = [sid for sid in ids if sid.rsplit("_slice_", 1)[0] not in labeled_cases]
    new = [f"v{k // SLICES_PER_CASE:06d}_slice_{k % SLICES_PER_CASE}" for k in range(n_slices)]
    for sid in [ids[i] for i in keep]:
        (out / "data" / "slices" / f"{sid}.h5").symlink_to(source / "data" / "slices" / f"{sid}.h5")
    for k, sid in enumerate(new):
        (out / "data" / "slices" / f"{sid}.h5").symlink_to(source / "data" / "slices" / f"{pool[k % len(pool)]}.h5")
    (out / "train_slices.list").write_text("\n".join([ids[i] for i in keep] + new) + "\n")
    cases = sorted({sid.rsplit("_slice_", 1)[0] for sid in new})
    (out / "unlabeled.list").write_text("\n".join(cases) + "\n")
    info = read_dataset_info(source)
    (out / "dataset.json").write_text(json.dumps({**info, "unlabeled": cases, "num_unlabeled_slices": n_slices}))
    with np.load(source / INDEX_NAME) as f:
        labeled, counts = f["labeled"][keep], f["counts"][keep]
    write_root_index(out, np.concatenate([labeled, np.zeros(n_slices, bool)]),
                     np.concatenate([counts, np.zeros((n_slices, counts.shape[1]), np.int64)]),
                     (int(info["image_size"]),) * 2)
    return out


def startup_bench(a):
    """Seconds to the first batch (disk path, ``--num_workers`` 0 and 2) on pools linked from ``--startup``."""
    work, times = Path(a.work), {}
    pools = {n: linked_pool(a.startup, n, work / f"linked_{n}") for n in a.sizes}
    for _ in range(a.rounds):  # rounds interleave the sizes, so that a slow moment of the machine hits both
        for n, root in pools.items():
            size = json.loads((root / "dataset.json").read_text())["image_size"]
            for workers in (0, 2):
                argv = train_argv(root, work / f"run_{n}", size, "disk", 2, workers)
                t = timed_run("train_custom", argv, first_batch_only=True)["first_batch_s"]
                times.setdefault(str(n), []).append(t)
                print(json.dumps({"slices": n, "workers": workers, "first_batch_s": t}), flush=True)
    for root in pools.values():
        shutil.rmtree(root, ignore_errors=True)
    return {n: {"median_s": float(np.median(t)), "min_s": min(t), "max_s": max(t), "runs": t} for n, t in times.items()}


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.child:
        return child(a.child)
    from training.speed import cpu_description
    result = {"cpu": cpu_description(), "cores": os.cpu_count()}
    if a.feed:
        result["feed_slices_per_s"] = feed_bench(a)
    elif a.startup:
        result["first_batch_s"] = startup_bench(a)
    elif a.acdc_root:
        result["acdc"] = acdc_bench(a)
    else:
        result["pools"] = pool_bench(a)
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
