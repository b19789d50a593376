"""Figures as PNG: the paper's Fig. 3 panel (several methods on chosen slices) and the HCA / CGSR maps of one model.

    python code/visualize.py panel --checkpoints labeled_only=OUT/runs/ACDC_labeled_only_7_s1/best.pth \\
        sscd=OUT/runs/ACDC_sscd_7_s1/best.pth --split val --cases patient081_frame01 patient090_frame02 \\
        --slices 4 5 --out fig3.png
    python code/visualize.py hca --checkpoint OUT/runs/ACDC_sscd_7_s1/best.pth --split val \\
        --case patient081_frame01 --slice 4 --out hca_cgsr.png

panel: rows = the (case, slice) pairs (``--slices`` gives one slice per case, or one for all; default the
middle slice), columns = the grey slice, one overlay per checkpoint (the test protocol's prediction), the
ground truth. Colours and blending: ``reporting/visual.py``. Slices of different sizes are padded (black,
bottom/right) to the largest.

hca: row 1 = the slice at the network size and the HCA confidence for every stage of the HCA schedule
(``--hca_weights``, default the checkpoint's, else the reference schedule), the region CGSR would take
as hardest outlined in white; row 2 = a weak view x_w (BCP mix of the slice with ``--mix_case``/
``--mix_slice`` inside the box), its strong view x_s (cutout + jitter) and the CGSR outputs x_s2w,
x_w2s with the exchanged regions outlined (``--stage``'s weights; default the checkpoint's stage).

The data root defaults to the one recorded in the checkpoint.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

from common.errors import run_cli
from dataloaders.dataset import load_h5, read_list
from evaluation.testing import load_trained_model
from reporting.visual import ALPHA, cgsr_example, hca_cgsr_figure, hca_stage_maps, method_panel, predict_slice
from utils.sscd import DEFAULT_HCA_SCHEDULE, HCA_COMBINES, RANK_BY, parse_hca_schedule

REPO = Path(__file__).resolve().parents[1]
AUTO_CELL = 192  # --zoom auto: the smallest zoom making a cell at least this many pixels wide


def _common(p):
    p.add_argument("--root_path", default=None, help="data root (default: the checkpoint's)")
    p.add_argument("--split", choices=["val", "test"], default="val", help="where the cases come from")
    p.add_argument("--zoom", type=int, default=None, help="integer magnification (default: automatic)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="PNG file to write")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    panel = sub.add_parser("panel", help="methods side by side on chosen slices (Fig. 3)")
    panel.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH",
                       help="one column per checkpoint, titled NAME")
    panel.add_argument("--cases", nargs="+", default=None, help="volume ids (default: the split's first)")
    panel.add_argument("--slices", nargs="+", type=int, default=None,
                       help="slice index per case, or one for every case (default: the middle slice)")
    panel.add_argument("--alpha", type=float, default=ALPHA, help="overlay opacity")
    _common(panel)
    hca = sub.add_parser("hca", help="HCA confidence per stage and CGSR on one slice")
    hca.add_argument("--checkpoint", required=True)
    hca.add_argument("--case", default=None, help="volume id (default: the split's first)")
    hca.add_argument("--slice", type=int, default=None, help="slice index (default: the middle)")
    hca.add_argument("--mix_case", default=None, help="volume pasted into the BCP box (default: the split's next)")
    hca.add_argument("--mix_slice", type=int, default=None, help="its slice (default: the middle)")
    hca.add_argument("--hca_weights", default=None, help="HCA schedule (default: the checkpoint's, else the reference)")
    hca.add_argument("--stage", type=int, default=None,
                     help="stage whose weights drive CGSR (default: the checkpoint's)")
    hca.add_argument("--hca_combine", choices=HCA_COMBINES, default=None)
    hca.add_argument("--rank_by", choices=RANK_BY, default=None)
    hca.add_argument("--patch_size", type=int, default=None, help="region side (default: the checkpoint's)")
    hca.add_argument("--top_num", type=int, default=None)
    hca.add_argument("--kl_prob", type=float, default=None, help="probability of the KL-guided CGSR branch")
    hca.add_argument("--seed", type=int, default=0, help="draws the BCP box, the strong view and the CGSR branch")
    _common(hca)
    return p


def resolve_root(root, config):
    """``root`` or the checkpoint's recorded root (relative paths: from here, else the repository)."""
    value = root or config.get("root_path")
    if not value:
        raise SystemExit("--root_path is required: the checkpoint does not record its data root")
    path = Path(value)
    if not path.is_dir() and not path.is_absolute() and (REPO / path).is_dir():
        path = REPO / path
    if not path.is_dir():
        raise SystemExit(f"data root {value} not found; pass --root_path")
    return path


