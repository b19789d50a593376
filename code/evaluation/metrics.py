"""Segmentation metrics: Dice, Jaccard, HD95 and ASD per foreground class.

Distances come from ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``), the
functions behind every published ACDC table, so voxel-unit numbers are comparable with
them. ``asd`` is medpy's *directed* average surface distance, prediction -> ground truth,
as in the tables (not the symmetric ASSD). ``hd95`` is symmetric (95th percentile of the
pooled pred->gt and gt->pred surface distances). Surfaces use medpy's default
face connectivity (``connectivity=1``).

Units: ``spacing`` is the voxel size per array axis, in array axis order (for a (D, H, W)
volume: (sz, sy, sx) in mm). ``spacing=None`` gives distances in voxels, which is what the
published tables report (the processed ACDC h5 files carry no spacing).

Empty-mask policy (medpy itself raises on an empty mask; the reference test script scores
an empty prediction as HD95 = ASD = 0, i.e. a *perfect* distance for a missed structure):

* prediction and ground truth both empty: the structure is correctly absent,
  dice = jaccard = 1, hd95 = asd = 0;
* exactly one of them empty: dice = jaccard = 0 and hd95 = asd = the diagonal of the
  volume, ``sqrt(sum((shape_i * spacing_i) ** 2))`` (voxels when ``spacing`` is None),
  the worst possible distance (BraTS convention). A missed or hallucinated structure is
  therefore always penalised, never rewarded.

``dice_per_class`` applies the same policy to Dice, in pure numpy, for fast validation
during training.
"""
import math

import numpy as np

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")


def _check_shapes(pred, gt):
    """Raise ValueError unless ``pred`` and ``gt`` have the same shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")


def _as_mask(array, name):
    """Return ``array`` as a boolean mask; it must be boolean or contain only 0 and 1."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1), got values {np.unique(array)[:8]}")
    return array.astype(bool)


def _check_spacing(spacing, ndim):
    """Return ``spacing`` as a float tuple of length ``ndim`` with positive entries, or None."""
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (one per array axis), got {spacing}")
    return spacing


def volume_diagonal(shape, spacing=None):
    """Length of the diagonal of a volume of ``shape`` voxels with voxel size ``spacing``
    (voxel units when None): the largest distance two voxels of it can have, used as the
    distance penalty for a missed or hallucinated structure."""
    spacing = (1.0,) * len(shape) if spacing is None else spacing
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def binary_metrics(pred, gt, spacing=None):
    """Dice, Jaccard, HD95 and directed ASD (pred -> gt) of two binary 2-D or 3-D masks.

    Returns ``{"dice", "jaccard", "hd95", "asd"}`` as floats; distances in the units of
    ``spacing`` (voxels when None). Empty masks follow the module's empty policy.
    """
    pred = _as_mask(pred, "pred")
    gt = _as_mask(gt, "gt")
    _check_shapes(pred, gt)
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D, got {pred.ndim}-D arrays of shape {pred.shape}")
    spacing = _check_spacing(spacing, pred.ndim)
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    if pred_empty or gt_empty:
        worst = volume_diagonal(pred.shape, spacing)
        return {"dice": 0.0, "jaccard": 0.0, "hd95": worst, "asd": worst}
    # imported here: training and validation (evaluation.inference) import this module, and need no medpy
    from medpy.metric import binary as medpy_binary
    return {
        "dice": float(medpy_binary.dc(pred, gt)),
        "jaccard": float(medpy_binary.jc(pred, gt)),
        "hd95": float(medpy_binary.hd95(pred, gt, voxelspacing=spacing)),
        "asd": float(medpy_binary.asd(pred, gt, voxelspacing=spacing)),
    }


def _check_label_maps(pred_labels, gt_labels, num_classes):
    """Validate two label maps of equal shape with values in [0, num_classes); return them as arrays."""
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    _check_shapes(pred_labels, gt_labels)
    for name, labels in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} has labels in [{labels.min()}, {labels.max()}], expected [0, {num_classes})"
            )
    return pred_labels, gt_labels


def case_metrics(pred_labels, gt_labels, num_classes, spacing=None):
    """Per foreground class c = 1..num_classes-1, ``binary_metrics(pred == c, gt == c, spacing)``."""
    pred_labels, gt_labels = _check_label_maps(pred_labels, gt_labels, num_classes)
    return [binary_metrics(pred_labels == c, gt_labels == c, spacing) for c in range(1, int(num_classes))]


def dice_per_class(pred_labels, gt_labels, num_classes):
    """Dice per foreground class (array of length num_classes-1), pure numpy; a class absent
    from both maps scores 1, a class absent from exactly one scores 0."""
    pred_labels, gt_labels = _check_label_maps(pred_labels, gt_labels, num_classes)
    dice = np.empty(int(num_classes) - 1, dtype=np.float64)
    for c in range(1, int(num_classes)):
        p, g = pred_labels == c, gt_labels == c
        total = int(p.sum()) + int(g.sum())
        dice[c - 1] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total
    return dice


def summarize(per_case):
    """Aggregate ``case_metrics`` results of several cases.

    Returns, for each metric, ``{"per_class": [mean over cases for each class],
    "mean": mean of the per-class values}`` (plain floats, JSON-serialisable).
    """
    if not per_case:
        raise ValueError("summarize needs at least one case, got an empty list")
    num_fg = len(per_case[0])
    if num_fg == 0 or any(len(case) != num_fg for case in per_case):
        raise ValueError(
            f"every case must have the same non-zero number of classes, got {[len(c) for c in per_case]}"
        )
    summary = {}
    for name in METRIC_NAMES:
        values = np.array([[cls[name] for cls in case] for case in per_case], dtype=np.float64)
        per_class = values.mean(axis=0)
        summary[name] = {"per_class": [float(v) for v in per_class], "mean": float(per_class.mean())}
    return summary
