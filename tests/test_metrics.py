"""Tests for evaluation.metrics against hand-computed values and an independent brute force."""
import json
import math

import h5py
import numpy as np
import pytest

from conftest import skip_without_real_data
from evaluation.metrics import (
    binary_metrics,
    case_metrics,
    dice_per_class,
    summarize,
    volume_diagonal,
)


def squares_3d(k, s, shape=(3, 40, 40)):
    """Two k x k squares, one voxel thick (slice 1), the second offset by s voxels along x."""
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    a[1, 5:5 + k, 5:5 + k] = True
    b[1, 5:5 + k, 5 + s:5 + s + k] = True
    return a, b


def surface(mask):
    """Voxels of ``mask`` with at least one face neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded.copy()
    for axis in range(mask.ndim):
        for shift in (1, -1):
            interior &= np.roll(padded, shift, axis=axis)
    return (padded & ~interior)[tuple(slice(1, -1) for _ in range(mask.ndim))]


def directed_distances(src, dst, spacing):
    """For every surface voxel of src, the Euclidean distance to the nearest surface voxel of dst."""
    p = np.argwhere(surface(src)) * np.asarray(spacing, dtype=float)
    q = np.argwhere(surface(dst)) * np.asarray(spacing, dtype=float)
    return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)).min(axis=1)


def brute_force(pred, gt, spacing):
    """Independent HD95 (pooled both directions, numpy percentile) and directed ASD pred->gt."""
    d_pg = directed_distances(pred, gt, spacing)
    d_gp = directed_distances(gt, pred, spacing)
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95)), float(d_pg.mean())


def test_offset_squares_hand_computed():
    # k = 25, s = 2: overlap 25 * 23 voxels, each square 625 voxels.
    a, b = squares_3d(25, 2)
    m = binary_metrics(a, b)
    assert m["dice"] == pytest.approx(2 * 575 / 1250)
    assert m["jaccard"] == pytest.approx(575 / 675)
    # One voxel thick: every voxel is a surface voxel. Per row the pred->gt distances are
    # 2, 1 and then 23 zeros; both directions pooled: 1150 zeros, 50 ones, 50 twos.
    # 95th percentile position 0.95 * 1249 = 1186.55 lies among the ones -> HD95 = 1 (max is 2).
    assert m["hd95"] == pytest.approx(1.0)
    # ASD = 25 rows * (2 + 1) / 625 voxels.
    assert m["asd"] == pytest.approx(75 / 625)


def test_offset_squares_match_brute_force():
    a, b = squares_3d(25, 2)
    hd95, asd = brute_force(a, b, (1.0, 1.0, 1.0))
    assert (hd95, asd) == pytest.approx((1.0, 75 / 625))


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (1.0, 2.5), (0.7, 1.3)])
def test_2d_blobs_match_brute_force(spacing):
    # Filled 2-D shapes: only the outline is surface, distances are not axis-aligned.
    yy, xx = np.mgrid[:30, :32]
    pred = (yy - 14) ** 2 + (xx - 15) ** 2 <= 49
    gt = np.zeros_like(pred)
    gt[9:22, 12:26] = True
    m = binary_metrics(pred, gt, spacing)
    hd95, asd = brute_force(pred, gt, (1.0, 1.0) if spacing is None else spacing)
    assert m["hd95"] == pytest.approx(hd95)
    assert m["asd"] == pytest.approx(asd)
    assert m["dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert m["jaccard"] == pytest.approx((pred & gt).sum() / (pred | gt).sum())


def test_asd_is_directed():
    # pred is the left half of gt: the two directions see different surfaces.
    gt = np.zeros((20, 20), dtype=bool)
    gt[2:12, 2:12] = True
    pred = np.zeros_like(gt)
    pred[2:12, 2:7] = True
    forward = binary_metrics(pred, gt)["asd"]
    backward = binary_metrics(gt, pred)["asd"]
    assert forward != pytest.approx(backward)
    assert forward == pytest.approx(brute_force(pred, gt, (1, 1))[1])
    assert backward == pytest.approx(brute_force(gt, pred, (1, 1))[1])


def test_identical_masks_are_perfect():
    a, _ = squares_3d(6, 0)
    assert binary_metrics(a, a.copy()) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_spacing_scales_distances():
    a, b = squares_3d(25, 2)
    base = binary_metrics(a, b)
    # Doubling the spacing along the offset axis (x) doubles every distance.
    doubled = binary_metrics(a, b, spacing=(1.0, 1.0, 2.0))
    assert doubled["hd95"] == pytest.approx(2 * base["hd95"])
    assert doubled["asd"] == pytest.approx(2 * base["asd"])
    # Along y the nearest partner stays in the same row, so y spacing changes nothing.
    assert binary_metrics(a, b, spacing=(1.0, 3.0, 1.0))["hd95"] == pytest.approx(base["hd95"])
    # Overlap metrics do not depend on spacing.
    assert doubled["dice"] == base["dice"]


def test_empty_policy():
    shape = (4, 10, 12)
    empty = np.zeros(shape, dtype=bool)
    full = np.zeros(shape, dtype=bool)
    full[1, 2:5, 3:6] = True
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    diagonal = math.sqrt(4**2 + 10**2 + 12**2)
    for pred, gt in ((empty, full), (full, empty)):
        m = binary_metrics(pred, gt)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0
        assert m["hd95"] == pytest.approx(diagonal) and m["asd"] == pytest.approx(diagonal)
    # With spacing the penalty is the physical diagonal.
    m = binary_metrics(empty, full, spacing=(10.0, 1.5, 1.5))
    assert m["hd95"] == pytest.approx(math.sqrt(40**2 + 15**2 + 18**2))
    # The penalty is never better than any real distance in the volume.
    far = np.zeros(shape, dtype=bool)
    far[0, 0, 0] = True
    opposite = np.zeros(shape, dtype=bool)
    opposite[-1, -1, -1] = True
    assert binary_metrics(far, opposite)["hd95"] < binary_metrics(empty, full)["hd95"]


def test_volume_diagonal():
    assert volume_diagonal((3, 4)) == pytest.approx(5.0)
    assert volume_diagonal((3, 4), (2.0, 0.5)) == pytest.approx(math.sqrt(36 + 4))


def test_binary_metrics_input_errors():
    a = np.zeros((5, 6), dtype=bool)
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(6, 5\)"):
        binary_metrics(a, np.zeros((6, 5), dtype=bool))
    with pytest.raises(ValueError, match="binary mask"):
        binary_metrics(np.full((5, 6), 2), a)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        binary_metrics(np.zeros(5, dtype=bool), np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, spacing=(1.0, 0.0))
    # 0/1 integer masks are accepted like booleans.
    b = np.zeros((5, 6), dtype=np.uint8)
    b[1:3, 1:3] = 1
    assert binary_metrics(b, b.astype(bool))["dice"] == 1.0


def label_maps():
    """A 3-class case: class 1 offset squares, class 2 predicted but absent, class 3 absent from both."""
    gt = np.zeros((3, 40, 40), dtype=np.uint8)
    pred = np.zeros_like(gt)
    a, b = squares_3d(25, 2)
    pred[a] = 1
    gt[b] = 1
    pred[0, 0:2, 0:2] = 2
    return pred, gt


def test_case_metrics_per_class():
    pred, gt = label_maps()
    result = case_metrics(pred, gt, num_classes=4)
    assert len(result) == 3
    assert result[0]["dice"] == pytest.approx(0.92)
    assert result[0]["hd95"] == pytest.approx(1.0)
    assert result[1]["dice"] == 0.0 and result[1]["hd95"] == pytest.approx(volume_diagonal(pred.shape))
    assert result[2] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_dice_per_class_matches_case_metrics():
    pred, gt = label_maps()
    fast = dice_per_class(pred, gt, 4)
    assert fast.shape == (3,)
    np.testing.assert_allclose(fast, [m["dice"] for m in case_metrics(pred, gt, 4)])
    np.testing.assert_allclose(fast, [0.92, 0.0, 1.0])


def test_label_map_errors():
    pred, gt = label_maps()
    with pytest.raises(ValueError, match=r"pred_labels has labels in \[0, 2\], expected \[0, 2\)"):
        case_metrics(pred, gt, num_classes=2)
    with pytest.raises(ValueError, match="gt_labels"):
        dice_per_class(np.zeros((2, 2), int), np.array([[0, 0], [0, -1]]), 4)
    with pytest.raises(ValueError, match="does not match"):
        dice_per_class(pred, gt[:, :, :-1], 4)
    with pytest.raises(ValueError, match="num_classes"):
        case_metrics(pred, gt, num_classes=1)


def test_summarize_two_cases():
    case1 = [
        {"dice": 0.8, "jaccard": 0.6, "hd95": 2.0, "asd": 1.0},
        {"dice": 0.6, "jaccard": 0.4, "hd95": 4.0, "asd": 3.0},
    ]
    case2 = [
        {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0},
        {"dice": 0.2, "jaccard": 0.1, "hd95": 10.0, "asd": 5.0},
    ]
    s = summarize([case1, case2])
    assert s["dice"]["per_class"] == pytest.approx([0.9, 0.4])
    assert s["dice"]["mean"] == pytest.approx(0.65)
    assert s["jaccard"]["per_class"] == pytest.approx([0.8, 0.25])
    assert s["hd95"]["per_class"] == pytest.approx([1.0, 7.0])
    assert s["hd95"]["mean"] == pytest.approx(4.0)
    assert s["asd"]["mean"] == pytest.approx((0.5 + 4.0) / 2)
    assert json.loads(json.dumps(s)) == s


def test_summarize_errors():
    with pytest.raises(ValueError, match="at least one case"):
        summarize([])
    one = {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    with pytest.raises(ValueError, match="same non-zero number of classes"):
        summarize([[one, one], [one]])


def test_real_acdc_volume(real_acdc_root):
    """On a real val volume: a perfect prediction is perfect; deleting a class is penalised."""
    skip_without_real_data(real_acdc_root, "real ACDC data")
    case = (real_acdc_root / "val.list").read_text().split()[0]
    with h5py.File(real_acdc_root / "data" / f"{case}.h5", "r") as f:
        gt = f["label"][:]
    perfect = case_metrics(gt, gt, 4)
    assert all(m == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0} for m in perfect)
    pred = gt.copy()
    pred[pred == 1] = 0
    missed = case_metrics(pred, gt, 4)
    assert missed[0]["dice"] == 0.0
    assert missed[0]["hd95"] == pytest.approx(volume_diagonal(gt.shape))
    assert missed[1:] == perfect[1:]


# ------------------------------------------------------------------ found by mutation testing (docs/mutation.md)

def test_mask_errors_name_the_argument_and_its_values():
    good = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match=r"^pred must be a binary mask \(bool or 0/1\), got values \[0 2\]$"):
        binary_metrics(np.array([[0, 2], [0, 0]]), good[:2, :2])
    with pytest.raises(ValueError, match=r"^gt must be a binary mask \(bool or 0/1\), got values \[0 3\]$"):
        binary_metrics(good[:2, :2], np.array([[0, 3], [0, 0]]))
    many = np.arange(16).reshape(4, 4)  # the message lists the first 8 values only
    with pytest.raises(ValueError, match=r"got values \[0 1 2 3 4 5 6 7\]$"):
        binary_metrics(many, good)
    with pytest.raises(ValueError, match=r"^gt_labels has labels in \[0, 5\], expected \[0, 4\)$"):
        dice_per_class(np.zeros((2, 2), int), np.array([[0, 5], [0, 0]]), 4)


def test_case_metrics_pass_the_spacing_on():
    pred, gt = np.zeros((6, 6), int), np.zeros((6, 6), int)
    pred[1:3, 1:3], gt[1:3, 3:5] = 1, 1  # two voxels apart along the second axis
    voxels = case_metrics(pred, gt, 2)[0]
    mm = case_metrics(pred, gt, 2, spacing=(1.0, 2.5))[0]
    assert mm["hd95"] == pytest.approx(2.5 * voxels["hd95"]) and mm["dice"] == voxels["dice"] == 0.0


def test_dice_per_class_fills_every_class_in_order():
    pred = np.array([[0, 1, 1, 2], [3, 3, 3, 3]])
    gt = np.array([[0, 1, 2, 2], [3, 3, 0, 0]])
    # class 1: 2|{1}|/(2+1) = 2/3; class 2: 2*1/(1+2) = 2/3; class 3: 2*2/(4+2) = 2/3 ... make them differ:
    gt[1] = [3, 0, 0, 0]  # class 3: 2*1/(4+1) = 0.4
    assert dice_per_class(pred, gt, 4).tolist() == pytest.approx([2 / 3, 2 / 3, 0.4])
    assert dice_per_class(pred, np.where(gt == 2, 0, gt), 4)[1] == 0.0  # class 2 absent from gt only


def test_summarize_one_foreground_class():
    one = {"dice": 0.5, "jaccard": 1 / 3, "hd95": 2.0, "asd": 1.0}
    assert summarize([[one], [one]])["dice"] == {"per_class": [0.5], "mean": 0.5}
    with pytest.raises(ValueError, match=r"got \[0, 0\]"):
        summarize([[], []])
    with pytest.raises(ValueError, match=r"^summarize needs at least one case, got an empty list$"):
        summarize([])
