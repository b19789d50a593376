"""What a checkpoint must carry so that ``code/predict.py`` needs nothing else: the model card.

Stored in every checkpoint as ``config["model_card"]`` (plain values, read with
``torch.load(weights_only=True)``)::

    {"format": "sscd-model-card-v1", "dataset": "ACDC" | "PROMISE12" | "CUSTOM",
     "classes": ["background", ...], "num_classes": C, "input_channels": 1,
     "network": {"name": "unet", "in_chns": 1, "class_num": C, "channels": [16, 32, 64, 128, 256]},
     "image_size": S,                  # the network's input size (--image_size)
     "preprocessing": {...},           # the recipe of dataloaders.volume_io (normalisation, slice axis, size)
     "training_cases": [...],          # every case of train.list and unlabeled.list: the run may have seen them
     "training_source": "...",         # where those cases come from (data_source): names compare within one source
     "naming": "nnunet" | "plain"}     # converted data sets: how the training images were named ({case}_0000)

``training_cases`` lets the test scripts refuse to score a case the model trained on; ``naming`` tells
``predict.py`` whether a ``_0000`` suffix is nnU-Net's channel suffix or part of the case name.
"""
import json
from pathlib import Path

from networks.unet import CHANNELS

CARD_FORMAT = "sscd-model-card-v1"
CLASSES = {"ACDC": ["background", "RV", "Myo", "LV"], "PROMISE12": ["background", "gland"]}
# the processed ACDC release: per-volume min-max, slices along z at their native size
ACDC_RECIPE = {"normalization": "minmax", "slice_axis": "z", "size": None}


def _json(root):
    path = Path(root) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recipe_and_classes(dataset, root):
    """(preprocessing recipe, class names) of the data a run trains on."""
    if dataset == "ACDC":
        return dict(ACDC_RECIPE), list(CLASSES["ACDC"])
    info = _json(root)
    if dataset == "PROMISE12":
        recipe = {"normalization": "promise12_slice", "percentiles": [0.5, 99.5],
                  "clahe": bool(info.get("clahe", False)), "slice_axis": "z", "size": info.get("image_size")}
        return recipe, list(CLASSES["PROMISE12"])
    return dict(info["preprocessing"]), list(info["classes"])


def training_cases(root):
    """Every case a run on ``root`` may train on (train.list and unlabeled.list), sorted; None without a root."""
    if root is None:
        return None
    names = set()
    for name in ("train.list", "unlabeled.list"):
        path = Path(root) / name
        if path.is_file():
            names.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    return sorted(names)


def data_source(root):
    """Where a data root's cases come from: the converted input folder (dataset.json ``source``), else
    the root itself (resolved); None without a root. Two roots of one source name the same cases."""
    if root is None:
        return None
    return _json(root).get("source") or str(Path(root).resolve())


def model_card(dataset, root, num_classes, image_size, in_chns=1):
    """The model card of a run on ``dataset`` (ACDC, PROMISE12 or CUSTOM) rooted at ``root``."""
    recipe, classes = recipe_and_classes(dataset, root)
    if len(classes) != num_classes:  # e.g. --num_classes given for an ACDC-layout folder of another data set
        classes = classes[:1] + [f"class{k}" for k in range(1, num_classes)]
    card = {"format": CARD_FORMAT, "dataset": dataset, "classes": classes, "num_classes": int(num_classes),
            "input_channels": int(in_chns), "network": {"name": "unet", "in_chns": int(in_chns),
                                                        "class_num": int(num_classes), "channels": list(CHANNELS)},
            "image_size": int(image_size), "preprocessing": recipe, "training_cases": training_cases(root),
            "training_source": data_source(root)}
    if dataset == "CUSTOM":
        card["naming"] = "nnunet" if _json(root).get("layout") == "nnunet" else "plain"
    return card
