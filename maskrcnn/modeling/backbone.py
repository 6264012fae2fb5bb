"""Backbones: a ResNet/ResNeXt trunk (torchvision.models) with a chosen norm, plus FPN or C4 outputs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from maskrcnn.config_schema import BackboneConfig
from maskrcnn.modeling.blocks import FOLDED_BLOCKS, conv_norm
from maskrcnn.modeling.deform import make_deformable
from maskrcnn.modeling.norms import FrozenBatchNorm2d, norm_factory


class ConvNorm(nn.Sequential):
    """Conv2d, then an optional norm, then an optional ReLU; the conv has a bias only without norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: Callable[[int], nn.Module] | None = None,
        relu: bool = True,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm is None
        )
        if norm is not None:
            layers["norm"] = norm(out_channels)
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


# depth -> (residual block, blocks per stage res2..res5), as in the ResNet paper's Table 1; ResNet-10 (one
# basic block a stage, torchvision's ResNet class with layers [1, 1, 1, 1]) is the small trunk for CPU training.
DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}

STAGES = ("layer1", "layer2", "layer3", "layer4")  # res2..res5


def build_trunk(cfg: BackboneConfig) -> ResNet:
    """Return a torchvision ResNet/ResNeXt (no weights) with the configured norm and frozen stages.

    ResNeXt is the same trunk with grouped 3x3 convs: `groups` x `width_per_group` (e.g. 32x4d).
    """
    if cfg.depth not in DEPTHS:
        raise ValueError(f"ResNet depth {cfg.depth} is not one of {sorted(DEPTHS)}")
    block, layers = DEPTHS[cfg.depth]
    if block is BasicBlock and (cfg.groups, cfg.width_per_group) != (1, 64):
        raise ValueError(f"ResNet-{cfg.depth} has basic blocks: ResNeXt groups/width need depth >= 50")
    norm = norm_factory(cfg.norm, cfg.gn_groups)
    if cfg.fold_frozen_bn:
        block = FOLDED_BLOCKS[block]
    trunk = ResNet(block, layers, groups=cfg.groups, width_per_group=cfg.width_per_group, norm_layer=norm)
    if cfg.res2_channels:
        thin_stages(trunk, block, layers, cfg.res2_channels, cfg.width_per_group)
    del trunk.fc, trunk.avgpool  # detection uses the feature maps only
    if cfg.stride_in_1x1 and block_expansion(trunk) > 1:  # MSRA / Detectron2: stride in the 1x1 conv
        for stage in (trunk.layer2, trunk.layer3, trunk.layer4):
            stage[0].conv1.stride, stage[0].conv2.stride = stage[0].conv2.stride, (1, 1)
    if cfg.res5_dilation != 1:
        dilate_stage(trunk.layer4, cfg.res5_dilation)
    for stage in cfg.deform_stages:  # after the strides and dilation are final: the offset conv copies them
        make_deformable(getattr(trunk, STAGES[stage - 2]), cfg.deform_groups, cfg.deform_modulated)
    freeze_stages(trunk, cfg.trainable_stages)
    return trunk


def dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Drop a bottleneck stage's stride 2 and dilate every block's 3x3 conv instead (Detectron2's DC5).

    The output keeps the input's resolution while the 3x3 convs see as far as before. Unlike
    torchvision's `replace_stride_with_dilation`, the first block is dilated too, as in Detectron2.
    """
    first = stage[0]
    first.conv1.stride = first.conv2.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in stage:
        block.conv2.dilation = block.conv2.padding = (dilation, dilation)


def thin_stages(trunk: ResNet, block: type[nn.Module], layers: list[int], res2_channels: int,
                width_per_group: int) -> None:
    """Rebuild res2..res5 with `res2_channels` outputs at res2 (doubling per stage), as Detectron2's
    RES2_OUT_CHANNELS does; each bottleneck stays `groups x width_per_group` wide at res2.

    torchvision's stages have 64, 128, 256, 512 "planes" (outputs = 4 x planes, bottleneck width =
    planes x base_width / 64 x groups); a thin trunk has fewer planes and a base width to match.
    """
    planes = res2_channels // block.expansion
    trunk.inplanes = 64  # the stem's output
    trunk.base_width = width_per_group * 64 // planes
    for i, name in enumerate(STAGES):
        setattr(trunk, name, trunk._make_layer(block, planes * 2**i, layers[i], stride=1 if i == 0 else 2))
    for module in trunk.modules():  # the initialisation torchvision's ResNet gives its own stages
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def block_expansion(trunk: ResNet) -> int:
    """Return the channel expansion of the trunk's residual blocks (1 basic, 4 bottleneck)."""
    return trunk.layer1[0].expansion


