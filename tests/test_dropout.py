"""Dropout masks that one seed draws alike on every x86 CPU (issue 35): the mask is
``torch.rand(shape) < keep`` in logical order, and no training path calls a random operator whose
stream depends on the CPU (``bernoulli_``, torch's dropout, ``normal_``, ...)."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import train_ACDC_SSCD
import train_ACDC_supervised
from conftest import load_script
from networks.dropout import Dropout, dropout_noise, portable_dropout
from networks.unet import build_model

# Seeded operators whose CPU kernels are serial draws from the generator (the same numbers on
# every x86 CPU). Anything else tagged nondeterministic_seeded is refused by the spy below.
PORTABLE_RANDOM_OPS = {"rand", "rand_like", "uniform_", "randint", "randint_like", "random_", "randperm"}


class RandomOpSpy(TorchDispatchMode):
    """Records the name of every seeded (random) aten operator that runs inside it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_noise_is_the_uniform_draw_below_keep_divided_by_keep():
    x = torch.ones(2, 3, 4, 5)
    torch.manual_seed(3)
    noise = dropout_noise(x, 0.25)
    torch.manual_seed(3)
    expected = (torch.rand(2, 3, 4, 5) < 0.75).float() / 0.75
    assert torch.equal(noise, expected)
    assert torch.equal(noise.unique(), torch.tensor([0.0, 1 / 0.75]))


def test_mask_does_not_depend_on_memory_format_or_dtype():
    x = torch.randn(2, 4, 8, 8)
    torch.manual_seed(5)
    plain = dropout_noise(x, 0.3)
    torch.manual_seed(5)
    nhwc = dropout_noise(x.contiguous(memory_format=torch.channels_last), 0.3)
    torch.manual_seed(5)
    half = dropout_noise(x.bfloat16(), 0.3)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert torch.equal(plain, nhwc)
    assert half.dtype == torch.bfloat16 and torch.equal(plain > 0, half > 0)


def test_output_and_gradient_are_x_times_noise():
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    torch.manual_seed(9)
    out = portable_dropout(x, 0.5, training=True)
    torch.manual_seed(9)
    noise = dropout_noise(x.detach(), 0.5)
    assert torch.equal(out, x.detach() * noise)
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, 2.0 * noise)
    kept = (noise > 0).float().mean().item()
    assert 0.4 < kept < 0.6  # 216 draws at keep 0.5


def test_eval_and_zero_probability_pass_through_without_a_draw():
    x = torch.randn(2, 2, 4, 4)
    layer = Dropout(0.5).eval()
    zero = Dropout(0.0).train()
    state = torch.get_rng_state()
    assert layer(x) is x and zero(x) is x
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="expected 0 <= p < 1"):
        Dropout(1.0)


def test_network_has_no_torch_dropout_and_loads_old_state_dicts():
    model = build_model(4)
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert all(type(m).forward is Dropout.forward for m in dropouts) and len(dropouts) == 9
    assert [m.p for m in model.modules() if isinstance(m, Dropout)] == [0.05, 0.1, 0.2, 0.3, 0.5] + [0.0] * 4
    # nn.Dropout held no state: the keys are those of the network written with it
    assert "in_conv.4.weight" in model.state_dict() and "in_conv.3.weight" not in model.state_dict()


def test_network_forward_backward_draws_only_portable_random_ops():
    model = build_model(4).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    with RandomOpSpy() as spy:
        logits, heads = model(x, heads=True)
        (logits.sum() + sum(h.sum() for h in heads)).backward()
    assert spy.seen == {"rand"}


def test_a_training_run_draws_only_portable_random_ops(synthetic_root, tmp_path):
    """Pre-training with the SDA and a curriculum stage (teacher in train mode, so its dropout runs
    too), and the labeled-only trainer: every random draw is one of the portable operators."""
    tiny = ["--root_path", str(synthetic_root), "--image_size", "32", "--batch_size", "4", "--labeled_bs", "2",
            "--device", "cpu", "--num_workers", "0", "--labelnum", "3", "--amp", "off"]
    with RandomOpSpy() as spy:
        train_ACDC_SSCD.main([*tiny, "--save_dir", str(tmp_path / "sscd"), "--pre_iterations", "2",
                              "--stage_iterations", "1", "--hca_weights", "1,0,0,0", "--patch_size", "8",
                              "--teacher_mode", "train", "--val_interval", "2"])
        train_ACDC_supervised.main([*tiny, "--save_dir", str(tmp_path / "sup"), "--max_iterations", "2",
                                    "--val_interval", "2"])
    assert "rand" in spy.seen  # the dropout masks (and the boxes/augmentations)
    assert spy.seen <= PORTABLE_RANDOM_OPS, sorted(spy.seen - PORTABLE_RANDOM_OPS)


def test_spy_catches_torch_dropout():
    """The spy is not blind: torch's own dropout shows as bernoulli_, outside the portable set."""
    with RandomOpSpy() as spy:
        nn.Dropout(0.5).train()(torch.ones(8))
    assert spy.seen - PORTABLE_RANDOM_OPS


def test_bench_dropout_swaps_the_layers_and_times_both():
    bench = load_script("bench/bench_dropout.py")
    model = build_model(4)
    bench.swap_dropout([model], portable=False)
    assert sum(type(m) is nn.Dropout for m in model.modules()) == 9
    bench.swap_dropout([model], portable=True)
    assert [m.p for m in model.modules() if isinstance(m, Dropout)] == [0.05, 0.1, 0.2, 0.3, 0.5] + [0.0] * 4
    best = bench.main(["--image_size", "32", "--batch_size", "4", "--threads", "1", "--steps", "1", "--blocks", "1"])
    assert set(best) == {"torch", "portable"} and all(v > 0 for v in best.values())
