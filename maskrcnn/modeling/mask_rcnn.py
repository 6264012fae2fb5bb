"""The meta-architecture: normalise → resize → pad → backbone → RPN → RoI heads → outputs in input pixels."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config_schema import Config
from maskrcnn.instance_masks import InstanceMasks, as_instance_masks
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.backbone import Backbone
from maskrcnn.modeling.cascade import CascadeRoIHeads
from maskrcnn.modeling.roi_heads import RoIHeads
from maskrcnn.modeling.rpn import RPN
from maskrcnn.structures.boxes import nonempty_boxes, scale_boxes
from maskrcnn.structures.paste import paste_masks, paste_masks_grid_sample

ImageLike = str | Path | Tensor | np.ndarray | Any  # Any: a PIL image


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """Return (new_h, new_w, scale): shorter side to min_size unless the longer would exceed max_size."""
    # Python floats (double precision), as torchvision computes it, so sizes agree to the pixel.
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale), scale


def resized_shape_rounded(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Return (new_h, new_w) as Detectron2's ResizeShortestEdge computes them: rounded, not floored."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_uint8_pil(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Return a [3,H,W] 0..1 image as uint8, resized to `size` by PIL's bilinear filter, as 0..255 floats."""
    from PIL import Image

    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    resized = Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().to(image.device)


def as_image_tensor(image: ImageLike, max_pixels: int | None = None) -> Tensor:
    """Return a [3,H,W] float RGB tensor in 0..1 from a path, PIL image, HxWx3 array or tensor.

    Files are read with `read_image` (refused above `max_pixels`, default its own limit); arrays may be
    HxW, HxWx1, HxWx3 (or HxWx4, alpha dropped), tensors [3,H,W]; anything under 2x2 pixels raises
    `ImageReadError`, as a file of that size does.
    """
    from maskrcnn.data.image_io import image_to_tensor, read_image
    from maskrcnn.errors import ImageReadError

    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 2:
            raise ImageReadError(f"image tensor of shape {tuple(image.shape)} cannot be used; "
                                 "expected [3, H, W] with H and W at least 2")
        if image.dtype == torch.uint8:
            return image.float() / 255
        return image.float()
    if isinstance(image, (str, Path)):
        return image_to_tensor(read_image(image) if max_pixels is None else read_image(image, max_pixels))
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        channels = image.shape[2] if image.ndim == 3 else 1
        if image.ndim not in (2, 3) or channels not in (1, 3, 4) or min(image.shape[:2]) < 2:
            raise ImageReadError(f"image array of shape {image.shape} cannot be used; expected HxW, HxWx1 "
                                 "or HxWx3 (RGB) with H and W at least 2")
        if channels == 1:
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
        return image_to_tensor(np.ascontiguousarray(image[..., :3]))
    raise TypeError(f"cannot use an image of type {type(image).__name__}; give a path, PIL image, array or tensor")


# Target entries that hold one row per instance (filtered together with `boxes`).
INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area", "keypoints")


def scale_keypoints(keypoints: Tensor, scale_y: Tensor | float, scale_x: Tensor | float) -> Tensor:
    """Return keypoints [N, K, 3] with x multiplied by `scale_x` and y by `scale_y` (visibility kept)."""
    factors = torch.stack([torch.as_tensor(scale_x), torch.as_tensor(scale_y), torch.ones(())]).to(keypoints)
    return keypoints * factors


def drop_empty_instances(target: dict[str, Any], min_size: float = 1e-5) -> dict[str, Any]:
    """Return the target without instances whose box has (near) zero width or height, crowd or not.

    Such a box cannot be encoded (BoxCoder divides by its width, logs its size); Detectron2 drops them too.
    """
    boxes = target["boxes"]
    keep = nonempty_boxes(boxes, min_size)
    if bool(keep.all()):
        return target
    out = dict(target)
    for key in INSTANCE_KEYS:
        value = target.get(key)
        per_instance = isinstance(value, InstanceMasks) or (isinstance(value, Tensor) and value.dim() >= 1)
        if per_instance and len(value) == len(boxes):
            out[key] = value[keep.to(value.device)]
    return out


def _pooling_dtype(feature: Tensor) -> torch.dtype:
    """float32 for a half-precision map under autocast (what torchvision's RoIAlign casts to), else as is."""
    if feature.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(feature.device.type):
        return torch.float32
    return feature.dtype


