"""Reads torchvision Mask R-CNN (v1 and v2) and Keypoint R-CNN state dicts into our module names.

The mechanism is shared with other importers (Detectron2): ordered (regex, replacement) rules from
maskrcnn.renaming, the first matching rule renames the key.
"""

from __future__ import annotations

import re

from torch import Tensor

from maskrcnn.renaming import Replacement, compile_rules, rename_key


# (torchvision name pattern, our name) — applied in order, first match wins.
_RULES: list[tuple[str, Replacement]] = [
    (r"^backbone\.body\.", "backbone.trunk."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"backbone.fpn.lateral.\1.conv."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.1\.", r"backbone.fpn.lateral.\1.norm."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"backbone.fpn.output.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.1\.", r"backbone.fpn.output.\1.norm."),
    # Old torchvision FPN files name the convs directly (inner_blocks.0.weight).
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.lateral.\1.conv.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.output.\1.conv.\2"),
    (r"^rpn\.head\.conv\.(\d+)\.0\.", r"rpn.head.convs.\1.conv."),
    (r"^rpn\.head\.conv\.(\d+)\.1\.", r"rpn.head.convs.\1.norm."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.convs.0.conv.\1"),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.box_deltas."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_heads.box_head.fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_heads.box_head.fcs.1."),
    # v2 box head: four conv+BN blocks, a Flatten (index 4), then one Linear (index 5).
    (r"^roi_heads\.box_head\.([0-3])\.0\.", r"roi_heads.box_head.convs.\1.conv."),
    (r"^roi_heads\.box_head\.([0-3])\.1\.", r"roi_heads.box_head.convs.\1.norm."),
    (r"^roi_heads\.box_head\.5\.", "roi_heads.box_head.fcs.0."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_heads.box_predictor.class_logits."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_heads.box_predictor.box_deltas."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_heads.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_head\.(\d+)\.1\.", r"roi_heads.mask_head.convs.\1.norm."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
    # Keypoint R-CNN: a Sequential of (conv, ReLU) pairs, so conv i sits at index 2i; then the deconv.
    (r"^roi_heads\.keypoint_head\.(\d+)\.", lambda m: f"roi_heads.keypoint_head.convs.{int(m.group(1)) // 2}.conv."),
    (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.", "roi_heads.keypoint_head.deconv."),
]
_COMPILED = compile_rules(_RULES)
_OLD_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$")  # torchvision < 0.13


def is_torchvision_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Return True when the keys look like torchvision's detection models."""
    return any(k.startswith("backbone.body.") for k in state_dict)


def rename_torchvision_key(key: str) -> str:
    """Return our parameter name for a torchvision one (unknown names come back unchanged)."""
    old_mask = _OLD_MASK_CONV.match(key)
    if old_mask:
        return f"roi_heads.mask_head.convs.{int(old_mask.group(1)) - 1}.conv.{old_mask.group(2)}"
    renamed = rename_key(key, _COMPILED)
    return key if renamed is None else renamed


def convert_torchvision_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return the state dict with torchvision names mapped to ours (unknown names kept as they are)."""
    return {rename_torchvision_key(key): value for key, value in state_dict.items()}
