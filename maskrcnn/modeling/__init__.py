"""The Mask R-CNN network: `build_model(cfg)` and the checkpoint-name conversion it understands."""

from __future__ import annotations

from torch import Tensor

from maskrcnn.config_schema import Config
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.modeling.torchvision_import import convert_torchvision_state_dict, is_torchvision_state_dict


def build_model(cfg: Config) -> MaskRCNN:
    """Return a freshly initialised Mask R-CNN for `cfg`, in eval mode on the CPU."""
    return MaskRCNN(cfg).eval()


def import_state_dict(model: MaskRCNN, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return `state_dict` renamed into this project's parameter names (torchvision, Detectron2 files)."""
    from maskrcnn.detectron2.weights import convert_detectron2_state_dict, is_detectron2_state_dict

    if is_torchvision_state_dict(state_dict):
        return convert_torchvision_state_dict(state_dict)
    if is_detectron2_state_dict(state_dict):
        return convert_detectron2_state_dict(state_dict, model.cfg.model)
    return dict(state_dict)


__all__ = ["MaskRCNN", "build_model", "import_state_dict"]
