"""torchvision's Mask R-CNN with fixed random weights, and ours loaded from the same weights.

The reference pairs of the parity tests (tests/test_torchvision_parity.py), the torchvision comparison
(benchmarks/compare_torchvision.py) and the GPU check (benchmarks/gpu_check.py):

- `decisive_torchvision_model`: torchvision's own builder, seeded, with scores and mask logits moved
  off near-ties so that two implementations either agree or plainly do not (the parity pair);
- `fine_tuning_torchvision_model`: R50-FPN as fine-tuned from ImageNet (frozen BN, res3..res5 trainable),
  like our `torchvision-r50-fpn` preset, so that training steps are like for like (the speed pair);
- `ours_with_weights`: one of our presets loaded from a torchvision state dict, every key used.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from maskrcnn.config import load_config
from maskrcnn.engine.compare import Tolerances
from maskrcnn.modeling import MaskRCNN, build_model, import_state_dict

PARITY_MIN_SIZE, PARITY_MAX_SIZE = 320, 512  # smaller than the presets' 800 px, so parity tests stay quick
# Channels-last convolutions and folded frozen BN sum in another order than torchvision's NCHW
# convolutions: on random weights boxes move by up to ~0.03 px and scores by ~2e-5, and one
# detection in a hundred may sit on an NMS near-tie that the last bit decides.
FAST_PATH = Tolerances(box=0.05, score=1e-4, mask_iou=0.99)
FAST_PATH_MATCHED = 0.98


def set_torchvision_input_size(model: nn.Module, min_size: int, max_size: int) -> nn.Module:
    """Make torchvision's transform resize images to `min_size` (shorter side) within `max_size`; return the model."""
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size
    return model


def decisive_torchvision_model(builder: Callable[..., nn.Module]) -> nn.Module:
    """Return a seeded torchvision Mask R-CNN (from `builder`) whose scores and masks are not near-ties."""
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.5)  # scores spread over ~0.35..0.5
        # Random mask logits saturate to exactly 0 or 1, and a bilinear sample halfway between the two
        # lands exactly on the 0.5 threshold; softer logits, shifted off zero, avoid such coin flips.
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(0.3)
    return set_torchvision_input_size(model, PARITY_MIN_SIZE, PARITY_MAX_SIZE)


def fine_tuning_torchvision_model() -> nn.Module:
    """torchvision's maskrcnn_resnet50_fpn as fine-tuned from ImageNet: frozen BN, res3..res5 trainable."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = TorchvisionMaskRCNN(_resnet_fpn_extractor(trunk, trainable_layers=3), num_classes=91).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.5)  # ~100 detections survive, as with a trained model
    return model


def parity_size_overrides() -> list[str]:
    """Config overrides that make our model resize test images as `decisive_torchvision_model` does."""
    return [f"input.min_size_test={PARITY_MIN_SIZE}", f"input.max_size_test={PARITY_MAX_SIZE}"]


def ours_with_weights(preset: str, state_dict: dict[str, Tensor], overrides: list[str] = ()) -> MaskRCNN:
    """Return our model of `preset` (with `overrides`) in eval mode, loaded from a torchvision state dict.

    Raises ValueError unless every parameter is loaded and every key is used (BN's `num_batches_tracked` aside).
    """
    ours = build_model(load_config(preset, list(overrides)))
    result = ours.load_state_dict(import_state_dict(ours, state_dict), strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if result.missing_keys or unexpected:
        raise ValueError(f"torchvision weights do not fit {preset}: missing {result.missing_keys}, "
                         f"unused {unexpected}")
    return ours.eval()
