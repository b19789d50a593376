"""The method pieces of SSCD as small pure torch functions.

Conventions: images (B, 1, H, W) float, label maps (B, H, W) long, logits / probabilities
(B, C, H, W). Regions are the cells of a grid of ``patch x patch`` squares, numbered in raster
order (``row * grid_w + col``). Randomness only through an explicit ``torch.Generator``.
Every function works on the device of its inputs without a host synchronisation, except
``largest_component_per_class`` (scipy on the CPU: one round trip) and its device twin
``largest_component_per_class_device`` (one 1-byte convergence check per ``check_every`` rounds).

See docs/SSCD.md Part A for the method and Part B for the reference code's behaviour.
"""
import math

import numpy as np
import torch
from scipy import ndimage

from .losses import dice_loss

__all__ = [
    "DEFAULT_HCA_SCHEDULE", "HCA_COMBINES", "RANK_BY",
    "bcp_box_mask", "mix",
    "entropy_map", "sda_mask", "apply_sda",
    "hca_maps",
    "region_means", "neighbour_contrast", "region_hardness",
    "disc_mask", "cgsr",
    "class_argmax", "LCC_IMPLS", "largest_component_per_class", "largest_component_per_class_device", "pseudo_labels",
    "center_disc_mask", "center_disc_dice",
    "cross_weight", "parse_hca_schedule", "split_iterations",
]

#: Reference HCA weight schedule (five stages) over the heads [1/2, 1/4, 1/8, full resolution].
DEFAULT_HCA_SCHEDULE = "1,0,0,0;.5,.5,0,0;0,.5,.5,0;0,0,.5,.5;0,0,0,1"
HCA_COMBINES = ("max_softmax", "logits")
RANK_BY = ("confidence", "contrast")
_CGSR_DIRECTIONS = ("hard_into_easy", "easy_into_hard")
_CGSR_PASTES = ("disc", "square")


# --------------------------------------------------------------------------------------------
# 1. BCP copy-paste box and mixing
# --------------------------------------------------------------------------------------------
def bcp_box_mask(batch, height, width, ratio=2 / 3, generator=None, device=None):
    """BCP copy-paste mask: (B, H, W) float32, ones with one zero box, shared by the batch.

    The box has side ``int(H * ratio) x int(W * ratio)``; its top-left corner is uniform over
    all positions where the box fits, i.e. rows ``[0, H - box_h]`` and cols ``[0, W - box_w]``
    (the reference draws from ``[0, H - box_h)``, one position fewer). The corner is drawn with
    ``generator`` (on the generator's device; default CPU), the mask is built on ``device``; the
    corner stays a tensor, so a CUDA generator costs no host synchronisation.
    The result is an expanded (read-only) view of one (H, W) mask; ``.clone()`` it to write.
    """
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"batch, height, width must be >= 1, got {batch}, {height}, {width}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    bh, bw = int(height * ratio), int(width * ratio)
    gen_device = generator.device if generator is not None else "cpu"
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    top = torch.randint(0, height - bh + 1, (1,), generator=generator, device=gen_device).to(rows.device)
    left = torch.randint(0, width - bw + 1, (1,), generator=generator, device=gen_device).to(rows.device)
    in_rows = (rows >= top) & (rows < top + bh)
    in_cols = (cols >= left) & (cols < left + bw)
    box = in_rows[:, None] & in_cols[None, :]
    mask = (~box).to(torch.float32)
    return mask.unsqueeze(0).expand(batch, height, width)


def mix(a, b, box_mask):
    """``a * M + b * (1 - M)``: ``a`` outside the box (M = 1), ``b`` inside (M = 0).

    ``a``, ``b``: images (B, C, H, W) or label maps (B, H, W) of the same shape; ``box_mask``
    (B, H, W) (or broadcastable (H, W)). Returns a new tensor of ``a``'s dtype; for integer
    inputs (labels) the mask is read as binary (M > 0.5).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (3, 4):
        raise ValueError(f"expected (B, H, W) or (B, C, H, W), got {tuple(a.shape)}")
    if tuple(box_mask.shape[-2:]) != tuple(a.shape[-2:]):
        raise ValueError(f"box_mask {tuple(box_mask.shape)} does not match {tuple(a.shape)}")
    m = box_mask.unsqueeze(1) if a.dim() == 4 and box_mask.dim() == 3 else box_mask
    if a.is_floating_point():
        m = m.to(a.dtype)
        return a * m + b * (1 - m)
    return torch.where(m > 0.5, a, b)


# --------------------------------------------------------------------------------------------
# 2-3. Entropy and the Spatial Decoupling Amplifier
# --------------------------------------------------------------------------------------------
def entropy_map(logits):
    """(B, C, H, W) logits -> (B, H, W) entropy of the softmax, natural log:
    ``-sum_c p_c log(max(p_c, 1e-8))``."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    return -(p * torch.log(p.clamp(min=1e-8))).sum(dim=1)


