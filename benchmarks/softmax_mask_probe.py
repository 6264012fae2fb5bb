"""Why a softmax-mask model can score mask AP 0: how high its masks' probabilities reach.

Reads the `fpn/softmax` runs of `benchmarks/ablations.py` and, over the first N validation images,
records for every detection the peak probability of its class's mask channel (what is thresholded at
0.5 and pasted) and the peak of 1 - background (the mask's foreground, whichever class). A mask whose
class channel never reaches 0.5 pastes as empty, however well the foreground is found.

    .venv/bin/python benchmarks/softmax_mask_probe.py --out runs/ablations --seeds 0 1 [--images 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import maskrcnn.modeling.roi_heads as roi_heads  # noqa: E402
from maskrcnn.api import load_model  # noqa: E402
from maskrcnn.data.image_io import read_image  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations", help="the ablations folder (default runs/ablations)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--images", type=int, default=20, help="validation images to run (default 20)")
    args = p.parse_args()
    out = Path(args.out)
    images = sorted((out / "data" / "val").iterdir())[: args.images]
    peaks: dict[str, list[torch.Tensor]] = {}
    probabilities = roi_heads.mask_probabilities

    def recording(mask_logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
        chosen = probabilities(mask_logits, labels, kind)
        peaks["class"].append(chosen.flatten(1).amax(1))
        peaks["foreground"].append((1 - mask_logits.float().softmax(1)[:, 0]).flatten(1).amax(1))
        return chosen

    roi_heads.mask_probabilities = recording
    for seed in args.seeds:
        peaks.update({"class": [], "foreground": []})
        model = load_model(None, out / "runs" / "fpn-softmax" / f"seed{seed}" / "checkpoints" / "model_final.pth")
        for path in images:
            model.predict(read_image(path))
        cls, fg = torch.cat(peaks["class"]), torch.cat(peaks["foreground"])
        print(f"seed {seed}: {len(cls)} detections on {len(images)} images; peak class-channel probability "
              f"median {cls.median():.2f}, max {cls.max():.2f}; peak 1 - background median {fg.median():.2f}, "
              f"max {fg.max():.2f}")


if __name__ == "__main__":
    main()
