"""Convert your own NIfTI/MHA/MHD/NRRD data set, with or without labels per case, into this project's layout.

Usage::

    python code/dataloaders/convert_dataset.py --input Dataset042_Prostate --out data/Prostate42 \\
        [--image_size 256] [--unlabeled DIR] [--class_names gland] [--val_cases A,B | --splits FILE]

Input (``--input``), one of:

- an nnU-Net v2 raw folder: ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``),
  ``imagesTr/{case}_0000{ending}``, ``labelsTr/{case}{ending}``, ``imagesTs/`` (prediction only,
  not converted). An ``imagesTr`` case without a ``labelsTr`` file is unlabeled;
- a plain folder with ``images/`` and ``labels/``: ``images/{case}{ending}`` and, for labeled cases,
  ``labels/{case}{ending}`` with the same name. Class names from ``--class_names`` (foreground,
  comma-separated; default class1, class2, ... up to the largest label value).

``--unlabeled DIR`` adds every image file of DIR (``{case}{ending}`` or ``{case}_0000{ending}``) to the
unlabeled pool. Images must be 3-D and single-channel (multi-channel and 4-D files are refused).

Output (``--out``)::

    dataset.json        classes, preprocessing recipe (dataset-level), splits, labeled order, sources
    train.list          labeled training cases, in the order --labelnum takes them (first k = labeled)
    unlabeled.list      cases without a label: their slices carry NO 'label' dataset
    val.list, test.list labeled evaluation cases (by case, never by slice)
    train_slices.list   slices of train.list cases, then of unlabeled.list cases
    data/slices/<case>_slice_<k>.h5   'image' float32 (S, S) [+ 'label' uint8 (S, S) for labeled cases]
    data/<case>.h5      labeled cases: 'image' float32 (D, S, S), 'label' uint8 (D, S, S), geometry attrs

Preprocessing (``dataloaders.volume_io``, replayed by ``code/predict.py``): the slices run along the
axis of largest spacing (``--slice_axis``); each volume is clipped to its 0.5 / 99.5 percentiles and
min-max mapped to [0, 1]; slices are resized to S x S (bilinear; labels nearest).

Splits: ``--val_cases`` / ``--test_cases`` (comma-separated case ids), or ``--splits FILE`` (JSON
``{"val": [...], "test": [...]}``), else a seeded split of the labeled cases (``--val_fraction``,
``--seed``) that is printed and written to dataset.json. The train order is a seeded permutation
(or ``--train_order FILE``, one case per line).

Every header is checked (geometry, slice axis, data sizes) before anything is written, every voxel while
its case is written (``--workers N`` cases at a time, one case in memory per process). The output is
built in ``.<out>.partial`` beside ``--out`` and swapped in when complete, so a failed conversion leaves
``--out`` as it was; an interrupted one is resumed by the same command (the cases already written and
verified are kept, ``dataloaders.conversion``). An ``--out`` made with other settings is refused unless
``--overwrite``. ``slice_index.npz`` holds what training start-up needs from every slice.
"""
import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)
from common.errors import run_cli  # noqa: E402
from common.geometry import check_geometry  # noqa: E402
from dataloaders.conversion import PartialFolder, describe_change, run_jobs  # noqa: E402
from dataloaders.preprocess_promise12 import _swap_in, write_lines  # noqa: E402
from dataloaders.slice_index import stack_counts, write_root_index  # noqa: E402
from dataloaders.volume_io import (DEFAULT_PERCENTILES, SLICE_AXIS_RULES, check_image_header,  # noqa: E402
                                   image_ending, slice_axis)

LOGGER = logging.getLogger("convert_dataset")
FORMAT = "sscd-converted-v1"
CHANNEL = "_0000"
# what makes two conversions the same data set (a rerun with other values is refused without --overwrite)
SETTINGS = ("preprocessing", "source", "unlabeled_source", "classes", "splits", "unlabeled")