def sda_mask(logits, alpha):
    """SDA mask: (B, H, W) float, 1 on the ``k = floor(alpha * H * W)`` highest-entropy pixels
    of each image, 0 elsewhere.

    Exactly k pixels per image: ties are broken by a stable descending sort, so among equal
    entropies the earlier pixel in raster order wins (the reference thresholds instead and keeps
    ties too). ``alpha * H * W`` is floored with a 1e-9 tolerance against float round-off.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    ent = entropy_map(logits).detach()
    b, h, w = ent.shape
    n = h * w
    k = int(math.floor(alpha * n + 1e-9))
    flat = ent.reshape(b, n)
    mask = torch.zeros_like(flat)
    if k > 0:
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, 1.0)
    return mask.view(b, h, w)


def apply_sda(image, label, mask):
    """Masked SDA inputs: ``(image * mask, label * mask)``.

    image (B, C, H, W), label (B, H, W) integer, mask (B, H, W) binary. Masked-out pixels get
    intensity 0 and label 0 (background). Dtypes are preserved.
    """
    if image.dim() != 4 or label.dim() != 3 or mask.shape != label.shape:
        raise ValueError(f"expected image (B,C,H,W), label and mask (B,H,W); got {tuple(image.shape)}, "
                         f"{tuple(label.shape)}, {tuple(mask.shape)}")
    if image.shape[0] != label.shape[0] or image.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} do not match")
    masked_image = image * mask.unsqueeze(1).to(image.dtype)
    masked_label = label * (mask > 0.5).to(label.dtype)
    return masked_image, masked_label


# --------------------------------------------------------------------------------------------
# 4. Hierarchical Confidence Aggregation
# --------------------------------------------------------------------------------------------
def hca_maps(head_logits, weights, combine="max_softmax"):
    """Aggregate the decoder heads into one confidence map and one class map.

    head_logits: list of (B, C, H, W) logits, all at full resolution, in the order
    [1/2-scale head, 1/4, 1/8, full-resolution main]; weights: one float per head (the stage's
    W1..W4), normalised here to sum 1 (error if negative or all zero). Heads with weight 0 are not
    read at all.

    * ``combine='max_softmax'`` (paper): confidence = sum_k w_k max_c softmax(P_k),
      class map = sum_k w_k softmax(P_k);
    * ``combine='logits'`` (reference code): R = sum_k w_k P_k, confidence = max_c softmax(R),
      class map = softmax(R).

    Returns ``(confidence (B, H, W), class_probs (B, C, H, W))``.
    """
    if combine not in HCA_COMBINES:
        raise ValueError(f"combine must be one of {HCA_COMBINES}, got {combine!r}")
    heads = list(head_logits)
    weights = [float(w) for w in weights]
    if len(heads) == 0 or len(heads) != len(weights):
        raise ValueError(f"need one weight per head, got {len(heads)} heads and {len(weights)} weights")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"HCA weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"HCA weights must not all be zero, got {weights}")
    shape = tuple(heads[0].shape)
    for k, head in enumerate(heads):
        if head.dim() != 4 or tuple(head.shape) != shape:
            raise ValueError(f"head {k} has shape {tuple(head.shape)}, expected (B, C, H, W) = {shape}")
    active = [(w / total, head) for w, head in zip(weights, heads) if w != 0]
    if combine == "logits":
        r = sum(w * head for w, head in active)
        probs = torch.softmax(r, dim=1)
        return probs.max(dim=1).values, probs
    confidence = 0
    class_probs = 0
    for w, head in active:
        p = torch.softmax(head, dim=1)
        confidence = confidence + w * p.max(dim=1).values
        class_probs = class_probs + w * p
    return confidence, class_probs


# --------------------------------------------------------------------------------------------
# 5-7. Regionalize and rank
# --------------------------------------------------------------------------------------------
def _check_patch(patch, height, width):
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch!r}")
    if height % patch or width % patch:
        raise ValueError(f"patch_size={patch} does not divide the size {height}x{width}")


def region_means(x, patch):
    """Means over non-overlapping ``patch x patch`` squares.

    (B, H, W) -> (B, H/patch, W/patch); (B, C, H, W) -> (B, C, H/patch, W/patch).
    ValueError if H or W is not divisible by ``patch``.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"expected (B, H, W) or (B, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    _check_patch(patch, h, w)
    gh, gw = h // patch, w // patch
    shape = tuple(x.shape[:-2]) + (gh, patch, gw, patch)
    return x.reshape(shape).mean(dim=(-3, -1))


