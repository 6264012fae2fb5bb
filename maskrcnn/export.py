"""ONNX export of a whole Mask R-CNN (resize, backbone, RPN, RoI heads, NMS, top-k, mask selection), and the
check that the exported file gives PyTorch's detections (`check_parity`).

The exported graph takes one image, float32 [3, H, W] RGB in 0..1 of any size, and returns, in that
image's pixels, `boxes` [D, 4] (xyxy), `scores` [D], `labels` [D] (int64, 1..K) and `mask_probs`
[D, M, M] (the predicted class's mask probabilities, M = 28). Pasting each M×M mask into its box of
the image (a D×H×W boolean output) is done outside the graph, by the same function the PyTorch model
uses (`maskrcnn.structures.paste_masks`), so the file's outputs stay small.

`ExportableMaskRCNN` is the model's inference path written so that a trace records every size as a
graph value: image sizes, the resized size, the padding, the per-level top-k and the number of RoIs
per pyramid level are computed with tensor operations (never Python numbers), and no branch depends
on data. It reuses the model's modules and parameters, so the exported file holds the same weights.

The model that runs the file is `maskrcnn.onnx_model.OnnxMaskRCNN`; the export cache (one export per
model, reused) is `maskrcnn.export_cache`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align, roi_pool

from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_path
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.modeling.poolers import RoIPooler, assign_levels
from maskrcnn.modeling.roi_heads import mask_probabilities
from maskrcnn.onnx_backends import OUTPUT_NAMES

OPSET = 17


class ExportError(UserError):
    """The model (or the requested format) cannot be exported; the message names the part."""


def unsupported_parts(model: MaskRCNN) -> list[str]:
    """Return a one-line description of each configured part the exported graph cannot reproduce."""
    cfg = model.cfg
    problems = []
    if cfg.input.resize != "tensor":
        problems.append(f"input.resize={cfg.input.resize} (PIL's uint8 resize of Detectron2 configs is not an "
                        "ONNX operator; export with input.resize=tensor, which changes results slightly)")
    keypoints = getattr(cfg.model, "keypoint_head", None)
    if keypoints is not None and getattr(keypoints, "enabled", False):
        problems.append("model.keypoint_head (the exported graph has no keypoint outputs yet)")
    if not cfg.model.mask_head.enabled:
        problems.append("model.mask_head.enabled=false (the exported graph always has a mask output)")
    return problems


def check_exportable(model: MaskRCNN) -> None:
    """Raise an ExportError naming every part of `model` that the exported graph cannot reproduce."""
    problems = unsupported_parts(model)
    if problems:
        raise ExportError("cannot export: " + "; ".join(problems))


def _clip(boxes: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Return [..., 4] boxes clamped to the rectangle, with the bounds as (traced) tensors."""
    zero = boxes.new_zeros(())
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), width.to(boxes.dtype))
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), height.to(boxes.dtype))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _nonempty(boxes: Tensor, min_size: float) -> Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def _with_spare_box(boxes: Tensor) -> Tensor:
    """Return the boxes with one more, (0, 0, 1, 1), appended."""
    return torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])])


