"""evaluation.inference on hand-made volumes: which classes the selection Dice averages, the warning
and the error that name the others, the validation Dice against a count made here, and the metrics
in voxels and in mm (what the mutation run of docs/mutation.md found unchecked)."""
import logging

import numpy as np
import pytest
import torch

from evaluation.inference import Validator, evaluate_predictions, present_classes, scored_classes
from evaluation.metrics import case_metrics


def volume(case, label, image=None, spacing=None):
    label = np.asarray(label, dtype=np.uint8)
    v = {"case": case, "label": label, "image": np.zeros(label.shape) if image is None else image, "attrs": {}}
    if spacing is not None:
        v["attrs"]["spacing"] = np.array(spacing)
    return v


def labels_with(*classes, shape=(2, 4, 4)):
    label = np.zeros(shape, np.uint8)
    for k, c in enumerate(classes):
        label[0, k, :2] = c
    return label


def test_present_classes_are_the_foreground_classes_of_any_volume():
    volumes = [volume("a", labels_with(2)), volume("b", labels_with(1)), volume("c", labels_with())]
    assert present_classes(volumes, 4) == [1, 2]  # 0 is background, 3 occurs nowhere
    assert present_classes([volume("d", labels_with(3))], 4) == [3]


def test_no_foreground_anywhere_is_refused_naming_three_cases():
    volumes = [volume(name, labels_with()) for name in "abcd"]
    with pytest.raises(ValueError) as err:
        scored_classes(volumes, 4)
    assert str(err.value) == ("validation volumes (a, b, c, ...): no foreground class 1..3 occurs in any of "
                              "them; nothing to select a model on")


def test_validator_warns_about_the_classes_it_leaves_out(caplog):
    logger = logging.getLogger("test_inference")
    with caplog.at_level(logging.WARNING, logger="test_inference"):
        Validator([volume("a", labels_with(1, 2))], 4, 8, "cpu", logger=logger)
    assert [r.getMessage() for r in caplog.records] == [
        "validation: class(es) [3] occur in no validation volume; they would score Dice 1 whenever the model "
        "never predicts them, so the selection Dice is the mean over classes [1, 2] only"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test_inference"):
        Validator([volume("a", labels_with(2)), volume("b", labels_with(3))], 4, 8, "cpu", logger=logger)
    assert len(caplog.records) == 1 and "class(es) [1] occur in no" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test_inference"):
        Validator([volume("a", labels_with(1, 2, 3))], 4, 8, "cpu", logger=logger)
    assert caplog.records == []


def oracle(pred, label, classes):
    dice = []
    for c in classes:
        p, g = pred == c, label == c
        dice.append(1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum()))
    return dice


@pytest.mark.parametrize("batch_size", [1, 3, 128])
def test_validator_dice_is_the_count_made_here(batch_size):
    rng = np.random.default_rng(0)
    images = [rng.random((3, 8, 8)), rng.random((2, 8, 8))]  # float64 on purpose: uploaded as float32
    labels = [labels_with(1, 2, shape=(3, 8, 8)), labels_with(2, shape=(2, 8, 8))]
    validator = Validator([volume(str(k), labels[k], images[k]) for k in range(2)], 3, 8, "cpu",
                          batch_size=batch_size)

    def forward(x):  # class 1 where the pixel is brighter than 0.5, else 0: a prediction known here
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        return torch.cat([0.5 - x, x - 0.5, torch.zeros_like(x)], dim=1)

    score, per_class = validator(forward)
    preds = [(im > 0.5).astype(np.uint8) for im in images]
    expected = np.mean([oracle(p, g, [1, 2]) for p, g in zip(preds, labels)], axis=0)
    assert per_class == pytest.approx({"dice_class1": expected[0], "dice_class2": expected[1]})
    assert score == pytest.approx(np.mean(expected))


def test_metrics_in_mm_only_where_the_volume_has_a_spacing():
    label = np.zeros((4, 8, 8), np.uint8)
    label[1:3, 2:6, 2:6] = 1
    pred = np.zeros_like(label)
    pred[1:3, 2:6, 3:7] = 1  # shifted by one voxel along x
    cases = evaluate_predictions([pred, pred], [volume("a", label, spacing=(1.0, 1.0, 2.5)), volume("b", label)], 2)
    (voxels_a, mm_a), (voxels_b, mm_b) = cases
    assert mm_b is None and voxels_a == voxels_b == case_metrics(pred, label, 2)
    assert mm_a == case_metrics(pred, label, 2, (1.0, 1.0, 2.5))
    assert mm_a[0]["hd95"] == pytest.approx(2.5 * voxels_a[0]["hd95"])  # the shift is along x, 2.5 mm per voxel


def test_parallel_evaluation_gives_the_serial_results():
    label = labels_with(1, 1, shape=(2, 6, 6))
    preds = [label, np.roll(label, 1, axis=2)]
    volumes = [volume("a", label, spacing=(2.0, 1.0, 1.0)), volume("b", label, spacing=(2.0, 1.0, 1.0))]
    assert evaluate_predictions(preds, volumes, 2, workers=2) == evaluate_predictions(preds, volumes, 2)
