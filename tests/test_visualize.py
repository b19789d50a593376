"""Tests for reporting/visual.py and code/visualize.py: PNG sizes and the documented overlay colours at
labelled pixels, with a fake model whose prediction is known, and both CLI figures end to end."""
import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import visualize
from common.checkpoint import save_checkpoint
from networks.unet import build_model
from reporting import visual
from utils.sscd import DEFAULT_HCA_SCHEDULE, parse_hca_schedule

RGB = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}  # RV red, Myo green, LV blue
LEVELS = (0.1, 0.4, 0.7, 0.95)  # image intensity of classes 0..3 in the synthetic slice


class IntensityModel(nn.Module):
    """Predicts the class whose intensity level is nearest to the pixel, then adds ``shift``
    (mod C): prediction = (true class + shift) % C on the synthetic slice."""

    def __init__(self, shift=0):
        super().__init__()
        self.shift = shift
        self.register_buffer("levels", torch.tensor(LEVELS).view(1, -1, 1, 1))

    def forward(self, x, heads=False):
        logits = torch.roll(-100.0 * (x - self.levels) ** 2, shifts=self.shift, dims=1)
        return (logits, [logits, logits, logits]) if heads else logits



def synthetic_slice(h=16, w=20):
    """A label map with every class and an image at the class levels plus a deterministic ripple."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[2:7, 2:9] = 1
    label[8:14, 3:8] = 2
    label[4:12, 11:18] = 3
    ripple = 0.04 * np.sin(np.arange(h * w).reshape(h, w))
    image = (np.asarray(LEVELS)[label] + ripple).astype(np.float32)
    return image, label


def grey_of(image):
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.int64)


def expected_blend(grey, colour, alpha=0.5):
    """The documented rule: round((1 - alpha) * g + alpha * colour) per channel."""
    return np.rint((1 - alpha) * grey[..., None] + alpha * np.asarray(colour)[None]).astype(np.int64)


def cell(png, row, col, h, w, zoom):
    y, x = visual.cell_origin(row, col, h * zoom, w * zoom)
    return png[y:y + h * zoom:zoom, x:x + w * zoom:zoom].astype(np.int64)  # one pixel per zoom block


def check_overlay(rgb, image, labels, alpha=0.5):
    """Every pixel is grey where labels == 0 and the palette blend of its class elsewhere."""
    grey = grey_of(image)
    assert np.array_equal(rgb[labels == 0], np.repeat(grey[labels == 0][:, None], 3, axis=1))
    for c, colour in RGB.items():
        m = labels == c
        assert m.any()
        assert np.array_equal(rgb[m], expected_blend(grey[m], colour, alpha))


def test_overlay_colours_are_the_documented_blend():
    image, label = synthetic_slice()
    out = visual.overlay(image, label, 4)
    assert out.dtype == np.uint8 and out.shape == (16, 20, 3)
    check_overlay(out.astype(np.int64), image, label)
    # a hand-computed pixel: LV (blue) on grey rint(0.95 * 255 + ripple)
    g = int(grey_of(image)[5, 12])
    assert tuple(out[5, 12]) == (round(0.5 * g), round(0.5 * g), int(np.rint(0.5 * g + 127.5)))
    # opacity 1 paints the pure colour; 2 classes use the gland colour
    assert tuple(visual.overlay(image, label, 4, alpha=1.0)[3, 3]) == RGB[1]
    gland = visual.overlay(image, (label > 0).astype(np.uint8), 2, alpha=1.0)
    assert tuple(gland[3, 3]) == visual.PALETTES[2][0] and tuple(gland[0, 0]) == (grey_of(image)[0, 0],) * 3
    with pytest.raises(ValueError):
        visual.overlay(image, label, 3)


def test_method_panel_png_with_known_predictions(tmp_path):
    image, label = synthetic_slice()
    exact, shifted = IntensityModel(0), IntensityModel(1)
    pred_exact = visual.predict_slice(exact, image, 16)  # network size 16: resized 16x20 -> 16x16 -> back
    pred_shift = visual.predict_slice(shifted, image, 16)
    # nearest resizing to 16 columns and back can drop/duplicate columns: compare with the model at full size
    assert np.array_equal(visual.predict_slice(exact, image[:, :16], 16), label[:, :16])
    assert np.array_equal(visual.predict_slice(shifted, image[:, :16], 16), (label[:, :16] + 1) % 4)

    rows = [{"image": image, "label": label, "title": "case z=0"},
            {"image": image[::-1].copy(), "label": label[::-1].copy(), "title": "flipped"}]
    preds = [[pred_exact, pred_shift], [pred_exact[::-1].copy(), pred_shift[::-1].copy()]]
    zoom = 3
    fig = visual.method_panel(rows, preds, ["exact", "shifted"], 4, zoom=zoom)
    path = tmp_path / "panel.png"
    fig.save(path)
    png = np.asarray(Image.open(path).convert("RGB"))
    pad, title = visual.PAD, visual.TITLE_H
    assert png.shape == (pad + 2 * (title + 16 * zoom + pad), pad + 4 * (20 * zoom + pad), 3)
    # every zoom block is one colour
    y, x = visual.cell_origin(0, 3, 16 * zoom, 20 * zoom)
    block = png[y:y + zoom, x:x + zoom].reshape(-1, 3)
    assert (block == block[0]).all()
    for r, row in enumerate(rows):
        grey = grey_of(row["image"])
        assert np.array_equal(cell(png, r, 0, 16, 20, zoom), np.repeat(grey[..., None], 3, axis=2))
        check_overlay(cell(png, r, 3, 16, 20, zoom), row["image"], row["label"])  # ground truth
        check_overlay(cell(png, r, 1, 16, 20, zoom), row["image"], preds[r][0])
        check_overlay(cell(png, r, 2, 16, 20, zoom), row["image"], preds[r][1])
    # where the shifted model says LV (true Myo) the pixel is blue-blended, not green
    myo = (label == 2) & (pred_shift == 3)
    assert myo.any()
    got = cell(png, 0, 2, 16, 20, zoom)[myo]
    assert np.array_equal(got, expected_blend(grey_of(image)[myo], RGB[3]))
    # titles live in the white band above the cells only
    assert (png[:pad] == 255).all()


def test_colormap_and_outlines():
    ramp = visual.colormap(np.array([[0.0, 1.0, 2.0, -1.0]]))
    assert tuple(ramp[0, 0]) == visual.CMAP_ANCHORS[0][1] and tuple(ramp[0, 1]) == visual.CMAP_ANCHORS[-1][1]
    assert tuple(ramp[0, 2]) == tuple(ramp[0, 1]) and tuple(ramp[0, 3]) == tuple(ramp[0, 0])
    assert tuple(visual.colormap(np.array([[0.625]]), low=0.25)[0, 0]) == visual.CMAP_ANCHORS[2][1]
    square = visual.region_mask(5, 4, 16, zoom=2)  # region 5 of a 4x4 grid: row 1, col 1
    assert square.shape == (32, 32) and square.sum() == 64 and square[8:16, 8:16].all()
    edge = visual.boundary(square)
    assert edge.sum() == 4 * 8 - 4 and edge[8, 8:16].all() and not edge[10, 10]


@pytest.fixture(scope="module")
def random_checkpoint(synthetic_root, tmp_path_factory):
    """An untrained 4-class U-Net recorded with the synthetic root and network size 32."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vis") / "best.pth"
    save_checkpoint({"model": build_model(4).state_dict(), "num_classes": 4,
                     "config": {"root_path": str(synthetic_root), "image_size": 32, "patch_size": 8}}, path)
    return path


