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

COMMANDS = ["train", "eval", "predict", "demo", "make_shapes", "benchmark", "check_dataset", "convert", "export", "quantize",
            "serve", "models", "show_data"]


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
        # The list positional (KEY=VALUE overrides, predict's inputs) that items after options join.
        lists = [a.dest for a in p._actions if not a.option_strings and a.nargs in ("*", "+")]
        p.set_defaults(_run=module.run, _list_dest=lists[0] if lists else None)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, letting positionals (KEY=VALUE overrides) come before, between and after options.

    argparse fills a list positional from its first run of items only (`a=1 --out run b=2` leaves
    `b=2` over), and `parse_intermixed_args` refuses sub-commands; so the items left over join that list.
    """
    args, extras = parser.parse_known_args(argv)
    dest = getattr(args, "_list_dest", None)
    items = [x for x in extras if not x.startswith("-")]
    unknown = [x for x in extras if x.startswith("-")] if dest else extras
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if dest and items:
        setattr(args, dest, list(getattr(args, dest) or []) + items)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = parse_args(build_parser(), argv)
    try:
        return int(args._run(args) or 0)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingInterrupted carries 128 + signal (SIGTERM: 143)
        print("interrupted", file=sys.stderr)
        return int(getattr(e, "exit_status", 130))


if __name__ == "__main__":
    sys.exit(main())
