"""Deformable convolutions: zero offsets are the plain conv; the offset channels move samples as documented."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskrcnn.config import BackboneConfig
from maskrcnn.modeling.backbone import build_trunk
from maskrcnn.modeling.blocks import conv_norm
from maskrcnn.modeling.deform import DeformConv2d
from maskrcnn.modeling.norms import FrozenBatchNorm2d


def _conv(modulated: bool = False, groups: int = 1, offset_groups: int = 1, dilation: int = 1) -> DeformConv2d:
    torch.manual_seed(0)
    conv = DeformConv2d(8, 6, 3, padding=dilation, dilation=dilation, groups=groups, offset_groups=offset_groups,
                        modulated=modulated)
    torch.nn.init.normal_(conv.weight)
    return conv


def test_zero_offsets_are_the_plain_convolution():
    x = torch.randn(2, 8, 9, 11)
    for kwargs in ({}, {"groups": 2, "offset_groups": 2}, {"dilation": 2}):
        conv = _conv(**kwargs)
        with torch.no_grad():
            expected = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            assert torch.allclose(conv(x), expected, atol=1e-4), kwargs


def test_offset_channels_are_dy_dx_per_tap_and_modulation_follows_them():
    """Channel 2t is tap t's vertical offset, 2t+1 its horizontal one (Detectron2's and torchvision's layout);
    a modulated conv's mask logits come after all offsets."""
    x = torch.randn(1, 8, 9, 11)
    conv = _conv()
    with torch.no_grad():
        conv.offset.bias[1::2] = 1.0  # every tap one pixel to the right
        # Tap j of output column c then reads column c + j (not c + j - 1): the input padded 0 left, 2 right.
        expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), conv.weight)
        assert torch.allclose(conv(x), expected, atol=1e-4)
        conv.offset.bias.zero_()
        conv.offset.bias[0::2] = 1.0  # one pixel down
        expected = F.conv2d(F.pad(x, (1, 1, 0, 2)), conv.weight)
        assert torch.allclose(conv(x), expected, atol=1e-4)

    modulated = _conv(modulated=True)
    assert modulated.offset.out_channels == 27
    with torch.no_grad():  # zero offsets, mask logits 0: every sample weighs sigmoid(0) = 0.5
        plain = F.conv2d(x, modulated.weight, None, 1, 1)
        assert torch.allclose(modulated(x), 0.5 * plain, atol=1e-4)
        modulated.offset.bias[18:] = 20.0  # mask ~1: the plain conv
        assert torch.allclose(modulated(x), plain, atol=1e-3)


def test_frozen_bn_folding_and_training_reach_the_deformable_layers():
    """The folded-BN blocks call conv._conv_forward with a scaled weight; gradients reach the offsets."""
    trunk = build_trunk(BackboneConfig(depth=50, res2_channels=64, width_per_group=16, deform_stages=[3],
                                       trainable_stages=4))
    block = trunk.layer2[1]
    torch.nn.init.normal_(block.conv2.offset.weight, std=0.1)
    x = torch.randn(1, block.conv2.in_channels, 8, 8)
    norm = FrozenBatchNorm2d(block.conv2.out_channels)
    norm.weight.uniform_(0.5, 2)
    expected = norm(block.conv2(x))
    assert torch.allclose(conv_norm(block.conv2, norm, x), expected, atol=1e-4)
    expected.sum().backward()
    assert block.conv2.offset.weight.grad is not None and block.conv2.offset.weight.grad.abs().sum() > 0
