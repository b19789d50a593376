"""The contracts of utils/sscd.py that the hand-computed tests of test_sscd.py left open, found by
mutation testing (scripts/mutation_score.py, docs/mutation.md): every input check on its own and at
its boundary, with its message; default arguments; output dtypes; ties; edge grids."""
import math

import pytest
import torch

from utils import sscd

F32 = torch.float32


def image(b=2, c=1, h=8, w=8, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ every ValueError, alone, with its words

ERRORS = [
    (lambda: sscd.bcp_box_mask(0, 4, 4), r"batch, height, width must be >= 1, got 0, 4, 4"),
    (lambda: sscd.bcp_box_mask(2, 0, 4), r"batch, height, width must be >= 1, got 2, 0, 4"),
    (lambda: sscd.bcp_box_mask(2, 4, 0), r"batch, height, width must be >= 1, got 2, 4, 0"),
    (lambda: sscd.bcp_box_mask(2, 4, 4, ratio=1.5), r"ratio must lie in \(0, 1\], got 1.5"),
    (lambda: sscd.mix(image(), image(c=2), torch.ones(2, 8, 8)),
     r"a and b must have the same shape, got \(2, 1, 8, 8\) and \(2, 2, 8, 8\)"),
    (lambda: sscd.mix(torch.ones(8, 8), torch.ones(8, 8), torch.ones(8, 8)), r"expected \(B, H, W\) or \(B, C, H, W\), got \(8, 8\)"),
    (lambda: sscd.mix(image(), image(), torch.ones(2, 4, 8)), r"box_mask \(2, 4, 8\) does not match \(2, 1, 8, 8\)"),
    (lambda: sscd.entropy_map(torch.ones(2, 8, 8)), r"logits must be \(B, C, H, W\), got \(2, 8, 8\)"),
    (lambda: sscd.sda_mask(image(c=3), 1.5), r"alpha must lie in \[0, 1\], got 1.5"),
    (lambda: sscd.apply_sda(torch.ones(2, 8, 8), torch.ones(2, 8, 8), torch.ones(2, 8, 8)),
     r"expected image \(B,C,H,W\), label and mask \(B,H,W\); got \(2, 8, 8\), \(2, 8, 8\), \(2, 8, 8\)"),
    (lambda: sscd.apply_sda(image(), torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8)),
     r"got \(2, 1, 8, 8\), \(2, 1, 8, 8\), \(2, 1, 8, 8\)"),
    (lambda: sscd.apply_sda(image(), torch.ones(2, 8, 8), torch.ones(2, 4, 8)), r"got \(2, 1, 8, 8\), \(2, 8, 8\), \(2, 4, 8\)"),
    (lambda: sscd.apply_sda(image(b=3), torch.ones(2, 8, 8), torch.ones(2, 8, 8)),
     r"image \(3, 1, 8, 8\) and label \(2, 8, 8\) do not match"),
    (lambda: sscd.apply_sda(image(h=4), torch.ones(2, 8, 8), torch.ones(2, 8, 8)),
     r"image \(2, 1, 4, 8\) and label \(2, 8, 8\) do not match"),
    (lambda: sscd.hca_maps([image(c=3)], [1.0], combine="mean"), r"combine must be one of .*, got 'mean'"),
    (lambda: sscd.hca_maps([image(c=3)], [1.0, 1.0]), r"need one weight per head, got 1 heads and 2 weights"),
    (lambda: sscd.hca_maps([], []), r"need one weight per head, got 0 heads and 0 weights"),
    (lambda: sscd.hca_maps([image(c=3)], [-1.0]), r"HCA weights must be finite and >= 0, got \[-1.0\]"),
    (lambda: sscd.hca_maps([image(c=3)], [0.0]), r"HCA weights must not all be zero, got \[0.0\]"),
    (lambda: sscd.hca_maps([image(c=3), image(c=3, h=4)], [1.0, 1.0]),
     r"head 1 has shape \(2, 3, 4, 8\), expected \(B, C, H, W\) = \(2, 3, 8, 8\)"),
    (lambda: sscd.region_means(torch.ones(8, 8), 4), r"expected \(B, H, W\) or \(B, C, H, W\), got \(8, 8\)"),
    (lambda: sscd.region_means(torch.ones(2, 8, 8), 2.0), r"patch_size must be a positive int, got 2.0"),
    (lambda: sscd.region_means(torch.ones(2, 8, 8), 0), r"patch_size must be a positive int, got 0"),
    (lambda: sscd.region_means(torch.ones(2, 8, 6), 4), r"patch_size=4 does not divide the size 8x6"),
    (lambda: sscd.neighbour_contrast(torch.ones(8, 8)), r"scores must be \(B, gh, gw\), got \(8, 8\)"),
    (lambda: sscd.region_hardness(torch.ones(2, 8, 8), 4, rank_by="entropy"), r"rank_by must be one of .*'entropy'"),
    (lambda: sscd.region_hardness(torch.ones(8, 8), 4), r"confidence must be \(B, H, W\), got \(8, 8\)"),
    (lambda: sscd.disc_mask(2.0), r"patch_size must be a positive int, got 2.0"),
    (lambda: sscd.disc_mask(0), r"patch_size must be a positive int, got 0"),
    (lambda: sscd.largest_component_per_class(torch.ones(8, 8, dtype=torch.long), 3), r"labels must be \(B, H, W\), got \(8, 8\)"),
    (lambda: sscd.largest_component_per_class(torch.ones(2, 8, 8), 3), r"labels must be an integer tensor, got torch.float32"),
    (lambda: sscd.largest_component_per_class_device(torch.ones(8, 8, dtype=torch.long), 3),
     r"labels must be \(B, H, W\), got \(8, 8\)"),
    (lambda: sscd.largest_component_per_class_device(torch.ones(2, 8, 8), 3),
     r"labels must be an integer tensor, got torch.float32"),
    (lambda: sscd.pseudo_labels(image(c=3), 4), r"logits must be \(B, 4, H, W\), got \(2, 3, 8, 8\)"),
    (lambda: sscd.pseudo_labels(torch.ones(2, 8, 8), 4), r"logits must be \(B, 4, H, W\), got \(2, 8, 8\)"),
    (lambda: sscd.pseudo_labels(image(c=4), 4, lcc_impl="cuda"), r"lcc_impl must be one of .*'cuda'"),
    (lambda: sscd.center_disc_mask(0, 4, 1), r"need height, width >= 1 and radius >= 0, got 0, 4, 1"),
    (lambda: sscd.center_disc_mask(4, 0, 1), r"need height, width >= 1 and radius >= 0, got 4, 0, 1"),
    (lambda: sscd.center_disc_mask(4, 4, -1), r"need height, width >= 1 and radius >= 0, got 4, 4, -1"),
    (lambda: sscd.center_disc_dice(torch.ones(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), 2),
     r"probs must be \(B, C, H, W\), got \(2, 8, 8\)"),
    (lambda: sscd.parse_hca_schedule(None), r"empty HCA schedule: None"),
    (lambda: sscd.parse_hca_schedule("  "), r"empty HCA schedule: '  '"),
    (lambda: sscd.parse_hca_schedule("1,0,0"), r"stage 1 \('1,0,0'\) has 3 weights, expected 4"),
    (lambda: sscd.parse_hca_schedule("1,0,0,0;a,0,0,1"), r"stage 2 \('a,0,0,1'\) has a non-numeric weight"),
    (lambda: sscd.parse_hca_schedule("1,0,0,nan"), r"stage 1 \('1,0,0,nan'\) has a negative or non-finite weight"),
    (lambda: sscd.parse_hca_schedule("1,0,0,-1"), r"has a negative or non-finite weight"),
    (lambda: sscd.parse_hca_schedule("0,0,0,0"), r"stage 1 \('0,0,0,0'\) has all-zero weights"),
    (lambda: sscd.cross_weight(3, -1), r"rampup must be >= 0, got -1"),
    (lambda: sscd.split_iterations(True, 2), r"total and n_stages must be ints, got True, 2"),
    (lambda: sscd.split_iterations(4, True), r"total and n_stages must be ints, got 4, True"),
    (lambda: sscd.split_iterations(4.0, 2), r"total and n_stages must be ints, got 4.0, 2"),
    (lambda: sscd.split_iterations(4, 2.0), r"total and n_stages must be ints, got 4, 2.0"),
    (lambda: sscd.split_iterations(4, 0), r"n_stages must be >= 1, got 0"),
    (lambda: sscd.split_iterations(2, 3), r"total=2 iterations cannot give each of 3 stages at least 1"),
]


