"""Official ACDC release (NIfTI) -> the processed SSL4MIS layout that SSCD trains on.

Input ``raw``: the official ACDC folder, ``patientXXX/`` folders directly in it or in its
``training/`` and ``testing/`` subfolders, each holding ``patientXXX_frameYY.nii.gz`` and
``patientXXX_frameYY_gt.nii.gz`` for the ED and ES frames (the ``_4d`` file and ``Info.cfg``
are ignored). The two annotated frames, sorted by frame number, become ``frame01`` and
``frame02`` (SSL4MIS naming).

Output ``out``::

    data/<patientXXX_frameNN>.h5          'image' float32 (D, H, W) min-max normalised to [0, 1]
                                          per volume, 'label' uint8 (D, H, W) in {0, 1, 2, 3},
                                          attribute 'spacing' = (sz, sy, sx) in mm (NIfTI header)
    data/slices/<volume>_slice_<k>.h5     2-D slices of the training volumes, k = 1..D
    train.list, train_slices.list         (+ val.list, test.list when ``splits`` is given)

Slice numbering starts at 1, as in the released processed set (its ``train_slices.list``
names ``..._slice_1`` .. ``..._slice_D``), so a canonical ``train_slices.list`` resolves
against the files written here. Datasets are gzip-compressed like the released files.

Splits: with ``splits`` (a folder holding ``train.list``, ``val.list``, ``test.list`` of
volume ids) those lists are used; ``train_slices.list`` is copied from that folder when present
(canonical order) and otherwise derived from ``train.list`` in its order. Without ``splits``
every volume goes to ``train.list`` and no val/test lists are written.

CLI: ``python code/dataloaders/preprocess_acdc.py --raw DIR --out DIR [--splits DIR]``.
"""
import argparse
import re
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:  # run as a script: code/ holds the dataloaders package
    sys.path.insert(0, CODE_DIR)
from dataloaders.image_check import read_image  # noqa: E402
from dataloaders.slice_index import index_folder  # noqa: E402

VALID_LABELS = (0, 1, 2, 3)
SPLIT_LISTS = ("train.list", "val.list", "test.list")
SLICES_LIST = "train_slices.list"
_PATIENT_RE = re.compile(r"patient\d{3}")


def minmax_normalize(volume):
    """``(v - min) / (max - min)`` as float32 in [0, 1]; a constant volume maps to zeros."""
    volume = np.asarray(volume, dtype=np.float64)
    lo, hi = volume.min(), volume.max()
    if hi == lo:
        return np.zeros(volume.shape, dtype=np.float32)
    return ((volume - lo) / (hi - lo)).astype(np.float32)


def volume_id(patient, ordinal):
    """SSL4MIS volume id: ('patient001', 1) -> 'patient001_frame01'."""
    return f"{patient}_frame{ordinal:02d}"


def slice_id(volume, index):
    """Id of the slice at 0-based array ``index`` of ``volume``; numbering starts at 1 as in the
    released set: ('patient001_frame01', 0) -> 'patient001_frame01_slice_1'."""
    return f"{volume}_slice_{index + 1}"