def read_volume(root, case):
    with h5py.File(root / "data" / f"{case}.h5", "r") as f:
        return f["image"][:], f["label"][:]


def test_cli_panel(synthetic_root, random_checkpoint, tmp_path):
    cases = (synthetic_root / "val.list").read_text().split()[:2]
    out = tmp_path / "fig3.png"
    visualize.main(["panel", "--checkpoints", f"a={random_checkpoint}", f"b={random_checkpoint}", "--split", "val",
                    "--cases", *cases, "--slices", "1", "4", "--zoom", "2", "--device", "cpu", "--out", str(out)])
    png = np.asarray(Image.open(out).convert("RGB"))
    image, label = read_volume(synthetic_root, cases[0])
    h, w = image.shape[1:]
    pad, title = visual.PAD, visual.TITLE_H
    assert png.shape[:2] == (pad + 2 * (title + 2 * h + pad), pad + 4 * (2 * w + pad))
    for r, (case, z) in enumerate(zip(cases, (1, 4))):
        image, label = read_volume(synthetic_root, case)
        check_overlay(cell(png, r, 3, h, w, 2), image[z], label[z])
        # both columns show the same checkpoint's prediction
        assert np.array_equal(cell(png, r, 1, h, w, 2), cell(png, r, 2, h, w, 2))
    with pytest.raises(SystemExit):
        visualize.main(["panel", "--checkpoints", f"a={random_checkpoint}", "--cases", "nope", "--device", "cpu",
                        "--out", str(tmp_path / "x.png")])


