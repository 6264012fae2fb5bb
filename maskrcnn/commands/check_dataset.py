"""`maskrcnn check-dataset`: validate a COCO-format dataset, report what is wrong, optionally clean it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from maskrcnn.errors import UserError

HELP = ("check a COCO-format dataset before training: maskrcnn check-dataset ANN.json:IMAGE_DIR "
        "[--json REPORT.json] [--fix OUT.json]")

EXAMPLES = 4  # ids shown per kind in the table


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the check-dataset command's options."""
    p.add_argument("data", metavar="ANN.json:IMAGE_DIR", help="the annotation file and its image folder")
    p.add_argument("--json", default=None, metavar="REPORT.json", help="write every finding to this JSON file")
    p.add_argument("--fix", default=None, metavar="OUT.json",
                   help="write a cleaned copy of the annotations here (never over the input)")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully to catch truncated files (slower; default reads headers only)")


def _same_file(a: Path, b: Path) -> bool:
    """Return whether two paths name the same file (following links)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _table(findings: list, severity_of: dict) -> list[str]:
    """Return the summary table: one row per kind with its severity, count and first few ids."""
    rows: dict[str, list] = {}
    for f in findings:
        rows.setdefault(f.kind, []).append(f)
    if not rows:
        return []
    width = max(len("kind"), *(len(k) for k in rows))
    lines = [f"{'kind':<{width}}  {'severity':<8}  {'count':>6}  examples"]
    for kind, group in rows.items():
        refs = []
        for f in group:
            ref = f.ref()
            if ref not in refs:
                refs.append(ref)
            if len(refs) > EXAMPLES:
                break
        shown = ", ".join(refs[:EXAMPLES]) + (", ..." if len(refs) > EXAMPLES else "")
        lines.append(f"{kind:<{width}}  {severity_of[kind][0]:<8}  {len(group):>6}  {shown}")
    return lines


def _counts(findings: list) -> tuple[int, int]:
    errors = sum(f.severity == "error" for f in findings)
    return errors, len(findings) - errors


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def run(args: argparse.Namespace) -> int:
    """Check the dataset, print the summary, write the report and cleaned copy; 1 if it has errors."""
    from maskrcnn.data.coco import parse_data_spec
    from maskrcnn.data.validate import KINDS, ImageProber, check_data, clean_data, load_annotations
    from maskrcnn.fileio import atomic_write_text

    ann_file, image_dir = parse_data_spec(args.data)
    fix_path = Path(args.fix) if args.fix else None
    report_path = Path(args.json) if args.json else None
    if fix_path is not None and _same_file(fix_path, ann_file):
        raise UserError(f"--fix {fix_path} is the input annotation file; write the cleaned copy to a new file")
    if fix_path is not None and report_path is not None and _same_file(fix_path, report_path):
        raise UserError(f"--fix and --json both name '{fix_path}'; give them different files")
    if report_path is not None and _same_file(report_path, ann_file):
        raise UserError(f"--json {report_path} is the input annotation file; write the report to a new file")
    data = load_annotations(ann_file)
    if not image_dir.is_dir():
        raise UserError(f"image directory '{image_dir}' (for '{ann_file}') does not exist")

    prober = ImageProber(image_dir, decode=args.decode)
    findings = check_data(data, prober, ann_file)
    errors, warnings = _counts(findings)
    print(f"{ann_file}: {_plural(len(data['images']), 'image')}, {_plural(len(data['annotations']), 'annotation')}, "
          f"{_plural(len(data['categories']), 'category', 'categories')} "
          f"(images in {image_dir}{', fully decoded' if args.decode else ''})")
    table = _table(findings, KINDS)
    if table:
        print()
        print("\n".join(table))
        print()
        seen: set[str] = set()
        for f in findings:  # the first message of each kind says exactly what is wrong
            if f.kind not in seen:
                seen.add(f.kind)
                print(f"{f.kind}: {f.message}")
        print()
    verdict = "OK" if errors == 0 else "FAILED"
    print(f"{verdict}: {_plural(errors, 'error')}, {_plural(warnings, 'warning')}")

    if report_path is not None:
        report = {
            "ann_file": str(ann_file), "image_dir": str(image_dir),
            "images": len(data["images"]), "annotations": len(data["annotations"]),
            "categories": len(data["categories"]), "errors": errors, "warnings": warnings,
            "counts": {k: sum(f.kind == k for f in findings) for k in dict.fromkeys(f.kind for f in findings)},
            "findings": [f.to_dict() for f in findings],
        }
        atomic_write_text(report_path, json.dumps(report, indent=1))
        print(f"report: {report_path}")

    if fix_path is not None:
        fixed, summary = clean_data(data, prober, ann_file)
        atomic_write_text(fix_path, json.dumps(fixed, separators=(",", ":")))
        kept = ", ".join(f"{len(fixed[k])}/{len(data[k])} {k}" for k in ("images", "annotations", "categories"))
        extra = []
        if summary.resized_images:
            extra.append(f"corrected the size of {_plural(summary.resized_images, 'image')}")
        if summary.renumbered_annotations:
            extra.append(f"gave {_plural(summary.renumbered_annotations, 'annotation')} a new id")
        print(f"cleaned copy: {fix_path} (kept {kept}{'; ' + '; '.join(extra) if extra else ''})")
        left, _ = _counts(summary.remaining)
        if left:
            kinds = sorted({f.kind for f in summary.remaining if f.severity == "error"})
            print(f"the cleaned copy still has {_plural(left, 'error')} that dropping entries cannot fix: "
                  + ", ".join(kinds))
    return 1 if errors else 0
