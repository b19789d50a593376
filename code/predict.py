"""Segment new scans (no labels needed) with a trained checkpoint; label maps in each input's exact geometry.

    python code/predict.py -i IN -o OUT --checkpoint model/<run>/best.pth [--lcc] [--tta flip] [--device cuda]

``IN`` is one image file or a folder of them (.nii.gz, .nii, .mha, .mhd, .nrrd; nnU-Net's
``{case}_0000.nii.gz`` naming is understood). ``OUT/{case}{ending}`` gets one uint8 label map per case
with the input's size, spacing, origin and direction (``.mhd`` inputs are written as ``.mha``, one file).
The checkpoint's model card (``evaluation.model_card``) supplies everything else: classes, network, input
size, and the preprocessing recipe, replayed through the converter's own function
(``dataloaders.volume_io.preprocess_image``), so that a case predicts exactly as the test scripts do.

Every input is checked (readable, 3-D, one channel) before the first forward. Outputs are written to a
temporary name and renamed, so a file in ``OUT`` is always complete; a rerun skips the cases already
there unless ``--overwrite``. ``--save_probabilities`` adds ``{case}.npz`` (``probabilities`` float32
(C, z, y, x) on the input grid, plus ``spacing``/``origin``/``direction``), written before the label map.
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import CheckpointError, load_checkpoint, load_model_state
from common.errors import run_cli
from common.geometry import restore_original_geometry, write_label_image
from dataloaders.dataset import resize_nearest
from dataloaders.image_check import layout
from dataloaders.volume_io import (blank_reason, check_image_header, check_recipe, geometry_meta, image_ending,
                                   preprocess_image, read_image)
from evaluation.inference import predict_volume
from evaluation.testing import largest_component_3d
from networks.unet import CHANNELS, build_model

CHANNEL = "_0000"
TEMP_PREFIX = ".partial-"
IGNORED_SUFFIXES = (".raw", ".raw.gz", ".zraw", ".json", ".txt", ".npz")  # data files of .mhd/.nhdr headers, ...
# input endings whose header names a separate data file -> the one-file format the label map is written in
# (one file is renamed atomically; a header's data file would keep its temporary name)
SINGLE_FILE = {".mhd": ".mha", ".nhdr": ".nrrd"}
# what predict.json records of a run; a rerun into the same -o with other values is refused
RUN_SETTINGS = ("checkpoint", "checkpoint_sha256", "lcc", "tta", "amp", "channels_last")
CASES_FILE = "predict_cases.jsonl"  # one line per finished case: its input's SHA-256 and the run's settings


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="an image file or a folder of image files")
    p.add_argument("-o", "--output", required=True, help="folder for the label maps (created)")
    p.add_argument("--checkpoint", required=True, help="a best.pth written by a trainer of this project")
    p.add_argument("--lcc", action="store_true", help="keep only the largest 3-D connected component per class")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average the softmax over the in-plane flips (4 forwards per slice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=8,
                   help="slices per forward (bounds the memory: ~45 MB per slice at 256² on the CPU)")
    p.add_argument("--save_probabilities", action="store_true", help="also write {case}.npz with the class "
                   "probabilities on the input grid")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists again")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16: the network under bfloat16 autocast (fast on GPUs and CPUs with native bf16; a few "
                        "voxels may differ from the test scripts, which run fp32)")
    p.add_argument("--channels_last", choices=["off", "on"], default="on",
                   help="memory format of the network: on = NHWC (faster), as the test scripts' default; give "
                        "both the same value for voxel-identical label maps")
    return p


class Network(torch.nn.Module):
    """The model as predict calls it: in ``channels_last`` if asked (the default, as the test scripts'),
    forward under bf16 autocast if asked, float32 logits out."""

    def __init__(self, model, amp, channels_last):
        super().__init__()
        self.model, self.amp, self.channels_last = model, amp == "bf16", channels_last == "on"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.amp:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def case_name(path, naming="nnunet"):
    """(case, ending) of an input file: 'prostate_07_0000.nii.gz' -> ('prostate_07', '.nii.gz') under
    nnU-Net naming; under ``plain`` naming (a model trained on images/ + labels/) the name is kept whole."""
    ending = image_ending(path.name)
    stem = path.name[: -len(ending)]
    return (stem[: -len(CHANNEL)] if naming != "plain" and stem.endswith(CHANNEL) else stem), ending


def list_inputs(source, naming="nnunet"):
    """[(case, path, ending)] of ``-i`` (a file or a folder); ValueError naming what is wrong. ``naming``
    (the model card's): ``nnunet`` reads ``{case}_0000`` as the first channel of ``case`` and refuses a
    second channel; ``plain`` takes every file name as its case name."""
    paths = input_paths(source)
    stems = {path.name[: -len(image_ending(path.name))] for path in paths}
    cases, seen = [], {}
    for path in paths:
        stem = path.name[: -len(image_ending(path.name))]
        if naming != "plain" and stem[-5:-4] == "_" and stem[-4:].isdigit() and stem[-4:] != "0000" \
                and f"{stem[:-5]}{CHANNEL}" in stems:
            raise ValueError(f"{path}: a second input channel of case {stem[:-5]} ({stem[-5:]}); this model takes one "
                             f"channel (expected only {{case}}_0000 files)")
        case, ending = case_name(path, naming)
        if case in seen:
            raise ValueError(f"{path}: case {case} also comes from {seen[case].name}; expected one file per case")
        seen[case] = path
        cases.append((case, path, ending))
    return cases


def input_paths(source):
    """The image files of ``-i`` (a file or a folder); ValueError naming a file of another kind or an
    empty folder."""
    source = Path(source)
    if source.is_file():
        paths = [source]
    elif source.is_dir():
        paths = [p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith(".")
                 and not p.name.lower().endswith(IGNORED_SUFFIXES)]
    else:
        raise FileNotFoundError(f"-i {source}: no such file or folder")
    if source.is_dir():
        odd = [p for p in sorted(source.iterdir()) if not p.name.startswith(".") and image_ending(p.name)
               and not p.is_file()]
        if odd:
            raise ValueError(f"{odd[0]}: named like an image but not a readable file")
    for path in paths:
        ending = image_ending(path.name)
        if ending is None:
            raise ValueError(f"{path}: not an image file predict.py reads (expected .nii.gz, .nii, .mha, .mhd, .nrrd)")
        if path.name[: -len(ending)] in ("", CHANNEL):
            raise ValueError(f"{path}: no case name before {path.name}; expected {{case}}{ending}")
    if not paths:
        raise ValueError(f"-i {source}: no image files (expected .nii.gz, .nii, .mha, .mhd or .nrrd)")
    return paths


def load_predictor(path, device):
    """(model in eval mode on ``device``, model card) from a checkpoint with a model card."""
    state = load_checkpoint(path, map_location="cpu")
    card = state.get("config", {}).get("model_card")
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: no model card (config['model_card']); it was written before checkpoints "
                              f"described themselves: retrain, or evaluate it with test_ACDC.py / test_PROMISE12.py")
    check_recipe(card["preprocessing"])
    if card["input_channels"] != 1:
        raise CheckpointError(f"{path}: a model of {card['input_channels']} input channels; predict.py feeds one")
    if int(state["num_classes"]) != len(card["classes"]):
        raise CheckpointError(f"{path}: {state['num_classes']} output classes, the card names {len(card['classes'])}")
    network = card["network"]
    if network.get("name") != "unet" or list(network.get("channels", CHANNELS)) != list(CHANNELS):
        raise CheckpointError(f"{path}: a {network.get('name')} network of widths {network.get('channels')}; this code "
                              f"builds the unet of widths {list(CHANNELS)}")
    model = build_model(network["class_num"], network["in_chns"])
    load_model_state(model, state["model"], path)
    return model.to(device).eval(), card


def flips(x):
    """The in-plane flips of a (B, 1, H, W) batch and their inverses, for --tta flip."""
    return [((), x), ((-1,), x.flip(-1)), ((-2,), x.flip(-2)), ((-2, -1), x.flip(-2, -1))]


@torch.no_grad()
def predict_probabilities(model, volume, image_size, device, batch_size, tta):
    """Softmax (C, D, H, W) float32 of a stored-grid volume, slices in batches (mean over flips with
    ``tta``), resized back to (H, W) nearest, as ``predict_volume`` does with its argmax."""
    vol = torch.as_tensor(volume, dtype=torch.float32)
    size, out = vol.shape[-2:], []
    for start in range(0, vol.shape[0], batch_size):
        x = resize_nearest(vol[start:start + batch_size].to(device), (image_size, image_size))[:, None]
        views = flips(x) if tta else [((), x)]
        prob = sum(torch.softmax(model(v), dim=1).flip(dims) if dims else torch.softmax(model(v), dim=1)
                   for dims, v in views) / len(views)
        out.append(resize_nearest(prob, size).cpu())
    return torch.cat(out).permute(1, 0, 2, 3).numpy()


def predict_case(model, card, image, args, path="image"):
    """(label (D,H,W) uint8 on the stored grid, probabilities on the input grid or None, slice axis).
    A volume that normalises to a constant gets a warning naming ``path``."""
    volume, axis = preprocess_image(image, card["preprocessing"], path)
    blank = blank_reason(image, volume)
    if blank:
        tqdm.write(f"warning: {path}: {blank}: its slices carry no information; its label map is the network's "
                   f"answer to a blank image", file=sys.stderr)
    size, device = card["image_size"], torch.device(args.device)
    probs = None
    if args.tta == "flip" or args.save_probabilities:
        probs = predict_probabilities(model, volume, size, device, args.batch_size, args.tta == "flip")
        label = probs.argmax(axis=0).astype(np.uint8)
    else:
        label = predict_volume(model, volume, size, device, batch_size=args.batch_size)
    if args.lcc:
        label = largest_component_3d(label, len(card["classes"]))
    if probs is not None:
        meta = geometry_meta(image, axis)
        probs = np.stack([restore_original_geometry(p, meta) for p in probs])
    return label, probs, axis


def output_name(case, ending):
    """The label map's file name: the input's ending, a header + data pair as its one-file format
    (``.mhd`` -> ``.mha``, ``.nhdr`` -> ``.nrrd``) so that one rename makes it complete."""
    return f"{case}{SINGLE_FILE.get(ending, ending)}"


def sha256_of(*paths):
    """Hex SHA-256 of the bytes of ``paths``, one after the other (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def input_fingerprint(path):
    """SHA-256 of an input image's bytes, with its data file for a ``.mhd``/``.nhdr`` header."""
    data = layout(path).data_path
    return sha256_of(path) if Path(data) == Path(path) else sha256_of(path, data)


def run_settings(args, card):
    """What makes two runs' label maps interchangeable: the checkpoint's content and the options."""
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "checkpoint_sha256": sha256_of(args.checkpoint),
            "lcc": args.lcc, "tta": args.tta, "amp": args.amp, "channels_last": args.channels_last}


def read_case_records(out):
    """{label map name: record} of ``out/predict_cases.jsonl`` (a torn last line is ignored)."""
    records = {}
    path = out / CASES_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def is_done(out, name, save_probabilities, record, fingerprint, settings):
    """Whether an earlier run of these settings finished this case from this very input: its label map
    (and probabilities when asked for) and a record of the same checkpoint, options and input bytes."""
    stem = name[: -len(image_ending(name))]
    return ((out / name).is_file() and (not save_probabilities or (out / f"{stem}.npz").is_file())
            and record is not None and record.get("input_sha256") == fingerprint
            and record.get("settings") == settings and (record.get("probabilities") or not save_probabilities))


def record_run(out, args, card, settings, names):
    """Write ``out/predict.json`` (atomically) with this run's settings, marked running. Refused
    (FileExistsError) unless ``--overwrite``: an ``out`` whose label maps come from a run of other
    settings or another checkpoint content, or that holds a label map of these cases that no run
    recorded. ``--overwrite`` deletes these cases' label maps and every case record first, so a run
    killed half-way leaves no earlier model's map that a rerun would keep."""
    path, cases = out / "predict.json", out / CASES_FILE
    records = read_case_records(out)
    present = [n for n in names if (out / n).exists()]
    if args.overwrite:
        for name in present:
            (out / name).unlink()
            npz = out / f"{name[: -len(image_ending(name))]}.npz"
            npz.unlink(missing_ok=True)
        cases.unlink(missing_ok=True)
    else:
        unrecorded = [n for n in present if n not in records]
        if unrecorded:
            raise FileExistsError(f"-o {out}: holds {len(unrecorded)} label map(s) that no predict.py run recorded "
                                  f"({', '.join(unrecorded[:3])}{', ...' if len(unrecorded) > 3 else ''}); give "
                                  f"--overwrite to predict them again, or another -o")
        if path.is_file() and (records or present):
            try:
                before = json.loads(path.read_text())
            except ValueError:
                before = {}
            changed = [f"{k} {before.get(k)!r} there, {settings[k]!r} now" for k in RUN_SETTINGS
                       if before.get(k) != settings[k]]
            if changed:
                raise FileExistsError(f"-o {out}: holds label maps of another run ({'; '.join(changed)}); give "
                                      f"--overwrite to predict every case again, or another -o")
    write_json_atomic(path, {**settings, "state": "running", "model_card": card})


def record_case(out, name, fingerprint, settings, probabilities):
    """Append the provenance of one finished case to ``out/predict_cases.jsonl``."""
    line = json.dumps({"name": name, "input_sha256": fingerprint, "settings": settings,
                       "probabilities": bool(probabilities)})
    with open(out / CASES_FILE, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path, value):
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}"
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def write_case(out, name, label, probs, image, axis):
    """Write ``{case}.npz`` (if ``probs``), then the label map, each to a temporary name renamed when complete."""
    if probs is not None:
        stem = name[: -len(image_ending(name))]
        tmp = out / f"{TEMP_PREFIX}{stem}.npz"
        np.savez_compressed(tmp, probabilities=probs.astype(np.float32), spacing=np.asarray(image.GetSpacing()),
                            origin=np.asarray(image.GetOrigin()), direction=np.asarray(image.GetDirection()))
        os.replace(tmp, out / f"{stem}.npz")
    tmp = out / f"{TEMP_PREFIX}{name}"
    write_label_image(label, geometry_meta(image, axis), tmp)
    os.replace(tmp, out / name)


def prepare_output(out, source):
    """Create ``-o`` (ValueError if it is a file or the input folder) and delete temporaries of an
    interrupted run."""
    out, source = Path(out), Path(source)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"-o {out}: is a file; expected a folder for the label maps")
    folder = source if source.is_dir() else source.parent
    if out.resolve() == folder.resolve():
        raise ValueError(f"-o {out}: is the folder of the input images; expected another folder (label maps "
                         f"there would be taken for inputs, or replace them with --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_temporaries(out, names):
    """Delete the temporary files an interrupted run of these cases left in ``out`` (only its own names)."""
    stems = [n[: -len(image_ending(n))] for n in names]
    for name in ["predict.json", *names, *(f"{stem}.npz" for stem in stems)]:
        (out / f"{TEMP_PREFIX}{name}").unlink(missing_ok=True)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: expected 1 or more")
    input_paths(args.input)
    model, card = load_predictor(args.checkpoint, torch.device(args.device))
    cases = list_inputs(args.input, card.get("naming", "nnunet"))
    for _, path, _ in cases:
        check_image_header(path)  # every input, before the first forward
    model = Network(model, args.amp, args.channels_last).eval()
    out = prepare_output(args.output, args.input)
    settings, names = run_settings(args, card), [output_name(case, ending) for case, _, ending in cases]
    remove_temporaries(out, names)
    record_run(out, args, card, settings, names)
    records = read_case_records(out)
    written, skipped = 0, 0
    for case, path, ending in tqdm(cases, desc="predict", unit="case", disable=None):
        name, fingerprint = output_name(case, ending), input_fingerprint(path)
        if is_done(out, name, args.save_probabilities, records.get(name), fingerprint, settings):
            skipped += 1
            continue
        image = read_image(path)
        label, probs, axis = predict_case(model, card, image, args, path)
        record_case(out, name, fingerprint, settings, probs is not None)  # first: a kill between the two
        write_case(out, name, label, probs, image, axis)  # leaves a record without a map, redone next time
        written += 1
    write_json_atomic(out / "predict.json", {**settings, "state": "complete", "model_card": card})
    print(f"predicted {written} case(s), skipped {skipped} already in {out} (--overwrite predicts them again)"
          if skipped else f"predicted {written} case(s) into {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main) and 0)
