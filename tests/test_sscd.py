"""Tests for code/utils/sscd.py on tiny hand-made tensors with hand-computed values."""
import math

import pytest
import torch

from utils.losses import dice_loss, one_hot
from utils.sscd import (DEFAULT_HCA_SCHEDULE, apply_sda, bcp_box_mask, center_disc_dice,
                        center_disc_mask, cgsr, disc_mask, entropy_map, hca_maps,
                        largest_component_per_class, mix, neighbour_contrast, parse_hca_schedule,
                        pseudo_labels, region_hardness, region_means, sda_mask, split_iterations)


def logits_from_probs(p0):
    """(B, H, W) class-0 probabilities -> (B, 2, H, W) logits whose softmax is (p0, 1 - p0)."""
    return torch.stack([p0.log(), (1 - p0).log()], dim=1)


# ---------------------------------------------------------------- BCP box and mix
def test_bcp_box_mask_shape_box_and_determinism():
    g = torch.Generator().manual_seed(3)
    m = bcp_box_mask(3, 12, 9, ratio=2 / 3, generator=g)
    assert m.shape == (3, 12, 9) and m.dtype == torch.float32
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])      # one box shared by the batch
    zeros = (m[0] == 0).nonzero()
    assert len(zeros) == 8 * 6                                       # int(12*2/3) x int(9*2/3)
    top, left = zeros.min(0).values.tolist()
    bottom, right = zeros.max(0).values.tolist()
    assert (bottom - top + 1, right - left + 1) == (8, 6)            # one solid rectangle
    assert torch.equal(m, bcp_box_mask(3, 12, 9, generator=torch.Generator().manual_seed(3)))


def test_bcp_box_mask_corner_covers_every_position():
    g = torch.Generator().manual_seed(0)
    tops, lefts = set(), set()
    for _ in range(200):
        zeros = (bcp_box_mask(1, 6, 6, ratio=0.5, generator=g)[0] == 0).nonzero()
        top, left = zeros.min(0).values.tolist()
        tops.add(top)
        lefts.add(left)
    assert tops == {0, 1, 2, 3} and lefts == {0, 1, 2, 3}            # box 3x3 fits at 0..3
    assert bcp_box_mask(2, 4, 4, ratio=1.0).sum() == 0
    with pytest.raises(ValueError):
        bcp_box_mask(1, 4, 4, ratio=0.0)


def test_mix_images_and_labels():
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a = torch.full((1, 1, 2, 2), 2.0)
    b = torch.full((1, 1, 2, 2), 5.0)
    assert torch.equal(mix(a, b, m), torch.tensor([[[[2.0, 5.0], [5.0, 2.0]]]]))
    la = torch.tensor([[[1, 1], [1, 1]]])
    lb = torch.tensor([[[3, 3], [3, 3]]])
    out = mix(la, lb, m)
    assert out.dtype == torch.long and torch.equal(out, torch.tensor([[[1, 3], [3, 1]]]))
    with pytest.raises(ValueError):
        mix(a, b[:, :, :1], m)


