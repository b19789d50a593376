"""Tests for code/utils/losses.py on tiny hand-made tensors with hand-computed values."""
import math

import pytest
import torch

from utils.losses import ce_dice_loss, dice_loss, masked_ce, mix_loss, one_hot

EPS = 1e-5


def onehot_logits(labels, num_classes, scale=50.0):
    """(B, H, W) labels -> (B, C, H, W) logits, `scale` on the labelled class, 0 elsewhere."""
    return scale * one_hot(labels, num_classes)


def d(inter, s_sum, t_sum):
    return 1 - (2 * inter + EPS) / (s_sum + t_sum + EPS)


# 1x2x2x2 example: class-0 probabilities [[.9,.3],[.6,.2]], target [[0,0],[0,1]]
PROBS = torch.tensor([[[[0.9, 0.3], [0.6, 0.2]],
                       [[0.1, 0.7], [0.4, 0.8]]]])
TARGET = torch.tensor([[[0, 0], [0, 1]]])


def test_one_hot():
    t = torch.tensor([[[0, 2], [1, 0]]])
    oh = one_hot(t, 3)
    assert oh.shape == (1, 3, 2, 2)
    assert torch.equal(oh[0, 0], torch.tensor([[1.0, 0], [0, 1]]))
    assert torch.equal(oh[0, 1], torch.tensor([[0.0, 0], [1, 0]]))
    assert torch.equal(oh[0, 2], torch.tensor([[0.0, 1], [0, 0]]))


