"""Segmentation losses for SSCD: (masked) Dice, masked cross entropy, the BCP mix loss and the
supervised CE + Dice.

Shapes: ``probs`` (B, C, H, W) softmax probabilities, ``logits`` (B, C, H, W), ``target``
(B, H, W) integer class map with values in [0, C), masks (B, H, W) float in [0, 1].
All functions return 0-d tensors on the inputs' device.
"""
import torch
import torch.nn.functional as F

__all__ = ["one_hot", "dice_loss", "masked_ce", "MIX_DICE", "mix_loss", "ce_dice_loss"]


def one_hot(target, num_classes, dtype=torch.float32):
    """(B, H, W) integer labels -> (B, C, H, W) one-hot of ``dtype`` (values outside [0, C) give
    an all-zero row; no host sync for a range check)."""
    if target.dim() != 3:
        raise ValueError(f"target must be (B, H, W), got {tuple(target.shape)}")
    classes = torch.arange(num_classes, device=target.device).view(1, num_classes, 1, 1)
    return (target.unsqueeze(1).long() == classes).to(dtype)


def _check(probs, target, num_classes, mask):
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, C, H, W), got {tuple(probs.shape)}")
    b, c, h, w = probs.shape
    if c != num_classes:
        raise ValueError(f"probs has {c} channels, num_classes is {num_classes}")
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = {(b, h, w)}, got {tuple(target.shape)}")
    if mask is not None and tuple(mask.shape) != (b, h, w):
        raise ValueError(f"mask must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")


def dice_loss(probs, target, num_classes, mask=None, eps=1e-5):
    """Soft Dice loss, mean over all classes (background included).

    Per class c: ``1 - (2 sum s_c t_c m + eps) / (sum s_c^2 m + sum t_c^2 m + eps)``, sums over
    batch and pixels, ``s`` = probs, ``t`` = one-hot target, ``m`` = mask (all ones if None).
    The mask weights pixels and applies to every class (the reference one-hot-encoded the mask,
    defect D1, so classes 2-3 got no Dice; not reproduced). A class absent from both prediction
    and target in the region scores 0 loss.
    """
    _check(probs, target, num_classes, mask)
    t = one_hot(target, num_classes, probs.dtype)
    dims = (0, 2, 3)
    if mask is None:  # m = 1: the products with it are skipped (exact)
        inter, s_sum, t_sum = (probs * t).sum(dims), (probs * probs).sum(dims), t.sum(dims)
    else:  # t is 0/1, so t^2 m = t m exactly
        m = mask.to(probs.dtype).unsqueeze(1)
        inter, s_sum, t_sum = (probs * t * m).sum(dims), (probs * probs * m).sum(dims), (t * m).sum(dims)
    per_class = 1.0 - (2.0 * inter + eps) / (s_sum + t_sum + eps)
    return per_class.mean()


def masked_ce(logits, target, mask=None):
    """Pixel cross entropy averaged over the mask: ``sum(CE * m) / (sum(m) + 1e-16)``;
    without a mask the plain mean over all pixels. logits (B, C, H, W), target (B, H, W)."""
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(f"expected logits (B,C,H,W) and target (B,H,W), got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)}")
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    if mask is None:
        return ce.mean()
    if mask.shape != ce.shape:
        raise ValueError(f"mask must be (B, H, W) = {tuple(ce.shape)}, got {tuple(mask.shape)}")
    m = mask.to(ce.dtype)
    return (ce * m).sum() / (m.sum() + 1e-16)


MIX_DICE = ("joint", "region")


def mix_loss(logits, target_out, target_in, box_mask, weight_out, weight_in, num_classes, dice="joint"):
    """BCP mix loss on a copy-paste mixed image. Returns ``(dice, ce)``.

    ``box_mask`` (B, H, W) is 1 outside the pasted box, 0 inside. Outside is supervised by
    ``target_out`` with ``weight_out``, inside by ``target_in`` with ``weight_in``;
    ``ce = w_out masked_ce(logits, target_out, box) + w_in masked_ce(logits, target_in, 1-box)``
    (the reference's CE). The Dice, every class counted:

    * ``dice="joint"`` (default): one Dice per class over the whole image against the mixed target
      (``target_out`` outside, ``target_in`` inside), each pixel weighted by its region's weight:
      ``dice_loss(softmax, mixed target, mask=w_out * box + w_in * (1 - box))``.
    * ``dice="region"``: a separate Dice per region, ``w_out dice_loss(.., target_out, mask=box)
      + w_in dice_loss(.., target_in, mask=1-box)``, what BCP's masked Dice meant to compute. A
      structure cut by the box edge leaves a few-pixel fragment in one region whose Dice weighs as
      much as a whole structure. On real ACDC (7 labeled patients, 128^2, 600 pre-training
      iterations at lr 0.05) the pre-training reached best val Dice 0.41 with it against 0.61 with
      ``joint`` (docs/results.md, 2.5; docs/method.md, "The mix-loss Dice").

    (Reference: pseudo-labeled region weight u_weight = 0.5, ground-truth region 1.0; its masked
    Dice scored only background and class 1, defect D1.)
    """
    if dice not in MIX_DICE:
        raise ValueError(f"dice must be one of {MIX_DICE}, got {dice!r}")
    probs = torch.softmax(logits, dim=1)
    box = box_mask.to(probs.dtype).expand(probs.shape[0], *probs.shape[2:])
    inside = 1.0 - box
    if dice == "joint":
        mixed = torch.where(box > 0.5, target_out, target_in)
        d = dice_loss(probs, mixed, num_classes, mask=weight_out * box + weight_in * inside)
    else:
        d = weight_out * dice_loss(probs, target_out, num_classes, mask=box) \
            + weight_in * dice_loss(probs, target_in, num_classes, mask=inside)
    ce = weight_out * masked_ce(logits, target_out, box) + weight_in * masked_ce(logits, target_in, inside)
    return d, ce


def ce_dice_loss(logits, target, num_classes):
    """Supervised loss on full images: ``0.5 * (mean CE + dice_loss(softmax(logits)))``."""
    ce = masked_ce(logits, target)
    dice = dice_loss(torch.softmax(logits, dim=1), target, num_classes)
    return 0.5 * (ce + dice)