# ---------------------------------------------------------------- entropy and SDA
def test_entropy_map_values():
    p0 = torch.tensor([[[0.5, 0.25, 1.0]]])
    ent = entropy_map(logits_from_probs(p0.clamp(max=1 - 1e-12)))
    h25 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))          # 0.562335
    assert ent.shape == (1, 1, 3)
    assert ent[0, 0, 0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert ent[0, 0, 1].item() == pytest.approx(h25, rel=1e-6)
    assert ent[0, 0, 2].item() == pytest.approx(0.0, abs=1e-6)


SDA_P0 = torch.full((1, 4, 4), 0.1)
# highest entropies (binary entropy falls as p0 leaves .5): .5 > .45 > .4 > .35 > .1
SDA_P0[0, 0, 1] = 0.5
SDA_P0[0, 1, 3] = 0.45
SDA_P0[0, 2, 0] = 0.4
SDA_P0[0, 3, 2] = 0.35


def test_sda_mask_keeps_exact_top_alpha_positions():
    logits = logits_from_probs(SDA_P0)                               # (1, 2, 4, 4)
    m = sda_mask(logits, 0.25)                                       # k = 4
    expected = torch.zeros(1, 4, 4)
    expected[0, 0, 1] = expected[0, 1, 3] = expected[0, 2, 0] = expected[0, 3, 2] = 1
    assert torch.equal(m, expected)
    m = sda_mask(logits, 0.2)                                        # k = floor(3.2) = 3
    expected[0, 3, 2] = 0
    assert torch.equal(m, expected)
    assert sda_mask(logits, 0.0).sum() == 0 and sda_mask(logits, 1.0).sum() == 16
    with pytest.raises(ValueError):
        sda_mask(logits, 1.5)


def test_sda_mask_exactly_k_with_ties_and_per_image():
    flat = torch.zeros(2, 2, 2, 3)                                  # image 0: all ties
    flat[1, 0] = torch.tensor([[9.0, 9.0, 0.0], [9.0, 0.0, 9.0]])   # image 1: 2 uncertain pixels (p=.5 at zeros)
    m = sda_mask(flat, 0.5)                                          # k = 3 per image
    assert torch.equal(m[0], torch.tensor([[1.0, 1, 1], [0, 0, 0]]))  # ties: raster order
    assert m[1].sum() == 3 and m[1, 0, 2] == 1 and m[1, 1, 1] == 1
    assert m[1, 0, 0] == 1                                            # first of the tied rest


def test_apply_sda_zeroes_outside():
    mask = sda_mask(logits_from_probs(SDA_P0), 0.25)
    image = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    label = (torch.arange(16) % 3 + 1).view(1, 4, 4)
    xi, yi = apply_sda(image, label, mask)
    exp_img = torch.zeros(1, 1, 4, 4)
    exp_lab = torch.zeros(1, 4, 4, dtype=torch.long)
    for (r, c) in [(0, 1), (1, 3), (2, 0), (3, 2)]:
        exp_img[0, 0, r, c] = 4 * r + c + 1
        exp_lab[0, r, c] = (4 * r + c) % 3 + 1
    assert torch.equal(xi, exp_img)
    assert yi.dtype == torch.long and torch.equal(yi, exp_lab)


# ---------------------------------------------------------------- HCA
def _heads_small():
    # B=1, C=2, H=1, W=2; logits = log p so the softmax is p exactly
    h1 = torch.tensor([[[[0.25, 0.6]], [[0.75, 0.4]]]]).log()       # max softmax [.75, .6]
    h2 = torch.tensor([[[[0.9, 0.5]], [[0.1, 0.5]]]]).log()         # max softmax [.9, .5]
    nan = torch.full_like(h1, float("nan"))                         # weight-0 heads are never read
    return [h1, h2, nan, nan]


def test_hca_single_head_is_its_max_softmax():
    conf, cls = hca_maps(_heads_small(), (1, 0, 0, 0), "max_softmax")
    assert torch.allclose(conf, torch.tensor([[[0.75, 0.6]]]))
    assert torch.allclose(cls, torch.tensor([[[[0.25, 0.6]], [[0.75, 0.4]]]]))


def test_hca_mixed_weights_average():
    conf, cls = hca_maps(_heads_small(), (0.5, 0.5, 0, 0), "max_softmax")
    assert torch.allclose(conf, torch.tensor([[[0.825, 0.55]]]))
    assert torch.allclose(cls, torch.tensor([[[[0.575, 0.55]], [[0.425, 0.45]]]]))
    conf2, _ = hca_maps(_heads_small(), (2, 2, 0, 0), "max_softmax")   # normalised
    assert torch.allclose(conf, conf2)


def test_hca_logits_combine_hand_example():
    h1 = torch.tensor([[[[0.0]], [[2.0]]]])                         # softmax [.1192, .8808]
    h2 = torch.tensor([[[[0.0]], [[0.0]]]])                         # softmax [.5, .5]
    nan = torch.full_like(h1, float("nan"))
    conf, cls = hca_maps([h1, h2, nan, nan], (0.5, 0.5, 0, 0), "logits")
    e = math.e                                                      # R = [0, 1]
    assert conf.item() == pytest.approx(e / (1 + e), rel=1e-6)
    assert cls[0, :, 0, 0].tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], rel=1e-6)
    conf_p, _ = hca_maps([h1, h2, nan, nan], (0.5, 0.5, 0, 0), "max_softmax")
    s = 1 / (1 + math.exp(-2))
    assert conf_p.item() == pytest.approx(0.5 * s + 0.25, rel=1e-6)   # differs from 'logits'


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("combine", ["max_softmax", "logits"])
def test_hca_shapes(size, combine):
    g = torch.Generator().manual_seed(size)
    heads = [torch.randn(2, 4, size, size, generator=g) for _ in range(4)]
    conf, cls = hca_maps(heads, (0, 0, 0.5, 0.5), combine)
    assert conf.shape == (2, size, size) and cls.shape == (2, 4, size, size)
    assert torch.allclose(cls.sum(1), torch.ones(2, size, size), atol=1e-5)
    assert conf.min() >= 0.25 - 1e-6 and conf.max() <= 1 + 1e-6
    conf4, _ = hca_maps(heads, (0, 0, 0, 1), combine)
    assert torch.allclose(conf4, torch.softmax(heads[3], 1).max(1).values)


