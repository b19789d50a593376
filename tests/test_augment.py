"""Tests for dataloaders.augment: exact geometry, image/label alignment, the strong view, and the
distribution of the random factors (fixed generator seeds, loose statistical tolerances)."""
import math

import pytest
import torch

from dataloaders.augment import (
    CUTOUT_AREA,
    JITTER,
    ROTATION_DEG,
    apply_geometry,
    augment,
    cutout_boxes,
    jitter,
    sample_params,
)

C = 4  # classes; image = label / C is exact in float32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def labelled_pattern(n, size, seed=0):
    """Random blocky label maps (B,S,S) and images (B,1,S,S) = label / C, zero border-free."""
    g = gen(seed)
    coarse = torch.randint(0, C, (n, 1, size // 4, size // 4), generator=g).float()
    fine = torch.randint(0, C, (n, 1, size, size), generator=g).float()
    blocks = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    labels = torch.where(torch.rand(n, 1, size, size, generator=g) < 0.2, fine, blocks)[:, 0].long()
    return labels[:, None].float() / C, labels


def fixed_params(n, **values):
    params = sample_params(n, gen(123))
    for key, value in values.items():
        params[key] = torch.full_like(params[key], value)
    return params


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("axis", [0, 1])
def test_rot90_flip_mode_is_exact(size, k, axis):
    images, labels = labelled_pattern(2, size, seed=k)
    images = images + torch.rand(images.shape, generator=gen(7))  # arbitrary float values
    params = fixed_params(2, mode=0, k=k, flip_axis=axis)
    out_img, out_lab = apply_geometry(images, labels, params)
    assert torch.equal(out_img, torch.flip(torch.rot90(images, k, [-2, -1]), [-2 + axis]))
    assert torch.equal(out_lab, torch.flip(torch.rot90(labels, k, [-2, -1]), [-2 + axis]))
    assert out_lab.dtype == labels.dtype


def test_identity_mode_is_exact():
    images, labels = labelled_pattern(3, 32)
    images = images + 0.01 * torch.rand(images.shape, generator=gen(1))
    out_img, out_lab = apply_geometry(images, labels, fixed_params(3, mode=2))
    assert torch.equal(out_img, images) and torch.equal(out_lab, labels)


def test_free_rotation_moves_pixels_and_keeps_labels_nearest():
    images, labels = labelled_pattern(2, 48)
    params = fixed_params(2, mode=1, angle=15.0)
    out_img, out_lab = apply_geometry(images, labels, params)
    assert not torch.equal(out_lab, labels)
    assert set(out_lab.unique().tolist()) <= set(range(C))  # nearest: no interpolated labels
    assert torch.equal(out_img[:, 0] * C, out_lab.float())
    # zero padding in the corners that rotate in from outside
    assert out_lab[:, 0, 0].eq(0).all() and out_img[:, 0, 0, 0].eq(0).all()
    # a rotation by 0 degrees is the identity
    same_img, same_lab = apply_geometry(images, labels, fixed_params(2, mode=1, angle=0.0))
    assert torch.equal(same_img, images) and torch.equal(same_lab, labels)


def test_weak_view_stays_aligned():
    images, labels = labelled_pattern(64, 32)
    out = augment(images, labels, gen(3), strong=False)
    assert set(out) == {"image", "label"}
    assert out["image"].shape == images.shape and out["label"].shape == labels.shape
    assert torch.equal(out["image"][:, 0] * C, out["label"].float())
    # the batch really was transformed (several modes happened)
    changed = [(not torch.equal(out["label"][i], labels[i])) for i in range(64)]
    assert 10 < sum(changed) < 64


def test_strong_view_shares_geometry_and_cuts_label():
    n, size = 64, 32
    images, labels = labelled_pattern(n, size, seed=5)
    out = augment(images, labels, gen(11), strong=True)
    weak = augment(images, labels, gen(11), strong=False)
    assert set(out) == {"image", "label", "image_strong", "label_strong", "cutout"}
    # the weak view does not depend on whether the strong one is drawn
    assert torch.equal(out["image"], weak["image"]) and torch.equal(out["label"], weak["label"])
    assert torch.equal(out["image"][:, 0] * C, out["label"].float())
    # recompute the cutout box from the same parameter draw (augment draws them first)
    box = cutout_boxes(sample_params(n, gen(11)), size, size)
    assert 10 < int(box.flatten(1).any(1).sum()) < n - 10
    assert torch.equal(out["label_strong"], torch.where(box, torch.zeros_like(out["label"]), out["label"]))
    assert torch.equal(out["cutout"], box.float())  # where the strong image holds the noise
    assert out["label_strong"].dtype == out["label"].dtype
    strong = out["image_strong"]
    assert strong.shape == images.shape and strong.min() >= 0 and strong.max() <= 1
    # outside the box the jitter is one monotone map per sample: the strong image is a function
    # of the (aligned) weak label there, and ordered like it
    jittered = 0
    for i in range(n):
        keep = ~box[i]
        values = strong[i, 0][keep]
        lab = out["label"][i][keep]
        present = [c for c in range(C) if (lab == c).any()]
        levels = []
        for c in present:
            v = values[lab == c]
            assert torch.allclose(v, v[0].expand_as(v), atol=1e-6), f"sample {i}: class {c} not uniform"
            levels.append(float(v[0]))
        assert levels == sorted(levels), f"sample {i}: jitter is not monotone"
        jittered += not torch.allclose(values, out["image"][i, 0][keep])
        # inside the box: jittered 0/1 noise, two levels whatever the pattern underneath
        if box[i].sum() >= 16:
            assert len(strong[i, 0][box[i]].unique()) == 2, f"sample {i}: the image was not cut out"
    assert jittered == n  # brightness/contrast factors are never exactly 1


def test_strong_cutout_content_is_binary_noise_before_jitter():
    """With brightness and contrast factors of 1 the cut region holds 0/1 pixels only."""
    n, size = 16, 32
    images, labels = labelled_pattern(n, size)
    params = fixed_params(n, mode=2, cut=True, bright=1.0, contrast=1.0, cut_area=0.3, cut_aspect=1.0)
    box = cutout_boxes(params, size, size)
    assert box.flatten(1).all(1).logical_not().all() and box.flatten(1).any(1).all()
    noise = torch.randint(0, 2, images.shape, generator=gen(0)).float()
    cut = torch.where(box[:, None], noise, images)
    assert torch.allclose(jitter(cut, params), cut)


def test_cutout_box_is_a_rectangle_inside_the_image():
    size = 48
    params = sample_params(500, gen(9))
    params["cut"] = torch.ones_like(params["cut"])
    boxes = cutout_boxes(params, size, size)
    for b in boxes:
        rows, cols = b.any(1).nonzero()[:, 0], b.any(0).nonzero()[:, 0]
        assert rows.numel() > 0
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert rows.numel() == h and cols.numel() == w and int(b.sum()) == h * w


def test_augment_is_deterministic_for_a_generator():
    images, labels = labelled_pattern(8, 32)
    a = augment(images, labels, gen(42))
    b = augment(images, labels, gen(42))
    c = augment(images, labels, gen(43))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_jitter_clamps_to_unit_range():
    images = torch.rand(50, 1, 16, 16, generator=gen(2))
    params = sample_params(50, gen(2))
    out = jitter(images, params)
    assert out.min() >= 0 and out.max() <= 1
    # brightness alone is a multiplication by the factor (then clamped)
    params["contrast"] = torch.ones_like(params["contrast"])
    expected = (images * params["bright"].view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(jitter(images, params), expected, atol=1e-6)


# ---------------------------------------------------------------- distribution of the factors

N = 20000


@pytest.fixture(scope="module")
def many():
    return sample_params(N, gen(2024))


def test_all_factors_have_one_value_per_sample(many):
    assert all(v.shape == (N,) for v in many.values())


def test_mode_frequencies(many):
    freq = [float((many["mode"] == m).float().mean()) for m in range(3)]
    assert freq[0] == pytest.approx(0.5, abs=0.02)
    assert freq[1] == pytest.approx(0.25, abs=0.02)
    assert freq[2] == pytest.approx(0.25, abs=0.02)


def test_quarter_turns_and_flip_axis_uniform(many):
    k = many["k"]
    assert set(k.unique().tolist()) == {0, 1, 2, 3}
    for q in range(4):
        assert float((k == q).float().mean()) == pytest.approx(0.25, abs=0.02)
    assert set(many["flip_axis"].unique().tolist()) == {0, 1}
    assert float(many["flip_axis"].float().mean()) == pytest.approx(0.5, abs=0.02)


def test_angles_within_twenty_degrees_roughly_uniform(many):
    angle = many["angle"]
    assert ROTATION_DEG == 20.0
    assert angle.min() >= -20 and angle.max() <= 20
    assert angle.min() < -19.5 and angle.max() > 19.5
    hist = torch.histc(angle, bins=8, min=-20, max=20) / N
    assert torch.allclose(hist, torch.full_like(hist, 1 / 8), atol=0.015), hist


def test_jitter_factors_range(many):
    assert JITTER == (0.2, 1.8)
    for key in ("bright", "contrast"):
        v = many[key]
        assert v.min() >= 0.2 and v.max() <= 1.8
        assert v.min() < 0.25 and v.max() > 1.75
        assert float(v.mean()) == pytest.approx(1.0, abs=0.02)
    assert float(many["bright_first"].float().mean()) == pytest.approx(0.5, abs=0.02)


def test_cutout_rate_and_area(many):
    assert float(many["cut"].float().mean()) == pytest.approx(0.5, abs=0.02)
    area = many["cut_area"]
    assert CUTOUT_AREA == (0.02, 0.4)
    assert area.min() >= 0.02 and area.max() <= 0.4
    assert float(area.mean()) == pytest.approx(0.21, abs=0.01)
    aspect = many["cut_aspect"]
    assert aspect.min() >= 0.3 - 1e-6 and aspect.max() <= 1 / 0.3 + 1e-6
    # log-uniform aspect: as many tall boxes as wide ones
    assert float((aspect > 1).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_realised_cutout_area_fraction():
    size = 256
    params = sample_params(1500, gen(5))
    boxes = cutout_boxes(params, size, size)
    cut = params["cut"]
    frac = boxes.flatten(1).float().mean(1)
    assert torch.equal(frac > 0, cut)  # a box exactly where cutout is on
    f = frac[cut]
    # rounding the box sides down may shave a little below the drawn area, never above it
    assert f.max() <= 0.4 and f.min() >= 0.02 * 0.9
    assert (f <= params["cut_area"][cut] + 1e-6).all()
    assert float(f.mean()) == pytest.approx(0.2, abs=0.02)


def test_sample_params_on_generator_device_is_reproducible():
    a, b = sample_params(100, gen(1)), sample_params(100, gen(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not math.isclose(float(a["angle"].sum()), float(sample_params(100, gen(2))["angle"].sum()))
