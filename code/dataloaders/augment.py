"""Weak and strong augmentation, batched, on whatever device the batch lives on.

One implementation serves both input paths: per sample in DataLoader workers (a batch of
one on the CPU) and batched on the training device. The distribution follows the reference
(SSCD.md Part B §3.3):

- geometry, shared by the weak and the strong view: with p=0.5 a rot90 by k in {0,1,2,3}
  followed by a flip along a random axis; else with p=0.5 a rotation by an angle drawn
  uniformly from [-20, 20] degrees; else nothing. Nearest-neighbour sampling for image and
  label alike, zero padding. Slices are square (resized to the network size beforehand).
- strong view: a cutout with p=0.5 (area fraction U(0.02, 0.4), aspect U(0.3, 3.33), filled
  with random 0/1 pixels) applied to the image AND its label (label 0 inside: the reference's
  defect D4 zeroed the label only), then brightness and contrast jitter with factors in
  U(0.2, 1.8) applied in random order, clamped to [0, 1].
"""
import math

import torch
import torch.nn.functional as F

ROTATION_DEG = 20.0
JITTER = (0.2, 1.8)
CUTOUT_P = 0.5
CUTOUT_AREA = (0.02, 0.4)
CUTOUT_ASPECT = (0.3, 1 / 0.3)


def _uniform(n, low, high, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def sample_params(n, generator=None, device="cpu"):
    """Draw the random factors of ``n`` augmentations (a dict of 1-D tensors of length n).

    ``mode`` 0 = rot90+flip, 1 = free rotation, 2 = identity; ``k`` quarter turns; ``flip_axis``
    0 (rows) or 1 (columns); ``angle`` in degrees; ``bright``/``contrast`` jitter factors;
    ``bright_first`` order of the two; cutout ``cut`` (bool), ``cut_area``, ``cut_aspect`` and
    ``cut_u``/``cut_v`` in [0,1) positioning the box.
    """
    g, d = generator, device
    u = torch.rand(n, generator=g, device=d)
    u2 = torch.rand(n, generator=g, device=d)
    mode = torch.where(u < 0.5, 0, torch.where(u2 < 0.5, 1, 2))
    return {
        "mode": mode,
        "k": torch.randint(0, 4, (n,), generator=g, device=d),
        "flip_axis": torch.randint(0, 2, (n,), generator=g, device=d),
        "angle": _uniform(n, -ROTATION_DEG, ROTATION_DEG, g, d),
        "bright": _uniform(n, *JITTER, g, d),
        "contrast": _uniform(n, *JITTER, g, d),
        "bright_first": torch.rand(n, generator=g, device=d) < 0.5,
        "cut": torch.rand(n, generator=g, device=d) < CUTOUT_P,
        "cut_area": _uniform(n, *CUTOUT_AREA, g, d),
        "cut_aspect": torch.exp(_uniform(n, math.log(CUTOUT_ASPECT[0]), math.log(CUTOUT_ASPECT[1]), g, d)),
        "cut_u": torch.rand(n, generator=g, device=d),
        "cut_v": torch.rand(n, generator=g, device=d),
    }


def geometry_matrices(params):
    """(n, 2, 3) affine matrices (normalised coordinates, output -> input) for ``params``.

    Quarter turns use exact 0/±1 entries so nearest sampling reproduces torch.rot90 exactly.
    """
    mode, k = params["mode"], params["k"]
    n, device = mode.shape[0], mode.device
    cos_q = (k == 0).float() - (k == 2).float()  # built on the device: no blocking host->device copy
    sin_q = (k == 1).float() - (k == 3).float()
    theta = params["angle"] * (math.pi / 180.0)
    cos = torch.where(mode == 0, cos_q, torch.where(mode == 1, torch.cos(theta), torch.ones_like(theta)))
    sin = torch.where(mode == 0, sin_q, torch.where(mode == 1, torch.sin(theta), torch.zeros_like(theta)))
    mat = torch.zeros(n, 2, 3, device=device)
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, -sin, sin, cos
    # a flip of the output along rows (axis 0 -> y) or columns (axis 1 -> x)
    flip = mode == 0
    fx = torch.where(flip & (params["flip_axis"] == 1), -1.0, 1.0)
    fy = torch.where(flip & (params["flip_axis"] == 0), -1.0, 1.0)
    mat[:, :, 0] *= fx[:, None]
    mat[:, :, 1] *= fy[:, None]
    return mat


def apply_geometry(images, labels, params):
    """Warp images (B,1,S,S) float and labels (B,S,S) with one nearest-neighbour grid sample."""
    stacked = torch.cat([images, labels[:, None].to(images.dtype)], dim=1)
    grid = F.affine_grid(geometry_matrices(params).to(images.dtype), list(stacked.shape), align_corners=False)
    warped = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped[:, :1], warped[:, 1].round().to(labels.dtype)


def cutout_boxes(params, height, width):
    """(B,H,W) bool: the cutout rectangle of each sample (all False where ``cut`` is off)."""
    area = params["cut_area"] * height * width
    box_h = torch.sqrt(area * params["cut_aspect"]).clamp(1, height).floor()
    box_w = torch.sqrt(area / params["cut_aspect"]).clamp(1, width).floor()
    top = (params["cut_u"] * (height - box_h + 1)).floor()
    left = (params["cut_v"] * (width - box_w + 1)).floor()
    device = box_h.device
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return inside & params["cut"][:, None, None]


def jitter(images, params):
    """Brightness (multiply) and contrast (blend with the image mean) in random order, clamped to [0,1]."""
    b = params["bright"].view(-1, 1, 1, 1).to(images.dtype)
    c = params["contrast"].view(-1, 1, 1, 1).to(images.dtype)
    first = params["bright_first"].view(-1, 1, 1, 1)

    def brightness(x):
        return (x * b).clamp(0, 1)

    def contrast(x):
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (c * x + (1 - c) * mean).clamp(0, 1)

    return torch.where(first, contrast(brightness(images)), brightness(contrast(images)))


def augment(images, labels, generator=None, strong=True):
    """Weak (and strong) views of a batch of square slices.

    images (B,1,S,S) float in [0,1], labels (B,S,S) integer. Returns a dict with ``image``,
    ``label`` (weak: geometry only) and, if ``strong``, ``image_strong``, ``label_strong``
    (same geometry, then cutout on image and label, then intensity jitter) and ``cutout`` (B,S,S)
    float, 1 where the strong image holds cutout noise.
    """
    params = sample_params(images.shape[0], generator, images.device)
    image, label = apply_geometry(images, labels, params)
    out = {"image": image, "label": label}
    if strong:
        box = cutout_boxes(params, image.shape[-2], image.shape[-1])
        noise = torch.randint(0, 2, image.shape, generator=generator, device=image.device).to(image.dtype)
        cut_image = torch.where(box[:, None], noise, image)
        out["image_strong"] = jitter(cut_image, params)
        out["label_strong"] = torch.where(box, torch.zeros_like(label), label)
        out["cutout"] = box.to(image.dtype)
    return out