def test_hca_errors():
    heads = _heads_small()
    for bad in [(0, 0, 0, 0), (1, -0.5, 0, 0), (1, 0, 0)]:
        with pytest.raises(ValueError):
            hca_maps(heads, bad, "max_softmax")
    with pytest.raises(ValueError):
        hca_maps(heads, (1, 0, 0, 0), "mean")


# ---------------------------------------------------------------- regions
def test_region_means_by_hand():
    x = torch.arange(1.0, 17.0).view(1, 4, 4)
    expected = torch.tensor([[[3.5, 5.5], [11.5, 13.5]]])
    assert torch.equal(region_means(x, 2), expected)
    x4 = torch.stack([x, 2 * x], dim=1)                              # (1, 2, 4, 4)
    assert torch.equal(region_means(x4, 2), torch.stack([expected, 2 * expected], dim=1))
    with pytest.raises(ValueError, match="patch_size=3"):
        region_means(x, 3)


def test_neighbour_contrast_by_hand():
    s = torch.tensor([[[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]])
    expected = torch.tensor([[[(1 + 7) / 2, (1 + 2 + 14) / 3, (2 + 28) / 2],
                              [(7 + 8) / 2, (14 + 8 + 16) / 3, (28 + 16) / 2]]])
    assert torch.allclose(neighbour_contrast(s), expected)
    # on the 2x2 region means of the 4x4 map every region has 2 neighbours at distance 2 and 8
    assert torch.allclose(neighbour_contrast(region_means(torch.arange(1.0, 17.0).view(1, 4, 4), 2)),
                          torch.full((1, 2, 2), 5.0))
    assert neighbour_contrast(torch.ones(1, 1, 1)).item() == 0.0


def test_region_hardness_confidence():
    conf = torch.full((1, 4, 4), 0.9)
    conf[0, 2:, :2] = 0.3                                            # region 2 (row 1, col 0)
    h = region_hardness(conf, 2, "confidence")
    assert torch.allclose(h, torch.tensor([[0.1, 0.1, 0.7, 0.1]]))
    assert h.argmax().item() == 2


def test_region_hardness_contrast():
    conf = torch.full((1, 6, 6), 0.9)
    conf[0, 2:4, 2:4] = 0.3                                          # centre region of the 3x3 grid
    h = region_hardness(conf, 2, "contrast")
    expected = torch.tensor([[0.0, 0.2, 0.0, 0.2, 0.6, 0.2, 0.0, 0.2, 0.0]])
    assert torch.allclose(h, expected, atol=1e-6)
    assert h.argmax().item() == 4
    with pytest.raises(ValueError):
        region_hardness(conf, 2, "entropy")


# ---------------------------------------------------------------- CGSR
def test_disc_mask_patch4():
    expected = torch.tensor([[0.0, 0, 1, 0],
                             [0, 1, 1, 1],
                             [1, 1, 1, 1],
                             [0, 1, 1, 1]])
    assert torch.equal(disc_mask(4), expected)
    d32 = disc_mask(32)
    assert d32[16, 0] == 1 and d32[0, 16] == 1 and d32[0, 0] == 0 and d32[31, 31] == 0


PATCH = 4        # 8x8 images -> 2x2 grid, regions 0 1 / 2 3
# Per image: hardness of the weak and strong views (higher = harder), and descriptors.
HARD_W = [[0.9, 0.1, 0.5, 0.2],      # hardest 0, easiest 1, candidates (1, 3)
          [0.2, 0.4, 0.1, 0.7]]      # hardest 3, easiest 2, candidates (2, 0)
HARD_S = [[0.3, 0.8, 0.1, 0.6],      # hardest 1, easiest 2, candidates (2, 0)
          [0.05, 0.2, 0.9, 0.3]]     # hardest 2, easiest 0, candidates (0, 1)
CLS_W = [[[0.3, 0.7], [0.1, 0.9], [0.5, 0.5], [0.8, 0.2]],
         [[0.6, 0.4], [0.5, 0.5], [0.95, 0.05], [0.2, 0.8]]]
CLS_S = [[[0.25, 0.75], [0.9, 0.1], [0.9, 0.1], [0.5, 0.5]],
         [[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.5, 0.5]]]
# plain: dst_w = easiest_w, dst_s = easiest_s; src_s = hardest_s, src_w = hardest_w
PLAIN = {"dst_w": [1, 2], "src_s": [1, 2], "dst_s": [2, 0], "src_w": [0, 3]}
# KL, image 0: p_s[1]=(.9,.1) vs w-candidates 1 (.1,.9) / 3 (.8,.2) -> 3;
#              p_w[0]=(.3,.7) vs s-candidates 2 (.9,.1) / 0 (.25,.75) -> 0
#     image 1: p_s[2]=(.5,.5) vs 2 (.95,.05) / 0 (.6,.4) -> 0; p_w[3]=(.2,.8) vs 0 (.9,.1) / 1 (.3,.7) -> 1
KL = {"dst_w": [3, 0], "src_s": [1, 2], "dst_s": [0, 1], "src_w": [0, 3]}


def _cgsr_inputs(repeat=1):
    b = 2 * repeat
    base = torch.arange(64.0).view(8, 8)
    # image-specific, pixel-specific values: any cross-image or wrong-region read is visible
    x_w = torch.stack([1000.0 * (i + 1) + base for i in range(b)]).unsqueeze(1)
    x_s = -torch.stack([1000.0 * (i + 1) + base + 0.5 for i in range(b)]).unsqueeze(1)

    def cls(table):
        t = torch.tensor(table * repeat)                             # (B, R, 2)
        return t.transpose(1, 2).reshape(b, 2, 2, 2)

    return (x_w, x_s, torch.tensor(HARD_W * repeat), torch.tensor(HARD_S * repeat),
            cls(CLS_W), cls(CLS_S))


def _region(r):
    rr, cc = divmod(r, 2)
    return slice(PATCH * rr, PATCH * rr + PATCH), slice(PATCH * cc, PATCH * cc + PATCH)


def _expected(x_dst, x_src, dst, src):
    disc = disc_mask(PATCH).bool()
    out = x_dst.clone()
    for i in range(x_dst.shape[0]):
        ys, xs = _region(int(dst[i]))
        ys2, xs2 = _region(int(src[i]))
        out[i, 0, ys, xs] = torch.where(disc, x_src[i, 0, ys2, xs2], x_dst[i, 0, ys, xs])
    return out


@pytest.mark.parametrize("kl_prob,table", [(0.0, PLAIN), (1.0, KL)])
def test_cgsr_branches(kl_prob, table):
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    originals = [t.clone() for t in (x_w, x_s, hw, hs, cw, cs)]
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=kl_prob,
                          generator=torch.Generator().manual_seed(0))
    for key in ("dst_w", "src_s", "dst_s", "src_w"):
        assert info[key].tolist() == table[key], key
    assert info["kl_branch"].tolist() == [kl_prob == 1.0] * 2
    assert torch.equal(s2w, _expected(x_w, x_s, table["dst_w"], table["src_s"]))
    assert torch.equal(w2s, _expected(x_s, x_w, table["dst_s"], table["src_w"]))
    n_disc = int(disc_mask(PATCH).sum())                              # 11
    for i in range(2):                                                # one disc per image changed
        assert int((s2w[i] != x_w[i]).sum()) == n_disc
        assert int((w2s[i] != x_s[i]).sum()) == n_disc
    for before, after in zip(originals, (x_w, x_s, hw, hs, cw, cs)):
        assert torch.equal(before, after)                             # inputs untouched


