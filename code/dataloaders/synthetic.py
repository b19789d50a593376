"""Synthetic cardiac cine-MRI in exactly the processed-ACDC (SSL4MIS) layout.

The default data of the code base: every script and test runs on it without the real
data. ``make_synthetic_acdc(root)`` writes::

    root/
      train_slices.list     slice ids of the training patients, patient order
                            (frame01 slices, then frame02 slices, then the next patient);
                            slices are numbered from 1 like the released set: ..._slice_1
      train.list            training volumes (patientXXX_frame01, patientXXX_frame02, ...)
      val.list, test.list   validation / test volumes
      data/slices/<id>.h5   training slices: 'image' float32 (H, W) in [0, 1], 'label' uint8 (H, W)
      data/<volume>.h5      every volume: 'image' float32 (D, H, W) in [0, 1], 'label' uint8 (D, H, W),
                            attribute 'spacing' = (sz, sy, sx) in mm
      SYNTHETIC             marker (JSON of the generation parameters), written last

Labels: 0 background, 1 RV, 2 myocardium, 3 LV. Each patient is a short-axis stack: the LV
blood pool is a disc, the myocardium a ring of at least ``MIN_MYO_THICKNESS`` pixels around it,
the RV a crescent against the myocardium on one side. The ES frame has a smaller LV and RV and a
thicker myocardium than ED; structures shrink towards the apex (last slice). Images: textured
body on dark air, bright LV and RV blood, dark myocardium, slight partial-volume blur, a smooth
multiplicative bias field, Gaussian noise, then per-volume min-max normalisation to [0, 1].
Everything is deterministic given ``seed``; patient ``i`` depends only on (seed, i, slices, size).

CLI: ``python code/dataloaders/synthetic.py --out DIR [--patients N --val N --test N ...]``.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

if __package__ in (None, ""):  # run as a script: make code/ importable, as the scripts there do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.preprocess_acdc import minmax_normalize, slice_id  # noqa: E402
from dataloaders.slice_index import index_folder  # noqa: E402

RV, MYO, LV = 1, 2, 3
MARKER = "SYNTHETIC"
SPACING = (10.0, 1.5, 1.5)
MIN_MYO_THICKNESS = 4.0
MIN_SIZE = 32
LIST_NAMES = ("train_slices.list", "train.list", "val.list", "test.list")


def patient_id(index):
    """ACDC patient id of the 1-based ``index``: 1 -> 'patient001'."""
    return f"patient{index:03d}"


def volume_ids(patient):
    """The two volume ids of a patient: ED ('..._frame01') and ES ('..._frame02')."""
    return [f"{patient}_frame01", f"{patient}_frame02"]


def disc(shape, center, radius):
    """Boolean 2-D mask of the pixels whose centres lie within ``radius`` of ``center`` (y, x)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def heart_slice(shape, center, lv_radius, myo_thickness, rv_radius, rv_center):
    """Label map (uint8) of one short-axis slice: LV disc, myocardial ring of width
    ``myo_thickness`` around it, RV = disc at ``rv_center`` minus the LV+myocardium disc."""
    labels = np.zeros(shape, dtype=np.uint8)
    heart = disc(shape, center, lv_radius + myo_thickness)
    labels[disc(shape, rv_center, rv_radius) & ~heart] = RV
    labels[heart] = MYO
    labels[disc(shape, center, lv_radius)] = LV
    return labels


def patient_anatomy(rng, size):
    """Random per-patient ED geometry for an (H, W) slice: centre, LV radius, myocardial
    thickness, RV radius, and the RV centre's distance and direction from the LV centre."""
    h, w = size
    m = min(h, w)
    lv_radius = m * rng.uniform(0.10, 0.13)
    thickness = max(MIN_MYO_THICKNESS, m * rng.uniform(0.05, 0.065))
    outer = lv_radius + thickness
    return {
        "center": np.array([h / 2, w / 2]) + rng.uniform(-0.05, 0.05, 2) * np.array([h, w]),
        "lv_radius": lv_radius,
        "thickness": thickness,
        "rv_radius": outer * rng.uniform(1.05, 1.25),
        "rv_distance": outer * rng.uniform(0.55, 0.75),
        "rv_angle": np.pi + rng.uniform(-0.4, 0.4),
    }


