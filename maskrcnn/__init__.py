"""Mask R-CNN (He, Gkioxari, Dollár, Girshick, 2017) in PyTorch: train, evaluate, predict."""

from maskrcnn.api import load_model
from maskrcnn.config import Config, load_config
from maskrcnn.modeling import MaskRCNN, build_model

__all__ = ["Config", "MaskRCNN", "build_model", "load_config", "load_model"]
__version__ = "0.1.0"