def test_cgsr_random_branch_per_image():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs(repeat=4)                 # 8 images
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
                          generator=torch.Generator().manual_seed(1))
    branch = info["kl_branch"].tolist()
    assert any(branch) and not all(branch)
    for i, kl in enumerate(branch):
        table = KL if kl else PLAIN
        for key in ("dst_w", "src_s", "dst_s", "src_w"):
            assert int(info[key][i]) == table[key][i % 2]
    assert torch.equal(s2w, _expected(x_w, x_s, info["dst_w"], info["src_s"]))
    assert torch.equal(w2s, _expected(x_s, x_w, info["dst_s"], info["src_w"]))
    again = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], s2w) and torch.equal(again[2]["kl_branch"], info["kl_branch"])


def test_cgsr_kl_direction_and_normalisation():
    # p = (.5,.4,.1); q1 = (.7,.29,.01), q2 = (.4,.3,.3)
    # KL(p||q1) = .5 ln(5/7) + .4 ln(40/29) + .1 ln 10 = 0.1907;  KL(p||q2) = 0.1168  -> q2
    # the reverse direction would choose q1: KL(q1||p) = 0.1192 < KL(q2||p) = 0.1540
    p, q1, q2, u = [0.5, 0.4, 0.1], [0.7, 0.29, 0.01], [0.4, 0.3, 0.3], [1 / 3] * 3
    hard_w = torch.tensor([[0.8, 0.3, 0.0, 0.1]])    # hardest 0, candidates (2, 3), easiest 2
    hard_s = torch.tensor([[0.1, 0.9, 0.2, 0.3]])    # hardest 1, candidates (0, 2), easiest 0
    cls_w = torch.tensor([[p, u, q1, q2]]).transpose(1, 2).reshape(1, 3, 2, 2)
    cls_s = torch.tensor([[q1, p, q2, u]]).transpose(1, 2).reshape(1, 3, 2, 2)
    x = torch.zeros(1, 1, 8, 8)
    for scale in (1.0, 2.0):                         # descriptors are renormalised
        _, _, info = cgsr(x, x + 1, hard_w, hard_s, scale * cls_w, scale * cls_s, PATCH,
                          top_num=2, kl_prob=1.0)
        assert info["src_s"].tolist() == [1] and info["dst_w"].tolist() == [3]
        assert info["src_w"].tolist() == [0] and info["dst_s"].tolist() == [2]
    # zero entries are clamped, not NaN
    z = torch.zeros_like(cls_w)
    z[:, 0] = 1.0
    _, _, info = cgsr(x, x + 1, hard_w, hard_s, z, z, PATCH, top_num=2, kl_prob=1.0)
    assert info["dst_w"].tolist() == [2] and info["dst_s"].tolist() == [0]