def neighbour_contrast(scores):
    """(B, gh, gw) -> (B, gh, gw): mean over the 4-neighbours n of ``|s(r) - s(n)|``.

    Border regions average over their 2-3 neighbours; a 1x1 grid gives 0.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, gh, gw), got {tuple(scores.shape)}")
    total = torch.zeros_like(scores)
    count = torch.zeros_like(scores)
    dv = (scores[:, 1:, :] - scores[:, :-1, :]).abs()   # between row i and i+1
    dh = (scores[:, :, 1:] - scores[:, :, :-1]).abs()   # between col j and j+1
    total[:, 1:, :] += dv
    total[:, :-1, :] += dv
    total[:, :, 1:] += dh
    total[:, :, :-1] += dh
    count[:, 1:, :] += 1
    count[:, :-1, :] += 1
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return total / count.clamp(min=1)


def region_hardness(confidence, patch, rank_by="confidence"):
    """Per-region hardness (B, gh*gw), raster order, higher = more doubtful.

    confidence (B, H, W). ``rank_by='confidence'`` (paper): 1 - region mean confidence;
    ``'contrast'`` (reference): neighbour contrast of the region means.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if confidence.dim() != 3:
        raise ValueError(f"confidence must be (B, H, W), got {tuple(confidence.shape)}")
    means = region_means(confidence, patch)
    score = 1.0 - means if rank_by == "confidence" else neighbour_contrast(means)
    return score.flatten(1)


# --------------------------------------------------------------------------------------------
# 8-9. CGSR
# --------------------------------------------------------------------------------------------
def disc_mask(patch, device=None):
    """(patch, patch) float32 disc: 1 where ``(x - c)^2 + (y - c)^2 <= (patch / 2)^2`` with
    ``c = patch / 2`` on pixel indices 0..patch-1 (as the reference: centre 16, radius 16 for 32;
    hence slightly off-centre, touching the first row/col but not the last)."""
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch!r}")
    idx = torch.arange(patch, device=device, dtype=torch.float32)
    c = patch / 2.0
    d2 = (idx[:, None] - c) ** 2 + (idx[None, :] - c) ** 2
    return (d2 <= c * c).to(torch.float32)


def _kl_rows(p, q):
    """KL(p || q) along the last dim; p (B, C), q (B, K, C) -> (B, K)."""
    p = p.unsqueeze(1)
    return (p * (p.log() - q.log())).sum(dim=-1)


def _as_distribution(cls):
    """(B, C, gh, gw) region class descriptors -> (B, R, C) distributions (clamped at 1e-8 and
    renormalised to sum 1)."""
    d = cls.flatten(2).transpose(1, 2).clamp(min=1e-8)
    return d / d.sum(dim=-1, keepdim=True)


