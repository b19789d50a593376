"""What the damage checks cost (dataloaders/image_check.py): ITK's read alone against the checked read
of ``volume_io.read_image``, on the ACDC val volumes written as NIfTI (``.nii.gz`` and ``.nii``) and on
the generated 512 x 512 x 300 int16 volume of bench/bench_predict.py, in both NIfTI forms.

    python bench/bench_read.py --acdc_root ../shared/data/ACDC [--repeats 5] [--out read.json]

Three paths read each file in turn, ``--repeats`` times: ``itk`` is ``sitk.ReadImage`` (what a script
without the checks does), ``named`` is ITK's reader with the format's ImageIO named (what read_image
asks ITK for, so the checks are what it adds to this one), ``checked`` is ``read_image``. The table
gives the best total per set and path and checked's ratio to both (files already in the page cache:
decompression and memory, not disk).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from dataloaders.volume_io import export_h5_volume, read_image  # noqa: E402
from training.speed import cpu_description  # noqa: E402


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc_root", default=None, help="ACDC-layout root whose val.list volumes are read")
    p.add_argument("--large_size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--repeats", type=int, default=5, help="alternating reads of every file by each path")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    return p


def itk_read(path):
    return sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))).shape


def named_read(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("NiftiImageIO")
    return sitk.GetArrayViewFromImage(reader.Execute()).shape


def checked_read(path):
    return sitk.GetArrayViewFromImage(read_image(path)).shape


def time_set(files, repeats):
    """Best total seconds over ``repeats`` rounds for each path, the paths alternating per file."""
    paths = {"itk": itk_read, "named": named_read, "checked": checked_read}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        totals = dict.fromkeys(paths, 0.0)
        for path in files:
            for name, read in paths.items():
                start = time.perf_counter()
                read(path)
                totals[name] += time.perf_counter() - start
        best = {k: min(best[k], totals[k]) for k in best}
    return best


def file_sets(work, acdc_root, large_size):
    sets = {}
    if acdc_root:
        cases = Path(acdc_root, "val.list").read_text().split()
        for ending in (".nii.gz", ".nii"):
            sets[f"ACDC val ({len(cases)} volumes) {ending}"] = [
                export_h5_volume(Path(acdc_root) / "data" / f"{c}.h5", work / f"{c}{ending}") for c in cases]
    nx, ny, nz = large_size
    array = np.random.default_rng(0).integers(0, 1000, size=(nz, ny, nx), dtype=np.int16)  # bench_predict's
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 2.5))
    for ending in (".nii", ".nii.gz"):
        path = work / f"large{ending}"
        sitk.WriteImage(image, str(path), ending.endswith(".gz"))
        sets[f"{nx}x{ny}x{nz} int16 {ending}"] = [path]
    return sets


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = {"machine": cpu_description(), "repeats": args.repeats, "sets": []}
    with tempfile.TemporaryDirectory(prefix="sscd_read_") as folder:
        for name, files in file_sets(Path(folder), args.acdc_root, args.large_size).items():
            best = time_set(files, args.repeats)
            mib = sum(p.stat().st_size for p in files) / 2 ** 20
            row = {"set": name, "files": len(files), "file_mib": mib, "itk_seconds": best["itk"],
                   "named_seconds": best["named"], "checked_seconds": best["checked"],
                   "ratio": best["checked"] / best["itk"], "ratio_named": best["checked"] / best["named"]}
            results["sets"].append(row)
            print(f"{name}: {mib:.1f} MiB on disk, ITK {best['itk']:.3f} s, ITK with NiftiImageIO named "
                  f"{best['named']:.3f} s, checked {best['checked']:.3f} s ({100 * (row['ratio'] - 1):+.1f} % "
                  f"/ {100 * (row['ratio_named'] - 1):+.1f} %)")
    print(f"CPU: {results['machine']['cpu_model']} ({results['machine']['cpu_capability']})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