def _one_image_case(cls_s_region1, cls_s_region2):
    """The first image of _cgsr_inputs with hardest weak region b = 0, hardest strong region d = 1,
    weak class profiles (a, b, b, b) and strong ones (b, given, given, b), a = (.9, .1), b = (.1, .9)."""
    x_w, x_s, _, _, _, _ = _cgsr_inputs()
    hard_w = torch.tensor([[0.9, 0.1, 0.2, 0.3]])                    # b = 0
    hard_s = torch.tensor([[0.1, 0.9, 0.2, 0.3]])                    # d = 1
    a, b = [0.9, 0.1], [0.1, 0.9]
    cls_w = torch.tensor([[a, b, b, b]]).transpose(1, 2).reshape(1, 2, 2, 2)
    cls_s = torch.tensor([[b, cls_s_region1, cls_s_region2, b]]).transpose(1, 2).reshape(1, 2, 2, 2)
    return x_w[:1], x_s[:1], hard_w, hard_s, cls_w, cls_s


def test_cgsr_weak_source_read_before_modification():
    # top_num = R lets the KL choice put strong content into the hardest weak region itself
    # (a* = b = 0); the weak source pasted into the strong view must be the ORIGINAL region 0.
    x_w, x_s, hard_w, hard_s, cls_w, cls_s = _one_image_case([0.8, 0.2], [0.9, 0.1])
    s2w, w2s, info = cgsr(x_w, x_s, hard_w, hard_s, cls_w, cls_s, PATCH, top_num=4, kl_prob=1.0)
    assert info["dst_w"].tolist() == [0] and info["src_w"].tolist() == [0]
    assert info["src_s"].tolist() == [1] and info["dst_s"].tolist() == [2]
    assert torch.equal(s2w, _expected(x_w, x_s, [0], [1]))
    assert torch.equal(w2s, _expected(x_s, x_w, [2], [0]))


def test_cgsr_errors():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    with pytest.raises(ValueError):
        cgsr(x_w, x_s, hw[:, :3], hs, cw, cs, PATCH, top_num=2, kl_prob=0.5)
    with pytest.raises(ValueError):
        cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=5, kl_prob=0.5)
    with pytest.raises(ValueError):
        cgsr(x_w, x_s, hw, hs, cw, cs, 3, top_num=2, kl_prob=0.5)
    with pytest.raises(ValueError):
        cgsr(x_w, x_s[:1], hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5)