def cgsr(x_w, x_s, hard_w, hard_s, cls_w, cls_s, patch, top_num=4, kl_prob=0.5, generator=None,
         direction="hard_into_easy", paste="disc"):
    """Confidence-guided semantic replacement between pixel-aligned weak and strong mixed images.

    x_w, x_s: (B, C, H, W) (C = 1 for images); hard_w, hard_s: (B, R) hardness per region,
    R = (H/patch)(W/patch), raster order, higher = harder; cls_w, cls_s: (B, K, gh, gw) region
    class descriptors (e.g. region_means of the HCA class probabilities). They are used directly as
    distributions: clamped at 1e-8 and renormalised to sum 1 (no softmax).

    Per image i (vectorised over the batch), the branch is KL-guided with probability ``kl_prob``
    (``torch.rand(B, generator=generator) < kl_prob``):

    * KL-guided: d = hardest region of x_s[i]; a* = the one of x_w[i]'s ``top_num`` easiest regions
      minimising KL(p_s[d] || p_w[a]); x_s[i][d] is pasted into x_w[i] at a* as a disc
      (``disc_mask``; the corners keep x_w). Symmetrically b = hardest region of x_w[i] (read from
      the unmodified input), c* among x_s[i]'s ``top_num`` easiest minimising KL(p_w[b] || p_s[c]),
      x_w[i][b] pasted into x_s[i] at c*.
    * plain swap: x_s[i]'s hardest region into x_w[i]'s easiest region, x_w[i]'s hardest region
      into x_s[i]'s easiest region (discs as above).

    The above is ``direction='hard_into_easy'`` (SSCD, default). ``direction='easy_into_hard'`` is
    ABD's bidirectional patch displacement (ABD-I, ``ABD_I_BCP``): each view's hardest region is
    *replaced* by a confident region of the other view:

    * KL-guided: b = hardest region of x_w[i], d = hardest region of x_s[i]; c* = the one of
      x_s[i]'s ``top_num`` easiest regions minimising KL(p_w[b] || p_s[c]), a* = the one of
      x_w[i]'s ``top_num`` easiest minimising KL(p_s[d] || p_w[a]); x_w[i][b] <- x_s[i][c*] and
      x_s[i][d] <- x_w[i][a*] (read from the unmodified input).
    * plain: x_w[i]'s hardest region <- x_s[i]'s easiest, x_s[i]'s hardest <- x_w[i]'s easiest.

    ``paste='disc'`` (default) blends the source into the destination through ``disc_mask``;
    ``paste='square'`` replaces the whole ``patch x patch`` destination square (as ABD).
    ABD ranks by mean confidence: pass ``region_hardness(conf, patch, 'confidence')`` as hard_w /
    hard_s, so that "hardest" = least confident and "easiest" = most confident.

    Ties: hardest = first maximum, easiest/candidates by a stable ascending sort (earlier region
    first), KL ties -> earlier candidate. Sources always come from the other view of the *same*
    image (no batch cross-indexing, defect D6). Inputs are not modified. ValueError on an unknown
    ``direction`` or ``paste``.

    Returns ``(x_s2w, x_w2s, info)``: x_s2w = x_w carrying strong content, x_w2s = x_s carrying
    weak content, info = dict of (B,) long tensors ``dst_w, src_s, dst_s, src_w`` (region indices:
    x_s[i][src_s] was pasted into x_w[i] at dst_w, x_w[i][src_w] into x_s[i] at dst_s; in both
    directions) and a (B,) bool tensor ``kl_branch``.
    """
    if direction not in _CGSR_DIRECTIONS:
        raise ValueError(f"direction must be one of {_CGSR_DIRECTIONS}, got {direction!r}")
    if paste not in _CGSR_PASTES:
        raise ValueError(f"paste must be one of {_CGSR_PASTES}, got {paste!r}")
    if x_w.dim() != 4 or x_w.shape != x_s.shape:
        raise ValueError(f"x_w and x_s must be equal (B, C, H, W), got {tuple(x_w.shape)}, {tuple(x_s.shape)}")
    b, c, h, w = x_w.shape
    _check_patch(patch, h, w)
    gh, gw = h // patch, w // patch
    r = gh * gw
    for name, t in (("hard_w", hard_w), ("hard_s", hard_s)):
        if tuple(t.shape) != (b, r):
            raise ValueError(f"{name} must be (B, R) = {(b, r)}, got {tuple(t.shape)}")
    for name, t in (("cls_w", cls_w), ("cls_s", cls_s)):
        if t.dim() != 4 or t.shape[0] != b or tuple(t.shape[-2:]) != (gh, gw):
            raise ValueError(f"{name} must be (B, K, {gh}, {gw}), got {tuple(t.shape)}")
    if cls_w.shape != cls_s.shape:
        raise ValueError(f"cls_w {tuple(cls_w.shape)} and cls_s {tuple(cls_s.shape)} differ")
    if not isinstance(top_num, int) or not 1 <= top_num <= r:
        raise ValueError(f"top_num must be an int in [1, {r}], got {top_num!r}")
    if not 0.0 <= kl_prob <= 1.0:
        raise ValueError(f"kl_prob must lie in [0, 1], got {kl_prob}")
    device = x_w.device
    rows = torch.arange(b, device=device)

    gen_device = generator.device if generator is not None else "cpu"
    kl_branch = (torch.rand(b, generator=generator, device=gen_device) < kl_prob).to(device)

    hard_w = hard_w.detach()
    hard_s = hard_s.detach()
    hardest_w = hard_w.argmax(dim=1)                   # b: hardest weak region
    hardest_s = hard_s.argmax(dim=1)                   # d: hardest strong region
    cand_w = torch.sort(hard_w, dim=1, stable=True).indices[:, :top_num]
    cand_s = torch.sort(hard_s, dim=1, stable=True).indices[:, :top_num]

    p_w = _as_distribution(cls_w.detach())             # (B, R, K)
    p_s = _as_distribution(cls_s.detach())
    q_w = p_w[rows[:, None], cand_w]                   # (B, top_num, K)
    q_s = p_s[rows[:, None], cand_s]
    kl_a = _kl_rows(p_s[rows, hardest_s], q_w)         # KL(p_s[d] || p_w[a])
    kl_c = _kl_rows(p_w[rows, hardest_w], q_s)         # KL(p_w[b] || p_s[c])
    a_star = torch.where(kl_branch, cand_w[rows, kl_a.argmin(dim=1)], cand_w[:, 0])
    c_star = torch.where(kl_branch, cand_s[rows, kl_c.argmin(dim=1)], cand_s[:, 0])
    if direction == "hard_into_easy":                  # SSCD: x_s[d] -> x_w[a*], x_w[b] -> x_s[c*]
        dst_w, src_s, dst_s, src_w = a_star, hardest_s, c_star, hardest_w
    else:                                              # ABD: x_s[c*] -> x_w[b], x_w[a*] -> x_s[d]
        dst_w, src_s, dst_s, src_w = hardest_w, c_star, hardest_s, a_star

    def to_regions(x):                                 # (B, C, H, W) -> (B, R, C, p, p)
        return x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, r, c, patch, patch)

    def from_regions(t):
        return t.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    reg_w = to_regions(x_w)
    reg_s = to_regions(x_s)
    out_w = reg_w.clone()
    out_s = reg_s.clone()
    if paste == "square":                              # whole square replaced, no blending
        out_w[rows, dst_w] = reg_s[rows, src_s]
        out_s[rows, dst_s] = reg_w[rows, src_w]
    else:
        disc = disc_mask(patch, device=device).to(x_w.dtype)
        out_w[rows, dst_w] = reg_w[rows, dst_w] * (1 - disc) + reg_s[rows, src_s] * disc
        out_s[rows, dst_s] = reg_s[rows, dst_s] * (1 - disc) + reg_w[rows, src_w] * disc
    info = {"dst_w": dst_w, "src_s": src_s, "dst_s": dst_s, "src_w": src_w, "kl_branch": kl_branch}
    return from_regions(out_w), from_regions(out_s), info


