"""Drawing helpers for the figures (``code/visualize.py``): pure numpy + PIL, no matplotlib.

Colours (fixed, so that figures of different runs compare):

* class overlays: ACDC (4 classes) RV red (255, 0, 0), Myo green (0, 255, 0), LV blue (0, 0, 255);
  2 classes (prostate gland) yellow (255, 220, 0);
* blending: the slice is shown in grey, ``g = round(255 * clip(image, 0, 1))`` in all three channels;
  a pixel of class c becomes ``round((1 - alpha) * g + alpha * colour_c)`` per channel (numpy
  ``rint``, halves to even), ``alpha = ALPHA = 0.5`` by default; background pixels stay grey;
* confidence maps: a fixed ramp (``CMAP_ANCHORS``, dark blue -> yellow) over [1 / num_classes, 1],
  the range of a max-softmax confidence; values clipped.

Figures are grids of equally sized cells with a title band above every cell:
``cell_origin(row, col, cell_h, cell_w)`` is the top-left pixel of a cell's image; the grid is
``PAD + cols * (cell_w + PAD)`` wide and ``PAD + rows * (TITLE_H + cell_h + PAD)`` high, on a white
background. Cells are the slices magnified by an integer ``zoom`` (nearest neighbour), so every
image pixel is a ``zoom x zoom`` block of one colour.
"""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dataloaders.augment import cutout_boxes, jitter, sample_params
from dataloaders.dataset import resize_nearest
from evaluation.inference import predict_volume
from utils.sscd import bcp_box_mask, cgsr, disc_mask, hca_maps, mix, region_hardness, region_means

PALETTES = {
    4: ((255, 0, 0), (0, 255, 0), (0, 0, 255)),  # RV, Myo, LV
    2: ((255, 220, 0),),                         # prostate gland
}
ALPHA = 0.5
PAD = 4
TITLE_H = 14
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
#: confidence ramp: value -> colour, linear between the anchors
CMAP_ANCHORS = ((0.0, (13, 8, 135)), (0.25, (84, 2, 163)), (0.5, (185, 50, 137)), (0.75, (248, 149, 64)),
                (1.0, (240, 249, 33)))
#: CGSR outlines: strong -> weak (source in x_s, destination in x_s2w) and weak -> strong
S2W_COLOUR = (255, 128, 0)
W2S_COLOUR = (0, 255, 255)
HARDEST_COLOUR = (255, 255, 255)


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
def palette(num_classes):
    """The overlay colours of classes 1..num_classes-1 (RGB tuples)."""
    if num_classes not in PALETTES:
        raise ValueError(f"no fixed palette for {num_classes} classes (have {sorted(PALETTES)})")
    return PALETTES[num_classes]


