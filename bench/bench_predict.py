"""Prediction benchmark: seconds per volume and peak memory of code/predict.py, file to written file.

    python bench/bench_predict.py --acdc_root DATA/ACDC [--checkpoint best.pth] [--threads 2] [--out bench_predict.json]

Two measurements, each ``predict.py`` run in a fresh process (its peak resident memory is the child's
``ru_maxrss``), timed from the command's start to its end (imports, checkpoint, reading, preprocessing,
the network, writing):

- ``acdc``: the ACDC val volumes (``val.list``) exported as NIfTI, predicted at the checkpoint's size
  (default: a 256² ACDC-card network; goal: under 1 s per volume on 2 CPU cores), three times: with
  the defaults (fp32, identical to the test scripts), ``--channels_last on``, and ``--amp bf16 --channels_last on``;
- ``large``: a generated int16 volume of 512 x 512 x 300 voxels (0.7 x 0.7 x 2.5 mm) with a 256² network
  of a converted data set's card (goal: peak memory under 3 x its float32 size + 1 GB).

The weights are random (speed and memory do not depend on them). ``--large_size`` shrinks the generated
volume for a quick check. Prints one line per measurement and writes them as JSON to ``--out``.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
from common.checkpoint import save_checkpoint  # noqa: E402
from dataloaders.volume_io import export_h5_volume  # noqa: E402
from evaluation.model_card import model_card  # noqa: E402
from networks.unet import build_model  # noqa: E402

# the predict.py flags the ACDC volumes are timed with: the defaults (identical to the test scripts), then faster
ACDC_FLAGS = ((), ("--channels_last", "off"), ("--amp", "bf16"))  # the defaults: fp32, channels_last on
LARGE_RECIPE = {"normalization": "percentile_minmax", "percentiles": [0.5, 99.5], "slice_axis": "largest_spacing",
                "size": 256}


def cpu_model():
    """The CPU's model name (lscpu), for the numbers' context."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def random_checkpoint(path, dataset, num_classes, image_size, recipe=None):
    """A checkpoint of a seeded random network with the model card predict.py needs."""
    torch.manual_seed(0)
    card = model_card(dataset, None, num_classes, image_size) if recipe is None else {
        **model_card("ACDC", None, num_classes, image_size), "dataset": "CUSTOM", "preprocessing": recipe,
        "classes": ["background"] + [f"class{k}" for k in range(1, num_classes)]}
    save_checkpoint({"model": build_model(num_classes).state_dict(), "num_classes": num_classes,
                     "config": {"model_card": card}}, path)
    return path


CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import predict
imported = time.perf_counter()
predict.main(sys.argv[1:])
done = time.perf_counter()
print(json.dumps({"import_seconds": imported - start, "predict_seconds": done - imported,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed_predict(inputs, out, checkpoint, threads, batch_size, extra=()):
    """{wall seconds, import seconds, predict seconds, peak RSS in MiB} of one fresh predict.py process
    over ``inputs`` (the process reports its own peak, so runs do not mix)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "code")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, "-i", str(inputs), "-o", str(out), "--checkpoint",
                           str(checkpoint), "--device", "cpu", "--batch_size", str(batch_size), *extra],
                          env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def baseline_rss(threads):
    """Peak RSS (MiB) of a process that only imports what predict.py imports (the fixed cost)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "code")}
    code = "import resource, predict; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def bench_acdc(root, work, checkpoint, threads, batch_size, extra=(), n_cases=None):
    """Seconds per volume over the ACDC val volumes (the first ``n_cases`` when given; file to written
    file), predict.py run with the flags ``extra``."""
    inputs = work / "acdc_in"
    cases = (Path(root) / "val.list").read_text().split()[:n_cases]
    if not inputs.is_dir():
        inputs.mkdir()
        for case in cases:
            export_h5_volume(Path(root) / "data" / f"{case}.h5", inputs / f"{case}_0000.nii.gz")
    checkpoint = checkpoint or random_checkpoint(work / "acdc.pth", "ACDC", 4, 256)
    out = work / ("acdc_out_" + ("_".join(a.strip("-") for a in extra) or "defaults"))  # a fresh folder per flag set
    run = timed_predict(inputs, out, checkpoint, threads, batch_size, extra)
    written = len([p for p in out.iterdir() if p.name.endswith(".nii.gz")])
    if written != len(cases):
        raise RuntimeError(f"predict.py {' '.join(extra)} wrote {written} of {len(cases)} label maps into {out}")
    return {"name": "acdc", "flags": " ".join(extra) or "defaults (fp32, as the test scripts)", "volumes": len(cases),
            "written": written, **run, "seconds_per_volume": run["wall_seconds"] / len(cases),
            "predict_seconds_per_volume": run["predict_seconds"] / len(cases), "goal": "< 1 s per volume"}


def bench_large(work, size, threads, batch_size):
    """Peak memory of predicting one generated size[0] x size[1] x size[2] (x, y, z) int16 volume."""
    nx, ny, nz = size
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(nz, ny, nx), dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 2.5))
    inputs = work / "large_in"
    inputs.mkdir()
    sitk.WriteImage(image, str(inputs / "large.nii"))
    del image, array
    checkpoint = random_checkpoint(work / "large.pth", None, 2, 256, LARGE_RECIPE)
    run = timed_predict(inputs, work / "large_out", checkpoint, threads, batch_size)
    float32_mib = nx * ny * nz * 4 / 2 ** 20
    written = sitk.ReadImage(str(work / "large_out" / "large.nii"))
    assert written.GetSize() == (nx, ny, nz)
    return {"name": "large", "size_xyz": [nx, ny, nz], **run,
            "float32_volume_mib": float32_mib, "goal_mib": 3 * float32_mib + 1024,
            "goal": "peak < 3 x float32 size + 1 GiB"}


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc_root", default=None, help="processed ACDC folder (val.list, data/<case>.h5); "
                   "without it only the large volume is measured")
    p.add_argument("--acdc_cases", type=int, default=None, help="only the first N val.list volumes (a quick check; "
                   "--amp bf16 is emulated, ~10x slower, on CPUs without native bf16)")
    p.add_argument("--checkpoint", default=None, help="an ACDC checkpoint (default: a random 256² network)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the predict.py process")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--large_size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "import_rss_mib": baseline_rss(args.threads), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.acdc_root:
            for extra in ACDC_FLAGS:
                results["runs"].append(bench_acdc(args.acdc_root, work, args.checkpoint, args.threads,
                                                  args.batch_size, extra, args.acdc_cases))
        results["runs"].append(bench_large(work, args.large_size, args.threads, args.batch_size))
    print(f"CPU {results['cpu']}, {args.threads} threads, torch {results['torch']}; a process that only imports "
          f"predict.py peaks at {results['import_rss_mib']:.0f} MiB")
    for run in results["runs"]:
        if run["name"] == "acdc":
            print(f"acdc, {run['flags']}: {run['volumes']} val volumes in {run['wall_seconds']:.1f} s = "
                  f"{run['seconds_per_volume']:.2f} s per volume (goal < 1 s; "
                  f"{run['predict_seconds_per_volume']:.2f} s "
                  f"after the {run['import_seconds']:.1f} s of imports), peak {run['peak_rss_mib']:.0f} MiB")
        else:
            print(f"large {'x'.join(map(str, run['size_xyz']))}: {run['wall_seconds']:.1f} s, "
                  f"peak {run['peak_rss_mib']:.0f} MiB "
                  f"(goal < {run['goal_mib']:.0f} MiB = 3 x {run['float32_volume_mib']:.0f} + 1024)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