def frame_labels(rng, anatomy, slices, size, systole):
    """Label volume (D, H, W) of one frame: structures shrink towards the apex, the centre
    jitters per slice; systole (ES) shrinks the cavities and thickens the myocardium."""
    lv_scale, myo_scale, rv_scale = (0.7, 1.3, 0.85) if systole else (1.0, 1.0, 1.0)
    labels = np.empty((slices, *size), dtype=np.uint8)
    direction = np.array([np.sin(anatomy["rv_angle"]), np.cos(anatomy["rv_angle"])])
    for z in range(slices):
        apex = 1.0 - 0.4 * (z / max(slices - 1, 1)) ** 2
        center = anatomy["center"] + rng.normal(0.0, 0.7, 2)
        lv_radius = max(3.0, anatomy["lv_radius"] * lv_scale * apex)
        thickness = max(MIN_MYO_THICKNESS, anatomy["thickness"] * myo_scale * apex)
        rv_radius = anatomy["rv_radius"] * rv_scale * apex
        rv_center = center + direction * anatomy["rv_distance"] * apex
        labels[z] = heart_slice(size, center, lv_radius, thickness, rv_radius, rv_center)
    return labels


def render_image(rng, labels):
    """MR-like float32 image in [0, 1] for a label volume (D, H, W): textured elliptical body
    on dark air, class intensities (bright LV/RV, dark myocardium), partial-volume blur,
    smooth multiplicative bias field, Gaussian noise, per-volume min-max normalisation."""
    d, h, w = labels.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    texture = ndimage.gaussian_filter(rng.normal(size=labels.shape), sigma=(0, 3, 3))
    texture /= texture.std() + 1e-8
    body = (yy / 0.92) ** 2 + (xx / 0.95) ** 2 <= 1.0
    image = np.where(body, 0.32 + 0.07 * texture, 0.03)
    intensity = {RV: rng.uniform(0.7, 0.8), MYO: rng.uniform(0.1, 0.18), LV: rng.uniform(0.82, 0.95)}
    for cls, value in intensity.items():
        image[labels == cls] = value
    image = ndimage.gaussian_filter(image, sigma=(0, 0.8, 0.8))
    a, b, c = rng.uniform(-0.15, 0.15, 3)
    image *= 1.0 + a * yy + b * xx + c * (yy**2 + xx**2)
    image += rng.normal(0.0, 0.03, labels.shape)
    return minmax_normalize(image)


def patient_volumes(seed, index, slices_per_volume, size):
    """(image, label) volumes of patient ``index`` for ED then ES, deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    anatomy = patient_anatomy(rng, size)
    volumes = []
    for systole in (False, True):
        labels = frame_labels(rng, anatomy, slices_per_volume, size, systole)
        volumes.append((render_image(rng, labels), labels))
    return volumes


def _check_params(n_patients, n_val, n_test, slices_per_volume, size):
    """Raise ValueError for parameters that cannot make a valid data set."""
    if not 1 <= n_patients <= 999:
        raise ValueError(f"n_patients must be in [1, 999], got {n_patients}")
    if n_val < 0 or n_test < 0 or n_patients - n_val - n_test < 1:
        raise ValueError(
            f"need n_val >= 0, n_test >= 0 and at least one training patient, "
            f"got n_patients={n_patients}, n_val={n_val}, n_test={n_test}"
        )
    if slices_per_volume < 1:
        raise ValueError(f"slices_per_volume must be >= 1, got {slices_per_volume}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ValueError(f"size must be (H, W) with both >= {MIN_SIZE}, got {tuple(size)}")


def _read_list(path):
    """Ids in a .list file, one per line, blank lines ignored."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def is_complete(root):
    """True when every list exists under ``root`` and every listed id has its h5 file."""
    root = Path(root)
    if not all((root / name).is_file() for name in LIST_NAMES):
        return False
    slices_ok = all((root / "data" / "slices" / f"{i}.h5").is_file() for i in _read_list(root / LIST_NAMES[0]))
    return slices_ok and all(
        (root / "data" / f"{i}.h5").is_file() for name in LIST_NAMES[1:] for i in _read_list(root / name)
    )