# ---------------------------------------------------------------- CGSR: ABD direction, square paste
# easy_into_hard on the tables above: dst = hardest region of the view itself, src = easiest (plain)
# or KL-chosen candidate (KL) of the other view.
ABD_PLAIN = {"dst_w": [0, 3], "src_s": [2, 0], "dst_s": [1, 2], "src_w": [1, 2]}
# KL, image 0: src_s = c* for p_w[b=0]=(.3,.7) among s-candidates 2 (.9,.1) KL 1.033 /
#              0 (.25,.75) KL 0.0064 -> 0;
#              src_w = a* for p_s[d=1]=(.9,.1) among w-candidates 1 (.1,.9) KL 1.758 /
#              3 (.8,.2) KL 0.0367 -> 3
#     image 1: src_s for p_w[3]=(.2,.8) among 0 (.9,.1) KL 1.363 / 1 (.3,.7) KL 0.0257 -> 1;
#              src_w for p_s[2]=(.5,.5) among 2 (.95,.05) KL 0.830 / 0 (.6,.4) KL 0.0204 -> 0
# (every KL pick differs from the plain easiest region, so the branches are distinguishable)
ABD_KL = {"dst_w": [0, 3], "src_s": [0, 1], "dst_s": [1, 2], "src_w": [3, 0]}


def _expected_square(x_dst, x_src, dst, src):
    out = x_dst.clone()
    for i in range(x_dst.shape[0]):
        ys, xs = _region(int(dst[i]))
        ys2, xs2 = _region(int(src[i]))
        out[i, 0, ys, xs] = x_src[i, 0, ys2, xs2]
    return out


def _square_mask(dst):
    m = torch.zeros(len(dst), 1, 8, 8, dtype=torch.bool)
    for i, r in enumerate(dst):
        ys, xs = _region(int(r))
        m[i, 0, ys, xs] = True
    return m


def _check_square_paste(s2w, w2s, x_w, x_s, table):
    # exactly the whole destination square changed (x_w > 0 and x_s < 0 everywhere), it holds the
    # other view of the same image at the source region, and nothing else changed
    assert torch.equal(s2w != x_w, _square_mask(table["dst_w"]))
    assert torch.equal(w2s != x_s, _square_mask(table["dst_s"]))
    assert torch.equal(s2w, _expected_square(x_w, x_s, table["dst_w"], table["src_s"]))
    assert torch.equal(w2s, _expected_square(x_s, x_w, table["dst_s"], table["src_w"]))


@pytest.mark.parametrize("kl_prob,table", [(0.0, ABD_PLAIN), (1.0, ABD_KL)])
def test_cgsr_easy_into_hard_square_branches(kl_prob, table):
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    originals = [t.clone() for t in (x_w, x_s, hw, hs, cw, cs)]
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=kl_prob,
                          generator=torch.Generator().manual_seed(0),
                          direction="easy_into_hard", paste="square")
    for key in ("dst_w", "src_s", "dst_s", "src_w"):
        assert info[key].tolist() == table[key], key
    assert info["kl_branch"].tolist() == [kl_prob == 1.0] * 2
    _check_square_paste(s2w, w2s, x_w, x_s, table)
    for i in range(2):
        assert int((s2w[i] != x_w[i]).sum()) == PATCH * PATCH
        assert int((w2s[i] != x_s[i]).sum()) == PATCH * PATCH
    for before, after in zip(originals, (x_w, x_s, hw, hs, cw, cs)):
        assert torch.equal(before, after)                             # inputs untouched


def test_cgsr_easy_into_hard_disc_uses_same_regions():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=1.0,
                          direction="easy_into_hard")                 # paste defaults to 'disc'
    assert {k: info[k].tolist() for k in ABD_KL} == ABD_KL
    assert torch.equal(s2w, _expected(x_w, x_s, ABD_KL["dst_w"], ABD_KL["src_s"]))
    assert torch.equal(w2s, _expected(x_s, x_w, ABD_KL["dst_s"], ABD_KL["src_w"]))


def test_cgsr_easy_into_hard_random_branch_per_image():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs(repeat=4)                 # 8 images
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
                          generator=torch.Generator().manual_seed(1),
                          direction="easy_into_hard", paste="square")
    branch = info["kl_branch"].tolist()
    assert any(branch) and not all(branch)
    ref = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
               generator=torch.Generator().manual_seed(1))            # same Bernoulli draws
    assert ref[2]["kl_branch"].tolist() == branch
    for i, kl in enumerate(branch):
        table = ABD_KL if kl else ABD_PLAIN
        for key in ("dst_w", "src_s", "dst_s", "src_w"):
            assert int(info[key][i]) == table[key][i % 2]
    _check_square_paste(s2w, w2s, x_w, x_s, {k: info[k].tolist() for k in ABD_KL})