class MaskRCNN(nn.Module):
    """Mask R-CNN. `forward(images, targets)` gives losses in training and detections in eval mode."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.clone()
        m = cfg.model
        self.class_names = list(m.class_names)
        self.register_buffer("pixel_mean", torch.tensor(m.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(m.pixel_std).view(3, 1, 1), persistent=False)
        self.backbone = Backbone(m.backbone)
        self.anchors = AnchorGenerator(m.anchors, self.backbone.strides)
        self.rpn = RPN(m.rpn, self.backbone.out_channels, self.anchors.num_anchors_per_location)
        c4 = m.backbone.kind == "c4"
        heads = CascadeRoIHeads if m.box_head.cascade.enabled else RoIHeads
        self.roi_heads = heads(
            m.box_head, m.mask_head, m.num_classes, self.backbone.out_channels, self.backbone.strides,
            res5=self.backbone.res5 if c4 else None,
            res5_channels=getattr(self.backbone, "res5_channels", 0),
            keypoint_cfg=m.keypoint_head,
        )
        self.channels_last = m.channels_last
        if self.channels_last:  # conv weights in NHWC; their outputs follow (see forward)
            self.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        """Return the device of the model's parameters."""
        return next(self.parameters()).device

    # ---- pre- and post-processing -------------------------------------------------------------

    def preprocess(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Return a zero-padded normalised batch, each image's resized size, and resized targets."""
        resized, sizes, new_targets = [], [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i} must be a [3, H, W] tensor, got shape {tuple(image.shape)}")
            if self.cfg.model.input_format == "BGR":
                image = image.flip(0)
            h, w = image.shape[-2:]
            if self.cfg.input.resize == "pil":  # Detectron2: resize the uint8 image, then normalise
                new_h, new_w = resized_shape_rounded(h, w, *self._target_size(h, w))
                mean, std = ([v * 255 for v in values] for values in (self.cfg.model.pixel_mean, self.cfg.model.pixel_std))
                image = resize_uint8_pil(image, (new_h, new_w))
                image = (image - image.new_tensor(mean)[:, None, None]) / image.new_tensor(std)[:, None, None]
            else:
                image = (image - self.pixel_mean) / self.pixel_std
                new_h, new_w, _ = resized_shape(h, w, *self._target_size(h, w))
                image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            resized.append(image)
            sizes.append((new_h, new_w))
            if targets is not None:
                new_targets.append(drop_empty_instances(self._resize_target(targets[i], (h, w), (new_h, new_w))))
        stride = self.cfg.model.size_divisibility
        pad_h = int(math.ceil(max(s[0] for s in sizes) / stride) * stride)
        pad_w = int(math.ceil(max(s[1] for s in sizes) / stride) * stride)
        batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
        for image, slot in zip(resized, batch):
            slot[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batch, sizes, (new_targets if targets is not None else None)

    def _target_size(self, height: int, width: int) -> tuple[float, int]:
        """Return (shorter side, longer-side cap) for an image: in training one drawn per image (multi-scale);
        with `input.scale`, the image's own shorter side times the scale."""
        cfg = self.cfg.input
        if cfg.scale > 0:
            return cfg.scale * min(height, width), cfg.max_size_train if self.training else cfg.max_size_test
        if not self.training:
            return cfg.min_size_test, cfg.max_size_test
        if cfg.min_size_train_sampling == "range":  # scale jitter: any whole size in [lo, hi]
            lo, hi = cfg.min_size_train
            return int(torch.randint(lo, hi + 1, (1,)).item()), cfg.max_size_train
        choice = int(torch.empty(1).uniform_(0.0, float(len(cfg.min_size_train))).item())
        return cfg.min_size_train[choice], cfg.max_size_train

    @staticmethod
    def _resize_target(target: dict[str, Tensor], old: tuple[int, int], new: tuple[int, int]) -> dict[str, Tensor]:
        out = dict(target)
        scale_y = torch.tensor(new[0], dtype=torch.float32) / torch.tensor(old[0], dtype=torch.float32)
        scale_x = torch.tensor(new[1], dtype=torch.float32) / torch.tensor(old[1], dtype=torch.float32)
        out["boxes"] = scale_boxes(target["boxes"].float(), scale_y, scale_x)
        if "masks" in target:
            # Dense [N, H, W] targets (torchvision's form) become crops here, the one place the model
            # converts them; the resize gives nearest interpolation's pixels without an [N, H, W] float copy.
            out["masks"] = as_instance_masks(target["masks"]).resize(*new)
        if "keypoints" in target:
            out["keypoints"] = scale_keypoints(target["keypoints"].float(), scale_y, scale_x)
        return out

    def postprocess(
        self, detections: list[dict[str, Tensor]], sizes: list[tuple[int, int]], original: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Return detections mapped back to each input image: boxes rescaled, masks pasted (bool)."""
        results = []
        for det, (h, w), (oh, ow) in zip(detections, sizes, original):
            scale_y = torch.tensor(oh, dtype=torch.float32) / torch.tensor(h, dtype=torch.float32)
            scale_x = torch.tensor(ow, dtype=torch.float32) / torch.tensor(w, dtype=torch.float32)
            boxes = scale_boxes(det["boxes"], scale_y, scale_x)
            # Empty boxes are no detections (they reach here only with box_head.min_size = 0, as in Detectron2).
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out = {"boxes": boxes[keep], "scores": det["scores"][keep], "labels": det["labels"][keep]}
            if "mask_probs" in det:
                paste = paste_masks_grid_sample if self.cfg.model.mask_head.paste == "detectron2" else paste_masks
                out["masks"] = paste(det["mask_probs"][keep], out["boxes"], oh, ow, self.cfg.model.mask_head.threshold)
            if "keypoints" in det:
                out["keypoints"] = scale_keypoints(det["keypoints"][keep], scale_y, scale_x)
                out["keypoint_scores"] = det["keypoint_scores"][keep]
            results.append(out)
        return results

    # ---- the network --------------------------------------------------------------------------

    def extract_features(self, batch: Tensor) -> list[Tensor]:
        """Run the backbone on a padded, normalised batch (in NHWC layout when configured)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.backbone(batch)

    @staticmethod
    def pooling_features(features: list[Tensor]) -> list[Tensor]:
        """The maps RoI pooling reads: P2..P5 (P6 exists for large anchors in the RPN only), or C4."""
        roi_features = features[:4] if len(features) > 1 else features
        # torchvision's RoIAlign reads NCHW float32 (under autocast it casts its input at every call)
        # and would copy an NHWC map at every call: convert once, in one pass.
        return [f.to(dtype=_pooling_dtype(f), memory_format=torch.contiguous_format) for f in roi_features]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training (with targets): dict of losses. Eval: per-image dicts of boxes, scores, labels, masks."""
        if self.training and targets is None:
            raise ValueError("training mode needs targets (call model.eval() for inference)")
        original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        with self._inference_autocast():
            batch, sizes, targets = self.preprocess(images, targets)
            features = self.extract_features(batch)
            anchors = self.anchors(features, (batch.shape[-2], batch.shape[-1]))
            proposals, rpn_losses = self.rpn(features, anchors, sizes, targets)
            roi_features = self.pooling_features(features)
            if self.training:
                return {**rpn_losses, **self.roi_heads(roi_features, proposals, sizes, targets)}
            detections = self.roi_heads(roi_features, proposals, sizes)  # decodes boxes in float32
        return self.postprocess(detections, sizes, original)  # box rescale and mask paste in float32

    def _inference_autocast(self) -> ContextManager:
        """Autocast to `test.precision` in eval mode (training precision is the trainer's business)."""
        precision = self.cfg.test.precision
        if self.training or precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    @torch.no_grad()
    def predict(
        self, images: ImageLike | Sequence[ImageLike], score_threshold: float | None = None, batch_size: int = 1
    ) -> list[dict[str, Any]]:
        """Return per image: `boxes` (xyxy px), `scores`, `labels` (1..K), `masks` (bool HxW), `names`.

        Accepts file paths, PIL images, HxWx3 uint8 arrays or [3,H,W] float tensors in 0..1. An image
        that `test.tiling` tiles is predicted window by window (maskrcnn.tiling); its `masks` are then
        an `RLEMasks` (image-sized COCO RLEs; `masks[i]` decodes one, `masks.numpy()` all).
        """
        from maskrcnn.tiling import run_model

        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        was_training = self.training
        self.eval()
        results = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = [as_image_tensor(x, self.cfg.input.max_pixels).to(self.device)
                         for x in items[start : start + batch_size]]
                for out in run_model(self, chunk):  # the whole image, or window by window (test.tiling)
                    if score_threshold is not None:
                        keep = out["scores"] >= score_threshold
                        out = {k: v[keep] for k, v in out.items()}
                    out["names"] = [self.label_name(int(i)) for i in out["labels"]]
                    results.append(out)
        finally:
            self.train(was_training)
        return results

    def label_name(self, label: int) -> str:
        """Return the class name of a contiguous label (1..K), or 'class N' when names are unknown."""
        if 1 <= label <= len(self.class_names):
            return self.class_names[label - 1]
        return f"class {label}"
