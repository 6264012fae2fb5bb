"""Cascade R-CNN (Cai & Vasconcelos, TPAMI 2019): the box branch as a sequence of stages.

A detector trained at one IoU threshold is best at proposals of about that quality. Cascade R-CNN
runs several box heads in a row, each trained at a higher IoU (0.5, 0.6, 0.7) on the boxes the
previous stage refined, so each stage sees better proposals than the last and learns to be precise
at its own threshold. Each stage has its own box head and a class-agnostic box predictor, and a
box coder whose weights tighten with the stage (smaller deltas as boxes get closer).

Training: the first stage samples RPN proposals with the ground truth added, as the plain head does;
every later stage takes the previous stage's refined boxes (detached: no gradient flows back through
them, as none flows into RPN proposals), clipped, empty ones dropped, and labels them at its own
threshold, without re-sampling (as Detectron2 does). The mask head trains on the first stage's RoIs.
Inference: every stage refines the boxes of the one before; the class scores are the mean of the
stages' probabilities, the boxes are the last stage's, and those final boxes feed the mask head.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config_schema import BoxHeadConfig
from maskrcnn.modeling.matcher import Matcher
from maskrcnn.modeling.roi_heads import (BoxPredictor, RoIHeads, SampledRoIs, StageRunner, box_losses,
                                         build_box_head)
from maskrcnn.structures.boxes import BoxCoder, clip_boxes


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: ANN001 - autograd's context object
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Return `x` unchanged, with its gradient multiplied by `scale` in the backward pass."""
    return _ScaleGradient.apply(x, scale)


class CascadeRoIHeads(RoIHeads):
    """RoI heads whose box branch runs in stages (`model.box_head.cascade`); masks and keypoints as usual."""

    def build_box_branch(self, cfg: BoxHeadConfig, channels: int, res5: nn.Module | None, res5_channels: int) -> None:
        """Build one box head, class-agnostic predictor, box coder and matcher per stage."""
        cascade = cfg.cascade
        self.box_head = nn.ModuleList(build_box_head(cfg, channels) for _ in cascade.ious)
        self.box_predictor = nn.ModuleList(
            BoxPredictor(head.out_channels, self.num_classes, class_agnostic=True) for head in self.box_head)
        self.coders = [BoxCoder(tuple(weights)) for weights in cascade.bbox_reg_weights]
        # Positive at IoU >= the stage's threshold, negative below it: no band of ignored RoIs.
        self.matchers = [Matcher(iou, iou, allow_low_quality_matches=False) for iou in cascade.ious]
        self.loss_weights = list(cascade.loss_weights)
        self.matcher = self.matchers[0]  # the first stage samples the RPN's proposals at its threshold

    @property
    def num_stages(self) -> int:
        """Return the number of cascade stages."""
        return len(self.box_head)

    # ---- training -----------------------------------------------------------------------------

    def label_stage(self, stage: int, boxes: list[Tensor], targets: list[dict[str, Tensor]]) -> list[SampledRoIs]:
        """Return per image the boxes labelled at `stage`'s IoU threshold (those inside crowds dropped)."""
        rois = [self.label_rois(self.matchers[stage], b, t) for b, t in zip(boxes, targets)]
        return [r.select(r.labels >= 0) for r in rois]

    def box_branch_losses(self, features: list[Tensor], sampled: list[SampledRoIs], targets: list[dict[str, Tensor]],
                          image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], None]:
        """Return each stage's classification and box losses (suffixed `_stage0`, ...), weighted."""
        losses: dict[str, Tensor] = {}
        rois = sampled
        for stage in range(self.num_stages):
            pooled = self.box_pooler(features, [r.boxes for r in rois])
            # Every stage's loss reaches the shared features: scale their gradient by 1/stages so the
            # backbone learns as from one head (Detectron2's choice), while each head gets its full gradient.
            pooled = scale_gradient(pooled, 1.0 / self.num_stages)
            class_logits, box_deltas = self.box_predictor[stage](self.box_head[stage](pooled))
            stage_losses = box_losses(class_logits, box_deltas, rois, self.coders[stage], self.cfg.smooth_l1_beta)
            for name, value in stage_losses.items():
                losses[f"{name}_stage{stage}"] = value * self.loss_weights[stage]
            if stage + 1 < self.num_stages:  # the next stage's RoIs: these, refined, at its threshold
                rois = self.label_stage(stage + 1, self.refine_for_training(stage, box_deltas, rois, image_sizes),
                                        targets)
        return losses, None

    def refine_for_training(self, stage: int, box_deltas: Tensor, rois: list[SampledRoIs],
                            image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Return per image `stage`'s refined boxes as the next stage's proposals: detached, clipped, non-empty."""
        boxes = self.coders[stage].decode(box_deltas.detach().float(), torch.cat([r.boxes for r in rois]).float())
        refined = []
        for image_boxes, (height, width) in zip(boxes[:, 0].split([len(r.boxes) for r in rois]), image_sizes):
            image_boxes = clip_boxes(image_boxes, height, width)
            keep = (image_boxes[:, 2] > image_boxes[:, 0]) & (image_boxes[:, 3] > image_boxes[:, 1])
            refined.append(image_boxes[keep])
        return refined

    # ---- inference ----------------------------------------------------------------------------

    def predict_boxes(self, run_stage: StageRunner, proposals: Tensor,
                      clip: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Return the last stage's boxes [R, 1, 4] and the class probabilities [R, K+1] averaged over stages.

        Each stage reads the previous stage's boxes, clipped to the image; none is dropped (unlike in
        training), so every stage scores the same rows and the probabilities can be averaged.
        """
        boxes, total = proposals, None
        for stage in range(self.num_stages):
            class_logits, box_deltas = run_stage(self.box_head[stage], self.box_predictor[stage], boxes)
            probs = F.softmax(class_logits.float(), dim=-1)
            total = probs if total is None else total + probs
            decoded = self.coders[stage].decode(box_deltas.float(), boxes.float())
            if stage + 1 < self.num_stages:
                boxes = clip(decoded[:, 0])  # the next stage's proposals
        return decoded, total * (1.0 / self.num_stages)