# --------------------------------------------------------------------------------------------
# 10. Pseudo-labels
# --------------------------------------------------------------------------------------------
def class_argmax(t):
    """(B, C, H, W) -> (B, H, W) long: the index of the largest class score, the first one on ties
    (``t.argmax(dim=1)`` exactly). Computed as ``t.max(dim=1).indices``: on the CPU, ``argmax`` over
    the class dimension of a contiguous tensor measured 8x slower (62 vs 8 ms at 8x4x256x256)."""
    return t.max(dim=1).indices


_EIGHT = np.ones((3, 3), dtype=bool)


def largest_component_per_class(labels, num_classes):
    """Keep, per image and per foreground class 1..num_classes-1, only the largest 8-connected
    component; the other components of that class become 0 (background).

    labels (B, H, W) integer -> same shape, dtype and device. Equal-size components: the one
    whose first pixel comes first in raster order is kept. Runs scipy.ndimage.label on the CPU
    (one host round trip); the signature is meant to stay when a device version replaces it.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    arr = labels.detach().cpu().numpy()
    out = arr.copy()
    for i in range(arr.shape[0]):
        for cls in range(1, num_classes):
            comp, n = ndimage.label(arr[i] == cls, structure=_EIGHT)
            if n <= 1:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            keep = int(np.argmax(sizes)) + 1
            out[i][(comp > 0) & (comp != keep)] = 0
    return torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)


# the four "forward" neighbours (right, down, down-right, down-left): every 8-connected pair once
_FORWARD_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _same_class_neighbours(labels, foreground):
    """(4, B*H*W) long: per forward direction, the flat index of each pixel's neighbour when both
    are foreground of the same class, else the pixel's own index (a self-loop, inert below)."""
    b, h, w = labels.shape
    own = torch.arange(b * h * w, device=labels.device).view(b, h, w)
    padded = torch.nn.functional.pad(torch.where(foreground, labels, -1), (1, 1, 1, 1), value=-1)
    out = []
    for dy, dx in _FORWARD_NEIGHBOURS:
        same = (padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == labels) & foreground
        out.append(torch.where(same, own + dy * w + dx, own).flatten())
    return torch.stack(out)


