"""The model that runs an exported file: `OnnxMaskRCNN`, with the same `predict` as `MaskRCNN`.

The file (`maskrcnn export --format onnx`, or the int8 IR `maskrcnn quantize` makes of it) is run by one of
the runtimes of `maskrcnn.onnx_backends`; everything else is here and shared by every runtime: the file
checks, the config and class names read from its metadata, pasting each [M, M] mask probability map into
its box at the image's size (outside the graph, by the same function the PyTorch model uses,
`maskrcnn.structures.paste_masks`), tiling and `predict`. Nothing here needs the exporter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from maskrcnn.errors import UserError
from maskrcnn.onnx_backends import OUTPUT_NAMES


class OnnxMaskRCNN:
    """An exported model run on the CPU by ONNX Runtime or OpenVINO, with `MaskRCNN.predict`'s inputs and outputs.

    `backend` names the runtime (maskrcnn.onnx_backends.BACKENDS); `precision` is fp32, or bf16 for OpenVINO;
    None (the default) runs the file as it is: fp32, or int8 for `maskrcnn quantize`'s IR (.xml, OpenVINO only).
    `requests` > 1: OpenVINO runs that many images at once (`OpenVinoRunner`); calls from several threads are
    safe with either runtime.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, backend: str = "onnxruntime",
                 precision: str | None = None, requests: int = 1):
        from maskrcnn.config import Config, merge_dict
        from maskrcnn.onnx_backends import open_runner

        path = Path(path)
        if not path.is_file():
            kind, command = ("OpenVINO IR", "maskrcnn quantize") if path.suffix.lower() == ".xml" else \
                ("ONNX file", "maskrcnn export --format onnx")
            raise UserError(f"{kind} '{path}' not found; write one with `{command}`")
        self.runner = open_runner(backend, path, threads, precision, requests)
        config = self.runner.metadata("maskrcnn.config")
        if config is None:
            raise UserError(f"'{path}' was not written by `maskrcnn export` (no maskrcnn.config metadata)")
        self.cfg = Config()
        merge_dict(self.cfg, json.loads(config))
        self.class_names = json.loads(self.runner.metadata("maskrcnn.class_names") or "[]")
        self.path = path
        self.device = torch.device("cpu")

    training = False  # always in inference mode; what the evaluator reads and restores

    def eval(self) -> "OnnxMaskRCNN":
        """Return self (an ONNX model is always in inference mode)."""
        return self

    def train(self, mode: bool = True) -> "OnnxMaskRCNN":
        """An exported model cannot train; `train(False)` is accepted, as `eval()`."""
        if mode:
            raise UserError("an ONNX model cannot be trained; train the PyTorch checkpoint instead")
        return self

    def parameters(self) -> Iterator[Tensor]:
        """No PyTorch parameters: the weights live in the ONNX file."""
        return iter(())

    def label_name(self, label: int) -> str:
        """Return the class name of a contiguous label (1..K), or 'class N' when names are unknown."""
        if 1 <= label <= len(self.class_names):
            return self.class_names[label - 1]
        return f"class {label}"

    def run(self, image: Tensor) -> dict[str, Tensor]:
        """Return the raw graph outputs for one [3,H,W] float image as tensors."""
        arrays = self.runner.run(image.detach().cpu().float().contiguous().numpy())
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in zip(OUTPUT_NAMES, arrays)}

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Return per image `boxes`, `scores`, `labels` and bool `masks` pasted at the input size."""
        from maskrcnn.structures.paste import paste_masks, paste_masks_grid_sample

        paste = paste_masks_grid_sample if self.cfg.model.mask_head.paste == "detectron2" else paste_masks
        arrays = self.runner.run_many([image.detach().cpu().float().contiguous().numpy() for image in images])
        results = []
        for image, outputs in zip(images, arrays):
            raw = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in zip(OUTPUT_NAMES, outputs)}
            h, w = image.shape[-2:]
            masks = paste(raw["mask_probs"], raw["boxes"], int(h), int(w), self.cfg.model.mask_head.threshold)
            results.append({"boxes": raw["boxes"], "scores": raw["scores"], "labels": raw["labels"], "masks": masks})
        return results

    @torch.no_grad()
    def predict(self, images: Any | Sequence[Any], score_threshold: float | None = None,
                batch_size: int = 1) -> list[dict[str, Any]]:
        """Return per image: `boxes` (xyxy px), `scores`, `labels` (1..K), `masks` (bool HxW), `names`.

        As `MaskRCNN.predict`, an image that the exported config's `test.tiling` tiles runs window by window.
        The graph takes one image: `batch_size` images go to the runtime together, which OpenVINO with several
        infer requests runs at once.
        """
        from maskrcnn.modeling.mask_rcnn import as_image_tensor
        from maskrcnn.tiling import run_model

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        results = []
        for start in range(0, len(items), batch_size):
            chunk = [as_image_tensor(item, self.cfg.input.max_pixels) for item in items[start : start + batch_size]]
            for out in run_model(self, chunk):
                if score_threshold is not None:
                    keep = out["scores"] >= score_threshold
                    out = {k: v[keep] for k, v in out.items()}
                out["names"] = [self.label_name(int(i)) for i in out["labels"]]
                results.append(out)
        return results
