"""ImageNet trunk initialisation from torchvision ResNet state-dict files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from maskrcnn.config import BackboneConfig
from maskrcnn.errors import UserError
from maskrcnn.modeling.backbone import Backbone


def test_resnet18_imagenet_file_loads_into_the_trunk(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    backbone = Backbone(BackboneConfig(depth=18, norm="frozen_bn"))
    skipped = backbone.load_trunk_weights(str(path))
    assert skipped == ["fc.bias", "fc.weight"]  # the classifier is not part of a detection trunk
    assert torch.equal(backbone.trunk.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    assert torch.equal(backbone.trunk.bn1.running_var, imagenet.bn1.running_var)


def test_resnext_trunk_has_torchvision_layout(tmp_path):
    imagenet = torchvision.models.resnext50_32x4d()
    path = tmp_path / "x50.pth"
    torch.save(imagenet.state_dict(), path)
    backbone = Backbone(BackboneConfig(depth=50, groups=32, width_per_group=4))
    assert backbone.load_trunk_weights(str(path)) == ["fc.bias", "fc.weight"]
    assert torch.equal(backbone.trunk.layer4[2].conv2.weight, imagenet.layer4[2].conv2.weight)


def test_wrong_or_missing_trunk_file_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    backbone = Backbone(BackboneConfig(depth=18))
    with pytest.raises(UserError, match="does not fit"):
        backbone.load_trunk_weights(str(path))
    with pytest.raises(UserError, match="does not exist"):
        backbone.load_trunk_weights(str(tmp_path / "nope.pth"))


def test_resnet10_is_torchvisions_resnet_with_one_basic_block_a_stage(tmp_path):
    # The shapes preset's small trunk: torchvision's ResNet class with layers [1, 1, 1, 1], so a
    # torchvision-made ResNet-10 state dict is its exact layout, and the FPN sees strides 4..64.
    torch.manual_seed(0)
    reference = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    path = tmp_path / "resnet10.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone(BackboneConfig(depth=10, fpn_channels=32))
    assert [len(getattr(backbone.trunk, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert backbone.load_trunk_weights(str(path)) == ["fc.bias", "fc.weight"]
    assert torch.equal(backbone.trunk.layer4[0].conv2.weight, reference.layer4[0].conv2.weight)
    features = backbone.eval()(torch.rand(1, 3, 128, 192))
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert {f.shape[1] for f in features} == {32}
