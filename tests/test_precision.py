"""`test.precision`: the network runs under autocast in eval mode; outputs stay float32."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.config import ConfigError, load_config
from maskrcnn.modeling import build_model
from support import THIN_HEADS

TINY = [*THIN_HEADS, "model.box_head.score_thresh=0.0"]


def _run(precision: str, training: bool = False):
    torch.manual_seed(0)
    model = build_model(load_config("shapes", TINY + [f"test.precision={precision}"])).train(training)
    seen = []
    model.backbone.fpn.output[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    image = torch.rand(3, 96, 128)
    if training:
        target = {"boxes": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([1]),
                  "masks": torch.ones(1, 96, 128, dtype=torch.uint8)}
        return model([image], [target]), seen
    with torch.no_grad():
        return model([image])[0], seen


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_eval_forward_runs_the_network_in_the_chosen_precision(precision, dtype):
    out, seen = _run(precision)
    assert seen == [dtype]
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32
    assert out["masks"].dtype == torch.bool and len(out["boxes"]) > 0


def test_training_ignores_test_precision():
    losses, seen = _run("bf16", training=True)
    assert seen == [torch.float32]
    assert all(torch.isfinite(v) for v in losses.values())


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="test.precision"):
        load_config("shapes", ["test.precision=int8"])
