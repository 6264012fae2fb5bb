"""What the torchrun worker processes of tests/test_distributed.py run (a driver script imports this module).

`worker_main` records each training step (image ids, sampled counts, a parameter digest) with sampling made
deterministic, so that a 2-process run can be compared with one process (which installs the same recorders);
`fault_main` trains and raises at FAULT_ITER on rank FAULT_RANK.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def deterministic_sample_balanced(labels, batch_size, positive_fraction):
    """sample_balanced without the RNG: the first positives and negatives, same counts. Records counts."""
    positive = torch.nonzero(labels >= 1).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    RECORD["counts"].append([num_pos, num_neg])
    return positive[:num_pos], negative[:num_neg]


RECORD: dict = {"counts": [], "steps": [], "params": []}


def install_recorders(keep_params: bool) -> None:
    """Make sampling deterministic and record, per step: image ids, sample counts, a parameter digest."""
    import maskrcnn.modeling.roi_heads as roi_heads
    import maskrcnn.modeling.rpn as rpn
    from maskrcnn.engine import trainer

    rpn.sample_balanced = roi_heads.sample_balanced = deterministic_sample_balanced
    original = trainer.Trainer._step

    def step(self, images, targets):
        RECORD["counts"].clear()
        values = original(self, images, targets)
        params = [p.detach() for p in self.model.parameters()]
        digest = hashlib.sha256(b"".join(p.contiguous().numpy().tobytes() for p in params)).hexdigest()
        RECORD["steps"].append({"ids": [int(t["image_id"]) for t in targets], "counts": list(RECORD["counts"]),
                                "digest": digest, "loss": values["loss"]})
        if keep_params:
            RECORD["params"].append(torch.cat([p.flatten() for p in params]).clone())
        return values

    trainer.Trainer._step = step


def worker_main() -> int:
    """Entry point of the torchrun workers: record, train through the CLI, dump the record."""
    out = Path(os.environ["RECORD_DIR"])
    rank = int(os.environ["RANK"])
    install_recorders(keep_params=rank == 0)
    from maskrcnn.cli import main

    status = main(sys.argv[1:])
    (out / f"rank{rank}.json").write_text(json.dumps(RECORD["steps"]))
    if rank == 0:
        torch.save(torch.stack(RECORD["params"]), out / "params.pt")
    return status


def fault_main() -> int:
    """Worker entry point that raises on rank FAULT_RANK at iteration FAULT_ITER, then trains through the CLI."""
    from maskrcnn.engine import trainer

    original = trainer.Trainer._step

    def step(self, images, targets):
        if self.rank == int(os.environ["FAULT_RANK"]) and self.iteration + 1 == int(os.environ["FAULT_ITER"]):
            raise RuntimeError(f"injected fault at iteration {self.iteration + 1}")
        return original(self, images, targets)

    trainer.Trainer._step = step
    from maskrcnn.cli import main

    return main(sys.argv[1:])
