"""Short ACDC- and PROMISE12-layout runs whose losses and weights are pinned in
``tests/data/benchmark_paths.json``, so that a change that is meant to leave the computation alone
(a refactor, a new data set, a faster path) cannot move the benchmark paths unnoticed.

The runs are computed under ``PINNED_ENV``: one thread, torch's AVX2 kernels and oneDNN capped at
AVX2, which every x86 CPU this project runs on has. Uncapped, an AVX-512 or AMX CPU rounds the
convolutions and vector loops differently (about 1e-7 per operation), and SSCD's discrete choices
(arg-max pseudo-labels, the largest component, region ranking) can turn that into another run within
two iterations. The dropout masks come from ``networks/dropout.py`` (the same on every vendor).

    python tests/benchmark_paths.py --write     # recompute the pinned values (only on purpose)
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

CODE = Path(__file__).resolve().parents[1] / "code"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

import train_ACDC_SSCD  # noqa: E402
import train_PROMISE12_SSCD  # noqa: E402
from common.checkpoint import load_checkpoint  # noqa: E402
from dataloaders.preprocess_promise12 import preprocess_promise12  # noqa: E402
from dataloaders.synthetic import make_synthetic_acdc  # noqa: E402

PINNED = Path(__file__).resolve().parent / "data" / "benchmark_paths.json"
# the kernels every x86 CPU here can run, read by torch and oneDNN when they start (so set before import)
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
COMMON = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--device", "cpu", "--num_workers", "0",
          "--log_interval", "1", "--val_interval", "2", "--amp", "off", "--channels_last", "off"]
# name -> (trainer, extra flags); "sscd" runs pre-training and one stage, so every phase is pinned
RUNS = {
    "acdc_sscd": ("ACDC", ["--labelnum", "3", "--pre_iterations", "3", "--hca_weights", "1,0,0,0",
                           "--stage_iterations", "2", "--patch_size", "8"]),
    "acdc_labeled_only": ("ACDC", ["--labelnum", "3", "--method", "labeled_only", "--pre_iterations", "2",
                                   "--hca_weights", "0,0,0,1", "--stage_iterations", "2", "--patch_size", "8"]),
    "acdc_bcp": ("ACDC", ["--labelnum", "3", "--method", "bcp", "--pre_iterations", "2", "--stage_iterations",
                          "2", "--patch_size", "8"]),
    "promise12_sscd": ("PROMISE12", ["--labelnum", "1", "--pre_iterations", "3", "--hca_weights", "1,0,0,0",
                                     "--stage_iterations", "2", "--patch_size", "8"]),
}
LOSS_LINE = re.compile(r"\[(\w+)\] it (\d+)/\d+ (.*) \(")


def make_promise12_raw(folder):
    """Three small generated prostate-like cases (uint16 .mha, 0.6 x 0.6 x 3 mm) and their split lists."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(("Case00", "Case01", "Case02")):
        rng = np.random.default_rng(10 + i)
        z, y, x = np.mgrid[:6, :40, :48]
        label = ((((x - 28 - i) / 9.0) ** 2 + ((y - 18) / 7.0) ** 2 + ((z - 2.5) / 3.0) ** 2) <= 1).astype(np.uint8)
        image = (rng.integers(100, 300, size=label.shape) + 700 * label.astype(np.int64)).astype(np.uint16)
        for array, name in ((image, case), (label, f"{case}_segmentation")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((0.6, 0.6, 3.0))
            sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))
    for split, cases in (("train", "Case00\nCase01\n"), ("val", "Case02\n"), ("test", "")):
        (folder / f"{split}.list").write_text(cases)
    return folder


def roots(work):
    """(ACDC-layout root, PROMISE12-layout root) generated under ``work``."""
    acdc = make_synthetic_acdc(Path(work) / "acdc", n_patients=20, n_val=2, n_test=1, slices_per_volume=4,
                               size=(40, 36))
    raw = make_promise12_raw(Path(work) / "prostate_raw")
    prostate = Path(work) / "prostate"
    preprocess_promise12(raw, prostate, image_size=32)
    return {"ACDC": acdc, "PROMISE12": prostate}


def weight_stats(path):
    """[sum, sum |w|, sum w^2, dot with a seeded N(0,1) vector] over every float tensor of every model."""
    state = load_checkpoint(path)
    dicts = [state["model"]] + [state.get("models", {})[k] for k in sorted(state.get("models", {}))]
    flat = torch.cat([t.double().flatten() for sd in dicts for k, t in sorted(sd.items()) if t.is_floating_point()])
    probe = torch.from_numpy(np.random.default_rng(0).standard_normal(flat.numel()))
    return [float(flat.sum()), float(flat.abs().sum()), float((flat ** 2).sum()), float(flat @ probe)]


def logged_losses(save_dir):
    """{"phase it": {loss name: value}} from the run's log.txt (4 decimals, as logged)."""
    out = {}
    for line in (Path(save_dir) / "log.txt").read_text().splitlines():
        m = LOSS_LINE.search(line)
        if m:
            out[f"{m.group(1)} {m.group(2)}"] = {k: float(v) for k, v in
                                                  (kv.split("=") for kv in m.group(3).split())}
    return out


def run_one(name, root, save_dir):
    """Train run ``name`` into ``save_dir``; its pinned values."""
    dataset, extra = RUNS[name]
    trainer = train_ACDC_SSCD if dataset == "ACDC" else train_PROMISE12_SSCD
    torch.set_num_threads(1)
    trainer.main(["--root_path", str(root), "--save_dir", str(save_dir), *COMMON, *extra])
    weights = {str(p.relative_to(save_dir)): weight_stats(p) for p in sorted(Path(save_dir).rglob("last.pth"))}
    weights["best.pth"] = weight_stats(Path(save_dir) / "best.pth")
    return {"losses": logged_losses(save_dir), "weights": weights}


def compute_all(work):
    data = roots(work)
    values = {name: run_one(name, data[RUNS[name][0]], Path(work) / "runs" / name) for name in RUNS}
    values["_kernels"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "env": {k: os.environ.get(k) for k in sorted(PINNED_ENV)}}
    return values


def compute_pinned(work):
    """``compute_all`` in a fresh interpreter under ``PINNED_ENV`` (torch reads it at start-up)."""
    out = Path(work) / "values.json"
    env = {**os.environ, **PINNED_ENV}
    proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--work", str(work)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark paths failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None):
    import tempfile
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write the values to {PINNED}")
    parser.add_argument("--out", help="write the values to this file")
    parser.add_argument("--work", help="folder for the data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, **PINNED_ENV})
    with tempfile.TemporaryDirectory() as tmp:
        values = compute_all(args.work or tmp)
    text = json.dumps({k: v for k, v in values.items() if not k.startswith("_")}, indent=1, sort_keys=True)
    if args.write:
        PINNED.write_text(text + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(values, sort_keys=True))
    else:
        print(text)
        print(f"kernels: {values['_kernels']}")


if __name__ == "__main__":
    main()
