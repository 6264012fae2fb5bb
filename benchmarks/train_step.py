"""One training step of the `shapes` preset, before and after: git revisions side by side, one run.

Each variant is a (source, CPU kind) pair. A source is a git revision (exported with `git archive` into a
temporary folder) or the working tree (`WORKTREE`); it trains with its *own* `shapes` preset, so a change of
recipe counts as well as a change of code. A CPU kind is `native` or `avx2` (oneDNN and ATen limited to AVX2
with ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY: how an AVX2-only machine runs, measured on this one). Each
variant runs in its own process, on the same synthetic shapes batches; the runs alternate (A, B, A, B, ...)
so that the machine's drift hits all variants alike, and the table reports medians and the ratio to the
first source of the same kind.

    .venv/bin/python benchmarks/train_step.py --sources 6399329 WORKTREE --kinds native avx2 [--runs 3]
    .venv/bin/python benchmarks/train_step.py --sources WORKTREE --profile      # op table of one run
    .venv/bin/python benchmarks/train_step.py --init runs/demo/train-*/checkpoints/model_final.pth  # trained model

Timing: after `--warmup` steps, `--steps` steps of data loading + forward + backward + optimizer update,
in the precision the preset's `solver.amp` picks on that kind (bf16 where native, else float32).

The compute floor: the FLOPs of one step's forward and backward (torch.utils.flop_counter, convolutions and
matrix products) divided by the throughput this process measures for a large 3x3 convolution's forward
and backward in the same precision and threads: what the step would take if every FLOP ran as fast as
the CPU's best case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flops import conv_throughput, counted_flops  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def export_source(source: str, into: Path) -> Path:
    """Return a folder holding the package as of `source` (a git revision, or the working tree itself)."""
    if source == WORKTREE:
        return REPO
    folder = into / source.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", source, "maskrcnn"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def worker(args: argparse.Namespace) -> None:
    """Time the training steps of one variant in this process; print one JSON line."""
    sys.path.insert(0, args.source_dir)
    import torch

    from maskrcnn.config import load_config
    from maskrcnn.data.loader import build_train_loader
    from maskrcnn.engine.solver import build_lr_scheduler, build_optimizer
    from maskrcnn.modeling import build_model
    from revision_compat import training_helpers

    amp_dtype, seed_all, build_train_dataset = training_helpers()

    torch.set_num_threads(args.threads)
    cfg = load_config("shapes", [f"data.train=['{args.data}/train.json:{args.data}/train']", *args.overrides])
    seed_all(0)
    model = build_model(cfg)
    if args.init:
        # A trained model's step: once the RPN finds the objects, most sampled RoIs near them are
        # positives, and the mask head runs on every one of them.
        state = torch.load(args.init, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state))
    dataset = build_train_dataset(cfg)
    loader = build_train_loader(dataset, batch_size=cfg.solver.ims_per_batch, num_workers=0,
                                aspect_ratio_grouping=True, seed=0, start_iter=0, max_bad_images=5,
                                max_worker_restarts=1, rank=0, world_size=1)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver)
    dtype = amp_dtype(cfg.solver.amp, torch.device("cpu"))
    model.train()

    def step() -> None:
        images, targets = next(loader)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        scheduler.step()

    for _ in range(args.warmup):
        step()
    flops = step_flops(model, loader, dtype)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    wall, cpu = [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    conv_flops_per_s = conv_throughput(dtype)
    print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu), "gflop": flops / 1e9,
                      "conv_gflops": conv_flops_per_s / 1e9, "floor": flops / conv_flops_per_s,
                      "precision": str(dtype).removeprefix("torch.") if dtype else "float32",
                      "batch": cfg.solver.ims_per_batch}))


def step_flops(model, loader, dtype) -> float:
    """Return the FLOPs of one training step's forward and backward on the next batch."""
    import torch

    images, targets = next(loader)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        sum(losses.values()).backward()

    flops = counted_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def run_variant(source_dir: Path, kind: str, args: argparse.Namespace) -> dict:
    """Run one timing process for a variant; return its JSON result."""
    env = {**os.environ, **(AVX2_ENV if kind == "avx2" else {})}
    command = [sys.executable, __file__, "--worker", "--source-dir", str(source_dir), "--data", str(args.data),
               "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile:
        command.append("--profile")
    if args.init:
        command += ["--init", str(args.init.resolve())]
    command += ["--", *args.overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=source_dir)
    if done.returncode:
        raise SystemExit(f"variant {source_dir} ({kind}) failed:\n{done.stderr[-3000:]}")
    if args.profile:
        print(done.stderr[-12000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=["HEAD", WORKTREE],
                        help=f"git revisions, or {WORKTREE} for the files as they are (default: HEAD {WORKTREE})")
    parser.add_argument("--kinds", nargs="+", default=["native"], choices=["native", "avx2"])
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler op table per run")
    parser.add_argument("--data", type=Path, default=None, help="shapes dataset folder (default: made in a temp dir)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint (a trained shapes model: the steady-state step)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every variant")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        tmp = Path(tmp)
        if args.data is None:
            sys.path.insert(0, str(REPO))
            from maskrcnn.data.shapes import make_shapes
            args.data = tmp / "shapes"
            make_shapes(args.data, 96, 1, seed=123)
        sources = {s: export_source(s, tmp / "src") for s in args.sources}
        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.runs):
            for kind in args.kinds:
                for source, folder in sources.items():
                    results.setdefault((source, kind), []).append(run_variant(folder, kind, args))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; medians over {args.runs} runs of "
          f"{args.steps} steps")
    print("| source | CPU kind | precision | batch | s/step (wall) | CPU s/step | speed-up vs first | GFLOP/step "
          "| conv GFLOP/s | floor s/step |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in args.kinds:
        base = None
        for source in args.sources:
            runs = results[(source, kind)]
            wall = statistics.median(r["wall"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            base = base or wall
            gflop = statistics.median(r["gflop"] for r in runs)
            conv = statistics.median(r["conv_gflops"] for r in runs)
            print(f"| {source} | {kind} | {runs[0]['precision']} | {runs[0]['batch']} | {wall:.3f} | {cpu:.3f} | "
                  f"{base / wall:.2f}x | {gflop:.1f} | {conv:.0f} | {gflop / conv:.3f} |")


if __name__ == "__main__":
    main()