def grey_rgb(image):
    """(H, W) float image in [0, 1] -> (H, W, 3) uint8 grey (values outside [0, 1] clipped)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    g = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def blend(grey, colour, alpha=ALPHA):
    """``rint((1 - alpha) * grey + alpha * colour)`` per channel, uint8 (the documented overlay rule)."""
    out = (1.0 - alpha) * np.asarray(grey, dtype=np.float64) + alpha * np.asarray(colour, dtype=np.float64)
    return np.rint(out).astype(np.uint8)


def overlay(image, labels, num_classes, alpha=ALPHA):
    """The grey slice with each foreground class blended in its palette colour: (H, W, 3) uint8."""
    rgb = grey_rgb(image)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = rgb.copy()
    for c, colour in enumerate(palette(num_classes), start=1):
        m = labels == c
        out[m] = blend(rgb[m], colour, alpha)
    return out


def colormap(values, low=0.0, high=1.0):
    """(H, W) values -> (H, W, 3) uint8 on the CMAP_ANCHORS ramp over [low, high] (clipped)."""
    v = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    xs = [a for a, _ in CMAP_ANCHORS]
    channels = [np.interp(v, xs, [c[k] for _, c in CMAP_ANCHORS]) for k in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def upscale(rgb, zoom):
    """Nearest-neighbour magnification of an (H, W, 3) image by the integer ``zoom``."""
    if not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be a positive int, got {zoom!r}")
    return np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)


def boundary(mask):
    """Pixels of a boolean mask with a 4-neighbour outside it (the mask's 1-pixel outline)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def region_mask(index, patch, size, zoom=1, disc=False):
    """Boolean (size*zoom, size*zoom) mask of region ``index`` (raster order over the
    ``patch x patch`` grid of a ``size x size`` image), the whole square or (``disc``) the disc
    that CGSR pastes there (``utils.sscd.disc_mask``)."""
    grid = size // patch
    row, col = divmod(int(index), grid)
    mask = np.zeros((size, size), dtype=bool)
    shape = disc_mask(patch).numpy() > 0.5 if disc else np.ones((patch, patch), dtype=bool)
    mask[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = shape
    return np.repeat(np.repeat(mask, zoom, axis=0), zoom, axis=1)


def draw_outline(rgb, mask, colour):
    """Paint the outline of ``mask`` into a copy of ``rgb`` in ``colour``."""
    out = rgb.copy()
    out[boundary(mask)] = colour
    return out


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def grid_size(rows, cols, cell_h, cell_w):
    """(width, height) in pixels of a grid of ``rows x cols`` cells of ``cell_h x cell_w``."""
    return PAD + cols * (cell_w + PAD), PAD + rows * (TITLE_H + cell_h + PAD)


def cell_origin(row, col, cell_h, cell_w):
    """(y, x) of the top-left image pixel of cell (row, col)."""
    return PAD + row * (TITLE_H + cell_h + PAD) + TITLE_H, PAD + col * (cell_w + PAD)


def _fit(draw, text, font, width):
    """``text`` shortened with '…' until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def compose(cells, titles=None):
    """A PIL image of the grid ``cells`` (list of rows, each a list of (H, W, 3) uint8 arrays or
    None for an empty cell; all arrays the same shape) with ``titles`` (same nesting, strings)."""
    arrays = [a for row in cells for a in row if a is not None]
    if not arrays:
        raise ValueError("no cell to draw")
    cell_h, cell_w = arrays[0].shape[:2]
    if any(a.shape != arrays[0].shape or a.dtype != np.uint8 for a in arrays):
        raise ValueError(f"every cell must be uint8 of shape {arrays[0].shape}")
    n_cols = max(len(row) for row in cells)
    width, height = grid_size(len(cells), n_cols, cell_h, cell_w)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for r, row in enumerate(cells):
        for c, a in enumerate(row):
            if a is not None:
                y, x = cell_origin(r, c, cell_h, cell_w)
                canvas[y:y + cell_h, x:x + cell_w] = a
    image = Image.fromarray(canvas, "RGB")
    if titles:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        for r, row in enumerate(titles):
            for c, text in enumerate(row):
                if text:
                    y, x = cell_origin(r, c, cell_h, cell_w)
                    draw.text((x, y - TITLE_H + 1), _fit(draw, str(text), font, cell_w), fill=TEXT, font=font)
    return image


# --------------------------------------------------------------------------------------------
# figure 1: predictions of several methods (the paper's Fig. 3)
# --------------------------------------------------------------------------------------------
def predict_slice(model, image, image_size, device="cpu"):
    """(H, W) uint8 prediction of one slice with the test protocol (nearest resize to the network
    size and back; ``evaluation.inference.predict_volume``)."""
    image = np.asarray(image, dtype=np.float32)
    return predict_volume(model, image[None], image_size, device)[0]


def method_panel(rows, predictions, names, num_classes, zoom=1, alpha=ALPHA):
    """The Fig. 3 panel: per row the grey slice, one overlay per method, the ground truth overlay.

    rows: list of dicts with ``image`` (H, W) in [0, 1], ``label`` (H, W) and ``title``;
    predictions: per row a list of (H, W) label maps, one per method, in the order of ``names``.
    All slices must have the same shape. Returns a PIL image (cells of (H*zoom, W*zoom)).
    """
    if len(predictions) != len(rows) or any(len(p) != len(names) for p in predictions):
        raise ValueError(f"need one prediction per method ({len(names)}) for each of the {len(rows)} rows")
    cells, titles = [], []
    for row, preds in zip(rows, predictions):
        line = [upscale(grey_rgb(row["image"]), zoom)]
        line += [upscale(overlay(row["image"], p, num_classes, alpha), zoom) for p in preds]
        line.append(upscale(overlay(row["image"], row["label"], num_classes, alpha), zoom))
        cells.append(line)
        titles.append([row.get("title", "")] + list(names) + ["ground truth"])
    return compose(cells, titles)


# --------------------------------------------------------------------------------------------
# figure 2: HCA confidence per curriculum stage, and CGSR on a weak/strong mixed pair
# --------------------------------------------------------------------------------------------
def _network_input(image, image_size, device):
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None, None]
    return resize_nearest(x, (image_size, image_size))


def head_outputs(model, x):
    """The HCA inputs [1/2, 1/4, 1/8, main] of ``model`` for a batch ``x`` (no gradient, eval mode)."""
    model.eval()
    with torch.no_grad():
        logits, heads = model(x, heads=True)
    return list(heads) + [logits]


def hca_stage_maps(model, image, image_size, schedule, combine="max_softmax", patch=None, rank_by="confidence",
                   device="cpu"):
    """Per stage weight vector of ``schedule``: ``(confidence (S, S) numpy, hardest region or None)``
    for one slice at the network size S (the hardest region needs ``patch``)."""
    outputs = head_outputs(model, _network_input(image, image_size, device))
    maps = []
    for weights in schedule:
        conf, _ = hca_maps(outputs, weights, combine)
        hardest = None
        if patch:
            hardest = int(region_hardness(conf, patch, rank_by).argmax(dim=1)[0])
        maps.append((conf[0].cpu().numpy(), hardest))
    return maps


def strong_view(x, generator):
    """The strong view of a (1, 1, S, S) batch without geometry: cutout (p = 0.5) then the brightness /
    contrast jitter, as ``dataloaders.augment``'s strong branch."""
    params = sample_params(x.shape[0], generator, x.device)
    box = cutout_boxes(params, x.shape[-2], x.shape[-1])
    noise = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype)
    return jitter(torch.where(box[:, None], noise, x), params)


def cgsr_example(model, image_a, image_b, image_size, weights, patch, top_num=4, kl_prob=0.5,
                 combine="max_softmax", rank_by="confidence", seed=0, device="cpu"):
    """CGSR on one weak/strong pair: x_w = the BCP mix of ``image_a`` (outside the box) and ``image_b``
    (inside), x_s = its strong view; HCA with ``weights``, hardness, region class means and
    ``utils.sscd.cgsr`` as in training. Returns a dict of (S, S) numpy images ``x_w``, ``x_s``,
    ``x_s2w``, ``x_w2s`` and the ints ``dst_w``, ``src_s``, ``dst_s``, ``src_w`` and bool ``kl_branch``."""
    gen = torch.Generator().manual_seed(int(seed))
    a = _network_input(image_a, image_size, "cpu")
    b = _network_input(image_b, image_size, "cpu")
    box = bcp_box_mask(1, image_size, image_size, generator=gen)
    x_w = mix(a, b, box)
    x_s = strong_view(x_w, gen)
    stats = []
    for x in (x_w, x_s):
        conf, cls = hca_maps(head_outputs(model, x.to(device)), weights, combine)
        stats.append((region_hardness(conf, patch, rank_by).cpu(), region_means(cls, patch).cpu()))
    x_s2w, x_w2s, info = cgsr(x_w, x_s, stats[0][0], stats[1][0], stats[0][1], stats[1][1], patch, top_num,
                              kl_prob, generator=gen)
    out = {k: v[0, 0].numpy() for k, v in (("x_w", x_w), ("x_s", x_s), ("x_s2w", x_s2w), ("x_w2s", x_w2s))}
    out.update({k: int(info[k][0]) for k in ("dst_w", "src_s", "dst_s", "src_w")})
    out["kl_branch"] = bool(info["kl_branch"][0])
    return out


def hca_cgsr_figure(image, stage_maps, schedule, cgsr_out, patch, zoom=1, low=0.0):
    """Row 1: the slice (resized to the network size) and the HCA confidence of each stage on the ramp
    over [low, 1] (``low = 1 / num_classes`` is the least possible confidence), the hardest region
    outlined in white; row 2: x_w, x_s, x_s2w, x_w2s with the CGSR regions outlined (strong -> weak orange:
    source square in x_s, pasted disc in x_s2w; weak -> strong cyan: source in x_w, disc in x_w2s)."""
    size = stage_maps[0][0].shape[0]
    row1 = [upscale(grey_rgb(_network_input(image, size, "cpu")[0, 0].numpy()), zoom)]
    titles1 = [f"input; conf {low:.2g}-1"]
    for k, ((conf, hardest), weights) in enumerate(zip(stage_maps, schedule), start=1):
        cell = upscale(colormap(conf, low, 1.0), zoom)
        if hardest is not None:
            cell = draw_outline(cell, region_mask(hardest, patch, size, zoom), HARDEST_COLOUR)
        row1.append(cell)
        titles1.append(f"S{k} " + ",".join(f"{w:g}" for w in weights))
    c = cgsr_out

    def view(key, region, colour, disc):
        return draw_outline(upscale(grey_rgb(c[key]), zoom), region_mask(region, patch, size, zoom, disc), colour)

    row2 = [view("x_w", c["src_w"], W2S_COLOUR, False), view("x_s", c["src_s"], S2W_COLOUR, False),
            view("x_s2w", c["dst_w"], S2W_COLOUR, True), view("x_w2s", c["dst_s"], W2S_COLOUR, True)]
    titles2 = ["x_w (weak mix)", "x_s (strong)", "x_s2w" + (" KL" if c["kl_branch"] else ""), "x_w2s"]
    return compose([row1, row2], [titles1, titles2])
