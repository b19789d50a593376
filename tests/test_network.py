"""Tests for networks.unet: size, output shapes, the three deep-supervision heads, input checks."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.unet import UNet, build_model



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(4)


def conv(c_in, c_out, k):
    return k * k * c_in * c_out + c_out  # weights + bias


def block(c_in, c_out):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU: two convolutions, two BatchNorms (scale, shift)."""
    return conv(c_in, c_out, 3) + 2 * c_out + conv(c_out, c_out, 3) + 2 * c_out


def test_parameter_count_is_pymic_size(model):
    """Counted by hand from the PyMIC U-Net (16-32-64-128-256), for 4 classes: 1,821,840 (~1.8 M).
    A missing, added or resized convolution anywhere changes it."""
    c = (16, 32, 64, 128, 256)
    encoder = block(1, c[0]) + sum(block(c[i], c[i + 1]) for i in range(4))
    decoder = sum(conv(c[4 - i], c[3 - i], 1) + block(2 * c[3 - i], c[3 - i]) for i in range(4))
    out, heads = conv(c[0], 4, 3), sum(conv(ch, 4, 3) for ch in (128, 64, 32))
    assert encoder + decoder + out + heads == 1_821_840
    assert sum(p.numel() for p in model.parameters()) == 1_821_840
    # the three heads are small 3x3 convolutions on top of the PyMIC body
    heads = sum(p.numel() for p in model.heads.parameters())
    assert heads == sum(9 * ch * 4 + 4 for ch in (128, 64, 32))


def test_build_model_sets_classes_and_channels():
    m = build_model(2, in_chns=3)
    assert isinstance(m, UNet) and m.num_classes == 2
    m.eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("size", [128, 256])
def test_output_shapes(model, size):
    model.eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        logits = model(x)
        main, heads = model(x, heads=True)
    assert logits.shape == (2, 4, size, size)
    assert torch.equal(logits, main)  # heads=True does not change the main output
    assert isinstance(heads, list) and len(heads) == 3
    for h in heads:
        assert h.shape == (2, 4, size, size)


def test_non_square_input(model):
    model.eval()
    with torch.no_grad():
        main, heads = model(torch.rand(1, 1, 64, 96), heads=True)
    assert main.shape == (1, 4, 64, 96)
    assert all(h.shape == (1, 4, 64, 96) for h in heads)


def test_heads_order_is_half_quarter_eighth(model):
    """heads[0] comes from the 1/2-scale decoder level, heads[1] from 1/4, heads[2] from 1/8."""
    model.eval()
    raw = {}
    hooks = [head.register_forward_hook(lambda mod, inp, out, i=i: raw.__setitem__(i, out))
             for i, head in enumerate(model.heads)]
    try:
        with torch.no_grad():
            _, heads = model(torch.rand(1, 1, 64, 64), heads=True)
    finally:
        for h in hooks:
            h.remove()
    sizes = {i: out.shape[-1] for i, out in raw.items()}
    by_scale = {64 // s: i for i, s in sizes.items()}
    assert sorted(by_scale) == [2, 4, 8]
    for j, scale in enumerate((2, 4, 8)):
        expected = F.interpolate(raw[by_scale[scale]], size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.allclose(heads[j], expected, atol=1e-6), f"heads[{j}] is not the 1/{scale} head"


def test_heads_are_differentiable(model):
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.rand(2, 1, 32, 32)
    _, heads = model(x, heads=True)
    sum(h.square().mean() for h in heads).backward()
    for i, head in enumerate(model.heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, f"no gradient at head {i}"
    # the heads loss reaches the shared encoder too, but not the main output conv
    assert model.in_conv[0].weight.grad.abs().sum() > 0
    assert model.out_conv.weight.grad is None


def test_main_output_gradient_does_not_touch_heads(model):
    model.train()
    model.zero_grad(set_to_none=True)
    model(torch.rand(2, 1, 32, 32)).mean().backward()
    assert model.out_conv.weight.grad.abs().sum() > 0
    assert all(h.weight.grad is None for h in model.heads)


@pytest.mark.parametrize("shape", [(1, 1, 40, 48), (1, 1, 48, 40), (1, 1, 100, 100), (1, 1, 8, 8)])
def test_sizes_not_divisible_by_16_rejected(model, shape):
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(*shape))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(*shape), heads=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_in_place_activations_give_the_out_of_place_gradients(memory_format):
    """The in-place LeakyReLUs (a speed-up) change nothing: the forward outputs and every parameter's
    gradient equal bit for bit those of the same network with out-of-place activations."""
    torch.manual_seed(3)
    fast = build_model(4).to(memory_format=memory_format).train()
    slow = copy.deepcopy(fast)
    relus = [m for m in fast.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 18 and all(m.inplace for m in relus)  # 9 blocks x 2
    for m in slow.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False
    x = torch.randn(2, 1, 32, 32).contiguous(memory_format=memory_format)
    results = []
    for net in (fast, slow):
        torch.manual_seed(4)  # the same dropout masks
        main, heads = net(x, heads=True)
        (main.square().mean() + sum((k + 1) * h.mean() for k, h in enumerate(heads))).backward()
        results.append((main.detach(), [p.grad for p in net.parameters()], net.in_conv[1].running_mean.clone()))
    (m1, g1, r1), (m2, g2, r2) = results
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert any(g.abs().sum() > 0 for g in g1)
