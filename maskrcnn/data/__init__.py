"""Data: image reading, COCO-format datasets, synthetic shapes, loaders."""

from maskrcnn.data.coco import CocoDataset, build_dataset, concat_datasets, parse_data_spec
from maskrcnn.data.image_io import image_to_tensor, read_image
from maskrcnn.data.loader import DataError, build_test_loader, build_train_loader
from maskrcnn.data.shapes import make_shapes

__all__ = [
    "CocoDataset",
    "DataError",
    "build_dataset",
    "build_test_loader",
    "build_train_loader",
    "concat_datasets",
    "image_to_tensor",
    "make_shapes",
    "parse_data_spec",
    "read_image",
]
