"""`maskrcnn models`: the model zoo (pretrained weights by name), what each scored, and what is cached."""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = ("List the pretrained models usable as --weights NAME (reported AP, size, cached or not); "
        "--download NAME... fetches them ahead of time")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the models command's arguments."""
    p.add_argument("--download", nargs="+", metavar="NAME", default=None,
                   help="fetch these models into the cache now (verified; for machines that go offline later)")
    p.add_argument("--json", action="store_true", help="print the table as JSON (every field of every entry)")


def _ap(value: float | None) -> str:
    """Return an AP for the table ('-' when not published)."""
    return f"{value:.1f}" if value is not None else "-"


def format_table(rows: list[dict]) -> str:
    """Return the zoo as an aligned text table."""
    header = ["name", "architecture", "box", "mask", "kp", "AP on", "size", "cached", "source of AP"]
    lines = [[r["name"], r["architecture"], _ap(r["metrics"].get("box")), _ap(r["metrics"].get("mask")),
              _ap(r["metrics"].get("keypoints")), r["evaluated_on"],
              f"{r['size_mb']:.0f} MB" if r["size_mb"] else "?", "yes" if r["cached"] else "no", r["source"]]
             for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *lines])


def run(args: argparse.Namespace) -> int:
    """Print the zoo table (or JSON), or download the named models."""
    from maskrcnn import zoo

    if args.download:
        chosen = [zoo.get_entry(name) for name in args.download]  # every name checked before any download
        for entry in chosen:
            print(f"{entry.name}: {zoo.fetch(entry)} (verified: {entry.describe_hash()})")
        return 0
    rows = [{**dataclasses.asdict(e), "file_name": e.file_name, "cache_path": str(zoo.cached_path(e)),
             "cached": zoo.is_cached(e), "default": e.name == zoo.DEFAULT_MODEL} for e in zoo.entries().values()]
    if args.json:
        print(json.dumps(rows, indent=2), flush=True)
        return 0
    print(format_table(rows))
    print(f"\nbox / mask / kp: the publisher's reported AP@[.5:.95] in percent on the 'AP on' set. "
          f"Default model (`maskrcnn predict IMAGE`): {zoo.DEFAULT_MODEL}.")
    print(f"cache: {zoo.cache_dir()} (set {zoo.CACHE_ENV} to move it; {zoo.MIRROR_ENV}=URL fetches from a mirror, "
          f"{zoo.OFFLINE_ENV}=1 never downloads)")
    return 0
