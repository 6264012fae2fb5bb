"""`maskrcnn train`: train (or resume, or fine-tune) a model from a config and KEY=VALUE overrides."""

from __future__ import annotations

import argparse
import logging

from maskrcnn.commands.options import add_config_option, add_overrides, add_weights_option

HELP = ("train a model: maskrcnn train --config C [--resume] [--weights FILE] [--out DIR] [KEY=VALUE ...]; "
        "on several GPUs or machines: torchrun --nproc-per-node N -m maskrcnn.cli train ... (docs/distributed.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the train command's options."""
    add_config_option(p, default="the --weights zoo model's; from scratch: own-data, fitted to the training data")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in the output dir")
    add_weights_option(p, help="initialise the whole model from a zoo model (`maskrcnn models`; its config is the "
                               "default and the classes come from the training data), a checkpoint or a state dict; "
                               "class-dependent layers are re-initialised when the number of classes differs")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (overrides output_dir)")
    add_overrides(p)


class _TqdmHandler(logging.Handler):
    """Log through tqdm.write so messages do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record))


def setup_logging() -> None:
    """Log INFO to the terminal through tqdm (rank 0), warnings only from the other ranks."""
    from maskrcnn.distributed import env_rank

    # Under torchrun only rank 0 logs progress; the other ranks report warnings and errors, marked.
    rank = env_rank()
    root = logging.getLogger()
    if not root.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Train and print where the outputs are; return the exit status."""
    from maskrcnn.config import load_config
    from maskrcnn.distributed import env_rank
    from maskrcnn.engine.trainer import train
    from maskrcnn.zoo import entry_config, resolve_weights

    setup_logging()
    weights, entry = resolve_weights(args.weights)  # a zoo name: fetched once (every rank waits for one download)
    if entry is not None and not args.config:
        # Fine-tuning: the zoo model's architecture, with the classes of the training data (the class layers
        # are re-initialised when their number differs).
        cfg = entry_config(entry, ["model.class_names=[]", "model.category_ids=[]", *args.overrides])
        logging.getLogger(__name__).info("config: zoo model %s (%s), classes from the training data",
                                         entry.name, entry.config)
    else:
        if not args.config and entry is None and not weights:
            # Your own data, from scratch: the recipe fitted to it (not the COCO defaults, which need GPUs).
            args.config = "own-data"
            logging.getLogger(__name__).info("config: own-data (no --config given): the from-scratch CPU recipe, "
                                             "fitted to your training data")
        cfg = load_config(args.config, list(args.overrides))
    if args.out:
        cfg.output_dir = args.out
    keep = [o.split("=", 1)[0].strip() for o in args.overrides]  # what the user set, fit_to_data keeps
    out = train(cfg, resume=args.resume, weights=str(weights) if weights else None, keep=keep)
    if env_rank() == 0:
        print(f"outputs in {out}")
    return 0
