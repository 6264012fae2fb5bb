"""What the before/after benchmarks import from the package, at any revision they are pointed at.

`train_step.py` and `dense_scene.py` run older revisions of the package (`--sources`, `--before`) with this
checkout's benchmark code, so a helper that has since moved is looked up in its old home as well.
"""

from __future__ import annotations

from typing import Callable


def training_helpers() -> tuple[Callable, Callable, Callable]:
    """Return `amp_dtype`, `seed_all` and `build_train_dataset` of the package on `sys.path`."""
    try:
        from maskrcnn.engine.precision import amp_dtype
        from maskrcnn.engine.rng import seed_all
        from maskrcnn.engine.train_setup import build_train_dataset
    except ImportError:  # revisions before the trainer split (issue 23) kept them in engine/trainer.py
        from maskrcnn.engine.trainer import amp_dtype, build_train_dataset, seed_all
    return amp_dtype, seed_all, build_train_dataset