def test_cgsr_easy_into_hard_kl_direction_by_hand():
    # same descriptors as test_cgsr_kl_direction_and_normalisation:
    # KL(p||q1) = 0.1907 > KL(p||q2) = 0.1168 -> q2; the reverse KL would pick q1, the plain
    # branch the easiest candidate (also q1's region)
    p, q1, q2, u = [0.5, 0.4, 0.1], [0.7, 0.29, 0.01], [0.4, 0.3, 0.3], [1 / 3] * 3
    hard_w = torch.tensor([[0.8, 0.3, 0.0, 0.1]])    # b = 0 (p), candidates (2 q1, 3 q2)
    hard_s = torch.tensor([[0.1, 0.9, 0.2, 0.3]])    # d = 1 (p), candidates (0 q1, 2 q2)
    cls_w = torch.tensor([[p, u, q1, q2]]).transpose(1, 2).reshape(1, 3, 2, 2)
    cls_s = torch.tensor([[q1, p, q2, u]]).transpose(1, 2).reshape(1, 3, 2, 2)
    x_w = torch.arange(1.0, 65.0).view(1, 1, 8, 8)
    x_s = -x_w
    s2w, w2s, info = cgsr(x_w, x_s, hard_w, hard_s, cls_w, cls_s, PATCH, top_num=2, kl_prob=1.0,
                          direction="easy_into_hard", paste="square")
    table = {"dst_w": [0], "src_s": [2], "dst_s": [1], "src_w": [3]}
    assert {k: info[k].tolist() for k in table} == table
    _check_square_paste(s2w, w2s, x_w, x_s, table)
    # x_w[0] <- x_s[2] (rows 4-7, cols 0-3); x_s[1] <- x_w[3] (rows 4-7, cols 4-7)
    assert torch.equal(s2w[0, 0, :4, :4], x_s[0, 0, 4:, :4])
    assert torch.equal(w2s[0, 0, :4, 4:], x_w[0, 0, 4:, 4:])
    _, _, plain = cgsr(x_w, x_s, hard_w, hard_s, cls_w, cls_s, PATCH, top_num=2, kl_prob=0.0,
                       direction="easy_into_hard", paste="square")
    assert plain["src_s"].tolist() == [0] and plain["src_w"].tolist() == [2]


def test_cgsr_easy_into_hard_true_swap_reads_originals():
    # top_num = R and matching descriptors make a* = b and c* = d: the hardest regions of the two
    # views are exchanged; each side must receive the other's ORIGINAL content
    x_w, x_s, hard_w, hard_s, cls_w, cls_s = _one_image_case([0.9, 0.1], [0.1, 0.9])
    s2w, w2s, info = cgsr(x_w, x_s, hard_w, hard_s, cls_w, cls_s, PATCH, top_num=4, kl_prob=1.0,
                          direction="easy_into_hard", paste="square")
    table = {"dst_w": [0], "src_s": [1], "dst_s": [1], "src_w": [0]}
    assert {k: info[k].tolist() for k in table} == table
    _check_square_paste(s2w, w2s, x_w, x_s, table)


@pytest.mark.parametrize("kl_prob,table", [(0.0, PLAIN), (1.0, KL)])
def test_cgsr_hard_into_easy_square(kl_prob, table):
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    s2w, w2s, info = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=kl_prob,
                          direction="hard_into_easy", paste="square")
    for key in ("dst_w", "src_s", "dst_s", "src_w"):
        assert info[key].tolist() == table[key], key
    _check_square_paste(s2w, w2s, x_w, x_s, table)


def test_cgsr_defaults_are_hard_into_easy_disc():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    default = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
                   generator=torch.Generator().manual_seed(2))
    explicit = cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, kl_prob=0.5,
                    generator=torch.Generator().manual_seed(2),
                    direction="hard_into_easy", paste="disc")
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    for key in default[2]:
        assert torch.equal(default[2][key], explicit[2][key])


def test_cgsr_bad_direction_or_paste():
    x_w, x_s, hw, hs, cw, cs = _cgsr_inputs()
    for bad in ("abd", "easy-into-hard", None):
        with pytest.raises(ValueError, match="direction"):
            cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, direction=bad)
    for bad in ("circle", "Square", None):
        with pytest.raises(ValueError, match="paste"):
            cgsr(x_w, x_s, hw, hs, cw, cs, PATCH, top_num=2, paste=bad)