def find_patient_dirs(raw):
    """Sorted ``patientXXX`` folders in ``raw``, ``raw/training`` and ``raw/testing``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"ACDC raw folder {raw} does not exist")
    found = {}
    for parent in (raw, raw / "training", raw / "testing"):
        if not parent.is_dir():
            continue
        for folder in parent.iterdir():
            if folder.is_dir() and _PATIENT_RE.fullmatch(folder.name):
                if folder.name in found:
                    raise ValueError(f"patient folder {folder.name} appears twice: {found[folder.name]} and {folder}")
                found[folder.name] = folder
    if not found:
        raise FileNotFoundError(
            f"no patientXXX folders in {raw} (nor in its training/ or testing/ subfolders); "
            "expected the official ACDC layout"
        )
    return [found[name] for name in sorted(found)]


def patient_frames(patient_dir):
    """(image path, label path) of the two annotated frames of a patient folder, by frame number."""
    patient = patient_dir.name
    frame_re = re.compile(rf"{patient}_frame(\d+)(_gt)?\.nii\.gz")
    images, labels = {}, {}
    for path in patient_dir.iterdir():
        match = frame_re.fullmatch(path.name)
        if match:
            (labels if match.group(2) else images)[int(match.group(1))] = path
    for frame, image in images.items():
        if frame not in labels:
            raise FileNotFoundError(f"{image} has no annotation {image.name.replace('.nii.gz', '_gt.nii.gz')}")
    for frame, label in labels.items():
        if frame not in images:
            raise FileNotFoundError(f"{label} has no image {label.name.replace('_gt.nii.gz', '.nii.gz')}")
    if len(labels) != 2:
        raise ValueError(
            f"{patient_dir} holds {len(labels)} annotated frames {sorted(labels)}; expected 2 (ED and ES)"
        )
    return [(images[f], labels[f]) for f in sorted(labels)]


def read_pair(image_path, label_path):
    """Read one frame: (normalised float32 image (D, H, W), uint8 label (D, H, W),
    spacing (sz, sy, sx) from the image header); validates shapes and label values."""
    import SimpleITK as sitk  # here, not at import: training imports this module without reading NIfTI
    image_itk = read_image(image_path)
    image = sitk.GetArrayFromImage(image_itk)
    label = sitk.GetArrayFromImage(read_image(label_path))
    if image.ndim != 3:
        raise ValueError(f"{image_path} is {image.ndim}-D with shape {image.shape}; expected a 3-D frame")
    if image.shape != label.shape:
        raise ValueError(
            f"image {image_path} has shape {image.shape} but its label {label_path} has shape {label.shape}"
        )
    values = np.unique(label)
    bad = values[~np.isin(values, VALID_LABELS)]
    if bad.size:
        raise ValueError(f"{label_path} holds label values {bad.tolist()}; expected only {list(VALID_LABELS)}")
    spacing = tuple(float(s) for s in reversed(image_itk.GetSpacing()))
    return minmax_normalize(image), label.astype(np.uint8), spacing


def read_list(path):
    """Ids in a .list file, one per line; blank lines ignored."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def read_splits(splits_dir, volumes):
    """Split lists from ``splits_dir`` checked against the known ``volumes``: returns
    ``({list name: ids}, canonical train slice ids or None)``."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise FileNotFoundError(f"splits folder {splits_dir} does not exist")
    lists, owner = {}, {}
    for name in SPLIT_LISTS:
        path = splits_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; --splits needs {', '.join(SPLIT_LISTS)}")
        ids = read_list(path)
        unknown = [i for i in ids if i not in volumes]
        if unknown:
            raise ValueError(f"{path} names volumes not found in the raw data: {unknown[:5]}")
        for i in ids:
            if i in owner:
                raise ValueError(f"volume {i} is listed in both {owner[i]} and {name}")
            owner[i] = name
        lists[name] = ids
    slices_path = splits_dir / SLICES_LIST
    return lists, (read_list(slices_path) if slices_path.is_file() else None)


def write_h5(path, image, label, spacing=None):
    """Write gzip-compressed 'image' and 'label' (and a 'spacing' attribute if given) to ``path``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
        if spacing is not None:
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)


def preprocess_acdc(raw, out, splits=None):
    """Convert the official ACDC release in ``raw`` to the processed layout in ``out`` (see module
    docstring). Returns a summary: counts of volumes, slices and list entries, and the output folder."""
    cases = {}
    for patient_dir in find_patient_dirs(raw):
        for ordinal, pair in enumerate(patient_frames(patient_dir), start=1):
            cases[volume_id(patient_dir.name, ordinal)] = pair
    if splits is None:
        lists, canonical_slices = {"train.list": sorted(cases)}, None
    else:
        lists, canonical_slices = read_splits(splits, cases)
    train = set(lists["train.list"])
    out = Path(out)
    (out / "data" / "slices").mkdir(parents=True, exist_ok=True)
    slices_of = {}
    for volume in tqdm(sorted(cases), desc="ACDC volumes", unit="vol"):
        image, label, spacing = read_pair(*cases[volume])
        write_h5(out / "data" / f"{volume}.h5", image, label, spacing)
        if volume in train:
            slices_of[volume] = [slice_id(volume, k) for k in range(image.shape[0])]
            for k, sid in enumerate(slices_of[volume]):
                write_h5(out / "data" / "slices" / f"{sid}.h5", image[k], label[k])
    derived = [sid for volume in lists["train.list"] for sid in slices_of[volume]]
    if canonical_slices is None:
        train_slices = derived
    else:
        missing = sorted(set(canonical_slices) - set(derived))
        if missing:
            raise ValueError(
                f"{Path(splits) / SLICES_LIST} names slices not produced from train.list: {missing[:5]}"
            )
        train_slices = canonical_slices
    for name, ids in {**lists, SLICES_LIST: train_slices}.items():
        (out / name).write_text("".join(f"{i}\n" for i in ids))
    index_folder(out)
    return {
        "out": str(out),
        "volumes": len(cases),
        "slices": sum(len(s) for s in slices_of.values()),
        **{name: len(ids) for name, ids in lists.items()},
        SLICES_LIST: len(train_slices),
    }


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    parser = argparse.ArgumentParser(description="Convert the official ACDC release to the SSL4MIS h5 layout.")
    parser.add_argument(
        "--raw", required=True, type=Path, help="official ACDC folder (patientXXX/ or training/, testing/)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--splits", type=Path, default=None, help="folder with train.list, val.list, test.list")
    return parser


def main(argv=None):
    """Command line: preprocess the official ACDC release."""
    parser = build_parser()
    args = parser.parse_args(argv)
    summary = preprocess_acdc(args.raw, args.out, args.splits)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    sys.exit(main())
