"""Dropout whose masks one seed draws the same on every x86 CPU.

torch's own dropout draws its mask with ``bernoulli_(keep)``. In torch's CPU kernel
(``aten/src/ATen/native/cpu/DistributionKernels.cpp``) that call has taken MKL's vectorised
generator when cpuinfo reports an Intel CPU and torch's serial generator otherwise, so the same seed
could give two different random streams. Here the mask on the CPU is ``torch.rand(shape) < keep``:
the default generator's serial Mersenne Twister, which every x86 CPU runs alike, drawn in the
tensor's logical (N, C, H, W) order, so the mask depends neither on the vendor nor on the memory
format or precision of the activations. The output is ``x * (mask / keep)``, as in torch.

On other devices (CUDA) the module calls ``F.dropout``: the fused kernel draws from that device's
generator (Philox on CUDA), which depends on the seed and the GPU's generator, not on the host CPU.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def dropout_noise(x, p):
    """``mask / keep`` for ``x`` (keep = 1 - p), with ``mask = torch.rand(x.shape) < keep`` drawn
    from the default CPU generator in logical order; same shape, dtype and memory format as ``x``.

    Each element is 0 or ``1 / keep`` (rounded as ``x``'s dtype rounds it). ``p`` in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p}: expected 0 <= p < 1")
    keep = 1.0 - p
    mask = torch.rand(x.shape, dtype=torch.float32) < keep
    noise = torch.empty_like(x)  # x's memory format (channels_last stays channels_last)
    noise.copy_(mask)
    return noise.div_(keep)


def portable_dropout(x, p, training):
    """Dropout of ``x`` with probability ``p``: ``x`` itself when not training or ``p == 0`` (no
    draw), ``x * dropout_noise(x, p)`` on the CPU, ``F.dropout`` on other devices."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * dropout_noise(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (a subclass: code that looks for dropout layers finds it) whose forward draws its
    masks through ``portable_dropout``; no parameters or buffers, so state dicts written with
    ``nn.Dropout`` in its place load unchanged."""

    def __init__(self, p=0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p}: expected 0 <= p < 1")
        super().__init__(p=float(p))

    def forward(self, x):
        return portable_dropout(x, self.p, self.training)