@pytest.mark.parametrize("call,message", ERRORS, ids=[str(k) for k in range(len(ERRORS))])
def test_each_check_alone_names_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def cgsr_inputs(b=4, c=1, size=8, patch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = (size // patch) ** 2
    return dict(x_w=torch.rand(b, c, size, size, generator=g), x_s=torch.rand(b, c, size, size, generator=g),
                hard_w=torch.rand(b, r, generator=g), hard_s=torch.rand(b, r, generator=g),
                cls_w=torch.rand(b, 3, size // patch, size // patch, generator=g),
                cls_s=torch.rand(b, 3, size // patch, size // patch, generator=g), patch=patch)


@pytest.mark.parametrize("change,message", [
    (dict(direction="sideways"), r"direction must be one of .*'sideways'"),
    (dict(paste="circle"), r"paste must be one of .*'circle'"),
    (dict(x_s=torch.rand(4, 1, 8, 4)), r"x_w and x_s must be equal \(B, C, H, W\), got \(4, 1, 8, 8\), \(4, 1, 8, 4\)"),
    (dict(hard_w=torch.rand(4, 3)), r"hard_w must be \(B, R\) = \(4, 4\), got \(4, 3\)"),
    (dict(hard_s=torch.rand(3, 4)), r"hard_s must be \(B, R\) = \(4, 4\), got \(3, 4\)"),
    (dict(cls_w=torch.rand(3, 3, 2, 2)), r"cls_w must be \(B, K, 2, 2\), got \(3, 3, 2, 2\)"),
    (dict(cls_s=torch.rand(4, 3, 4)), r"cls_s must be \(B, K, 2, 2\), got \(4, 3, 4\)"),
    (dict(cls_s=torch.rand(4, 3, 2, 1)), r"cls_s must be \(B, K, 2, 2\), got \(4, 3, 2, 1\)"),
    (dict(cls_s=torch.rand(4, 2, 2, 2)), r"cls_w \(4, 3, 2, 2\) and cls_s \(4, 2, 2, 2\) differ"),
    (dict(top_num=0), r"top_num must be an int in \[1, 4\], got 0"),
    (dict(top_num=5), r"top_num must be an int in \[1, 4\], got 5"),
    (dict(top_num=2.0), r"top_num must be an int in \[1, 4\], got 2.0"),
    (dict(kl_prob=1.5), r"kl_prob must lie in \[0, 1\], got 1.5"),
    (dict(kl_prob=-0.1), r"kl_prob must lie in \[0, 1\], got -0.1"),
])
def test_cgsr_checks_each_input_alone(change, message):
    with pytest.raises(ValueError, match=message):
        sscd.cgsr(**{**cgsr_inputs(), **change})


# ------------------------------------------------------------------ boundaries that must be accepted

def test_smallest_valid_inputs_are_accepted():
    assert sscd.bcp_box_mask(1, 1, 1, ratio=1.0).tolist() == [[[0.0]]]  # the whole 1x1 image is the box
    assert sscd.region_means(torch.arange(4.0).view(1, 2, 2), 1).tolist() == [[[0.0, 1.0], [2.0, 3.0]]]
    assert sscd.disc_mask(1).tolist() == [[0.0]]  # (0 - 0.5)^2 x 2 > 0.5^2: the formula leaves a 1-pixel disc empty
    assert sscd.center_disc_mask(1, 1, 0).tolist() == [[1.0]]
    assert sscd.split_iterations(5, 1) == [5]
    assert sscd.hca_maps([image(c=3)], [1.0])[0].shape == (2, 8, 8)  # a single head
    out = sscd.cgsr(**cgsr_inputs(), top_num=1, kl_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert out[2]["kl_branch"].all()
    assert sscd.sda_mask(image(b=1, c=3, h=4, w=4), 1 / 16).sum() == 1  # k = 1: one pixel


def test_defaults_are_the_documented_ones():
    heads = [image(c=3, seed=k) for k in range(2)]
    assert torch.equal(sscd.hca_maps(heads, [1.0, 1.0])[0], sscd.hca_maps(heads, [1.0, 1.0], "max_softmax")[0])
    conf = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sscd.region_hardness(conf, 4), 1.0 - sscd.region_means(conf, 4).flatten(1))
    inputs = cgsr_inputs(b=16, size=16, seed=3)  # 16 regions, so that top_num 4 vs 5 can matter
    default = sscd.cgsr(**inputs, generator=torch.Generator().manual_seed(5))
    explicit = sscd.cgsr(**inputs, top_num=4, kl_prob=0.5, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(default[2][k], explicit[2][k]) for k in default[2])
    assert 0 < int(default[2]["kl_branch"].sum()) < 16  # kl_prob 0.5: both branches occur
    for other in (dict(top_num=5), dict(kl_prob=1.0)):
        changed = sscd.cgsr(**inputs, **other, generator=torch.Generator().manual_seed(5))[2]
        assert any(not torch.equal(default[2][k], changed[k]) for k in default[2]), other
    probs = torch.softmax(image(c=2, h=16, w=16), 1)
    target = torch.randint(0, 2, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    assert sscd.center_disc_dice(probs, target, 2) == sscd.center_disc_dice(probs, target, 2, radius=4.0)
    assert sscd.center_disc_dice(probs, target, 2) != sscd.center_disc_dice(probs, target, 2, radius=16 / 5)


# ------------------------------------------------------------------ dtypes, masks and hand-computed edges

def test_masks_are_float32_and_keep_the_inputs_dtypes():
    assert sscd.bcp_box_mask(2, 4, 4).dtype == F32 and sscd.disc_mask(4).dtype == F32
    assert sscd.center_disc_mask(4, 4, 1).dtype == F32
    a, b = image().double(), image(seed=1).double()
    assert sscd.mix(a.float(), b.float(), torch.ones(2, 8, 8, dtype=torch.float64)).dtype == F32
    img, lab = sscd.apply_sda(image(), torch.ones(2, 8, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.float64))
    assert img.dtype == F32 and lab.dtype == torch.long


def test_mix_broadcasts_a_batch_mask_over_the_channels():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    box = torch.ones(2, 4, 4)
    box[0, :2] = 0  # image 0: its top half from b
    out = sscd.mix(a, b, box)
    assert out[0, :, :2].eq(1).all() and out[0, :, 2:].eq(0).all() and out[1].eq(0).all()
    labels = sscd.mix(torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4, dtype=torch.long),
                      torch.full((2, 4, 4), 0.5))
    assert labels.eq(1).all()  # integer maps read the mask as M > 0.5: 0.5 takes b


def test_sda_ties_keep_the_earliest_pixels():
    logits = torch.zeros(1, 3, 16, 16)  # every pixel has the same entropy
    mask = sscd.sda_mask(logits, 0.25)
    assert mask.view(-1)[:64].eq(1).all() and mask.view(-1)[64:].eq(0).all()


def test_neighbour_contrast_hand_values_and_one_neighbour():
    s = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 4.0]]])
    out = sscd.neighbour_contrast(s)
    # centre (1,1): |2-1| + |2-2| + |2-2| + |2-0| over 4; corner (0,0): |0-1| + |0-2| over 2
    assert out[0, 1, 1].item() == pytest.approx(3 / 4) and out[0, 0, 0].item() == pytest.approx(3 / 2)
    assert out[0, 1, 0].item() == pytest.approx((2 + 0 + 2) / 3)
    assert sscd.neighbour_contrast(torch.tensor([[[1.0, 4.0]]])).tolist() == [[[3.0, 3.0]]]  # one neighbour each


def test_region_distributions_sum_to_one_over_the_classes():
    d = sscd._as_distribution(torch.rand(2, 3, 2, 4, generator=torch.Generator().manual_seed(0)))
    assert d.shape == (2, 8, 3) and torch.allclose(d.sum(-1), torch.ones(2, 8))


def test_cgsr_picks_per_image_kl_minimisers_and_carries_channels():
    inputs = cgsr_inputs(b=6, c=3, size=16, seed=4)
    x_s2w, x_w2s, info = sscd.cgsr(**inputs, kl_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert x_s2w.shape == (6, 3, 16, 16)
    p_w, p_s = sscd._as_distribution(inputs["cls_w"]), sscd._as_distribution(inputs["cls_s"])
    for i in range(6):  # c* among x_s's 4 easiest regions minimises KL(p_w[b] || p_s[c]), image by image
        cand = torch.sort(inputs["hard_s"][i], stable=True).indices[:4]
        b = int(inputs["hard_w"][i].argmax())
        kl = (p_w[i, b] * (p_w[i, b].log() - p_s[i, cand].log())).sum(-1)
        assert int(info["dst_s"][i]) == int(cand[kl.argmin()])


def test_cgsr_candidates_on_tied_hardness_are_the_earliest_regions():
    inputs = cgsr_inputs(b=2, size=16, seed=6)
    inputs["hard_w"] = torch.zeros(2, 16)
    inputs["hard_s"] = torch.zeros(2, 16)
    info = sscd.cgsr(**inputs, kl_prob=0.0)[2]  # plain swap: the first of the easiest
    assert info["dst_w"].tolist() == [0, 0] and info["dst_s"].tolist() == [0, 0]


def test_lcc_keeps_every_background_region():
    labels = torch.zeros(1, 5, 5, dtype=torch.long)
    labels[0, :, 2] = 1  # one foreground column splits the background in two
    labels[0, 0, 0] = 2
    out = sscd.largest_component_per_class(labels, 3)
    assert torch.equal(out, labels)


def test_center_disc_mask_hand_values_on_an_odd_grid():
    mask = sscd.center_disc_mask(7, 9, 3)  # centre (3, 4), radius 3: squared 9 (not 2 x 3 = 6)
    expected = torch.zeros(7, 9)
    for y in range(7):
        for x in range(9):
            expected[y, x] = float((y - 3) ** 2 + (x - 4) ** 2 <= 9)
    assert torch.equal(mask, expected)


def test_center_disc_dice_weights_by_the_given_mask():
    probs = torch.softmax(image(c=2, h=16, w=16), 1)
    target = torch.randint(0, 2, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    half = torch.full((2, 16, 16), 0.5)
    half[:, :8] = 1.0
    disc = sscd.center_disc_mask(16, 16, 4.0).expand(2, 16, 16)
    assert sscd.center_disc_dice(probs, target, 2, mask=half) == pytest.approx(
        float(sscd.dice_loss(probs, target, 2, mask=disc * half)), abs=0)
    assert sscd.center_disc_dice(probs, target, 2, mask=half) != sscd.center_disc_dice(probs, target, 2)


def test_schedule_keeps_every_stage_before_a_trailing_separator():
    assert sscd.parse_hca_schedule("1,0,0,0;0,1,0,0;") == [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0)]
    assert math.isclose(sscd.cross_weight(0, 10), math.exp(-5))


def test_cross_weight_hand_values():
    assert sscd.cross_weight(5, 0) == 1.0 and sscd.cross_weight(-3, 0) == 1.0
    assert sscd.cross_weight(0, 10) == pytest.approx(math.exp(-5.0))
    assert sscd.cross_weight(5, 10) == pytest.approx(math.exp(-5.0 * 0.25))
    assert sscd.cross_weight(10, 10) == 1.0 and sscd.cross_weight(25, 10) == 1.0
    assert sscd.cross_weight(-4, 10) == pytest.approx(math.exp(-5.0))  # before the start: the start's weight



def test_the_box_is_a_function_of_the_generator_alone():
    """Both corners come from ``generator``: the global RNG (dropout's) neither moves the box nor is
    moved by it."""
    boxes = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        gen = torch.Generator().manual_seed(7)
        boxes.append(torch.stack([sscd.bcp_box_mask(1, 24, 30, generator=gen)[0] for _ in range(6)]))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(boxes[0], boxes[1])
    lefts = {int((b == 0).float().argmax(dim=1).max()) for b in boxes[0]}  # the box's left edge per draw
    assert len(lefts) > 1  # the corner does move from draw to draw
