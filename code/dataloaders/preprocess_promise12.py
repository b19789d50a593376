"""Preprocess prostate MRI in the PROMISE12 file layout into the processed-ACDC h5 layout.

Usage::

    python code/dataloaders/preprocess_promise12.py --raw <folder> --out <folder> --image_size 256 [--clahe]

Input: ``CaseXX.mhd`` + ``CaseXX_segmentation.mhd`` (raw or compressed MetaImage) or
``CaseXX.nii.gz`` + ``CaseXX_segmentation.nii.gz`` in one folder.

Output (``<out>``)::

    train_slices.list, train.list, val.list, test.list
    data/slices/<CaseXX_slice_k>.h5   'image' float32 (S, S) in [0, 1], 'label' uint8 (S, S)  (train)
    data/<CaseXX>.h5                  'image' float32 (D, S, S), 'label' uint8 (D, S, S)      (all)
    dataset.json                      settings, source folder, splits, withheld cases

Per axial slice: the image is resized to S x S bilinearly, then normalised with a robust min-max
(0.5 / 99.5 percentiles -> clip -> [0, 1]; a constant slice becomes zeros), then optionally
equalised (``--clahe``: SimpleITK's AdaptiveHistogramEqualizationImageFilter, radius S // 32,
alpha = beta = 0.3, followed by a min-max rescale to [0, 1]). Labels are resized with nearest
neighbour. Volume files carry the geometry attributes described in ``common.geometry``.

Splits: ``train.list`` / ``val.list`` / ``test.list`` in the raw folder (all three, or none).
Without lists the PROMISE12 convention applies: Case00-34 train, Case35-39 val, Case40-49 test.
A case listed in train/val whose files are absent is an error. A case listed in test.list whose
files are both absent is treated as a withheld test case (the NCI-ISBI folder withholds its test
split on purpose): it is reported with one warning line, skipped, recorded in dataset.json under
``withheld_test_cases`` and NOT written to the output test.list (the output lists name only cases
that have h5 files).

Nothing is written until every case has been read and validated; the output is built in a temporary
sibling folder that replaces ``<out>`` once complete, so a failed run leaves ``<out>`` as it was.
Re-running with the same settings rewrites every output identically; an ``<out>`` made with other
settings (size, CLAHE, source, cases) is refused unless ``--overwrite``.
"""
import argparse
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)
from common.errors import run_cli  # noqa: E402
from common.geometry import check_geometry, check_single_channel_3d, resize_slices, resized_spacing  # noqa: E402
from dataloaders.image_check import read_image  # noqa: E402
from dataloaders.slice_index import index_folder  # noqa: E402

LOGGER = logging.getLogger("preprocess_promise12")

SPLITS = ("train", "val", "test")
FILE_PATTERN = re.compile(r"^(Case\d+)(_segmentation)?\.(mhd|nii\.gz)$")
CASE_PATTERN = re.compile(r"^Case\d+$")
PERCENTILES = (0.5, 99.5)
AHE_ALPHA = 0.3
AHE_BETA = 0.3


