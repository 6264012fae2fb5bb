"""`maskrcnn eval` of an int8 IR with its float layers in bf16: the AP of onnxruntime_vs_pytorch.py's
experimental `openvino-int8-bf16` row, which no command offers.

OpenVINO loads the IR as `--backend openvino` does, then that row's `rest_in_bf16` recompiles it with the bf16
inference-precision hint, so the layers `maskrcnn quantize` left in float32 run in bf16.

    .venv/bin/python benchmarks/eval_int8_rest_bf16.py eval --weights model-int8.xml --backend openvino \
        --data val.json:val/ --out eval-int8-bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

from maskrcnn import onnx_backends
from maskrcnn.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from onnxruntime_vs_pytorch import rest_in_bf16  # noqa: E402

_load = onnx_backends.OpenVinoRunner._load


def _load_rest_in_bf16(self, runtime, path, threads, precision):
    result = _load(self, runtime, path, threads, precision)
    rest_in_bf16(self, threads)
    return result


if __name__ == "__main__":
    onnx_backends.OpenVinoRunner._load = _load_rest_in_bf16
    sys.exit(main(sys.argv[1:]))
