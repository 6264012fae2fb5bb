"""Recipe variants of the `shapes` preset, trained and scored side by side: which learns most per CPU-second.

Each variant is a name and config overrides on top of the `shapes` preset. Every variant trains in its own
process (`maskrcnn train`) for a fixed number of iterations (its whole schedule: warm-up and decay end
where the run ends), then scores on the validation split (never the demo's test split). `--parallel 2`
runs two variants at once with `--threads 1` each, which on a 2-vCPU VM is the most work per hour;
iteration counts, not wall time, make variants comparable under that sharing, and the CPU seconds each
process used are reported beside the AP so that a cheaper step can be given more iterations.

    .venv/bin/python benchmarks/recipe_sweep.py --data /tmp/shapes --out runs/sweep --iters 560 \\
        --variant base: --variant lr2e-3:solver.base_lr=0.002 --variant bs4:solver.ims_per_batch=4,solver.max_iter=1120

`--iters` is every variant's default `solver.max_iter`; a variant's own `solver.max_iter=` wins. The warm-up
is the same share of each run as on the demo's time budget (`--warmup-share`). A variant
whose folder already has a score is not trained again (delete the folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name:key=value,key=value` -> (name, overrides); commas inside [...] belong to a list value."""
    name, _, rest = text.partition(":")
    return name, [o for o in re.split(r",(?![^\[]*\])", rest) if o]


def train_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train and score one variant in a child process; return its row."""
    out = args.out / name
    score = out / "eval" / "final" / "metrics.json"
    row_file = out / "row.json"
    if row_file.exists() and score.exists():
        return json.loads(row_file.read_text())
    max_iter = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("solver.max_iter=")), args.iters)
    # The demo trains on a time budget, where the warm-up keeps its share of the preset's schedule
    # (100 of 3000 iterations): give each fixed-iteration run the same share unless it sets its own.
    warmup = [] if any(o.startswith("solver.warmup_iters=") for o in overrides) else [
        f"solver.warmup_iters={max(1, round(args.warmup_share * max_iter))}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "maskrcnn.cli", "train", "--config", "shapes", "--out", str(out),
               f"data.train=['{args.data}/train.json:{args.data}/train']", f"data.val={args.data}/val.json:{args.data}/val",
               f"solver.max_iter={args.iters}", "solver.max_minutes=0", "solver.checkpoint_period=100000",
               f"solver.seed={args.seed}", *warmup, *overrides]
    start = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        return {"name": name, "overrides": overrides, "error": f"exit {status}, see {log}"}
    metrics = json.loads(score.read_text())
    row = {"name": name, "overrides": overrides, "wall_s": time.time() - start,
           "cpu_s": usage.ru_utime + usage.ru_stime,
           "box_ap": metrics["bbox"]["AP"], "mask_ap": metrics["segm"]["AP"],
           "mask_ap75": metrics["segm"].get("AP75", float("nan"))}
    row_file.write_text(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `maskrcnn make-shapes` folder (train, val)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--iters", type=int, default=560, help="solver.max_iter of each variant (default 560)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at once (default 2)")
    parser.add_argument("--warmup-share", type=float, default=100 / 3000,
                        help="warm-up iterations as a share of each run (default: the preset's 100/3000)")
    parser.add_argument("--seed", type=int, default=0, help="solver.seed of every variant")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    args = parser.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    variants = [parse_variant(v) for v in args.variant]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda v: train_variant(*v, args), variants))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, {args.threads} thread(s) "
          f"per run, {args.parallel} at once, seed {args.seed}, default {args.iters} iterations; validation split")
    print("| variant | overrides | CPU s | box AP | mask AP | mask AP75 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {' '.join(r['overrides'])} | failed: {r['error']} | | | |")
            continue
        print(f"| {r['name']} | {' '.join(r['overrides']) or '(preset)'} | {r['cpu_s']:.0f} | {r['box_ap']:.1f} | "
              f"{r['mask_ap']:.1f} | {r['mask_ap75']:.1f} |")


if __name__ == "__main__":
    main()
