"""Deformable 3x3 convolutions (Dai et al. 2017; modulated v2: Zhu et al. 2019) for ResNet bottlenecks.

A deformable convolution samples its input at the kernel's grid positions moved by learned,
per-position offsets; a plain conv over the same input predicts them. The sampling is
`torchvision.ops.deform_conv2d`. The layout is Detectron2's (and torchvision's, which Detectron2 calls
on the CPU): the offset conv has 2·k² channels per offset group, (dy, dx) for each kernel tap in
row-major order; the modulated variant adds k² mask channels per group after all the offsets,
squashed by a sigmoid. So a Detectron2 `conv2_offset` loads unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class DeformConv2d(nn.Conv2d):
    """A Conv2d (same weight, stride, padding, dilation, groups) that samples at learned offsets.

    `offset` is the conv predicting them (zero-initialised: the layer starts as its plain conv).
    Subclassing Conv2d keeps the weight's name and lets code that rescales a conv's weight
    (`conv._conv_forward(x, weight, bias)`, as frozen-BN folding does) work unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False,
                 offset_groups: int = 1, modulated: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        if in_channels % offset_groups:
            raise ValueError(f"deformable conv: {in_channels} input channels do not split into "
                             f"{offset_groups} offset groups")
        self.modulated = modulated
        self.offset_groups = offset_groups
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.offset = nn.Conv2d(in_channels, (3 if modulated else 2) * taps * offset_groups, self.kernel_size,
                                stride=self.stride, padding=self.padding, dilation=self.dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def like(cls, conv: nn.Conv2d, offset_groups: int = 1, modulated: bool = False) -> "DeformConv2d":
        """Return a deformable conv with `conv`'s shape, stride, padding, dilation and groups (new weights)."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   conv.dilation[0], conv.groups, conv.bias is not None, offset_groups, modulated)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:  # [offsets (2·k²·G) | mask logits (k²·G)], as Detectron2 splits them
            split = out.shape[1] * 2 // 3
            out, mask = out[:, :split], out[:, split:].sigmoid()
        return deform_conv2d(x, out, weight, bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        kind = "modulated" if self.modulated else "v1"
        return f"{super().extra_repr()}, deformable {kind}, offset_groups={self.offset_groups}"


def make_deformable(stage: nn.Module, offset_groups: int = 1, modulated: bool = False) -> None:
    """Replace the 3x3 conv (`conv2`) of every bottleneck in a ResNet stage by a deformable one."""
    for block in stage:
        if not isinstance(block.conv2, nn.Conv2d) or block.conv2.kernel_size != (3, 3):
            raise ValueError("deformable convolutions need bottleneck blocks (a 3x3 conv2)")
        block.conv2 = DeformConv2d.like(block.conv2, offset_groups, modulated)
        nn.init.kaiming_normal_(block.conv2.weight, mode="fan_out", nonlinearity="relu")

