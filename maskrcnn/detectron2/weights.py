"""Detectron2 checkpoints: model-zoo `.pkl` files and checkpointer `.pth` files, renamed into our layout.

Beyond the names, two layouts differ:
- class layers: Detectron2's classifier has K+1 logits with background LAST and its box / mask
  predictors have K rows (no background); ours put background FIRST and give every class-dependent
  layer K+1 rows (the background rows are zeros and never used);
- anchors: with several sizes per level (C4), Detectron2 enumerates anchors size-major at each
  location, ours ratio-major, so the RPN's output channels are permuted.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskrcnn.config_schema import ModelConfig
from maskrcnn.errors import CheckpointError
from maskrcnn.renaming import compile_rules, rename_key

_STAGES = {"2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
_TRUNK = r"^backbone\.(?:bottom_up\.)?"  # FPN models nest the ResNet under bottom_up, C4 ones do not


def _block(m: re.Match[str]) -> str:
    stage, block, part, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    if part == "conv2_offset":  # a deformable 3x3 conv's offset predictor, a child of our conv2
        return f"backbone.trunk.{_STAGES[stage]}.{block}.conv2.offset.{rest}"
    if part == "shortcut":
        return f"backbone.trunk.{_STAGES[stage]}.{block}.downsample.{1 if rest.startswith('norm.') else 0}." + (
            rest[len("norm."):] if rest.startswith("norm.") else rest)
    index = part[-1]
    if rest.startswith("norm."):
        return f"backbone.trunk.{_STAGES[stage]}.{block}.bn{index}.{rest[len('norm.'):]}"
    return f"backbone.trunk.{_STAGES[stage]}.{block}.conv{index}.{rest}"


def _conv_part(rest: str) -> str:
    """Return a Detectron2 conv's `weight` / `norm.x` as our ConvNorm's `conv.weight` / `norm.x`."""
    return rest if rest.startswith("norm.") else f"conv.{rest}"


def _numbered(prefix: str, conv: bool) -> Any:
    """Replacement for `name{i}.rest` -> `prefix.{i-1}.(conv.|norm.)rest` (Detectron2 counts from 1)."""

    def replace(m: re.Match[str]) -> str:
        index, rest = int(m.group(1)) - 1, m.group(2)
        return f"{prefix}.{index}.{_conv_part(rest) if conv else rest}"

    return replace


# (Detectron2 name pattern, our name) - first match wins; the mechanism is torchvision_import's.
_RULES = compile_rules([
    (_TRUNK + r"stem\.conv1\.norm\.(.+)$", r"backbone.trunk.bn1.\1"),
    (_TRUNK + r"stem\.conv1\.(weight|bias)$", r"backbone.trunk.conv1.\1"),
    (_TRUNK + r"res([2-5])\.(\d+)\.(conv[1-3]|conv2_offset|shortcut)\.(.+)$", _block),
    (r"^backbone\.fpn_(lateral|output)([2-5])\.(.+)$",
     lambda m: f"backbone.fpn.{m.group(1)}.{int(m.group(2)) - 2}."
               + (m.group(3) if m.group(3).startswith("norm.") else f"conv.{m.group(3)}")),
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.head.convs.0.conv.\1"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$", r"rpn.head.objectness.\1"),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$", r"rpn.head.box_deltas.\1"),
    # Box heads and predictors: a cascade has one per stage, numbered from 0 in both layouts.
    (r"^roi_heads\.box_head\.(\d+\.)?fc(\d+)\.(weight|bias)$",
     lambda m: f"roi_heads.box_head.{m.group(1) or ''}fcs.{int(m.group(2)) - 1}.{m.group(3)}"),
    (r"^roi_heads\.box_head\.(\d+\.)?conv(\d+)\.(.+)$",
     lambda m: f"roi_heads.box_head.{m.group(1) or ''}convs.{int(m.group(2)) - 1}." + _conv_part(m.group(3))),
    (r"^roi_heads\.box_predictor\.(\d+\.)?cls_score\.(weight|bias)$",
     lambda m: f"roi_heads.box_predictor.{m.group(1) or ''}class_logits.{m.group(2)}"),
    (r"^roi_heads\.box_predictor\.(\d+\.)?bbox_pred\.(weight|bias)$",
     lambda m: f"roi_heads.box_predictor.{m.group(1) or ''}box_deltas.{m.group(2)}"),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(.+)$", _numbered("roi_heads.mask_head.convs", conv=True)),
    (r"^roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)$", r"roi_heads.mask_head.\1.\2"),
    (r"^roi_heads\.keypoint_head\.conv_fcn(\d+)\.(.+)$", _numbered("roi_heads.keypoint_head.convs", conv=True)),
    (r"^roi_heads\.keypoint_head\.score_lowres\.(weight|bias)$", r"roi_heads.keypoint_head.deconv.\1"),
])
# Not weights: Detectron2 buffers some files carry. Anchors are recomputed from the config.
_DERIVED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")


def is_detectron2_state_dict(state_dict: dict[str, Any]) -> bool:
    """Return True when the names are Detectron2's (GeneralizedRCNN's modules)."""
    return any(k.startswith(("backbone.bottom_up.", "proposal_generator.rpn_head.", "backbone.res2.",
                             "roi_heads.box_predictor.cls_score.")) for k in state_dict)


def rename_detectron2_key(key: str) -> str | None:
    """Return our parameter name for a Detectron2 one, or None for a name we do not know."""
    if key.startswith("roi_heads.res5."):  # C4: Detectron2's RoI head owns res5; ours is the trunk's layer4
        key = "backbone.bottom_up.res5." + key[len("roi_heads.res5."):]
    return rename_key(key, _RULES)


def convert_detectron2_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Return the state dict in our names and class / anchor layouts; raise naming unknown keys."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if _DERIVED.match(key):
            continue
        name = rename_detectron2_key(key)
        if name is None:
            unknown.append(key)
            continue
        out[name] = value.float() if value.is_floating_point() else value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"Detectron2 checkpoint has parameters maskrcnn cannot place: {shown}")
    _background_first(out, cfg)
    _anchors_ratio_major(out, cfg)
    return out


def _background_first(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Reorder / pad the class-dependent layers in place: background first, K+1 rows everywhere.

    A class-agnostic box predictor (4 outputs, as every cascade stage has) has no class rows to move;
    with one class (Keypoint R-CNN's person) 4 outputs are also the class-specific layout, and the
    config says which it is.
    """
    predictors = sorted({key[: -len("class_logits.weight")] for key in state
                         if key.startswith("roi_heads.box_predictor.") and key.endswith("class_logits.weight")})
    if not predictors:
        return
    k = state[predictors[0] + "class_logits.weight"].shape[0] - 1  # the checkpoint's number of classes
    for suffix in ("weight", "bias"):
        for predictor in predictors:  # one per cascade stage, else just "roi_heads.box_predictor."
            w = state[predictor + "class_logits." + suffix]
            state[predictor + "class_logits." + suffix] = torch.cat([w[k:], w[:k]])
            deltas = state.get(predictor + "box_deltas." + suffix)
            if deltas is None or (deltas.shape[0] == 4 and (k != 1 or cfg.box_head.class_agnostic)):
                continue
            if deltas.shape[0] != 4 * k:
                raise CheckpointError(
                    f"Detectron2 bbox_pred has {deltas.shape[0]} outputs, expected {4 * k} (class-specific, "
                    f"{k} classes) or 4 (class-agnostic)")
            state[predictor + "box_deltas." + suffix] = torch.cat([deltas.new_zeros(4, *deltas.shape[1:]), deltas])
        masks = state.get("roi_heads.mask_head.predictor." + suffix)
        agnostic = masks is not None and masks.shape[0] == 1 and (k != 1 or cfg.mask_head.class_agnostic)
        if masks is not None and not agnostic:
            state["roi_heads.mask_head.predictor." + suffix] = torch.cat([masks.new_zeros(1, *masks.shape[1:]), masks])