def _component_roots(labels, foreground, check_every):
    """(B*H*W,) long: for each foreground pixel the flat index of the first pixel (raster order)
    of its 8-connected same-class component; background pixels point at themselves.

    Label equivalence on the device: every pixel starts as its own root; each round hooks, for
    every same-class neighbour pair, the larger of their two labels onto the smaller
    (``scatter_reduce`` amin) and then halves every pointer path (``root = root[root]``). Labels
    only decrease and always name a pixel of the same component, so the fixpoint is the
    component minimum. Convergence is checked (one host read) every ``check_every`` rounds.
    """
    neighbours = _same_class_neighbours(labels, foreground)
    root = torch.arange(neighbours.shape[1], device=labels.device)
    while True:
        for _ in range(check_every):
            before = root
            other = root[neighbours]
            mine = root.expand_as(other)
            root = root.scatter_reduce(0, torch.maximum(mine, other).flatten(),
                                       torch.minimum(mine, other).flatten(), "amin")
            root = root[root]
        if torch.equal(before, root):
            return root


def largest_component_per_class_device(labels, num_classes, check_every=None):
    """``largest_component_per_class`` computed on the labels' device (same result, same tie rule).

    Components come from ``_component_roots``; sizes and the per-(image, class) winner are
    scatter reductions (no ``bincount``, whose output size would need a host read): the largest
    component wins, equal sizes go to the smaller root, i.e. the component whose first pixel
    comes first in raster order, as scipy's numbering does. ``check_every`` (default
    ``ceil(log2(max(H, W))) + 4``, enough for compact shapes to converge before the first check)
    sets how many rounds run between two convergence checks.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    b, h, w = labels.shape
    if check_every is None:
        check_every = math.ceil(math.log2(max(h, w, 2))) + 4
    foreground = (labels > 0) & (labels < num_classes)
    root = _component_roots(labels, foreground, check_every)
    fg = foreground.flatten()
    size = torch.zeros_like(root).scatter_add_(0, root, fg.long())[root]
    # one group per (image, class); background pixels go to a spare group at the end
    image = torch.arange(b, device=labels.device).repeat_interleave(h * w)
    spare = b * num_classes
    group = torch.where(fg, image * num_classes + labels.flatten().long(), spare)
    best = torch.zeros(spare + 1, dtype=size.dtype, device=labels.device)
    best = best.scatter_reduce(0, group, size, "amax")
    candidate = fg & (size == best[group])
    winner = torch.full((spare + 1,), root.numel(), dtype=root.dtype, device=labels.device)
    winner = winner.scatter_reduce(0, torch.where(candidate, group, spare), root, "amin")
    keep = ~fg | (root == winner[group])
    return torch.where(keep.view(b, h, w), labels, torch.zeros_like(labels))


LCC_IMPLS = ("scipy", "device")


def pseudo_labels(logits, num_classes, lcc=True, lcc_impl="scipy"):
    """(B, C, H, W) logits -> (B, H, W) long: argmax over classes, then (if ``lcc``) the
    largest-component-per-class filter, with scipy on the CPU (``lcc_impl='scipy'``) or on the
    logits' device (``'device'``, ``largest_component_per_class_device``); the results are equal."""
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}, H, W), got {tuple(logits.shape)}")
    if lcc_impl not in LCC_IMPLS:
        raise ValueError(f"lcc_impl must be one of {LCC_IMPLS}, got {lcc_impl!r}")
    labels = class_argmax(logits.detach())
    if not lcc:
        return labels
    filter_ = largest_component_per_class_device if lcc_impl == "device" else largest_component_per_class
    return filter_(labels, num_classes)