def scan_folder(raw):
    """Map case id -> {'image': [paths], 'segmentation': [paths]} for every CaseXX file in ``raw``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw: {raw} is not a directory")
    found = {}
    for path in sorted(raw.iterdir()):
        match = FILE_PATTERN.match(path.name)
        if match is None:
            continue
        case, is_seg = match.group(1), match.group(2) is not None
        entry = found.setdefault(case, {"image": [], "segmentation": []})
        entry["segmentation" if is_seg else "image"].append(path)
    return found


def read_case_list(path):
    """Case ids of a split list: one per line, blank lines ignored, ``.mhd``/``.nii.gz`` suffixes stripped."""
    path = Path(path)
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        for suffix in (".mhd", ".nii.gz"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if not CASE_PATTERN.match(name):
            raise ValueError(f"{path}:{number}: expected a case id like Case07, got {line.strip()!r}")
        if name in cases:
            raise ValueError(f"{path}:{number}: case {name} is listed twice")
        cases.append(name)
    return cases


def convention_splits(case_ids):
    """PROMISE12 convention for the given case ids: 00-34 train, 35-39 val, 40-49 test (sorted)."""
    splits = {name: [] for name in SPLITS}
    for case in sorted(case_ids, key=lambda c: int(c[4:])):
        number = int(case[4:])
        if number > 49:
            raise ValueError(
                f"{case} is outside the PROMISE12 convention (Case00-49); "
                "provide train.list, val.list and test.list in the raw folder")
        split = "train" if number < 35 else "val" if number < 40 else "test"
        splits[split].append(case)
    return splits


def resolve_splits(raw, found):
    """Return (splits, withheld, source) for the raw folder.

    ``splits`` maps train/val/test to case ids whose files exist; ``withheld`` lists test cases
    named in test.list without any file; ``source`` is "lists" or "convention".
    """
    raw = Path(raw)
    list_paths = {name: raw / f"{name}.list" for name in SPLITS}
    present = [name for name, path in list_paths.items() if path.is_file()]
    if not present:
        return convention_splits(found), [], "convention"
    absent = [str(list_paths[name]) for name in SPLITS if name not in present]
    if absent:
        raise FileNotFoundError(
            f"split lists are incomplete: missing {', '.join(absent)} "
            "(provide all of train.list, val.list, test.list or none of them)")
    splits, withheld, seen = {}, [], {}
    for name in SPLITS:
        splits[name] = []
        for case in read_case_list(list_paths[name]):
            if case in seen:
                raise ValueError(f"{case} is listed in both {seen[case]} and {list_paths[name]}")
            seen[case] = list_paths[name]
            if case in found:
                splits[name].append(case)
            elif name == "test":
                withheld.append(case)
            else:
                raise FileNotFoundError(
                    f"{list_paths[name]} lists {case}, but {raw} has no {case}.mhd / {case}.nii.gz")
    unlisted = sorted(set(found) - set(seen))
    if unlisted:
        LOGGER.warning("cases in %s not named in any list, skipped: %s", raw, " ".join(unlisted))
    return splits, withheld, "lists"


def case_files(case, entry):
    """(image_path, segmentation_path) of a case; raises if either is missing or ambiguous."""
    for kind in ("image", "segmentation"):
        paths = entry[kind]
        if len(paths) > 1:
            raise ValueError(f"{case}: several {kind} files: {', '.join(str(p) for p in paths)}")
    if not entry["segmentation"]:
        raise FileNotFoundError(f"{entry['image'][0]} has no segmentation ({case}_segmentation.mhd/.nii.gz)")
    if not entry["image"]:
        raise FileNotFoundError(f"{entry['segmentation'][0]} has no image ({case}.mhd/.nii.gz)")
    return entry["image"][0], entry["segmentation"][0]


def check_labels(label, seg_path):
    """Return the label array as uint8; raise if it holds values other than 0 and 1."""
    values = np.unique(label)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(f"{seg_path}: label values must be 0 or 1, found {bad[:10].tolist()}")
    return label.astype(np.uint8)


def normalize_slice(slice2d, percentiles=PERCENTILES):
    """Robust min-max: clip to the given percentiles and map to [0, 1]; constant -> zeros."""
    x = np.asarray(slice2d, dtype=np.float64)
    low, high = np.percentile(x, percentiles)
    if not high > low:
        return np.zeros_like(x)
    return (np.clip(x, low, high) - low) / (high - low)


def equalize_slice(slice2d, radius):
    """Adaptive histogram equalisation of a [0, 1] slice (SimpleITK), rescaled to [0, 1].

    A constant slice is returned unchanged (the filter would produce NaN on it).
    """
    x = np.asarray(slice2d, dtype=np.float64)
    if not x.max() > x.min():
        return x.copy()
    ahe = sitk.AdaptiveHistogramEqualizationImageFilter()
    ahe.SetRadius([int(radius)] * 2)
    ahe.SetAlpha(AHE_ALPHA)
    ahe.SetBeta(AHE_BETA)
    out = sitk.GetArrayFromImage(ahe.Execute(sitk.GetImageFromArray(x)))
    low, high = out.min(), out.max()
    if not high > low:
        return np.zeros_like(x)
    return (out - low) / (high - low)


def clahe_radius(image_size):
    """Equalisation window radius in pixels for a given output size (S // 32, at least 1)."""
    return max(1, int(image_size) // 32)


def preprocess_arrays(image, label, image_size, clahe=False):
    """(D, H, W) image and label arrays -> (D, S, S) float32 image in [0, 1] and uint8 label."""
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be equal 3-D shapes")
    size = (image_size, image_size)
    resized = resize_slices(image.astype(np.float64), size, order=1)
    slices = [normalize_slice(s) for s in resized]
    if clahe:
        slices = [equalize_slice(s, clahe_radius(image_size)) for s in slices]
    out_image = np.stack(slices).astype(np.float32)
    out_label = resize_slices(label, size, order=0).astype(np.uint8)
    return out_image, out_label


def volume_attributes(image, image_size, clahe):
    """Geometry and settings attributes for a processed volume from its SimpleITK source image."""
    return {
        "spacing": np.asarray(resized_spacing(image.GetSpacing(), image.GetSize(),
                                              (image_size, image_size)), dtype=np.float64),
        "orig_spacing": np.asarray(image.GetSpacing(), dtype=np.float64),
        "origin": np.asarray(image.GetOrigin(), dtype=np.float64),
        "direction": np.asarray(image.GetDirection(), dtype=np.float64),
        "orig_size": np.asarray(image.GetSize(), dtype=np.int64),
        "image_size": np.int64(image_size),
        "clahe": np.bool_(clahe),
    }


def write_h5(path, image, label, attrs=None):
    """Write 'image' and 'label' (plus attributes) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    os.replace(tmp, path)


def write_lines(path, lines):
    """Write one item per line (newline-terminated)."""
    Path(path).write_text("".join(f"{line}\n" for line in lines))


def load_case(image_path, seg_path):
    """Read and validate one case; return (sitk image, image array, uint8 label array)."""
    image = read_image(image_path)
    seg = read_image(seg_path)
    check_single_channel_3d(image, image_path)
    check_geometry(image, seg, image_path, seg_path)
    label = check_labels(sitk.GetArrayFromImage(seg), seg_path)
    return image, sitk.GetArrayFromImage(image), label


def select_cases(splits, cases):
    """Restrict ``splits`` to the requested case ids (None = all); raise on unknown ids."""
    if cases is None:
        return splits
    wanted = list(cases)
    available = {c for ids in splits.values() for c in ids}
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"cases={unknown} are not available in any split (available: {sorted(available)})")
    return {name: [c for c in ids if c in wanted] for name, ids in splits.items()}


def _settings(summary):
    """What makes two preprocessing runs of a folder the same dataset."""
    return {k: summary.get(k) for k in ("image_size", "clahe", "source", "splits")}


def check_output_folder(out, summary, overwrite):
    """Refuse to replace ``out`` unless it is empty/new, holds a dataset made with the same settings
    and cases (a rerun), or ``overwrite`` is given; never touch a folder this script did not make."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    info = out / "dataset.json"
    if not out.is_dir() or not info.is_file():
        raise FileExistsError(f"--out {out}: exists and holds no dataset.json, so it was not made by this script; "
                              f"choose a new or empty folder")
    try:
        old = json.loads(info.read_text())
    except ValueError:
        old = {}
    before, after = _settings(old), _settings(summary)
    changed = [k for k in before if before[k] != after[k]]
    if not changed:
        return
    if not overwrite:
        def show(settings, key):
            value = settings[key]
            if key == "splits" and isinstance(value, dict):
                return "/".join(f"{name} {len(value.get(name, []))}" for name in SPLITS) + " cases"
            return repr(value)
        text = "; ".join(f"{k}: {show(before, k)} there, {show(after, k)} now" for k in changed)
        raise FileExistsError(f"--out {out} holds a dataset made with other settings ({text}); pass --overwrite to "
                              f"replace the whole folder, or choose another --out")
    LOGGER.warning("--overwrite: replacing %s (%s changed)", out, ", ".join(changed))


def preprocess_promise12(raw, out, image_size=256, clahe=False, cases=None, overwrite=False):
    """Preprocess the raw folder into ``out`` (layout in the module docstring); return the summary dict.

    ``cases`` optionally restricts processing to these case ids (they keep their split). Every case
    is read and validated before anything is written; the output is written into a temporary
    sibling folder that replaces ``out`` only once complete, so a failed run leaves ``out`` as it
    was. An ``out`` that holds a dataset made with other settings or cases is refused unless
    ``overwrite``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    image_size = int(image_size)
    raw, out = Path(raw), Path(out)
    found = scan_folder(raw)
    splits, withheld, split_source = resolve_splits(raw, found)
    if withheld:
        LOGGER.warning("test.list names %d case(s) without files (withheld test split), skipped: %s",
                       len(withheld), " ".join(withheld))
    splits = select_cases(splits, cases)
    if not any(splits.values()):
        raise ValueError(f"--raw: no cases to process in {raw}")
    ordered = [(name, case) for name in SPLITS for case in splits[name]]
    files = {case: case_files(case, found[case]) for _, case in ordered}
    for _, case in tqdm(ordered, desc="checking", unit="case"):
        load_case(*files[case])  # geometry and label values of every case, before anything is written
    summary = {
        "image_size": image_size,
        "clahe": bool(clahe),
        "source": str(raw.resolve()),
        "split_source": split_source,
        "splits": splits,
        "withheld_test_cases": withheld,
        "num_classes": 2,
    }
    check_output_folder(out, summary, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary["num_train_slices"] = _write_dataset(partial, ordered, files, splits, summary, image_size, clahe)
        _swap_in(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _write_dataset(folder, ordered, files, splits, summary, image_size, clahe):
    """Write every case, the lists and dataset.json into ``folder``; returns the training slice count."""
    (folder / "data" / "slices").mkdir(parents=True)
    train_slices = []
    for split, case in tqdm(ordered, desc="PROMISE12", unit="case"):
        image, image_array, label = load_case(*files[case])
        volume, labels = preprocess_arrays(image_array, label, image_size, clahe)
        write_h5(folder / "data" / f"{case}.h5", volume, labels, volume_attributes(image, image_size, clahe))
        if split == "train":
            for k in range(volume.shape[0]):
                slice_id = f"{case}_slice_{k}"
                write_h5(folder / "data" / "slices" / f"{slice_id}.h5", volume[k], labels[k])
                train_slices.append(slice_id)
    for name in SPLITS:
        write_lines(folder / f"{name}.list", splits[name])
    write_lines(folder / "train_slices.list", train_slices)
    index_folder(folder)
    info = {**summary, "num_train_slices": len(train_slices)}
    (folder / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return len(train_slices)


def _swap_in(partial, out):
    """Replace ``out`` by the complete folder ``partial`` (two renames; the old folder is then deleted)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="folder with CaseXX.mhd + CaseXX_segmentation.mhd")
    parser.add_argument("--out", required=True, help="output folder (processed h5 layout)")
    parser.add_argument("--image_size", type=int, default=256, help="output slice size S (S x S)")
    parser.add_argument("--clahe", action="store_true", help="adaptive histogram equalisation per slice")
    parser.add_argument("--cases", nargs="+", default=None, help="process only these case ids")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out folder that holds a dataset made with other settings or cases")
    return parser


def main(argv=None):
    """Command-line entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = preprocess_promise12(args.raw, args.out, args.image_size, args.clahe, args.cases, args.overwrite)
    counts = ", ".join(f"{name} {len(summary['splits'][name])}" for name in SPLITS)
    LOGGER.info("wrote %s: %s cases, %d training slices", args.out, counts, summary["num_train_slices"])


if __name__ == "__main__":
    run_cli(main)
