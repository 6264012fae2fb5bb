"""The `maskrcnn` command line: one sub-command per module in `maskrcnn.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
User mistakes surface as `UserError`/`ConfigError`: one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from maskrcnn.config import ConfigError
from maskrcnn.errors import UserError

COMMANDS = ["train", "eval", "predict", "demo", "make_shapes", "benchmark", "check_dataset"]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"maskrcnn.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"maskrcnn.commands.{name}":
                continue  # not written yet
            raise
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