def load_slice(root, split, case, index, num_classes):
    """(image (H, W), label (H, W), index) of slice ``index`` (None: the middle) of volume ``case``."""
    ids = read_list(root, f"{split}.list")
    if case not in ids:
        raise SystemExit(f"case {case!r} is not in {split}.list ({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")
    image, label, _ = load_h5(Path(root) / "data" / f"{case}.h5", 3, num_classes)
    index = image.shape[0] // 2 if index is None else index
    if not 0 <= index < image.shape[0]:
        raise SystemExit(f"slice {index} of {case}: expected 0..{image.shape[0] - 1}")
    return image[index], label[index], index


def auto_zoom(width, zoom):
    if zoom is not None:
        if zoom < 1:
            raise SystemExit(f"--zoom {zoom}: expected a positive integer")
        return zoom
    return max(1, math.ceil(AUTO_CELL / width))


def pad_to(array, height, width):
    """Pad a 2-D slice with zeros at the bottom/right to (height, width)."""
    return np.pad(array, ((0, height - array.shape[0]), (0, width - array.shape[1])))


def figure_panel(args):
    named = []
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--checkpoints {item!r}: expected NAME=PATH")
        named.append((name, path))
    models = [(name, *load_trained_model(path, args.device)) for name, path in named]
    classes = {int(state["num_classes"]) for _, _, state in models}
    if len(classes) != 1:
        raise SystemExit(f"the checkpoints have different numbers of classes: {sorted(classes)}")
    num_classes = classes.pop()
    root = resolve_root(args.root_path, models[0][2].get("config", {}))
    cases = args.cases or read_list(root, f"{args.split}.list")[:1]
    slices = args.slices or [None]
    if len(slices) == 1:
        slices = slices * len(cases)
    if len(slices) != len(cases):
        raise SystemExit(f"--slices: give one per case ({len(cases)}) or one for all, got {len(slices)}")
    rows = []
    for case, index in zip(cases, slices):
        image, label, index = load_slice(root, args.split, case, index, num_classes)
        rows.append({"image": image, "label": label, "title": f"{case} z={index}"})
    preds = [[predict_slice(model, r["image"], int(state.get("config", {}).get("image_size", 256)), args.device)
              for _, model, state in models] for r in rows]
    h = max(r["image"].shape[0] for r in rows)
    w = max(r["image"].shape[1] for r in rows)
    for r, p in zip(rows, preds):
        r["image"], r["label"] = pad_to(r["image"], h, w), pad_to(r["label"], h, w)
        p[:] = [pad_to(x, h, w) for x in p]
    return method_panel(rows, preds, [n for n, _ in named], num_classes, auto_zoom(w, args.zoom), args.alpha)


def figure_hca(args):
    model, state = load_trained_model(args.checkpoint, args.device)
    config = state.get("config", {})
    num_classes = int(state["num_classes"])
    root = resolve_root(args.root_path, config)
    size = int(config.get("image_size", 256))
    try:
        schedule = parse_hca_schedule(args.hca_weights or config.get("hca_weights") or DEFAULT_HCA_SCHEDULE)
    except ValueError as err:
        raise SystemExit(f"--hca_weights: {err}") from None
    stage = args.stage or config.get("stage") or len(schedule)
    if not 1 <= int(stage) <= len(schedule):
        raise SystemExit(f"--stage {stage}: expected 1..{len(schedule)}")
    patch = args.patch_size or config.get("patch_size") or size // 8
    if size % patch:
        patch = size // 8 if args.patch_size is None else patch
    if size % patch:
        raise SystemExit(f"--patch_size {patch} must divide the network size {size}")
    grid = (size // patch) ** 2
    top_num = min(args.top_num or config.get("top_num") or 4, grid)
    kl_prob = args.kl_prob if args.kl_prob is not None else config.get("cgsr_kl_prob", 0.5)
    combine = args.hca_combine or config.get("hca_combine") or "max_softmax"
    rank_by = args.rank_by or config.get("rank_by") or "confidence"
    ids = read_list(root, f"{args.split}.list")
    case = args.case or ids[0]
    mix_case = args.mix_case or (ids[(ids.index(case) + 1) % len(ids)] if case in ids else ids[0])
    image, _, _ = load_slice(root, args.split, case, args.slice, num_classes)
    other, _, _ = load_slice(root, args.split, mix_case, args.mix_slice, num_classes)
    maps = hca_stage_maps(model, image, size, schedule, combine, patch, rank_by, args.device)
    out = cgsr_example(model, image, other, size, schedule[int(stage) - 1], patch, top_num, kl_prob, combine,
                       rank_by, args.seed, args.device)
    return hca_cgsr_figure(image, maps, schedule, out, patch, auto_zoom(size, args.zoom), low=1.0 / num_classes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    figure = figure_panel(args) if args.figure == "panel" else figure_hca(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, format="PNG")
    print(f"wrote {out} ({figure.width}x{figure.height})")
    return out


if __name__ == "__main__":
    run_cli(main)