# --------------------------------------------------------------------------------------------
# 11. Centre-disc loss
# --------------------------------------------------------------------------------------------
def center_disc_mask(height, width, radius, device=None):
    """(H, W) float32 disc: 1 where ``(y - H//2)^2 + (x - W//2)^2 <= radius^2`` (pixel indices;
    centred on pixel (H//2, W//2), e.g. (128, 128) at 256^2 as the reference)."""
    if height < 1 or width < 1 or radius < 0:
        raise ValueError(f"need height, width >= 1 and radius >= 0, got {height}, {width}, {radius}")
    ys = torch.arange(height, device=device, dtype=torch.float32) - height // 2
    xs = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    return ((ys[:, None] ** 2 + xs[None, :] ** 2) <= float(radius) ** 2).to(torch.float32)


def center_disc_dice(probs, target, num_classes, radius=None, mask=None):
    """Dice loss (losses.dice_loss) restricted to the centred disc of ``radius``
    (default min(H, W) / 4, i.e. 64 at 256^2 as the reference), pixels further weighted by
    ``mask`` (B, H, W) when given.

    probs (B, C, H, W), target (B, H, W). This is the correct masked form: pixels outside the
    disc do not count. The reference (§1.3 step 9) cropped [64, 192)^2 and multiplied both
    probabilities and labels by the disc, which leaves a constant background penalty outside the
    disc; that is not reproduced.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, C, H, W), got {tuple(probs.shape)}")
    b, _, h, w = probs.shape
    if radius is None:
        radius = min(h, w) / 4
    disc = center_disc_mask(h, w, radius, device=probs.device).to(probs.dtype).expand(b, h, w)
    return dice_loss(probs, target, num_classes, mask=disc if mask is None else disc * mask)


# --------------------------------------------------------------------------------------------
# 12. Curriculum schedule
# --------------------------------------------------------------------------------------------
def parse_hca_schedule(text):
    """Parse "w1,w2,w3,w4;w1,..." (one stage per ';') into a list of 4-tuples of floats.

    ValueError naming the (1-based) stage on a wrong number of weights, a non-number, a negative
    or non-finite weight, or all-zero weights. Whitespace and a trailing ';' are allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty HCA schedule: {text!r}")
    parts = text.strip().split(";")
    if parts[-1].strip() == "" and len(parts) > 1:
        parts = parts[:-1]
    stages = []
    for k, part in enumerate(parts, start=1):
        fields = [f.strip() for f in part.split(",")]
        if len(fields) != 4:
            raise ValueError(f"HCA schedule stage {k} ({part.strip()!r}) has {len(fields)} weights, expected 4")
        try:
            values = tuple(float(f) for f in fields)
        except ValueError:
            raise ValueError(f"HCA schedule stage {k} ({part.strip()!r}) has a non-numeric weight") from None
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"HCA schedule stage {k} ({part.strip()!r}) has a negative or non-finite weight")
        if sum(values) == 0:
            raise ValueError(f"HCA schedule stage {k} ({part.strip()!r}) has all-zero weights")
        stages.append(values)
    return stages


def cross_weight(iteration, rampup):
    """Weight of the cross-supervision terms at stage iteration ``iteration`` (1-based): the
    sigmoid ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(iteration, rampup) / rampup``, of the mean-teacher
    and SSL4MIS code (0.0067 at the start, 1 from ``rampup`` on); 1 throughout when ``rampup`` is 0."""
    if rampup < 0:
        raise ValueError(f"rampup must be >= 0, got {rampup}")
    if rampup == 0:
        return 1.0
    t = min(max(iteration, 0), rampup) / rampup
    return math.exp(-5.0 * (1.0 - t) ** 2)


def split_iterations(total, n_stages):
    """Split ``total`` iterations over ``n_stages``: ``total // n_stages`` each, the remainder
    given one by one to the last stages. ValueError if a stage would get < 1 iteration."""
    if isinstance(total, bool) or isinstance(n_stages, bool) or not isinstance(total, int) \
            or not isinstance(n_stages, int):
        raise ValueError(f"total and n_stages must be ints, got {total!r}, {n_stages!r}")
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    base, rest = divmod(total, n_stages)
    if base < 1:
        raise ValueError(f"total={total} iterations cannot give each of {n_stages} stages at least 1")
    return [base + (1 if k >= n_stages - rest else 0) for k in range(n_stages)]
