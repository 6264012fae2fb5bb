"""Region Proposal Network: scores and refines anchors, keeps the best as proposals, and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from maskrcnn.config_schema import RPNConfig
from maskrcnn.modeling.backbone import ConvNorm, norm_factory
from maskrcnn.modeling.matcher import BACKGROUND, IGNORE, IOU_BLOCK_ELEMENTS, Matcher, sample_balanced
from maskrcnn.structures.boxes import BoxCoder, clip_boxes, nonempty_boxes, pairwise_ioa

# A non-positive anchor (or proposal) covering this much of a crowd region is ignored, not negative.
CROWD_IOA_THRESH = 0.5


class RPNHead(nn.Module):
    """A small conv net slid over every level: objectness logit and 4 box deltas per anchor."""

    def __init__(self, channels: int, num_anchors: int, num_convs: int = 1, norm: str = ""):
        super().__init__()
        self.convs = nn.Sequential(*(ConvNorm(channels, channels, 3, norm_factory(norm)) for _ in range(num_convs)))
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.box_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Return objectness [N, T] and deltas [N, T, 4] over all T anchors, level by level."""
        logits, deltas = [], []
        for feature in features:
            x = self.convs(feature)
            n, _, h, w = x.shape
            # Channel a of location (y, x) belongs to anchor (y, x, a): the anchor generator's order.
            logits.append(self.objectness(x).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.box_deltas(x).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


def smooth_l1(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Return the summed smooth-L1 loss (plain L1 when beta is 0)."""
    if beta == 0:
        return F.l1_loss(input, target, reduction="sum")
    return F.smooth_l1_loss(input, target, beta=beta, reduction="sum")


def target_crowd(target: dict[str, Tensor]) -> Tensor:
    """Return the iscrowd flags of a target (all zero when absent)."""
    crowd = target.get("iscrowd")
    return crowd if crowd is not None else torch.zeros(len(target["boxes"]), dtype=torch.int64)


def non_crowd(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return the target's boxes, labels and masks without its crowd regions."""
    keep = ~target_crowd(target).bool()
    return {k: target[k][keep] for k in ("boxes", "labels", "masks") if k in target}


def crowd_coverage(crowd_boxes: Tensor, boxes: Tensor, block_elements: int = IOU_BLOCK_ELEMENTS) -> Tensor:
    """Return, per box, the largest share of its area that one crowd box covers, a block of boxes at a time."""
    block = max(1, block_elements // max(1, len(crowd_boxes)))
    parts = [pairwise_ioa(crowd_boxes, boxes[start : start + block]).max(dim=0).values
             for start in range(0, len(boxes), block)]
    return torch.cat(parts) if parts else boxes.new_zeros(0)


def label_with_crowd(
    matcher: Matcher, boxes: Tensor, gt_boxes: Tensor, iscrowd: Tensor
) -> tuple[Tensor, Tensor]:
    """Return (matched GT index or -1/-2, labels 1/0/-1) for `boxes` against non-crowd GT.

    Crowd regions never make a positive: a box that would be a negative but lies mostly inside one
    is ignored instead, so the model is not taught that a crowd of objects is background.
    """
    crowd = iscrowd.bool()
    matches = matcher.match_boxes(gt_boxes[~crowd], boxes)
    labels = torch.ones_like(matches, dtype=torch.float32)
    labels[matches == BACKGROUND] = 0
    labels[matches == IGNORE] = -1
    if crowd.any():
        in_crowd = crowd_coverage(gt_boxes[crowd], boxes) >= CROWD_IOA_THRESH
        labels[(labels == 0) & in_crowd] = -1
    return matches, labels


class RPN(nn.Module):
    """Proposal generation for both stages; losses on sampled anchors in training."""

    def __init__(self, cfg: RPNConfig, channels: int, num_anchors: int):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(channels, num_anchors, cfg.head_convs, cfg.head_norm)
        self.coder = BoxCoder(tuple(cfg.bbox_reg_weights))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)

    def forward(
        self,
        features: list[Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Return per-image proposals [P, 4] and (in training) the RPN losses."""
        logits, deltas = self.head(features)
        all_anchors = torch.cat(anchors)
        num_images = logits.shape[0]
        with torch.no_grad():
            boxes = self.coder.decode(
                deltas.detach().reshape(-1, 4), all_anchors.repeat(num_images, 1)
            ).view(num_images, -1, 4)
            proposals = self.select_proposals(boxes, logits.detach(), [len(a) for a in anchors], image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training:
            assert targets is not None
            losses = self.losses(logits, deltas, all_anchors, targets)
        return proposals, losses

    def select_proposals(
        self, boxes: Tensor, logits: Tensor, level_counts: list[int], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Return per image: top-k per level, clip, drop tiny, NMS per level, keep the best post-NMS."""
        pre_nms = self.cfg.pre_nms_top_n_train if self.training else self.cfg.pre_nms_top_n_test
        post_nms = self.cfg.post_nms_top_n_train if self.training else self.cfg.post_nms_top_n_test
        top_index, levels = [], []
        offset = 0
        for level, count in enumerate(level_counts):
            k = min(pre_nms, count)
            _, index = logits[:, offset : offset + count].topk(k, dim=1)
            top_index.append(index + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
            offset += count
        top_index = torch.cat(top_index, dim=1)
        level_of = torch.cat(levels)
        batch = torch.arange(boxes.shape[0], device=boxes.device)[:, None]
        boxes, scores = boxes[batch, top_index], logits[batch, top_index].sigmoid()
        proposals = []
        for image_boxes, image_scores, (height, width) in zip(boxes, scores, image_sizes):
            image_boxes = clip_boxes(image_boxes, height, width)
            keep = nonempty_boxes(image_boxes, self.cfg.min_size) & (image_scores >= self.cfg.score_thresh)
            image_boxes, image_scores, image_levels = image_boxes[keep], image_scores[keep], level_of[keep]
            keep = batched_nms(image_boxes, image_scores, image_levels, self.cfg.nms_thresh)[:post_nms]
            proposals.append(image_boxes[keep])
        return proposals

    def losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Return objectness BCE and box regression loss over anchors sampled 1:1 per image."""
        sampled_logits, sampled_labels, pos_deltas, pos_targets = [], [], [], []
        for image_logits, image_deltas, target in zip(logits, deltas, targets):
            matches, labels = label_with_crowd(self.matcher, anchors, target["boxes"], target_crowd(target))
            positive, negative = sample_balanced(
                labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction
            )
            sampled = torch.cat([positive, negative])
            sampled_logits.append(image_logits[sampled])
            sampled_labels.append(labels[sampled])
            gt_boxes = non_crowd(target)["boxes"]
            pos_deltas.append(image_deltas[positive])
            pos_targets.append(self.coder.encode(gt_boxes[matches[positive]], anchors[positive]))
        num_sampled = max(1, sum(len(s) for s in sampled_labels))
        objectness = F.binary_cross_entropy_with_logits(torch.cat(sampled_logits), torch.cat(sampled_labels))
        box_loss = smooth_l1(torch.cat(pos_deltas), torch.cat(pos_targets), self.cfg.smooth_l1_beta)
        return {"loss_objectness": objectness, "loss_rpn_box_reg": box_loss / num_sampled}
