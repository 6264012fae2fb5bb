"""Errors that mean "the user gave us something we cannot use" (printed as one line, no traceback).

The bottom of the package: it imports nothing from maskrcnn, so any module may raise these.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A bad file, path, value or combination; the message names it and says what to do."""


class ImageReadError(UserError):
    """An image file that is missing, unreadable, truncated, too small or too large."""


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, truncated, corrupt or does not fit the model.

    `saved_config` is the training config stored in the file, when it is one of ours and could be read.
    (Defined here so that the weights readers, e.g. maskrcnn.detectron2.weights, need not import checkpoint;
    `maskrcnn.checkpoint.CheckpointError` is the same class.)
    """

    def __init__(self, message: str, saved_config: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.saved_config = saved_config


class DataError(UserError):
    """The training data cannot be loaded any further (too many bad images or worker deaths).

    (Defined here so that the train stream, `maskrcnn.data.loader`, and its worker supervision,
    `maskrcnn.data.workers`, raise the same class; `maskrcnn.data.loader.DataError` is this class.)
    """


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what to try."""