def _anchors_ratio_major(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Permute the RPN outputs from Detectron2's size-major anchor order to our ratio-major one."""
    sizes, ratios = len(cfg.anchors.sizes[0]), len(cfg.anchors.aspect_ratios)
    if sizes == 1 or ratios == 1:
        return  # the two orders coincide
    # Our anchor r*S + s is Detectron2's s*R + r.
    order = torch.tensor([s * ratios + r for r in range(ratios) for s in range(sizes)])
    for suffix in ("weight", "bias"):
        key = "rpn.head.objectness." + suffix
        if key in state and state[key].shape[0] == len(order):
            state[key] = state[key][order]
        key = "rpn.head.box_deltas." + suffix
        if key in state and state[key].shape[0] == 4 * len(order):
            w = state[key]
            state[key] = w.reshape(len(order), 4, *w.shape[1:])[order].reshape(w.shape)


# ---- reading files ------------------------------------------------------------------------------

# What a model-zoo pickle may contain: dicts of numpy arrays. Nothing else is ever constructed.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def read_detectron2_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Return the tensors (float32) of a Detectron2 model-zoo `.pkl` file: {"model": {name: array}}."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except FileNotFoundError:
        raise CheckpointError(f"weights file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated files, foreign objects, not a pickle at all
        raise CheckpointError(f"cannot read '{path}' as a Detectron2 model-zoo pickle ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "__author__" not in data:
        # Detectron2 reads such pickles as Caffe2 / Detectron1 blobs and guesses the names.
        raise CheckpointError(
            f"'{path}' is not in Detectron2's model-zoo format ({{'model': ..., '__author__': ...}}); "
            "Caffe2 / Detectron1 pickles are not supported")
    tensors = {}
    for name, value in data["model"].items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"'{path}': entry '{name}' is a {type(value).__name__}, not an array")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        tensors[name] = tensor.float() if tensor.is_floating_point() else tensor  # float16 -> float32 is exact
    return tensors