def _write_h5(path, image, label, spacing=None):
    """Write 'image' and 'label' datasets (and a 'spacing' attribute if given) to ``path``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
        if spacing is not None:
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)


def _prepare_root(root, params, overwrite):
    """Decide whether ``root`` can be reused (returns True), must be (re)written (returns False),
    or must not be touched (raises)."""
    marker = root / MARKER
    if not marker.exists():
        clash = [n for n in (*LIST_NAMES, "data") if (root / n).exists()]
        if clash:
            raise FileExistsError(
                f"{root} already holds {clash} but no {MARKER} marker; refusing to write synthetic data there"
            )
        return False
    try:
        stored = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{marker} is not the JSON parameter record this generator writes: {err}") from err
    if not overwrite:
        if stored != params:
            raise ValueError(
                f"{root} holds a synthetic set made with {stored}, not {params}; pass overwrite=True to replace it"
            )
        if is_complete(root):
            return True
    marker.unlink()
    shutil.rmtree(root / "data", ignore_errors=True)
    for name in LIST_NAMES:
        (root / name).unlink(missing_ok=True)
    return False


def make_synthetic_acdc(
    root, n_patients=12, n_val=3, n_test=2, slices_per_volume=6, size=(96, 88), seed=0, overwrite=False
):
    """Write a synthetic ACDC-layout data set under ``root`` (see module docstring) and return
    ``root`` as a Path. Patients 1..n_train are training, then n_val validation, then n_test
    test patients. An existing complete set with the same parameters is reused unless
    ``overwrite``; a folder with ACDC files but no marker is never written into."""
    _check_params(n_patients, n_val, n_test, slices_per_volume, size)
    root = Path(root)
    params = {
        "n_patients": int(n_patients),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "slices_per_volume": int(slices_per_volume),
        "size": [int(s) for s in size],
        "seed": int(seed),
    }
    if _prepare_root(root, params, overwrite):
        return root
    (root / "data" / "slices").mkdir(parents=True, exist_ok=True)
    n_train = n_patients - n_val - n_test
    lists = {name: [] for name in LIST_NAMES}
    for index in range(1, n_patients + 1):
        patient = patient_id(index)
        split = "train.list" if index <= n_train else "val.list" if index <= n_train + n_val else "test.list"
        frames = patient_volumes(seed, index, slices_per_volume, tuple(size))
        for volume, (image, label) in zip(volume_ids(patient), frames):
            _write_h5(root / "data" / f"{volume}.h5", image, label, SPACING)
            lists[split].append(volume)
            if split == "train.list":
                for k in range(slices_per_volume):
                    _write_h5(root / "data" / "slices" / f"{slice_id(volume, k)}.h5", image[k], label[k])
                    lists["train_slices.list"].append(slice_id(volume, k))
    for name, ids in lists.items():
        (root / name).write_text("".join(f"{i}\n" for i in ids))
    index_folder(root)
    (root / MARKER).write_text(json.dumps(params))
    return root


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    parser = argparse.ArgumentParser(description="Write a synthetic data set in the processed-ACDC layout.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--patients", type=int, default=12, help="number of patients (all splits)")
    parser.add_argument("--val", type=int, default=3, help="validation patients")
    parser.add_argument("--test", type=int, default=2, help="test patients")
    parser.add_argument("--slices", type=int, default=6, help="slices per volume")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 88), metavar=("H", "W"), help="slice size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set")
    return parser


def main(argv=None):
    """Command line: generate a synthetic ACDC-layout data set."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root = make_synthetic_acdc(
        args.out, args.patients, args.val, args.test, args.slices, tuple(args.size), args.seed, args.overwrite
    )
    print(f"synthetic ACDC data set in {root}")


if __name__ == "__main__":
    sys.exit(main())