# ---------------------------------------------------------------- pseudo-labels
def test_largest_component_per_class():
    lab = torch.zeros(2, 6, 6, dtype=torch.long)
    # image 0: class 1 = diagonal chain of 3 (one component only under 8-connectivity),
    #          a 2-pixel bar and a single pixel; class 2 = one 2x2 blob; class 3 absent
    lab[0, 0, 0] = lab[0, 1, 1] = lab[0, 2, 2] = 1
    lab[0, 0, 4] = lab[0, 0, 5] = 1
    lab[0, 5, 0] = 1
    lab[0, 4:6, 3:5] = 2
    # image 1: the bar is now the largest class-1 component (3 pixels vs 1); class 3 two blobs
    lab[1, 0, 0] = 1
    lab[1, 0, 3:6] = 1
    lab[1, 3, 0] = 3
    lab[1, 5, 4:6] = 3
    out = largest_component_per_class(lab, 4)
    expected = lab.clone()
    expected[0, 0, 4] = expected[0, 0, 5] = expected[0, 5, 0] = 0
    expected[1, 0, 0] = 0
    expected[1, 3, 0] = 0
    assert out.dtype == torch.long and torch.equal(out, expected)
    assert torch.equal(lab[0, 0, 4:6], torch.tensor([1, 1]))          # input untouched


def test_pseudo_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    pl = pseudo_labels(logits, 4, lcc=False)
    assert pl.shape == (2, 8, 8) and pl.dtype == torch.long
    assert torch.equal(pl, logits.argmax(1))
    lab = torch.zeros(1, 8, 8, dtype=torch.long)
    lab[0, 1:4, 1:4] = 2
    lab[0, 6, 6] = 2
    out = pseudo_labels(10 * one_hot(lab, 4), 4)
    expected = lab.clone()
    expected[0, 6, 6] = 0
    assert torch.equal(out, expected)
    with pytest.raises(ValueError):
        pseudo_labels(logits, 3)


# ---------------------------------------------------------------- centre disc
def test_center_disc_mask_by_hand():
    expected = torch.zeros(8, 8)
    for r, c in [(2, 4), (3, 3), (3, 4), (3, 5), (4, 2), (4, 3), (4, 4), (4, 5), (4, 6),
                 (5, 3), (5, 4), (5, 5), (6, 4)]:
        expected[r, c] = 1
    assert torch.equal(center_disc_mask(8, 8, 2), expected)


def test_center_disc_dice_ignores_outside():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 6:10, 6:10] = 1
    disc = center_disc_mask(16, 16, 4).bool()
    pred = torch.where(disc, target, torch.full_like(target, 2))      # wrong outside the disc
    probs = torch.softmax(50 * one_hot(pred, 3), dim=1)
    assert center_disc_dice(probs, target, 3).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(probs, target, 3).item() > 0.3
    assert center_disc_dice(probs, target, 3, radius=4).item() == pytest.approx(0.0, abs=1e-6)
    # radius 6 reaches wrong pixels -> positive loss
    assert center_disc_dice(probs, target, 3, radius=6).item() > 0.1


# ---------------------------------------------------------------- schedule
def test_parse_hca_schedule():
    stages = parse_hca_schedule(DEFAULT_HCA_SCHEDULE)
    assert stages == [(1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0), (0.0, 0.5, 0.5, 0.0),
                      (0.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.0, 1.0)]
    assert parse_hca_schedule(" 1, 2,3,4 ;") == [(1.0, 2.0, 3.0, 4.0)]
    for text, stage in [("1,0,0,0;1,0,0", "stage 2"), ("1,0,0,0;0,0,-1,1", "stage 2"),
                        ("0,0,0,0", "stage 1"), ("1,0,0,0;1,0,0,0;a,0,0,0", "stage 3")]:
        with pytest.raises(ValueError, match=stage):
            parse_hca_schedule(text)
    with pytest.raises(ValueError):
        parse_hca_schedule("")


def test_split_iterations():
    assert split_iterations(30000, 5) == [6000] * 5
    assert split_iterations(10, 3) == [3, 3, 4]
    assert split_iterations(11, 3) == [3, 4, 4]
    assert split_iterations(3, 3) == [1, 1, 1]
    for total, n in [(2, 3), (10, 0), (0, 1)]:
        with pytest.raises(ValueError):
            split_iterations(total, n)