def test_dice_hand_value_unmasked():
    # class 0: s=[.9,.3,.6,.2], t=[1,1,1,0]: inter 1.8, sum s^2 1.30, sum t^2 3
    # class 1: s=[.1,.7,.4,.8], t=[0,0,0,1]: inter 0.8, sum s^2 1.30, sum t^2 1
    expected = (d(1.8, 1.30, 3.0) + d(0.8, 1.30, 1.0)) / 2
    assert math.isclose(expected, (0.7 / 4.3 + 0.7 / 2.3) / 2, rel_tol=1e-4)
    assert dice_loss(PROBS, TARGET, 2).item() == pytest.approx(expected, rel=1e-6)
    # the mask-free path equals an all-ones mask bit for bit, for any layout of the probabilities
    probs = torch.softmax(torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 1)
    target = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(1))
    for p in (probs, probs.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(dice_loss(p, target, 4), dice_loss(p, target, 4, mask=torch.ones(3, 16, 16)))


def test_dice_hand_value_masked():
    mask = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    # pixels 0, 1, 3 -- class 0: s=[.9,.3,.2] t=[1,1,0]: inter 1.2, s^2 .94, t^2 2
    #                  class 1: s=[.1,.7,.8] t=[0,0,1]: inter 0.8, s^2 1.14, t^2 1
    expected = (d(1.2, 0.94, 2.0) + d(0.8, 1.14, 1.0)) / 2
    assert dice_loss(PROBS, TARGET, 2, mask=mask).item() == pytest.approx(expected, rel=1e-6)
    # fractional mask: weight 0.5 on pixel 1 only
    mask = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    # class 0: inter .9+.5*.3=1.05; s^2 .81+.5*.09=.855; t^2 1.5 ; class 1: inter 0; s^2 .01+.5*.49=.255; t^2 0
    expected = (d(1.05, 0.855, 1.5) + d(0.0, 0.255, 0.0)) / 2
    assert dice_loss(PROBS, TARGET, 2, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_masked_dice_perfect_inside_wrong_outside_is_zero():
    target = torch.tensor([[[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2], [0, 0, 3, 3]]])
    mask = torch.tensor([[[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]])
    pred = target.clone()
    pred[0, 2:] = (target[0, 2:] + 1) % 4          # wrong everywhere outside the mask
    logits = onehot_logits(pred, 4)
    probs = torch.softmax(logits, dim=1)
    assert dice_loss(probs, target, 4, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_ce(logits, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    # unmasked they are clearly wrong (half of the pixels misclassified, CE ~ 50 on them)
    assert dice_loss(probs, target, 4).item() > 0.3
    assert masked_ce(logits, target).item() == pytest.approx(25.0, rel=1e-3)


def test_every_class_contributes_under_a_mask():
    # Defect D1 (mask one-hot encoded) gives classes 2-3 exactly zero Dice; here they must count.
    target = torch.tensor([[[0, 1], [2, 3], [1, 1]]])
    pred = torch.tensor([[[0, 1], [2, 0], [3, 3]]])   # only the class-3 pixel wrong inside the mask
    mask = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    probs = torch.softmax(onehot_logits(pred, 4), dim=1)
    # class 0: inter 1, s^2 2, t^2 1 -> 1/3; classes 1, 2: 0; class 3: inter 0, s^2 0, t^2 1 -> ~1
    expected = (d(1, 2, 1) + 0 + 0 + d(0, 0, 1)) / 4
    assert expected == pytest.approx(1 / 3, rel=1e-4)
    assert dice_loss(probs, target, 4, mask=mask).item() == pytest.approx(expected, abs=1e-6)
    # a region where class 3 is predicted as class 2 (all inside the mask): classes 2 and 3 ~ 1
    target = torch.full((1, 2, 2), 3)
    probs = torch.softmax(onehot_logits(torch.full((1, 2, 2), 2), 4), dim=1)
    assert dice_loss(probs, target, 4, mask=torch.ones(1, 2, 2)).item() == pytest.approx(0.5, abs=1e-5)


def test_one_hot_dtype_and_shape_check():
    assert one_hot(torch.tensor([[[0, 1]]]), 2).dtype == torch.float32
    assert one_hot(torch.tensor([[[0, 1]]]), 2, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\), got \(2, 2\)"):
        one_hot(torch.zeros(2, 2, dtype=torch.long), 2)


def test_dice_checks_shapes():
    with pytest.raises(ValueError, match=r"probs has 2 channels, num_classes is 3"):
        dice_loss(PROBS, TARGET, 3)
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\) = \(1, 2, 2\), got \(2, 2\)"):
        dice_loss(PROBS, TARGET[0], 2)
    with pytest.raises(ValueError, match=r"mask must be \(B, H, W\) = \(1, 2, 2\), got \(1, 3, 2\)"):
        dice_loss(PROBS, TARGET, 2, mask=torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match=r"probs must be \(B, C, H, W\), got \(2, 2, 2\)"):
        dice_loss(PROBS[0], TARGET, 2)


def test_losses_keep_the_probabilities_dtype_whatever_the_masks():
    """A float64 (or bool) mask weights the pixels without turning the float32 loss into float64."""
    for mask in (torch.ones(1, 2, 2, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.bool)):
        assert dice_loss(PROBS, TARGET, 2, mask=mask).dtype == torch.float32
        assert masked_ce(PROBS.log(), TARGET, mask).dtype == torch.float32


def test_masked_ce_checks_shapes():
    with pytest.raises(ValueError, match=r"expected logits \(B,C,H,W\) and target \(B,H,W\), got \(1, 2, 2, 2\), "
                                         r"\(1, 1, 2, 2\)"):
        masked_ce(PROBS, TARGET[None])  # a 4-D logits tensor and a 4-D target: one wrong is enough
    with pytest.raises(ValueError, match=r"expected logits .* got \(2, 2, 2\), \(1, 2, 2\)"):
        masked_ce(PROBS[0], TARGET)
    with pytest.raises(ValueError, match=r"mask must be \(B, H, W\) = \(1, 2, 2\), got \(2, 2\)"):
        masked_ce(PROBS, TARGET, torch.ones(2, 2))


def test_masked_ce_hand_value():
    # pixel 0: uniform logits, CE ln 2; pixel 1: p(target)=.75, CE -ln .75
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])   # (1, 2, 1, 2)
    target = torch.tensor([[[1, 1]]])
    mask = torch.tensor([[[1.0, 0.5]]])
    expected = (math.log(2) + 0.5 * -math.log(0.75)) / 1.5
    assert masked_ce(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_ce(logits, target).item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)
    # empty mask -> 0, not NaN
    assert masked_ce(logits, target, torch.zeros(1, 1, 2)).item() == 0.0


def _mix_case(wrong_region):
    """4x4 image, box = right half (box_mask 0 there). Targets: outside class 1, inside class 3.
    The prediction is the correct target except in `wrong_region`, where it predicts class 2."""
    box = torch.ones(1, 4, 4)
    box[0, :, 2:] = 0
    target_out = torch.full((1, 4, 4), 1)
    target_in = torch.full((1, 4, 4), 3)
    pred = torch.where(box > 0.5, target_out, target_in)
    region = box > 0.5 if wrong_region == "out" else box < 0.5
    pred[region] = 2
    return onehot_logits(pred, 4), target_out, target_in, box


def test_mix_loss_weights_regions():
    # A fully wrong region (true class t, predicted class 2 != t) has Dice ~ (0+1+1+0)/4 = 0.5
    # and CE ~ 50 (logsumexp(50,0,0,0) - 0); a perfect region has ~0 of both.
    logits, t_out, t_in, box = _mix_case("in")
    dice, ce = mix_loss(logits, t_out, t_in, box, weight_out=0.5, weight_in=1.0, num_classes=4, dice="region")
    assert dice.item() == pytest.approx(1.0 * 0.5, abs=1e-4)
    assert ce.item() == pytest.approx(1.0 * 50.0, rel=1e-4)
    logits, t_out, t_in, box = _mix_case("out")
    dice, ce = mix_loss(logits, t_out, t_in, box, weight_out=0.5, weight_in=1.0, num_classes=4, dice="region")
    assert dice.item() == pytest.approx(0.5 * 0.5, abs=1e-4)
    assert ce.item() == pytest.approx(0.5 * 50.0, rel=1e-4)
    # swapping the weights swaps the result
    dice, ce = mix_loss(logits, t_out, t_in, box, weight_out=1.0, weight_in=0.5, num_classes=4, dice="region")
    assert dice.item() == pytest.approx(0.5, abs=1e-4)
    assert ce.item() == pytest.approx(50.0, rel=1e-4)


def test_mix_loss_equals_weighted_masked_terms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    t_out = torch.randint(0, 3, (2, 5, 5), generator=g)
    t_in = torch.randint(0, 3, (2, 5, 5), generator=g)
    box = torch.ones(2, 5, 5)
    box[:, 1:4, 0:3] = 0
    p = torch.softmax(logits, dim=1)
    ce_expected = 0.5 * masked_ce(logits, t_out, box).item() + masked_ce(logits, t_in, 1 - box).item()
    dice, ce = mix_loss(logits, t_out, t_in, box, 0.5, 1.0, 3, dice="region")
    assert dice.item() == pytest.approx(0.5 * dice_loss(p, t_out, 3, box).item()
                                        + dice_loss(p, t_in, 3, 1 - box).item(), rel=1e-6)
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    dice, ce = mix_loss(logits, t_out, t_in, box, 0.5, 1.0, 3)  # joint: one Dice over the mixed target
    mixed = torch.where(box > 0.5, t_out, t_in)
    assert dice.item() == pytest.approx(dice_loss(p, mixed, 3, 0.5 * box + (1 - box)).item(), rel=1e-6)
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    # with equal weights the joint Dice is the plain Dice of the mixed label
    dice, _ = mix_loss(logits, t_out, t_in, box, 1.0, 1.0, 3)
    assert dice.item() == pytest.approx(dice_loss(p, mixed, 3).item(), rel=1e-6)


def test_mix_loss_box_cut_fragment_hand_values():
    # 4x4, two classes; class 1 is the 2x2 block rows 1-2, cols 1-2; the box (inside, M = 0) is
    # columns 0-1, so the box edge cuts the block in two. The prediction finds only its inside half.
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    pred = torch.zeros_like(target)
    pred[0, 1:3, 1] = 1
    logits = onehot_logits(pred, 2)
    box = torch.ones(1, 4, 4)
    box[0, :, 0:2] = 0
    # joint, weights 1/1: class 1 inter 2, sums 2 + 4 -> 1/3; class 0 inter 12, sums 14 + 12 -> 1/13
    dice, _ = mix_loss(logits, target, target, box, 1.0, 1.0, 2)
    assert dice.item() == pytest.approx((1 / 3 + 1 / 13) / 2, abs=1e-5)
    # joint, outside weighted 0.5: class 1 inter 2, sums 2 + (2 + 0.5*2) -> 1/5; class 0 inter
    # 6 + 0.5*6 = 9, sums (6 + 0.5*8) + (6 + 0.5*6) = 19 -> 1/19
    dice, _ = mix_loss(logits, target, target, box, 0.5, 1.0, 2)
    assert dice.item() == pytest.approx((1 / 5 + 1 / 19) / 2, abs=1e-5)
    # region: inside perfect (0); outside class 1 is a missed 2-pixel fragment (~1) and class 0
    # inter 6, sums 8 + 6 -> 1/7: the fragment weighs as much as a whole structure
    dice, _ = mix_loss(logits, target, target, box, 1.0, 1.0, 2, dice="region")
    assert dice.item() == pytest.approx((1 + 1 / 7) / 2, abs=1e-4)
    with pytest.raises(ValueError, match="dice must be one of"):
        mix_loss(logits, target, target, box, 1.0, 1.0, 2, dice="both")


def test_ce_dice_loss_hand_value():
    logits = torch.zeros(1, 2, 1, 2)                  # uniform: CE ln 2 everywhere
    target = torch.tensor([[[0, 1]]])
    # Dice per class: s=[.5,.5], one target pixel: inter .5, s^2 .5, t^2 1 -> 1 - (1+eps)/(1.5+eps)
    expected = 0.5 * (math.log(2) + d(0.5, 0.5, 1.0))
    assert ce_dice_loss(logits, target, 2).item() == pytest.approx(expected, rel=1e-6)
    perfect = onehot_logits(torch.tensor([[[0, 1], [2, 3]]]), 4)
    assert ce_dice_loss(perfect, torch.tensor([[[0, 1], [2, 3]]]), 4).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_have_gradients():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 1], [1, 1]]])
    box = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    dice, ce = mix_loss(logits, target, target, box, 0.5, 1.0, 2)
    (dice + ce + ce_dice_loss(logits, target, 2)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
