"""Stage two: per-RoI classification, class-specific box refinement and binary masks, in parallel.

Labels run 0..K with 0 = background; the class-dependent layers have K+1 outputs (the background
row of the box and mask predictors is never trained), as in torchvision's checkpoints. A
class-agnostic box predictor has 4 outputs: one box per RoI, whatever its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from maskrcnn.config_schema import BoxHeadConfig, KeypointHeadConfig, MaskHeadConfig
from maskrcnn.instance_masks import InstanceMasks, as_instance_masks
from maskrcnn.modeling.backbone import ConvNorm, norm_factory
from maskrcnn.modeling.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets
from maskrcnn.modeling.matcher import Matcher, sample_balanced
from maskrcnn.modeling.poolers import RoIPooler, boxes_to_rois
from maskrcnn.modeling.rpn import label_with_crowd, non_crowd, smooth_l1, target_crowd
from maskrcnn.structures.boxes import BoxCoder, clip_boxes, nonempty_boxes


@dataclass
class SampledRoIs:
    """One image's training RoIs: boxes, labels (0 = background), the matched GT's index and box."""

    boxes: Tensor
    labels: Tensor
    gt_index: Tensor
    gt_boxes: Tensor

    def select(self, index: Tensor) -> "SampledRoIs":
        """Return the RoIs at `index` (indices or a boolean mask)."""
        return SampledRoIs(self.boxes[index], self.labels[index], self.gt_index[index], self.gt_boxes[index])


# RoIs the mask head runs on at once at inference; more detections run in chunks of this many.
MASK_ROIS_PER_CHUNK = 256

# What a box stage computes for RoIs [R, 4] (all images' concatenated): (class logits, box deltas).
# Inference and ONNX export pool features differently and pass their own.
StageRunner = Callable[[nn.Module, nn.Module, Tensor], tuple[Tensor, Tensor]]


class FCBoxHead(nn.Module):
    """Optional 3x3 convs, then fully connected layers with ReLU ("2fc" and "4conv1fc")."""

    def __init__(self, in_channels: int, pool_size: int, num_convs: int, conv_dim: int, num_fcs: int,
                 fc_dim: int, norm: str = ""):
        super().__init__()
        make_norm = norm_factory(norm)
        self.convs = nn.Sequential(
            *(ConvNorm(in_channels if i == 0 else conv_dim, conv_dim, 3, make_norm) for i in range(num_convs))
        )
        flat = (conv_dim if num_convs else in_channels) * pool_size * pool_size
        self.fcs = nn.ModuleList(nn.Linear(flat if i == 0 else fc_dim, fc_dim) for i in range(num_fcs))
        self.out_channels = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x).flatten(start_dim=1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


class Res5BoxHead(nn.Module):
    """C4: the backbone's res5 stage over 14x14 RoI features (stride 2 → 7x7), then average pooling.

    The res5 module belongs to the backbone (its weights are saved there once); this head only
    holds a reference, kept out of the module tree on purpose.
    """

    def __init__(self, res5: nn.Module, out_channels: int):
        super().__init__()
        object.__setattr__(self, "res5", res5)
        self.out_channels = out_channels

    def features(self, x: Tensor) -> Tensor:
        """Return the res5 feature map of each RoI (shared with the C4 mask head)."""
        return self.res5(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """Class scores (K+1) and class-specific box deltas ((K+1)*4), or class-agnostic ones (4)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.class_logits = nn.Linear(in_features, num_classes + 1)
        self.box_deltas = nn.Linear(in_features, 4 if class_agnostic else (num_classes + 1) * 4)
        nn.init.normal_(self.class_logits.weight, std=0.01)
        nn.init.normal_(self.box_deltas.weight, std=0.001)
        nn.init.zeros_(self.class_logits.bias)
        nn.init.zeros_(self.box_deltas.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.class_logits(x), self.box_deltas(x)


def build_box_head(cfg: BoxHeadConfig, channels: int, res5: nn.Module | None = None,
                   res5_channels: int = 0) -> nn.Module:
    """Return the configured box head: 2fc or 4conv1fc over pooled FPN features, or C4's shared res5."""
    if cfg.type == "res5":
        assert res5 is not None
        return Res5BoxHead(res5, res5_channels)
    num_convs = cfg.num_convs if cfg.type == "4conv1fc" else 0
    num_fcs = 1 if cfg.type == "4conv1fc" else 2
    return FCBoxHead(channels, cfg.pooler.output_size, num_convs, cfg.conv_dim, num_fcs, cfg.fc_dim, cfg.norm)


def box_losses(class_logits: Tensor, box_deltas: Tensor, rois: list[SampledRoIs], coder: BoxCoder,
               beta: float) -> dict[str, Tensor]:
    """Return the classification loss over sampled RoIs and the box regression loss of the positives.

    The regression reads the GT class's deltas, or the single class-agnostic set.
    """
    labels = torch.cat([r.labels for r in rois])
    losses = {"loss_classifier": F.cross_entropy(class_logits, labels)}
    positive = torch.nonzero(labels > 0).squeeze(1)
    matched_gt = torch.cat([r.gt_boxes for r in rois])
    regression_targets = coder.encode(matched_gt[positive], torch.cat([r.boxes for r in rois])[positive])
    per_class = box_deltas.view(len(labels), -1, 4)
    deltas = per_class[positive, labels[positive] if per_class.shape[1] > 1 else 0]
    # Normalised by all sampled RoIs, not positives: the paper's code and both references do so.
    losses["loss_box_reg"] = smooth_l1(deltas, regression_targets, beta) / max(1, labels.numel())
    return losses


class MaskHead(nn.Module):
    """The mask FCN: 3x3 convs, a 2x deconvolution, and a 1x1 conv to one m×m logit map per class."""

    def __init__(self, in_channels: int, num_convs: int, conv_dim: int, num_outputs: int, norm: str = ""):
        super().__init__()
        make_norm = norm_factory(norm)
        self.convs = nn.Sequential(
            *(ConvNorm(in_channels if i == 0 else conv_dim, conv_dim, 3, make_norm) for i in range(num_convs))
        )
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else in_channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_outputs, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Small initial logits: masks start near p = 0.5 instead of saturated (a gentler start from scratch).
        nn.init.normal_(self.predictor.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(F.relu(self.deconv(self.convs(x))))


class MLPMaskHead(nn.Module):
    """The paper's fc mask head (Table 2e): fully connected layers, the last one giving m×m logits per class.

    It sees the whole RoI at once but keeps no spatial layout: every output pixel has its own weights.
    """

    def __init__(self, in_channels: int, in_size: int, num_fcs: int, fc_dim: int, num_outputs: int, mask_size: int):
        super().__init__()
        self.hidden = FCBoxHead(in_channels, in_size, 0, 0, num_fcs, fc_dim)
        self.predictor = nn.Linear(fc_dim, num_outputs * mask_size * mask_size)
        nn.init.normal_(self.predictor.weight, std=0.001)  # small initial logits, as the FCN's predictor
        nn.init.zeros_(self.predictor.bias)
        self.mask_size = mask_size

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.hidden(x)).view(len(x), -1, self.mask_size, self.mask_size)


def build_mask_head(cfg: MaskHeadConfig, in_channels: int, in_size: int, num_convs: int, num_classes: int,
                    norm: str) -> nn.Module:
    """Return the FCN or MLP mask head for `in_size`² RoI features; its masks are 2·in_size pixels square."""
    outputs = 1 if cfg.class_agnostic else num_classes + 1
    if cfg.type == "mlp":
        return MLPMaskHead(in_channels, in_size, cfg.num_fcs, cfg.fc_dim, outputs, 2 * in_size)
    return MaskHead(in_channels, num_convs, cfg.conv_dim, outputs, norm)


def mask_targets(gt_masks: InstanceMasks | Tensor, matched_gt: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Return [P, size, size] binary targets: each RoI's GT mask resampled into the RoI (RoIAlign, >= 0.5).

    `gt_masks` are InstanceMasks or dense [N, H, W]; see `InstanceMasks.roi_targets`.
    """
    return as_instance_masks(gt_masks).roi_targets(matched_gt, boxes, size)


def select_class(per_class: Tensor, labels: Tensor) -> Tensor:
    """Return per_class[i, labels[i]] (or channel 0 when there is a single, class-agnostic channel)."""
    if per_class.shape[1] == 1:
        return per_class[:, 0]
    # Row i*C + labels[i] of the [N*C, ...] flattening, a plain Gather in ONNX whose output length is the
    # index's. per_class.gather(1, ...) exports as GatherElements, which OpenVINO (2026.4, CPU) fails to run
    # in the exported graph: its shape check wants data and indices equal on every axis but `axis`, and the
    # CPU plugin drops the [:-1] slice that makes them equal (docs/deploy.md).
    rows = torch.arange(labels.shape[0], device=labels.device) * per_class.shape[1] + labels
    return per_class.flatten(0, 1)[rows]


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor, kind: str) -> Tensor:
    """Return the mask loss of positive RoIs with class `labels` and binary m×m `targets`.

    sigmoid (the paper's choice): per-pixel binary cross-entropy on the GT class's channel only, so
    classes never compete. softmax: a per-pixel multinomial over all K+1 channels, whose target is
    the GT class inside the mask and background (channel 0) outside: every class's logits get gradients.
    """
    if kind == "softmax":
        pixel_classes = torch.where(targets > 0.5, labels[:, None, None], 0)
        return F.cross_entropy(mask_logits, pixel_classes)
    logits = select_class(mask_logits, labels)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def mask_probabilities(mask_logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """Return [D, m, m] foreground probabilities of each detection's class (sigmoid, or softmax across classes)."""
    mask_logits = mask_logits.float()
    if kind == "softmax":
        return select_class(mask_logits.softmax(dim=1), labels)
    return select_class(mask_logits, labels).sigmoid()


class RoIHeads(nn.Module):
    """Box and mask branches on top of pooled RoI features."""

    def __init__(self, box_cfg: BoxHeadConfig, mask_cfg: MaskHeadConfig, num_classes: int,
                 channels: int, strides: list[int], res5: nn.Module | None = None, res5_channels: int = 0,
                 keypoint_cfg: KeypointHeadConfig | None = None):
        super().__init__()
        self.keypoint_cfg = keypoint_cfg if keypoint_cfg is not None else KeypointHeadConfig()
        self.cfg = box_cfg
        self.mask_cfg = mask_cfg
        self.num_classes = num_classes
        pool_strides = strides[:4] if len(strides) > 1 else strides  # P2..P5 (P6 is RPN-only)
        self.box_pooler = RoIPooler(box_cfg.pooler, pool_strides)
        self.build_box_branch(box_cfg, channels, res5, res5_channels)
        self.shares_res5 = box_cfg.type == "res5"
        # The deconv doubles the pooled grid; for C4, res5 has first halved it (14 -> 7 -> 14).
        pooled = box_cfg.pooler.output_size // 2 if self.shares_res5 else mask_cfg.pooler.output_size
        self.mask_size = 2 * pooled
        if mask_cfg.enabled:
            if self.shares_res5:
                # C4: the mask head runs on the res5 features the box head already computed.
                self.mask_head = build_mask_head(mask_cfg, res5_channels, pooled, 0, num_classes, "")
            else:
                self.mask_pooler = RoIPooler(mask_cfg.pooler, pool_strides)
                self.mask_head = build_mask_head(mask_cfg, channels, pooled, mask_cfg.num_convs, num_classes,
                                                 mask_cfg.norm)
        if self.keypoint_cfg.enabled:
            kp = self.keypoint_cfg
            self.keypoint_pooler = RoIPooler(kp.pooler, pool_strides)
            self.keypoint_head = KeypointHead(channels, kp.num_keypoints, kp.num_convs, kp.conv_dim, kp.norm)

    def build_box_branch(self, cfg: BoxHeadConfig, channels: int, res5: nn.Module | None, res5_channels: int) -> None:
        """Build the box head, its predictor, the box coder and the RoI matcher."""
        self.box_head: nn.Module = build_box_head(cfg, channels, res5, res5_channels)
        self.box_predictor: nn.Module = BoxPredictor(self.box_head.out_channels, self.num_classes, cfg.class_agnostic)
        self.coder = BoxCoder(tuple(cfg.bbox_reg_weights))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False)

    # ---- training -----------------------------------------------------------------------------

    @staticmethod
    def label_rois(matcher: Matcher, boxes: Tensor, target: dict[str, Tensor]) -> SampledRoIs:
        """Return every box of one image with its label (GT class, 0 = background, -1 = ignored) and matched GT."""
        gt = non_crowd(target)
        matches, fg = label_with_crowd(matcher, boxes, target["boxes"], target_crowd(target))
        gt_index = matches.clamp(min=0)
        has_gt = len(gt["labels"]) > 0
        labels = gt["labels"][gt_index] if has_gt else torch.zeros_like(matches)
        gt_boxes = gt["boxes"][gt_index].to(boxes.dtype) if has_gt else torch.zeros_like(boxes)
        labels = torch.where(fg > 0, labels, torch.where(fg == 0, 0, -1))
        return SampledRoIs(boxes, labels, gt_index, gt_boxes)

    def sample_proposals(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[SampledRoIs]:
        """Return per image the RoIs sampled at 1:3 positive:negative, with labels and matched GT.

        Ground-truth boxes join the proposals, so every object has at least one good RoI early on.
        """
        sampled = []
        for boxes, target in zip(proposals, targets):
            boxes = torch.cat([boxes, non_crowd(target)["boxes"].to(boxes.dtype)])
            rois = self.label_rois(self.matcher, boxes, target)
            positive, negative = sample_balanced(rois.labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
            sampled.append(rois.select(torch.cat([positive, negative])))
        return sampled

    def box_features(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Return the box head's output per RoI and, for C4, the res5 map shared with the mask head."""
        pooled = self.box_pooler(features, boxes)
        if self.shares_res5:
            res5 = self.box_head.features(pooled)
            return res5.mean(dim=(2, 3)), res5
        return self.box_head(pooled), None

    def forward(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        """Training: return the losses. Inference: return per-image detections (mask probabilities too)."""
        if self.training:
            assert targets is not None
            return self.losses(features, proposals, targets, image_sizes)
        return self.detect(features, proposals, image_sizes)

    def losses(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict[str, Tensor]],
               image_sizes: list[tuple[int, int]]):
        """Return classification, box regression and mask losses on sampled RoIs."""
        sampled = self.sample_proposals(proposals, targets)
        losses, res5 = self.box_branch_losses(features, sampled, targets, image_sizes)
        if self.mask_cfg.enabled:
            losses["loss_mask"] = self.mask_loss(features, sampled, targets, res5) * self.mask_cfg.loss_weight
        if self.keypoint_cfg.enabled:
            losses["loss_keypoint"] = self.keypoint_loss(features, sampled, targets) * self.keypoint_cfg.loss_weight
        return losses

    def box_branch_losses(self, features: list[Tensor], sampled: list[SampledRoIs], targets: list[dict[str, Tensor]],
                          image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Return the box losses on the sampled RoIs, and for C4 the res5 map the mask head shares."""
        head, res5 = self.box_features(features, [s.boxes for s in sampled])
        class_logits, box_deltas = self.box_predictor(head)
        return box_losses(class_logits, box_deltas, sampled, self.coder, self.cfg.smooth_l1_beta), res5

    def mask_loss(self, features: list[Tensor], sampled: list[SampledRoIs], targets: list[dict[str, Tensor]],
                  res5: Tensor | None) -> Tensor:
        """Return the mean per-pixel mask loss over positive RoIs only (BCE of the GT class's channel)."""
        pos_boxes, pos_labels, pos_targets, pos_rows = [], [], [], []
        offset = 0
        cap = self.mask_cfg.max_rois_per_image
        for s, target in zip(sampled, targets):
            positive = torch.nonzero(s.labels > 0).squeeze(1)
            if 0 < cap < positive.numel():
                positive = positive[torch.randperm(positive.numel(), device=positive.device)[:cap]]
            pos_boxes.append(s.boxes[positive])
            pos_labels.append(s.labels[positive])
            pos_rows.append(positive + offset)
            gt_masks = non_crowd(target)["masks"]
            pos_targets.append(mask_targets(gt_masks, s.gt_index[positive], s.boxes[positive], self.mask_size))
            offset += len(s.labels)
        labels = torch.cat(pos_labels)
        if labels.numel() == 0:
            # No positive RoI in this batch: a zero that still touches the mask head's parameters.
            return sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        if self.shares_res5:
            mask_logits = self.mask_head(res5[torch.cat(pos_rows)])
        else:
            mask_logits = self.mask_head(self.mask_pooler(features, pos_boxes))
        return mask_loss(mask_logits, labels, torch.cat(pos_targets), self.mask_cfg.loss)

    def keypoint_loss(self, features: list[Tensor], sampled: list[SampledRoIs],
                      targets: list[dict[str, Tensor]]) -> Tensor:
        """Return the heat-map cross-entropy over the labelled keypoints inside positive RoIs.

        Only positive RoIs with at least one such keypoint run the head (as Detectron2 selects them);
        the others would add nothing to the loss.
        """
        boxes, indices, valids = [], [], []
        size = self.keypoint_size
        for s, target in zip(sampled, targets):
            if "keypoints" not in target:
                raise ValueError("the keypoint head needs targets with 'keypoints' [N, K, 3]")
            gt_keypoints = target["keypoints"][~target_crowd(target).bool()]
            if gt_keypoints.shape[1] != self.keypoint_cfg.num_keypoints:
                raise ValueError(f"targets have {gt_keypoints.shape[1]} keypoints per instance but "
                                 f"model.keypoint_head.num_keypoints = {self.keypoint_cfg.num_keypoints}")
            positive = torch.nonzero(s.labels > 0).squeeze(1)
            if positive.numel() == 0 or len(gt_keypoints) == 0:
                continue
            index, valid = keypoint_targets(gt_keypoints[s.gt_index[positive]].to(s.boxes.dtype),
                                            s.boxes[positive], size)
            useful = valid.any(dim=1)
            boxes.append(s.boxes[positive][useful])
            indices.append(index[useful])
            valids.append(valid[useful])
        if sum(len(b) for b in boxes) == 0:
            # No labelled keypoint inside a positive RoI: a zero that still touches the head's parameters.
            return sum(p.sum() for p in self.keypoint_head.parameters()) * 0.0
        logits = self.keypoint_head(self.keypoint_pooler(features, boxes))
        return keypoint_loss(logits, torch.cat(indices), torch.cat(valids))

    @property
    def keypoint_size(self) -> int:
        """Side of the keypoint heat-maps: 4x the pooled grid (deconvolution 2x, then bilinear 2x)."""
        return 4 * self.keypoint_cfg.pooler.output_size

    # ---- inference ----------------------------------------------------------------------------

    def detect(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]):
        """Return per image: boxes, scores, labels of the top detections and their mask probabilities."""
        sizes = [len(p) for p in proposals]

        def run_stage(box_head: nn.Module, box_predictor: nn.Module, boxes: Tensor) -> tuple[Tensor, Tensor]:
            return box_predictor(box_head(self.box_pooler(features, list(boxes.split(sizes)))))

        def clip(boxes: Tensor) -> Tensor:
            return torch.cat([clip_boxes(b, h, w) for b, (h, w) in zip(boxes.split(sizes), image_sizes)])

        boxes, scores = self.predict_boxes(run_stage, torch.cat(proposals), clip)
        detections = []
        start = 0
        for props, (height, width) in zip(proposals, image_sizes):
            stop = start + len(props)
            detections.append(self.select_detections(boxes[start:stop], scores[start:stop], height, width))
            start = stop
        if self.mask_cfg.enabled:
            self.predict_masks(features, detections)
        if self.keypoint_cfg.enabled:
            self.predict_keypoints(features, detections)
        return detections

    def predict_boxes(self, run_stage: StageRunner, proposals: Tensor,
                      clip: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Return decoded boxes [R, C, 4] (C = K+1, or 1 when class-agnostic) and class probabilities [R, K+1].

        `proposals` are all images' RoIs concatenated; `clip` clamps such boxes to their images (unused
        here: the cascade's later stages need it).
        """
        class_logits, box_deltas = run_stage(self.box_head, self.box_predictor, proposals)
        return self.coder.decode(box_deltas.float(), proposals.float()), F.softmax(class_logits.float(), dim=-1)

    def select_detections(self, boxes: Tensor, scores: Tensor, height: int, width: int) -> dict[str, Tensor]:
        """Return the top detections of one image: threshold, drop tiny boxes, per-class NMS, top-k."""
        num_classes = scores.shape[1]
        boxes = clip_boxes(boxes, height, width).expand(-1, num_classes, -1)  # one box for all classes if agnostic
        boxes = boxes[:, 1:].reshape(-1, 4)  # drop the background column
        labels = torch.arange(1, num_classes, device=scores.device).repeat(len(scores))
        scores = scores[:, 1:].reshape(-1)
        keep = torch.nonzero(scores > self.cfg.score_thresh).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = nonempty_boxes(boxes, self.cfg.min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.cfg.nms_thresh)[: self.cfg.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def predict_masks(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add `mask_probs` [D, m, m] (the predicted class's channel) to each image's detections."""
        boxes = [d["boxes"] for d in detections]
        if sum(len(b) for b in boxes) == 0:
            for d in detections:
                d["mask_probs"] = d["boxes"].new_zeros((0, self.mask_size, self.mask_size))
            return
        rois = boxes_to_rois(boxes)
        labels = torch.cat([d["labels"] for d in detections])
        # Dense outputs (detections_per_image in the thousands) run the head a chunk of RoIs at a
        # time: its activations (256 x 28 x 28 floats per RoI after the deconvolution, and K+1
        # logit maps) would otherwise grow with every detection. Up to one chunk, one call as before.
        probs = torch.cat([self.mask_probs_of(features, rois[i : i + MASK_ROIS_PER_CHUNK],
                                              labels[i : i + MASK_ROIS_PER_CHUNK])
                           for i in range(0, len(rois), MASK_ROIS_PER_CHUNK)])
        for d, p in zip(detections, probs.split([len(b) for b in boxes])):
            d["mask_probs"] = p

    def mask_probs_of(self, features: list[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """Return [R, m, m] mask probabilities of `labels` for [R, 5] RoIs (image index, xyxy)."""
        if self.shares_res5:
            mask_logits = self.mask_head(self.box_head.features(self.box_pooler.pool_rois(features, rois)))
        else:
            mask_logits = self.mask_head(self.mask_pooler.pool_rois(features, rois))
        return mask_probabilities(mask_logits, labels, self.mask_cfg.loss)

    def predict_keypoints(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add `keypoints` [D, K, 3] (x, y, 1 in resized-image pixels) and `keypoint_scores` [D, K]."""
        boxes = [d["boxes"] for d in detections]
        k = self.keypoint_cfg.num_keypoints
        if sum(len(b) for b in boxes) == 0:
            for d in detections:
                d["keypoints"] = d["boxes"].new_zeros((0, k, 3))
                d["keypoint_scores"] = d["boxes"].new_zeros((0, k))
            return
        logits = self.keypoint_head(self.keypoint_pooler(features, boxes))
        keypoints, scores = heatmaps_to_keypoints(logits, torch.cat(boxes), self.keypoint_cfg.score)
        sizes = [len(b) for b in boxes]
        for d, kp, sc in zip(detections, keypoints.split(sizes), scores.split(sizes)):
            d["keypoints"], d["keypoint_scores"] = kp, sc
