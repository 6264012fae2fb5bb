"""A CVAT SDK auto-annotation function running a maskrcnn model in the `cvat-cli` process.

    cvat-cli --server-host https://cvat.example.org --auth USER task auto-annotate TASK_ID \\
        --function-module maskrcnn.serve.cvat_function -p weights=str:runs/mine/checkpoints/model_final.pth

Parameters (`-p NAME=TYPE:VALUE`): weights, config (a preset or YAML, when the weights hold none),
device (default cpu), score_threshold (default 0.5; CVAT's `--conf-threshold` wins when given).
Masks come back as CVAT mask shapes, or polygons under `--conv-mask-to-poly`; labels are the model's
class names, matched by name to the task's labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maskrcnn.serve.labeling import class_names, instances, polygon


class MaskRCNNFunction:
    """A CVAT detection function (`spec` and `detect`) around a loaded model."""

    def __init__(self, model: Any, score_threshold: float = 0.5):
        import cvat_sdk.auto_annotation as cvataa

        self.model, self.score_threshold = model, score_threshold
        self.names = class_names(model)
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, i, type="mask") for i, name in enumerate(self.names, 1)])

    def detect(self, context: Any, image: Any) -> list:
        """Return the model's detections on one PIL image as CVAT mask (or polygon) shapes."""
        import cvat_sdk.auto_annotation as cvataa
        from cvat_sdk.masks import encode_mask

        from maskrcnn.structures.detections import detections_to_cpu

        threshold = self.score_threshold if context.conf_threshold is None else context.conf_threshold
        pixels = np.asarray(image.convert("RGB"))
        output = detections_to_cpu(self.model.predict(pixels, score_threshold=threshold)[0])
        ids = {name: i for i, name in enumerate(self.names, 1)}
        shapes = []
        for found in instances(output, self.names):
            if context.conv_mask_to_poly:
                shapes.append(cvataa.polygon(ids[found.name], polygon(found.mask).ravel().tolist()))
            else:
                shapes.append(cvataa.mask(ids[found.name], encode_mask(found.mask)))
        return shapes


def create(weights: str | None = None, config: str | None = None, device: str = "cpu",
           score_threshold: float = 0.5) -> MaskRCNNFunction:
    """Load the model (cvat-cli calls this with the `-p` parameters) and return the function."""
    from maskrcnn.api import load_model

    if weights is None and config is None:
        raise ValueError("pass the model: -p weights=str:PATH (a checkpoint or zoo name) and/or -p config=str:NAME")
    return MaskRCNNFunction(load_model(config, weights=weights, device=device), score_threshold)
