"""Generated nnU-Net-style data sets for the own-data tests (tests/test_own_data*.py): small 3-D
volumes with classes that a threshold can tell apart, some cases without a label file."""
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ORIGIN = (-12.5, 4.0, 30.25)
# a slightly rotated frame (about x), so that direction matters when writing back
COS, SIN = np.cos(0.1), np.sin(0.1)
DIRECTION = (1.0, 0.0, 0.0, 0.0, COS, -SIN, 0.0, SIN, COS)


def phantom(shape_zyx, seed):
    """(image int16, label uint8 in {0, 1, 2}): an ellipsoid (1) with a brighter core (2) in noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_zyx), indexing="ij")
    shift = rng.uniform(-0.15, 0.15, size=3)
    r = ((z - shift[0]) / 0.8) ** 2 + ((y - shift[1]) / 0.6) ** 2 + ((x - shift[2]) / 0.5) ** 2
    label = np.where(r <= 0.3, 2, np.where(r <= 1, 1, 0)).astype(np.uint8)
    image = rng.normal(100, 20, size=shape_zyx) + 300 * (label == 1) + 600 * (label == 2)
    return image.astype(np.int16), label


def write_image(array, path, spacing, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)
    return path


def make_nnunet(folder, n_labeled=5, n_unlabeled=2, shape_zyx=(6, 36, 40), spacing=(0.8, 0.8, 3.0),
                ending=".nii.gz"):
    """An nnU-Net v2 raw folder: ``n_labeled`` cases with labelsTr files, ``n_unlabeled`` without, one
    imagesTs case; returns {"labeled": [...], "unlabeled": [...]} case names."""
    folder = Path(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = {"labeled": [f"case_{k:02d}" for k in range(n_labeled)],
             "unlabeled": [f"nolabel_{k:02d}" for k in range(n_unlabeled)]}
    for k, case in enumerate(names["labeled"] + names["unlabeled"]):
        image, label = phantom(shape_zyx, seed=k)
        write_image(image, folder / "imagesTr" / f"{case}_0000{ending}", spacing)
        if case in names["labeled"]:
            write_image(label, folder / "labelsTr" / f"{case}{ending}", spacing)
    write_image(phantom(shape_zyx, seed=99)[0], folder / "imagesTs" / f"new_00_0000{ending}", spacing)
    info = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "outer": 1, "core": 2},
            "numTraining": n_labeled + n_unlabeled, "file_ending": ending}
    (folder / "dataset.json").write_text(json.dumps(info))
    return names


def error_of(main, argv):
    """The one-line message a script ends with (``error: ...``); fails on a traceback or success."""
    import pytest
    from common.errors import run_cli
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    message = str(info.value.code)
    assert "\n" not in message, message
    return message


def random_custom_checkpoint(path, size, num_classes=3):
    """A seeded random network with a converted data set's card (percentile min-max, ``size``²)."""
    from conftest import load_script
    recipe = {"normalization": "percentile_minmax", "percentiles": [0.5, 99.5], "slice_axis": "largest_spacing",
              "size": size}
    return load_script("bench/bench_predict.py").random_checkpoint(path, "CUSTOM", num_classes, size, recipe)