def list_images(folder, what):
    """{case: path} of the image files in ``folder`` (names without their ending); ValueError on a
    file with another ending or a case named twice."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        ending = image_ending(path.name)
        if ending is not None and not path.is_file():  # a folder, a dangling link, a device
            raise ValueError(f"{path}: named like an image but not a readable file (in {what})")
        if path.is_dir():
            continue
        if ending is None:
            lower = path.name.lower()
            if lower.endswith(".gz") and not lower.endswith(".raw.gz"):
                raise ValueError(f"{path}: a gzip-compressed file this converter cannot read; expected .nii.gz, or "
                                 f".mha/.nrrd (which compress inside: SimpleITK.WriteImage(..., useCompression=True))")
            if path.suffix.lower() in (".raw", ".zraw", ".gz", ".json", ".txt", ".list"):
                continue  # MetaImage/NRRD data files and notes beside the images
            raise ValueError(f"{path}: not an image file this converter reads (expected one of .nii.gz, .nii, "
                             f".mha, .mhd, .nrrd in {what})")
        case = path.name[: -len(ending)]
        if case in found:
            raise ValueError(f"{path}: case {case} has two files in {what} ({found[case].name} and {path.name})")
        found[case] = path
    return found


def nnunet_cases(folder):
    """(cases, classes, layout info) of an nnU-Net v2 raw folder."""
    info_path = folder / "dataset.json"
    try:
        info = json.loads(info_path.read_text())
    except ValueError as err:
        raise ValueError(f"{info_path}: not valid JSON ({err})") from None
    channels = info.get("channel_names") or info.get("modality") or {}
    if len(channels) != 1:
        raise ValueError(f"{info_path}: channel_names has {len(channels)} channels ({channels}); expected exactly "
                         f"one (multi-channel input is not supported, see docs/own_data.md)")
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{info_path}: expected 'labels' as {{name: value}} with background 0")
    classes = class_names_from_labels(labels, info_path)
    ending = info.get("file_ending")
    if ending not in {*(e for e in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"))}:
        raise ValueError(f"{info_path}: file_ending {ending!r}; expected one of .nii.gz, .nii, .mha, .mhd, .nrrd")
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such folder (expected imagesTr/{{case}}_0000{ending})")
    cases = {}
    for case, path in list_images(images_dir, "imagesTr").items():
        if not case.endswith(CHANNEL):
            raise ValueError(f"{path}: expected {{case}}_0000{ending} in imagesTr (a single channel, suffix _0000)")
        cases[case[: -len(CHANNEL)]] = {"image": path, "label": None}
    label_files = list_images(labels_dir, "labelsTr") if labels_dir.is_dir() else {}
    for case, path in label_files.items():
        if case not in cases:
            raise FileNotFoundError(f"{path}: a label without an image (expected imagesTr/{case}_0000{ending})")
        cases[case]["label"] = path
    test_dir = folder / "imagesTs"
    test_files = list_images(test_dir, "imagesTs") if test_dir.is_dir() else {}
    predict_only = sorted(c[: -len(CHANNEL)] if c.endswith(CHANNEL) else c for c in test_files)
    both = sorted(set(predict_only) & set(cases))
    if both:
        clash = next(p for c, p in test_files.items() if (c[: -len(CHANNEL)] if c.endswith(CHANNEL) else c) == both[0])
        raise ValueError(f"{clash}: case {both[0]} is in imagesTs and in imagesTr ({cases[both[0]]['image'].name}); "
                         f"a test case must not be a training case")
    return cases, classes, {"layout": "nnunet", "file_ending": ending, "channel_names": channels,
                            "predict_only_cases": predict_only, "numTraining": info.get("numTraining")}


def class_names_from_labels(labels, where):
    """['background', name1, ...] from an nnU-Net ``labels`` mapping; ValueError unless its values are
    0..C-1, each once (region-based labels are not supported)."""
    by_value = {}
    if "ignore" in labels:
        raise ValueError(f"{where}: an 'ignore' label; expected only classes to learn (ignore labels are not "
                         f"supported: remove it and remap its voxels)")
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: label {name!r} has value {value!r}; expected an integer (region-based "
                             f"labels are not supported)")
        if value in by_value:
            raise ValueError(f"{where}: labels {by_value[value]!r} and {name!r} share the value {value}")
        by_value[value] = name
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise ValueError(f"{where}: label values {sorted(by_value)}; expected 0 (background), 1, ..., C-1")
    return [by_value[k] for k in range(len(by_value))]


def pair_cases(folder):
    """Cases of a plain ``images/`` + ``labels/`` folder (same file names)."""
    images_dir, labels_dir = folder / "images", folder / "labels"
    cases = {case: {"image": path, "label": None} for case, path in list_images(images_dir, "images").items()}
    if labels_dir.is_dir():
        for case, path in list_images(labels_dir, "labels").items():
            if case not in cases:
                raise FileNotFoundError(f"{path}: a label without an image (expected {images_dir / path.name})")
            cases[case]["label"] = path
    return cases, {"layout": "pairs", "file_ending": None, "channel_names": {"0": "image"},
                   "predict_only_cases": [], "numTraining": None}


def discover(input_dir, unlabeled_dir=None):
    """(cases, classes or None, layout info): every case of ``input_dir`` (nnU-Net raw or images/ +
    labels/) plus the images of ``unlabeled_dir`` (label None)."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--input {folder}: not a folder")
    if (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir():
        cases, classes, info = nnunet_cases(folder)
    elif (folder / "images").is_dir():
        (cases, info), classes = pair_cases(folder), None
    else:
        raise FileNotFoundError(f"--input {folder}: expected an nnU-Net raw folder (dataset.json + imagesTr/) or a "
                                f"folder with images/ (and labels/)")
    if unlabeled_dir is not None:
        extra = Path(unlabeled_dir)
        if not extra.is_dir():
            raise FileNotFoundError(f"--unlabeled {extra}: not a folder")
        found = list_images(extra, "--unlabeled")
        for case, path in found.items():
            base, suffix = case[:-5], case[-5:]
            if suffix[:1] == "_" and suffix[1:].isdigit() and suffix != CHANNEL and (
                    f"{base}{CHANNEL}" in found or base in found):
                raise ValueError(f"{path}: a second input channel of case {base} ({suffix}); expected one channel "
                                 f"per case ({{case}}.ext or {{case}}_0000.ext), as in imagesTr")
        predict_only = set(info.get("predict_only_cases") or ())
        for case, path in found.items():
            case = case[: -len(CHANNEL)] if case.endswith(CHANNEL) else case
            if case in predict_only:
                raise ValueError(f"{path}: case {case} is an imagesTs case of --input; a test case must not be a "
                                 f"training case (unlabeled ones included)")
            if case in cases:
                raise ValueError(f"{path}: case {case} is also {cases[case]['image']}; unlabeled cases need their own "
                                 f"names")
            cases[case] = {"image": path, "label": None}
    if not cases:
        raise ValueError(f"--input {folder}: no image files found")
    bad = [c for c in cases if not c or "/" in c or c.startswith(".")]
    if bad:
        raise ValueError(f"--input {folder}: case names {bad} cannot be used as file names")
    spaced = sorted(c for c in cases if c != c.strip() or any(ch in c for ch in "\n\r\t"))
    if spaced:
        raise ValueError(f"{cases[spaced[0]]['image']}: case name {spaced[0]!r} begins or ends with white space (or "
                         f"holds a tab or line break); the split lists could not name it: rename the file")
    return cases, classes, info


def warn_mixed_axes(axes):
    """Warn when the cases of one data set are cut along different axes ({case: axis})."""
    by_axis = {}
    for case, axis in sorted(axes.items()):
        by_axis.setdefault("xyz"[axis], []).append(case)
    if len(by_axis) > 1:
        parts = "; ".join(f"{name}: {len(cases)} case(s) ({', '.join(cases[:3])}{', ...' if len(cases) > 3 else ''})"
                          for name, cases in sorted(by_axis.items(), key=lambda kv: -len(kv[1])))
        LOGGER.warning("the cases are cut along different axes (%s): training mixes slice orientations; give "
                       "--slice_axis x|y|z to cut every case alike", parts)


def resolve_classes(classes, class_names, values_by_case, cases):
    """The class names ['background', ...]: from dataset.json, else ``--class_names``, else class1..
    up to the largest label value; ValueError naming a label file whose values fall outside."""
    if class_names:
        names = ["background"] + [n.strip() for n in class_names.split(",") if n.strip()]
        if classes is not None and names != classes:
            raise ValueError(f"--class_names {class_names}: the input's dataset.json names {classes[1:]}")
        classes = names
    if classes is None:
        seen = sorted({int(v) for values in values_by_case.values() if values is not None for v in values})
        missing = sorted(set(range(max(seen, default=0) + 1)) - set(seen))
        if missing:  # e.g. a 0/255 mask: the values are not class indices 0..C-1
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            above = [case for case, values in values_by_case.items()
                     if values is not None and values.size and values.max() > missing[0]]
            where = f" (values above {missing[0]} in {cases[above[0]]['label']}" + \
                (f" and {len(above) - 1} other file(s))" if len(above) > 1 else ")")
            raise ValueError(f"label values {seen[:6]}{'...' if len(seen) > 6 else ''} over all label files: {shown} "
                             f"never occur{where}; expected classes 0..C-1 (remap the labels, or name the classes "
                             f"with --class_names)")
        top = seen[-1] if seen else 0
        classes = ["background"] + [f"class{k}" for k in range(1, max(top, 1) + 1)]
    for case, values in values_by_case.items():
        if values is not None and values.size and values.max() >= len(classes):
            raise ValueError(f"{cases[case]['label']}: label values {values.tolist()}; expected 0..{len(classes) - 1} "
                             f"({', '.join(classes)})")
    return classes


def _case_list(text, flag, known):
    """Case ids of a comma-separated flag value (or a list), checked against the labeled cases ``known``."""
    ids = [c.strip() for c in text.split(",") if c.strip()] if isinstance(text, str) else list(text)
    for case in ids:
        if case not in known:
            raise ValueError(f"{flag}: {case} is not a labeled case of the input (labeled: {' '.join(sorted(known))})")
        if ids.count(case) > 1:
            raise ValueError(f"{flag}: {case} is named {ids.count(case)} times; expected each case once")
    return ids


def resolve_splits(labeled, args):
    """``({"train", "val", "test"}, how)``: the evaluation cases from flags, a splits file or a seeded
    split of ``labeled``; the train order from --train_order or a seeded permutation."""
    known = set(labeled)
    if args.splits and (args.val_cases or args.test_cases):
        raise ValueError("--splits with --val_cases/--test_cases: give the split one way")
    if args.splits:
        path = Path(args.splits)
        try:
            given = json.loads(path.read_text())
            val, test = given.get("val", []), given.get("test", [])
        except (ValueError, AttributeError, OSError) as err:
            raise ValueError(f"--splits {path}: expected a JSON file {{\"val\": [...], \"test\": [...]}} "
                             f"({err})") from None
        for key, value in (("val", val), ("test", test)):
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise ValueError(f"--splits {path}: {key} is {value!r}; expected a list of case names")
        val = _case_list(val, f"--splits {path}", known)
        test = _case_list(test, f"--splits {path}", known)
        how = f"file {path.resolve()}"
    elif args.val_cases:
        val = _case_list(args.val_cases, "--val_cases", known)
        test = _case_list(args.test_cases or "", "--test_cases", known)
        how = "flags"
    else:  # val drawn (seeded) from the labeled cases not in --test_cases
        test = _case_list(args.test_cases or "", "--test_cases", known)
        pool = [c for c in labeled if c not in set(test)]
        rng = np.random.default_rng(args.seed)
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        n_val = max(1, int(round(args.val_fraction * len(pool)))) if len(pool) > 1 else 0
        val = sorted(shuffled[:n_val])
        how = (f"seeded (--seed {args.seed}, --val_fraction {args.val_fraction})"
               + (", test from --test_cases" if test else ""))
    both = set(val) & set(test)
    if both:
        raise ValueError(f"cases {sorted(both)} are in both the val and the test split")
    train = [c for c in labeled if c not in set(val) | set(test)]
    if not train:
        raise ValueError("no labeled case left for training: every labeled case is in val or test")
    if not val:
        raise ValueError("no validation case: give --val_cases or a --val_fraction that leaves one (model selection "
                         "needs labeled val cases)")
    return {"train": train_order(train, args), "val": val, "test": test}, how


def train_order(train, args):
    """The order --labelnum takes the labeled training cases in: --train_order, else seeded."""
    if args.train_order:
        path = Path(args.train_order)
        order = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if sorted(order) != sorted(train):
            raise ValueError(f"--train_order {path}: expected each labeled training case once "
                             f"({' '.join(sorted(train))}), got {' '.join(order)}")
        return order
    rng = np.random.default_rng([args.seed, 1])
    return [sorted(train)[i] for i in rng.permutation(len(train))]


def check_output_folder(out, summary, overwrite):
    """Refuse an ``out`` that is not empty and not a conversion with the same settings, unless
    ``overwrite`` (and never a folder this script did not make)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file; expected a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    info = out / "dataset.json"
    try:
        old = json.loads(info.read_text()) if info.is_file() else None
    except ValueError:
        old = None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise FileExistsError(f"--out {out}: exists and was not made by convert_dataset.py (no {FORMAT} dataset.json); "
                              f"choose a new or empty folder")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"--out {out}: holds entries the converter did not write ({shown}); a new conversion "
                              f"replaces the whole folder: move them out, or choose another --out")
    changed = [k for k in SETTINGS if old.get(k) != summary.get(k)
               and not (k == "classes" and summary.get(k) is None)]  # classes the voxels decide: checked at the end
    if changed and not overwrite:
        raise FileExistsError(f"--out {out} holds a conversion made with other settings "
                              f"({'; '.join(describe_change(k, old.get(k), summary.get(k)) for k in changed)}); "
                              f"pass --overwrite to replace it, or choose another --out")
    if changed:
        LOGGER.warning("--overwrite: replacing %s (%s changed)", out, ", ".join(changed))


OUTPUT_FILES = ("dataset.json", "train.list", "val.list", "test.list", "unlabeled.list", "train_slices.list",
                "slice_index.npz")


def foreign_entries(out):
    """Paths (relative to ``out``) of what a conversion in ``out`` did not write: anything beside its
    lists, dataset.json and data/ (which holds <case>.h5 files and slices/<id>.h5)."""
    out, foreign = Path(out), []
    for entry in sorted(out.iterdir()):
        if entry.name in OUTPUT_FILES and entry.is_file():
            continue
        if entry.name != "data" or not entry.is_dir():
            foreign.append(entry.name)
            continue
        for item in sorted(entry.iterdir()):
            if item.name == "slices" and item.is_dir():
                foreign += [f"data/slices/{f.name}" for f in sorted(item.iterdir())
                            if not (f.is_file() and f.name.endswith(".h5"))]
            elif not (item.is_file() and item.name.endswith(".h5")):
                foreign.append(f"data/{item.name}")
    return foreign


def remove_stale_work_folders(out):
    """Delete the ``.<out>.partial-PID`` / ``.<out>.old-PID`` folders that conversions killed before
    they could clean up left beside ``out`` (their process no longer runs); returns their names."""
    removed = []
    for folder in sorted(Path(out).parent.glob(f".{Path(out).name}.*-*")):
        kind, _, pid = folder.name[len(Path(out).name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or not folder.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def check_headers(cases, rule):
    """{case: slice axis} from the headers alone (no voxel is read): every image and label a readable
    3-D single-channel file of the size its header gives, each label on its image's grid."""
    axes = {}
    for case in tqdm(sorted(cases), desc="headers", unit="case", disable=not sys.stderr.isatty()):
        entry = cases[case]
        image = check_image_header(entry["image"])
        try:
            axes[case] = slice_axis(image.GetSpacing(), rule, image.GetSize())
        except ValueError as err:
            raise ValueError(f"{entry['image']}: {err}") from None
        if entry["label"] is not None:
            check_geometry(image, check_image_header(entry["label"]), entry["image"], entry["label"])
    return axes


def plan(args):
    """(cases, the dataset.json summary without what the voxels decide) from the flags and headers."""
    if args.image_size < 16 or args.image_size % 16:
        raise ValueError(f"--image_size {args.image_size}: expected a positive multiple of 16 (the network's input)")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected 1 or more processes")
    cases, classes, info = discover(args.input, args.unlabeled)
    warn_mixed_axes(check_headers(cases, args.slice_axis))
    if args.class_names:  # the names are known now; a clash with dataset.json is refused before any work
        classes = resolve_classes(classes, args.class_names, {}, cases)
    labeled = sorted(c for c in cases if cases[c]["label"] is not None)
    if not labeled:
        raise ValueError(f"--input {args.input}: no case has a label; training needs labeled cases")
    splits, how = resolve_splits(labeled, args)
    recipe = {"normalization": "percentile_minmax", "percentiles": list(DEFAULT_PERCENTILES),
              "slice_axis": args.slice_axis, "size": int(args.image_size)}
    summary = {
        "format": FORMAT, **info, "source": str(Path(args.input).resolve()),
        "unlabeled_source": str(Path(args.unlabeled).resolve()) if args.unlabeled else None,
        "classes": classes, "num_classes": len(classes) if classes else None, "input_channels": 1,
        "image_size": int(args.image_size), "preprocessing": recipe, "splits": splits, "split_source": how,
        "unlabeled": sorted(c for c in cases if cases[c]["label"] is None),
    }
    return cases, summary


def convert_dataset(args):
    """Convert ``args.input`` (+ ``args.unlabeled``) into ``args.out``; returns the dataset.json dict."""
    cases, summary = plan(args)
    out = Path(args.out)
    check_output_folder(out, summary, args.overwrite)  # (the classes, if the voxels decide them, at the end)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in remove_stale_work_folders(out):
        LOGGER.warning("removed %s, left by a conversion that was killed", out.parent / name)
    partial = PartialFolder(out, {"format": FORMAT, "preprocessing": summary["preprocessing"]}, args.overwrite)
    try:
        records = convert_cases(partial, cases, summary, args.workers)
        values = {case: None if r["values"] is None else np.asarray(r["values"]) for case, r in records.items()}
        summary["classes"] = resolve_classes(summary["classes"], args.class_names, values, cases)
        summary["num_classes"] = len(summary["classes"])
        check_output_folder(out, summary, args.overwrite)
        write_outputs(partial, summary, records)
        _swap_in(partial.path, out)
    finally:
        partial.release()
    return summary


def convert_cases(partial, cases, summary, workers):
    """Every case converted (or kept from an interrupted conversion) into the partial folder, in
    ``workers`` processes; returns the records by case (logged: their warnings, what was kept)."""
    splits = summary["splits"]
    ordered = [(s, c) for s in ("train", "val", "test") for c in splits[s]]
    ordered += [("unlabeled", c) for c in summary["unlabeled"]]
    jobs = [{"folder": str(partial.path), "case": case, "split": split, "recipe": summary["preprocessing"],
             "entry": {k: None if v is None else str(v) for k, v in cases[case].items()},
             "record": partial.records.get(case)} for split, case in ordered]
    progress = tqdm(total=len(jobs), desc="converting", unit="case", disable=not sys.stderr.isatty())
    records = run_jobs(jobs, workers, on_done=lambda record: progress.update())
    progress.close()
    kept = sum(r["kept"] for r in records.values())
    if partial.records:
        LOGGER.info("resumed an interrupted conversion: kept %d of %d cases already written and verified, "
                    "converted %d", kept, len(jobs), len(jobs) - kept)
    for split, case in ordered:
        for warning in records[case]["warnings"]:
            LOGGER.warning("%s", warning)
    return {case: records[case] for _, case in ordered}


def write_outputs(partial, summary, records):
    """The lists, the slice index and dataset.json of a conversion whose cases are all written."""
    folder, splits = partial.path, summary["splits"]
    labeled_slices = [s for c in splits["train"] for s in records[c]["slices"]]
    unlabeled_slices = [s for c in summary["unlabeled"] for s in records[c]["slices"]]
    for name in ("train", "val", "test"):
        write_lines(folder / f"{name}.list", splits[name])
    write_lines(folder / "unlabeled.list", summary["unlabeled"])
    write_lines(folder / "train_slices.list", labeled_slices + unlabeled_slices)
    rows = [np.asarray(n) if n is not None else None
            for c in splits["train"] + summary["unlabeled"] for n in records[c]["counts"]]
    write_root_index(folder, [r is not None for r in rows], stack_counts(rows), (summary["image_size"],) * 2)
    summary.update({"num_labeled_slices": len(labeled_slices), "num_unlabeled_slices": len(unlabeled_slices)})
    (folder / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    partial.finish([name for r in records.values() for name in r["files"]])


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="nnU-Net v2 raw folder, or a folder with images/ (+ labels/)")
    p.add_argument("--out", required=True, help="output folder (the layout the trainers read)")
    p.add_argument("--unlabeled", default=None, help="extra folder of unlabeled image files")
    p.add_argument("--image_size", type=int, default=256, help="stored slice size S (S x S; a multiple of 16)")
    p.add_argument("--class_names", default=None, help="foreground class names, comma-separated (default: "
                   "dataset.json 'labels', else class1, class2, ...)")
    p.add_argument("--slice_axis", choices=SLICE_AXIS_RULES, default="largest_spacing",
                   help="axis the 2-D slices run along: the one of largest spacing, or a fixed axis")
    p.add_argument("--val_cases", default=None, help="validation cases, comma-separated")
    p.add_argument("--test_cases", default=None, help="test cases, comma-separated")
    p.add_argument("--splits", default=None, help='JSON file {"val": [...], "test": [...]}')
    p.add_argument("--val_fraction", type=float, default=0.2, help="seeded split: fraction of labeled cases for val")
    p.add_argument("--train_order", default=None, help="file: the labeled training cases in --labelnum order")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the train order")
    p.add_argument("--overwrite", action="store_true", help="replace an --out converted with other settings (and "
                   "discard an interrupted conversion made with other settings)")
    p.add_argument("--workers", type=int, default=1, help="processes converting cases in parallel (each holds one "
                   "case in memory)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction {args.val_fraction}: expected a fraction in (0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = convert_dataset(args)
    s = summary["splits"]
    print(f"wrote {args.out}: {len(summary['classes'])} classes ({', '.join(summary['classes'])}); "
          f"train {len(s['train'])} labeled + {len(summary['unlabeled'])} unlabeled cases, val {len(s['val'])}, "
          f"test {len(s['test'])} (split: {summary['split_source']})")
    print(f"  train order (--labelnum k takes the first k): {' '.join(s['train'])}")
    print(f"  val: {' '.join(s['val'])}" + (f"; test: {' '.join(s['test'])}" if s["test"] else ""))
    print(f"  slices: {summary['num_labeled_slices']} labeled, {summary['num_unlabeled_slices']} unlabeled")
    return summary


if __name__ == "__main__":
    run_cli(main)