class ExportableMaskRCNN(nn.Module):
    """The model's single-image inference path with every size a tensor: image [3,H,W] → detections."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        check_exportable(model)
        self.model = model.eval()

    # -- pieces -----------------------------------------------------------------------------------

    def preprocess(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the normalised, resized, padded batch of one, the input size and the resized size."""
        m = self.model
        cfg = m.cfg
        if cfg.model.input_format == "BGR":
            image = image.flip(0)
        size = torch._shape_as_tensor(image)[1:]  # (H, W) as a graph value, not constants
        # As resized_shape(), in double precision so the floor lands on the same pixel.
        size64 = size.to(torch.float64)
        # 1-d constants: the exporter turns 0-d ones (and Python numbers) into float32 and casts to match.
        limits = size64.new_tensor([cfg.input.min_size_test, cfg.input.max_size_test])
        if cfg.input.scale > 0:  # one factor for every image (input.scale), the longer side still capped
            limits = torch.stack([size64.min() * cfg.input.scale, limits[1]])
        scale = (limits / torch.stack([size64.min(), size64.max()])).min()
        new_size = torch.floor(size64 * scale).to(torch.int64)
        image = (image - m.pixel_mean) / m.pixel_std
        image = F.interpolate(image[None], size=(new_size[0], new_size[1]), mode="bilinear", align_corners=False)
        stride = cfg.model.size_divisibility
        padded = (new_size + stride - 1) // stride * stride
        pad = padded - new_size
        batch = F.pad(image, (0, pad[1], 0, pad[0]))
        return batch, size, new_size

    def proposals(self, features: list[Tensor], padded: tuple[Tensor, Tensor], size: Tensor) -> Tensor:
        """Return the RPN's proposals for the image: per-level top-k, clip, drop small, NMS per level."""
        rpn = self.model.rpn
        anchors = self.model.anchors(features, padded)
        boxes, scores, levels = [], [], []
        for level, (feature, level_anchors) in enumerate(zip(features, anchors)):
            logits, deltas = rpn.head([feature])
            logits, deltas = logits[0], deltas[0]
            k = torch.clamp(torch._shape_as_tensor(logits)[0], max=rpn.cfg.pre_nms_top_n_test)
            top_logits, index = logits.topk(k)
            boxes.append(rpn.coder.decode(deltas[index], level_anchors[index]).reshape(-1, 4))
            scores.append(top_logits.sigmoid())
            levels.append(torch.full_like(index, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        boxes = _clip(boxes, size[0], size[1])
        keep = torch.nonzero(_nonempty(boxes, rpn.cfg.min_size) & (scores >= rpn.cfg.score_thresh)).squeeze(1)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, rpn.cfg.nms_thresh)[: rpn.cfg.post_nms_top_n_test]
        return boxes[keep]

    @staticmethod
    def pool(pooler: RoIPooler, features: list[Tensor], boxes: Tensor) -> Tensor:
        """Return [R, C, S, S] pooled features: every level pooled (no branch on how many RoIs it has)."""
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1).to(features[0].dtype)

        def one(feature: Tensor, part: Tensor, scale: float) -> Tensor:
            if pooler.type == "roipool":
                return roi_pool(feature, part, pooler.output_size, scale)
            return roi_align(feature, part, pooler.output_size, scale, pooler.sampling_ratio, pooler.aligned)

        if len(features) == 1:
            return one(features[0], rois, pooler.scales[0])
        levels = assign_levels(rois[:, 1:], pooler.min_level, pooler.max_level, pooler.canonical_size,
                               pooler.canonical_level)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, pooler.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled.append(one(feature, rois[index], scale))
            order.append(index)
        # Rows come out level by level; put them back in RoI order.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def detect(self, features: list[Tensor], proposals: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return boxes, scores, labels and the class's mask probabilities in the resized image."""
        heads = self.model.roi_heads
        cfg = heads.cfg

        def run_stage(box_head: nn.Module, box_predictor: nn.Module, boxes: Tensor) -> tuple[Tensor, Tensor]:
            # One extra RoI, dropped after each head: a norm layer's reshape of an empty batch fails in ONNX
            # Runtime (GroupNorm's [N, G, -1] with N = 0), and an image may have no proposals or detections.
            pooled = self.pool(heads.box_pooler, features, _with_spare_box(boxes))
            class_logits, box_deltas = box_predictor(box_head(pooled))
            return class_logits[:-1], box_deltas[:-1]

        # The model's own box prediction (every cascade stage, if any), with this graph's pooling and clip.
        boxes, scores = heads.predict_boxes(run_stage, proposals, lambda b: _clip(b, size[0], size[1]))
        scores = scores[:, 1:]
        boxes = _clip(boxes, size[0], size[1]).expand(-1, scores.shape[1] + 1, -1)  # one box for all if agnostic
        boxes = boxes[:, 1:].reshape(-1, 4)  # drop the background column
        classes = torch.arange(1, scores.shape[1] + 1, device=scores.device)
        labels = classes[None].expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        keep = torch.nonzero(scores > cfg.score_thresh).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = torch.nonzero(_nonempty(boxes, cfg.min_size)).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_image]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if heads.shares_res5:
            pooled = heads.box_head.features(self.pool(heads.box_pooler, features, _with_spare_box(boxes)))
        else:
            pooled = self.pool(heads.mask_pooler, features, _with_spare_box(boxes))
        masks = mask_probabilities(heads.mask_head(pooled)[:-1], labels, heads.mask_cfg.loss)
        return boxes, scores, labels, masks

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return boxes (xyxy, input pixels), scores, labels (1..K) and [D, M, M] mask probabilities."""
        m = self.model
        batch, size, new_size = self.preprocess(image)
        features = m.extract_features(batch)
        padded = torch._shape_as_tensor(batch)[2:]
        proposals = self.proposals(features, (padded[0], padded[1]), new_size)
        boxes, scores, labels, mask_probs = self.detect(m.pooling_features(features), proposals, new_size)
        # Back to the input image, as MaskRCNN.postprocess: float32 ratios, then drop empty boxes.
        ratio = size.to(torch.float32) / new_size.to(torch.float32)
        boxes = boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
        keep = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)
        return boxes[keep], scores[keep], labels[keep], mask_probs[keep]


def model_metadata(model: MaskRCNN) -> dict[str, str]:
    """Return the metadata stored in the ONNX file: the config (JSON) and the class names."""
    return {"maskrcnn.config": json.dumps(model.cfg.to_dict()), "maskrcnn.class_names": json.dumps(model.class_names),
            "maskrcnn.outputs": "boxes xyxy input px; scores; labels 1..K; mask_probs [D,M,M] of the label"}


def export_onnx(model: MaskRCNN, out: str | os.PathLike, example_size: tuple[int, int] = (480, 640),
                opset: int = OPSET) -> Path:
    """Write `model` as an ONNX file (dynamic image height and width) and return its path.

    Uses torch.onnx's TorchScript-trace exporter (`dynamo=False`), where torchvision registers the ONNX
    symbolics of `nms`, `roi_align` and `roi_pool`. The torch.export-based exporter (`dynamo=True`)
    cannot trace this wrapper: it refuses `torch._shape_as_tensor`, and the data-dependent sizes
    (proposals after NMS, RoIs per level) would need unbacked-size hints throughout (docs/deploy.md).
    """
    import onnx

    out = Path(out)
    wrapper = ExportableMaskRCNN(model).eval()
    torch.manual_seed(0)
    example = torch.rand(3, *example_size)
    with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["image"], output_names=OUTPUT_NAMES,
            opset_version=opset, dynamo=False,
            dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                          "scores": {0: "detections"}, "labels": {0: "detections"},
                          "mask_probs": {0: "detections"}},
        )
        proto = onnx.load(str(tmp))
        for key, value in model_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return out


# The torchvision-parity tolerances (tests/test_torchvision_parity.py): boxes within 0.05 px, scores
# within 1e-4, mask IoU >= 0.99, and 98 of 100 detections paired (a near-tie at NMS may go either way).
PARITY_TOLERANCES = {"box": 0.05, "score": 1e-4, "mask_iou": 0.99}
PARITY_MATCHED = 0.98
PARITY_SIZES = ((480, 640), (257, 199), (100, 170), (333, 333))


@dataclass
class ParityReport:
    """What `check_parity` compared: random images, PyTorch's detections on them, and what differed."""

    images: int
    detections: int
    problems: list[str]
    runtime: str = "ONNX Runtime"  # the runtime compared with PyTorch, as messages name it

    @property
    def agrees(self) -> bool:
        """Whether detections were compared and all agreed: comparing none proves nothing."""
        return self.detections > 0 and not self.problems

    def lines(self) -> list[str]:
        """Return the outcome as lines for the terminal."""
        if self.problems:
            return self.problems
        if self.detections == 0:
            return [f"nothing to compare: neither PyTorch nor {self.runtime} detected anything on the {self.images} "
                    "random test images, so agreement is unproven"]
        return [f"{self.runtime} gives the same detections as PyTorch on the test images ({self.detections} "
                f"detections on {self.images} images)"]


def check_parity(model: MaskRCNN, onnx_path: str | os.PathLike, sizes: Sequence[tuple[int, int]] = PARITY_SIZES,
                 seed: int = 0, backend: str = "onnxruntime") -> ParityReport:
    """Compare PyTorch and the `backend` runtime (FP32) on random images of `sizes`; return what was compared and
    what differs."""
    from maskrcnn.engine.compare import Tolerances, detection_differences
    from maskrcnn.onnx_model import OnnxMaskRCNN

    onnx_model = OnnxMaskRCNN(onnx_path, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    problems, detections = [], 0
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=generator)
        with torch.no_grad():
            expected = model.eval()([image])[0]
        actual = onnx_model([image])[0]
        detections += len(expected["boxes"])
        for line in detection_differences(expected, actual, Tolerances(**PARITY_TOLERANCES), PARITY_MATCHED):
            problems.append(f"{h}x{w}: {line}")
    return ParityReport(images=len(sizes), detections=detections, problems=problems, runtime=onnx_model.runner.name)