def test_cli_hca_cgsr(synthetic_root, random_checkpoint, tmp_path):
    out = tmp_path / "hca.png"
    visualize.main(["hca", "--checkpoint", str(random_checkpoint), "--zoom", "3", "--device", "cpu",
                    "--out", str(out)])
    png = np.asarray(Image.open(out).convert("RGB"))
    stages = len(parse_hca_schedule(DEFAULT_HCA_SCHEDULE))
    side = 32 * 3
    assert png.shape[:2] == (visual.PAD + 2 * (visual.TITLE_H + side + visual.PAD),
                             visual.PAD + (1 + stages) * (side + visual.PAD))
    # a confidence cell is painted (not background)
    y, x = visual.cell_origin(0, 1, side, side)
    assert not (png[y:y + side, x:x + side] == 255).all()
    # row 2: four CGSR images, each outlined in its colour, and an empty fifth cell
    for col, colour in ((0, visual.W2S_COLOUR), (1, visual.S2W_COLOUR), (2, visual.S2W_COLOUR),
                        (3, visual.W2S_COLOUR)):
        y, x = visual.cell_origin(1, col, side, side)
        pixels = png[y:y + side, x:x + side].reshape(-1, 3)
        assert (pixels == colour).all(axis=1).any()
    y, x = visual.cell_origin(1, 4, side, side)
    assert (png[y:y + side, x:x + side] == 255).all()


def test_cgsr_example_is_consistent(synthetic_root, random_checkpoint):
    from evaluation.testing import load_trained_model

    model, _ = load_trained_model(random_checkpoint, "cpu")
    image, _ = read_volume(synthetic_root, (synthetic_root / "val.list").read_text().split()[0])
    out = visual.cgsr_example(model, image[2], image[3], 32, (1, 0, 0, 0), patch=8, seed=3)
    assert {out[k].shape for k in ("x_w", "x_s", "x_s2w", "x_w2s")} == {(32, 32)}
    disc = visual.region_mask(out["dst_w"], 8, 32, disc=True)
    # x_s2w = x_w outside the pasted disc, the strong view's source region inside it
    assert np.array_equal(out["x_s2w"][~disc], out["x_w"][~disc])
    src = visual.region_mask(out["src_s"], 8, 32)
    inner = visual.region_mask(0, 8, 8, disc=True)[:8, :8]
    assert np.array_equal(out["x_s2w"][disc], out["x_s"][src].reshape(8, 8)[inner])
    assert not np.array_equal(out["x_w"], out["x_s"])
