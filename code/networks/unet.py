"""The PyMIC-style 2-D U-Net used by SSL4MIS, BCP, ABD and SSCD, with deep-supervision heads.

Encoder channels 16-32-64-128-256 with dropout 0.05/0.1/0.2/0.3/0.5, conv-BN-LeakyReLU blocks,
bilinear up-blocks preceded by a 1x1 convolution, a 3x3 output convolution (about 1.8 M
parameters in all). Three extra 3x3 heads read the decoder at 1/8, 1/4 and 1/2 of the input
resolution; their class maps are upsampled to the input size so that the Hierarchical
Confidence Aggregation (HCA) can combine them with the main output at any input size
divisible by 16 (the reference fixed 256x256, its defect D25).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.dropout import Dropout

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU.

    The LeakyReLUs work in place on the BatchNorm outputs, which nothing else reads (BatchNorm's
    backward uses its input): with a positive slope the backward from the result equals the one
    from the input, so the gradients are bit-identical, and the U-Net's forward + backward at 256^2
    takes ~13 % less time on the CPU (fewer full-size activations; bench/README.md).
    """

    def __init__(self, in_ch, out_ch, dropout):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(inplace=True),
            Dropout(dropout),  # masks drawn alike on every x86 CPU (networks/dropout.py)
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """1x1 conv on the deep feature, bilinear x2, concatenation with the skip, ConvBlock."""

    def __init__(self, deep_ch, skip_ch, out_ch):
        super().__init__()
        self.reduce = nn.Conv2d(deep_ch, skip_ch, 1)
        self.conv = ConvBlock(2 * skip_ch, out_ch, 0.0)

    def forward(self, deep, skip):
        up = F.interpolate(self.reduce(deep), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet(nn.Module):
    """U-Net returning main logits, or ``(logits, heads)`` when ``heads=True``.

    ``heads`` is the list ``[1/2-scale, 1/4-scale, 1/8-scale]`` of class logits, each upsampled
    (bilinear) to the input size, i.e. the order of the reference's HCA weight vector
    ``(W1, W2, W3)`` with the main output as ``W4``.
    """

    def __init__(self, in_chns=1, class_num=4):
        super().__init__()
        c, p = CHANNELS, DROPOUT
        self.in_conv = ConvBlock(in_chns, c[0], p[0])
        self.down = nn.ModuleList(ConvBlock(c[i], c[i + 1], p[i + 1]) for i in range(4))
        self.up = nn.ModuleList(UpBlock(c[4 - i], c[3 - i], c[3 - i]) for i in range(4))
        self.out_conv = nn.Conv2d(c[0], class_num, 3, padding=1)
        # heads on the outputs of up[0] (1/8), up[1] (1/4), up[2] (1/2)
        self.heads = nn.ModuleList(nn.Conv2d(c[3 - i], class_num, 3, padding=1) for i in range(3))
        self.num_classes = class_num

    def forward(self, x, heads=False):
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by 16")
        skips = [self.in_conv(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        feat = skips[-1]
        decoded = []
        for i, block in enumerate(self.up):
            feat = block(feat, skips[3 - i])
            decoded.append(feat)
        logits = self.out_conv(feat)
        if not heads:
            return logits
        size = x.shape[-2:]
        aux = [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)
               for head, d in zip(self.heads, decoded[:3])]
        return logits, aux[::-1]


def build_model(num_classes, in_chns=1):
    """The network every script uses."""
    return UNet(in_chns=in_chns, class_num=num_classes)
