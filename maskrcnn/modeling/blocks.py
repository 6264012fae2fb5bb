"""ResNet blocks whose frozen BatchNorm is folded into the preceding convolution on the fly.

A frozen BN is an affine map per channel, y = x * scale + shift, so conv-then-BN equals one conv with
weight W * scale and bias shift. Computing that scaled weight at each forward (a weight-sized
multiply) instead of scaling the activation saves two activation-sized passes per layer, in training
and in inference, and the gradient still reaches W through the multiply, so training is the same
computation. The modules and their state-dict keys stay torchvision's (conv1, bn1, ...), so
checkpoints load unchanged. Any other norm (BatchNorm, GroupNorm) runs as a separate layer.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from maskrcnn.modeling.norms import FrozenBatchNorm2d


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """Return norm(conv(x)), as a single convolution when `norm` is a frozen BatchNorm."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)


def _shortcut(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor:
    """The identity, or the projection (1x1 conv + norm) where the shape changes."""
    if block.downsample is None:
        return x
    conv, norm = block.downsample
    return conv_norm(conv, norm, x)


class FoldedBasicBlock(BasicBlock):
    """torchvision's BasicBlock (two 3x3 convs) with frozen BNs folded into the convs."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(conv_norm(self.conv1, self.bn1, x), inplace=True)
        out = conv_norm(self.conv2, self.bn2, out)
        out += _shortcut(self, x)
        return F.relu(out, inplace=True)


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck (1x1, 3x3, 1x1) with frozen BNs folded into the convs."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(conv_norm(self.conv1, self.bn1, x), inplace=True)
        out = F.relu(conv_norm(self.conv2, self.bn2, out), inplace=True)
        out = conv_norm(self.conv3, self.bn3, out)
        out += _shortcut(self, x)
        return F.relu(out, inplace=True)


FOLDED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    BasicBlock: FoldedBasicBlock,
    Bottleneck: FoldedBottleneck,
}