def freeze_stages(trunk: nn.Module, trainable_stages: int) -> None:
    """Stop gradients into all but the last `trainable_stages` of (stem, res2, res3, res4, res5)."""
    order = ["layer4", "layer3", "layer2", "layer1", "stem"]
    trainable = set(order[:trainable_stages])
    for name, param in trunk.named_parameters():
        stage = name.split(".")[0]
        stage = "stem" if stage in ("conv1", "bn1") else stage
        param.requires_grad_(stage in trainable)


def trunk_channels(trunk: ResNet) -> list[int]:
    """Return the output channels of res2..res5 (64, 128, 256, 512 times the block expansion, or thinner)."""
    last_convs = [getattr(trunk, name)[-1] for name in STAGES]
    return [(block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels for block in last_convs]


def run_stem(trunk: ResNet, x: Tensor, fold_frozen_bn: bool = True) -> Tensor:
    """Return the stem output (conv1, norm, ReLU, max-pool): stride 4."""
    x = conv_norm(trunk.conv1, trunk.bn1, x) if fold_frozen_bn else trunk.bn1(trunk.conv1(x))
    return trunk.maxpool(F.relu(x, inplace=True))


class FPN(nn.Module):
    """Feature Pyramid Network: lateral 1x1 convs, a top-down nearest-upsampling path, 3x3 outputs.

    Returns P2..P5 from res2..res5 and P6 as a stride-2 subsampling of P5 (for the RPN only).
    """

    def __init__(self, in_channels: list[int], out_channels: int, norm: str = ""):
        super().__init__()
        make_norm = norm_factory(norm)
        self.lateral = nn.ModuleList(ConvNorm(c, out_channels, 1, make_norm, relu=False) for c in in_channels)
        self.output = nn.ModuleList(
            ConvNorm(out_channels, out_channels, 3, make_norm, relu=False) for _ in in_channels
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        top_down = self.lateral[-1](features[-1])
        outputs = [self.output[-1](top_down)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[level](top_down))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))  # P6
        return outputs


class Backbone(nn.Module):
    """Trunk + FPN (features P2..P6, strides 4..64), C4 (res4, stride 16) or C5 (res5, stride 32; 16 dilated).

    For C4 the trunk's res5 stage is not run here: the RoI head owns it (`self.res5`).
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.kind = cfg.kind
        self.fold_frozen_bn = cfg.fold_frozen_bn
        self.trunk = build_trunk(cfg)
        self.trunk_name = f"ResNet-{cfg.depth}" if cfg.groups == 1 else (
            f"ResNeXt-{cfg.depth}-{cfg.groups}x{cfg.width_per_group}d")
        channels = trunk_channels(self.trunk)
        if cfg.kind == "fpn":
            self.fpn = FPN(channels, cfg.fpn_channels, cfg.fpn_norm)
            self.strides = [4, 8, 16, 32, 64]
            self.out_channels = cfg.fpn_channels
        elif cfg.kind == "c4":
            self.strides = [16]
            self.out_channels = channels[2]
            self.res5_channels = channels[3]
        else:  # c5: res5 at stride 32, or 16 when dilated (DC5)
            self.strides = [32 // cfg.res5_dilation]
            self.out_channels = channels[3]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = run_stem(self.trunk, x, self.fold_frozen_bn)
        stages = STAGES[:3] if self.kind == "c4" else STAGES
        features = []
        for name in stages:
            x = getattr(self.trunk, name)(x)
            features.append(x)
        if self.kind == "fpn":
            return self.fpn(features)
        return [features[-1]]

    @property
    def res5(self) -> nn.Module:
        """The trunk's last stage, used as the C4 RoI head."""
        return self.trunk.layer4

    def load_trunk_weights(self, path: str) -> list[str]:
        """Load an ImageNet torchvision ResNet/ResNeXt state dict into the trunk; return unused file keys."""
        from maskrcnn.errors import UserError

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"backbone weights file '{path}' does not exist") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
            raise UserError(f"backbone weights file '{path}' cannot be read ({e.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        # Offset convs of deformable layers are not in ImageNet files: they stay zero (plain sampling).
        own = {k: v for k, v in self.trunk.state_dict().items()
               if not k.endswith("num_batches_tracked") and ".conv2.offset." not in k}
        missing = [k for k in own if k not in state]
        wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        if missing or wrong:
            problem = f"missing {', '.join(missing[:3])}" if missing else f"shape mismatch {', '.join(wrong[:2])}"
            raise UserError(
                f"backbone weights file '{path}' does not fit this {self.trunk_name} trunk "
                f"({problem}); give the torchvision ImageNet file of the same depth and width"
            )
        self.trunk.load_state_dict({k: state[k] for k in own}, strict=False)
        return sorted(k for k in state if k not in own and not k.endswith("num_batches_tracked"))

