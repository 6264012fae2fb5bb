"""Re-run the Mask R-CNN paper's ablations (Table 2) on the machine at hand, several seeds per variant.

Each variant is one set of config overrides on a base preset (`shapes` by default); every variant trains
with the same data, iterations and seeds, then the real COCO evaluator scores it on the held-out split.
By default the data is the built-in synthetic shapes in their "fine" style (thin rings, crosses,
five-pointed stars, small objects), where a pixel of misalignment costs mask IoU.

A second group compares the plain box head with Cascade R-CNN's (`cascade/*`, its own table): box AP at
the IoU thresholds, and the cost, as seconds per training step (the trainer's log) and per image at
inference (`maskrcnn benchmark` on the trained model, after training).

    .venv/bin/python benchmarks/ablations.py --out runs/ablations                # all variants, seeds 0 1 2
    .venv/bin/python benchmarks/ablations.py --out runs/ablations --variants fpn/roipool c4/roialign
    .venv/bin/python benchmarks/ablations.py --out runs/ablations --data train.json:images/ val.json:images/ \
        --config R50-FPN-1x                                                       # a COCO-format set of yours
    .venv/bin/python benchmarks/ablations.py --out runs/ablations --report ABLATIONS.md --chart docs/ablations.png
    .venv/bin/python benchmarks/ablations.py --out runs/cascade --variants cascade/plain cascade/cascade --seeds 0 1

Runs are separate `maskrcnn train` processes (a failed one is reported and the others go on); finished
runs are kept, so re-running the command resumes. `--report` writes the table between the markers of
the given Markdown file and the bar chart PNG, from whatever runs have finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maskrcnn.config import load_config  # noqa: E402
from maskrcnn.fileio import atomic_path, atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One ablated setting: config overrides, and the paper's numbers for the same choice (Table 2)."""

    name: str
    overrides: tuple[str, ...]
    paper: str  # the paper's row: "setting: mask AP / AP50 / AP75"
    paper_ap: float | None  # the paper's mask AP, for the chart
    against: str = ""  # the variant this one differs from by one choice (for the Δ column)
    input_scale: int = 1  # train and test at this multiple of the base preset's image size
    group: str = "table2"  # which table of the report: the paper's Table 2, or the cascade comparison

    @property
    def single_map(self) -> bool:
        """Whether the backbone gives one feature map (C4/C5), which then carries every anchor size."""
        return any(o.startswith("model.backbone.kind=c") for o in self.overrides)


# The shapes preset is R18-FPN; the C4/C5 rows swap the backbone for one feature map at stride 16 / 32.
C4 = ("model.backbone.kind=c4", "model.box_head.type=res5", "model.box_head.pooler.output_size=14")
C5 = ("model.backbone.kind=c5",)
ROIPOOL = ("model.box_head.pooler.type=roipool", "model.mask_head.pooler.type=roipool")
UNALIGNED = ("model.box_head.pooler.aligned=false", "model.mask_head.pooler.aligned=false")

VARIANTS = [
    Variant("fpn/baseline", (), "R-50-FPN, FCN head: 33.6 / 55.2 / 35.3 (2e)", 33.6),
    Variant("fpn/roialign-unaligned", UNALIGNED, "(the paper's own RoIAlign had no half-pixel shift)", None,
            "fpn/baseline"),
    Variant("fpn/roipool", ROIPOOL, "(RoIPool ablated on C4/C5 only)", None, "fpn/baseline"),
    Variant("fpn/softmax", ("model.mask_head.loss=softmax",), "R-50-C4 softmax: 24.8 / 44.1 / 25.1 (2b)", 24.8,
            "fpn/baseline"),
    Variant("fpn/class-agnostic", ("model.mask_head.class_agnostic=true",), "R-50-C4 agnostic: 29.7 (text, §4.2)",
            29.7, "fpn/baseline"),
    Variant("fpn/mlp", ("model.mask_head.type=mlp",), "R-50-FPN MLP 1024-1024: 31.5 / 53.7 / 32.8 (2e)", 31.5,
            "fpn/baseline"),
    Variant("c4/roialign", C4, "R-50-C4 RoIAlign: 30.3 / 51.2 / 31.5 (2c)", 30.3),
    Variant("c4/roipool", C4 + ROIPOOL, "R-50-C4 RoIPool: 26.9 / 48.8 / 26.4 (2c)", 26.9, "c4/roialign"),
    Variant("c5/roialign", C5, "R-50-C5 RoIAlign: 30.9 / 51.8 / 32.1 (2d)", 30.9),
    Variant("c5/roipool", C5 + ROIPOOL, "R-50-C5 RoIPool: 23.6 / 46.5 / 21.6 (2d)", 23.6, "c5/roialign"),
    # Stride 32 on the 128-px shapes is a 4x4 map, smaller than most objects need: at twice the size
    # the map is 8x8 and objects of 20-96 px span 0.6-3 cells, nearer COCO's at 800 px.
    Variant("c5x2/roialign", C5, "R-50-C5 RoIAlign: 30.9 / 51.8 / 32.1 (2d)", 30.9, input_scale=2),
    Variant("c5x2/roipool", C5 + ROIPOOL, "R-50-C5 RoIPool: 23.6 / 46.5 / 21.6 (2d)", 23.6, "c5x2/roialign",
            input_scale=2),
]
# Cascade R-CNN against the plain head, same preset otherwise. The literature's claim (Cai & Vasconcelos,
# TPAMI 2019) is a box AP gain that grows with the IoU threshold: small at AP50, larger at AP75.
CASCADE = ("model.box_head.class_agnostic=true", "model.box_head.cascade.enabled=true")
VARIANTS += [
    Variant("cascade/plain", (), "Detectron2 R50-FPN 3x plain: box 41.0, mask 37.2", None, group="cascade"),
    Variant("cascade/agnostic-boxes", ("model.box_head.class_agnostic=true",),
            "(control: the plain head with class-agnostic boxes, as every cascade stage has)", None,
            "cascade/plain", group="cascade"),
    Variant("cascade/cascade", CASCADE, "Detectron2 R50-FPN 3x cascade: box 44.3 (+3.3), mask 38.5 (+1.3)", None,
            "cascade/plain", group="cascade"),
]
BY_NAME = {v.name: v for v in VARIANTS}
MARK_START, MARK_END = "<!-- ablations:table:start -->", "<!-- ablations:table:end -->"
# Each group's table goes between its own markers.
MARKERS = {"table2": (MARK_START, MARK_END),
           "cascade": ("<!-- ablations:cascade:start -->", "<!-- ablations:cascade:end -->")}
# The metrics each group's Δ column compares, paired by seed.
DELTA_METRICS = {"table2": ("mask AP", "mask AP75"), "cascade": ("box AP", "box AP75")}


def single_level_anchors(config: str | None, extra: list[str]) -> str:
    """Return the override putting all of the preset's FPN anchor sizes on C4/C5's one feature map."""
    sizes = [s for level in load_config(config, extra).model.anchors.sizes for s in level]
    return f"model.anchors.sizes=[[{','.join(str(s) for s in sorted(set(sizes)))}]]"


def scaled_input(config: str | None, extra: list[str], factor: int) -> list[str]:
    """Return the overrides training and testing at `factor` times the preset's image sizes."""
    size = load_config(config, extra).input
    train = ",".join(str(factor * s) for s in size.min_size_train)
    return [f"input.min_size_train=[{train}]", f"input.max_size_train={factor * size.max_size_train}",
            f"input.min_size_test={factor * size.min_size_test}", f"input.max_size_test={factor * size.max_size_test}"]


def variant_overrides(variant: Variant, config: str | None, extra: list[str]) -> list[str]:
    """Return the full override list of one variant on top of the base preset and the common overrides."""
    overrides = list(extra) + list(variant.overrides)
    if variant.single_map:
        overrides.append(single_level_anchors(config, extra))
    if variant.input_scale != 1:
        overrides += scaled_input(config, extra, variant.input_scale)
    return overrides


def ensure_data(out: Path, num_train: int, num_val: int) -> tuple[str, str, list[str]]:
    """Return the train/val specs of the fine synthetic shapes (made once) and the class-name override."""
    from maskrcnn.data.shapes import make_shapes, shape_categories

    data = out / "data"
    stamp = data / "params.json"
    params = {"style": "fine", "train": num_train, "val": num_val, "seed": 0, "size": 128}
    if not (stamp.exists() and json.loads(stamp.read_text()) == params):
        print(f"making {num_train} + {num_val} fine-geometry shapes images in {data} ...", flush=True)
        make_shapes(data, num_train, num_val, seed=0, image_size=128, style="fine")
        atomic_write_text(stamp, json.dumps(params))
    names = ",".join(c["name"] for c in shape_categories("fine"))
    return (f"{data / 'train.json'}:{data / 'train'}", f"{data / 'val.json'}:{data / 'val'}",
            [f"model.class_names=[{names}]"])


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant.replace("/", "-") / f"seed{seed}"


def metrics_file(out: Path, variant: str, seed: int) -> Path:
    return run_dir(out, variant, seed) / "eval" / "final" / "metrics.json"


def benchmark_file(out: Path, variant: str, seed: int) -> Path:
    return run_dir(out, variant, seed) / "benchmark.json"


def seconds_per_step(out: Path, variant: str, seed: int) -> float | None:
    """Return a run's median training step time (data + forward + backward + update, the trainer's
    logged `time`), leaving out the first iteration's record (allocator warm-up); None without a log."""
    path = run_dir(out, variant, seed) / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["time"] for r in records if "time" in r and r.get("iter", 0) > 1]
    return statistics.median(values) if values else None


def time_inference(out: Path, variant: Variant, seed: int, threads: int, size: int = 128) -> None:
    """Write benchmark.json: `maskrcnn benchmark` of the trained model, one size x size image, 20 runs."""
    directory = run_dir(out, variant.name, seed)
    command = [sys.executable, "-m", "maskrcnn.cli", "benchmark", "--weights",
               str(directory / "checkpoints" / "model_final.pth"), "--size", f"{size}x{size}", "--runs", "20",
               "--warmup", "3", "--mode", "inference", "--json", str(benchmark_file(out, variant.name, seed)),
               "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    with open(directory / "log.txt", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def train_one(out: Path, variant: Variant, seed: int, config: str | None, common: list[str],
              threads: int) -> str:
    """Train and evaluate one (variant, seed) in its own process; return a one-line outcome."""
    if metrics_file(out, variant.name, seed).exists():
        return f"{variant.name} seed {seed}: done before, kept"
    directory = run_dir(out, variant.name, seed)
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "maskrcnn.cli", "train", "--out", str(directory)]
    command += ["--config", config] if config else []
    command += variant_overrides(variant, config, common) + [f"solver.seed={seed}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with open(directory / "log.txt", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    minutes = (time.perf_counter() - start) / 60
    if status != 0 or not metrics_file(out, variant.name, seed).exists():
        return f"{variant.name} seed {seed}: FAILED (exit {status}) after {minutes:.1f} min, see {directory / 'log.txt'}"
    if variant.group == "cascade":
        time_inference(out, variant, seed, threads)
    segm = json.loads(metrics_file(out, variant.name, seed).read_text())["segm"]
    return f"{variant.name} seed {seed}: mask AP {segm['AP']:.1f} in {minutes:.1f} min"


# ---- the report ------------------------------------------------------------------------------------


def collect(out: Path, variants: list[Variant], seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Return {variant: {"seed": [finished seeds], metric: [value per finished seed]}}.

    The metrics are mask and box AP/AP50/AP75, and where a run has them, seconds per training step
    ("s/step") and per inference image ("s/image", the benchmark's median).
    """
    results: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        done = [s for s in seeds if metrics_file(out, v.name, s).exists()]
        rows = [json.loads(metrics_file(out, v.name, s).read_text()) for s in done]
        if rows:
            results[v.name] = {"seed": done}
            for kind, section in (("mask", "segm"), ("box", "bbox")):
                for stat in ("AP", "AP50", "AP75"):
                    results[v.name][f"{kind} {stat}"] = [r[section].get(stat) for r in rows]
            steps = [seconds_per_step(out, v.name, s) for s in done]
            images = [json.loads(benchmark_file(out, v.name, s).read_text())["inference"]["seconds_per_image"]["median"]
                      if benchmark_file(out, v.name, s).exists() else None for s in done]
            results[v.name]["s/step"] = [x for x in steps if x is not None]
            results[v.name]["s/image"] = [x for x in images if x is not None]
    return results


def mean_spread(values: list[float], digits: int = 1) -> str:
    """Return "mean ± half-range" (the spread across seeds; just the value for one seed; "" for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def difference(results: dict[str, dict[str, list[float]]], name: str) -> str:
    """Return "Δ AP / Δ AP75 vs X; per seed: ..." against the variant this one differs from (mask AP for
    Table 2, box AP for the cascade group).

    Paired by seed: a seed fixes the initial weights and the data order, so the difference within a
    seed is far less noisy than the spread of either variant across seeds.
    """
    against = BY_NAME[name].against
    main_metric, ap75 = DELTA_METRICS[BY_NAME[name].group]
    if against not in results:
        return ""
    ours, theirs = results[name], results[against]
    common = [s for s in ours["seed"] if s in theirs["seed"]]
    if not common:
        return ""

    def per_seed(metric: str) -> list[float]:
        return [ours[metric][ours["seed"].index(s)] - theirs[metric][theirs["seed"].index(s)] for s in common]

    gain, high = per_seed(main_metric), per_seed(ap75)
    seeds = ", ".join(f"{d:+.1f}" for d in gain)
    return (f"{statistics.fmean(gain):+.1f} / {statistics.fmean(high):+.1f} vs {against.split('/')[1]}"
            f" ({main_metric} per seed: {seeds})")


# Columns of each group's table: (header, metric, digits).
COLUMNS = {
    "table2": [("mask AP", "mask AP", 1), ("AP50", "mask AP50", 1), ("AP75", "mask AP75", 1), ("box AP", "box AP", 1)],
    "cascade": [("box AP", "box AP", 1), ("box AP50", "box AP50", 1), ("box AP75", "box AP75", 1),
                ("mask AP", "mask AP", 1), ("mask AP75", "mask AP75", 1), ("s / step", "s/step", 2),
                ("s / image", "s/image", 3)],
}
REFERENCE = {"table2": "paper (Table 2): mask AP / AP50 / AP75", "cascade": "reference (COCO, theirs)"}


def markdown_table(results: dict[str, dict[str, list[float]]], group: str = "table2") -> str:
    """Return the Markdown table of the group's finished variants beside the paper's (or reference) row."""
    columns = COLUMNS[group]
    delta = " / ".join(DELTA_METRICS[group])
    lines = ["| variant | seeds | " + " | ".join(h for h, _, _ in columns) + f" | Δ {delta}, paired by seed | "
             + REFERENCE[group] + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | --- | --- |"]
    for name, metrics in results.items():
        if BY_NAME[name].group != group:
            continue
        cells = [mean_spread(metrics.get(key, []), digits) for _, key, digits in columns]
        cells += [difference(results, name), BY_NAME[name].paper]
        lines.append(f"| {name} | {len(metrics['mask AP'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, table: str, command: str, group: str = "table2") -> None:
    """Replace the text between the group's table markers of `path` with the table and how it was made."""
    start, end = MARKERS[group]
    if not path.is_file():
        raise SystemExit(f"report file {path} does not exist; give a Markdown file with the table markers")
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no '{start}' ... '{end}' markers to put the table between")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    made = f"Made by `{command}` on {time.strftime('%Y-%m-%d')}."
    atomic_write_text(path, f"{head}{start}\n{table}\n\n{made}\n{end}{tail}")


def bar_chart(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Draw mask AP and AP75 per variant (bars: seed mean; dots: each seed) beside the paper's mask AP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4.5))
    width = 0.27
    for offset, (metric, colour) in enumerate((("mask AP", "tab:blue"), ("mask AP75", "tab:orange"))):
        xs = [i + (offset - 1) * width for i in range(len(names))]
        ax.bar(xs, [statistics.fmean(results[n][metric]) for n in names], width, color=colour, label=f"ours: {metric}")
        for x, n in zip(xs, names):
            ax.plot([x] * len(results[n][metric]), results[n][metric], "k.", markersize=4)
    paper = [BY_NAME[n].paper_ap for n in names]
    ax.bar([i + width for i, p in enumerate(paper) if p is not None], [p for p in paper if p is not None], width,
           color="tab:gray", label="paper: mask AP (COCO, R-50)")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_title("Table 2 ablations: ours on fine shapes (dots: seeds), the paper's on COCO", fontsize=9)
    ax.set_ylim(0, 1.3 * max(ax.get_ylim()[1], 1.0))  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncols=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------


def variant_name(text: str) -> str:
    """Return `text` if it names a variant; else explain (a KEY=VALUE after --variants lands here)."""
    if text in BY_NAME:
        return text
    hint = "; KEY=VALUE overrides go before --variants" if "=" in text else ""
    raise argparse.ArgumentTypeError(f"unknown variant '{text}' (one of {', '.join(BY_NAME)}){hint}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations", help="folder for data, runs and results (default runs/ablations)")
    p.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], type=variant_name, metavar="NAME",
                   help=f"variants to run (default all: {', '.join(BY_NAME)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--iters", type=int, default=400, help="training iterations per run (default 400)")
    p.add_argument("--config", default="shapes", help="base preset or YAML (default shapes)")
    p.add_argument("--data", nargs=2, metavar=("TRAIN", "VAL"),
                   help="COCO-format train and val specs (JSON:IMAGE_DIR) instead of the synthetic fine shapes")
    p.add_argument("--train-images", type=int, default=1000, help="synthetic training images (default 1000)")
    p.add_argument("--val-images", type=int, default=200, help="synthetic validation images (default 200)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--threads", type=int, default=0, help="threads per run (default: cores / jobs)")
    p.add_argument("--report", metavar="MARKDOWN", help="only write the table into this file (between its markers)")
    p.add_argument("--chart", metavar="PNG", help="with --report: also draw the bar chart here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every variant")
    args = p.parse_args()
    out = Path(args.out)
    variants = [BY_NAME[n] for n in args.variants]

    if args.report:
        results = collect(out, variants, args.seeds)
        if not results:
            raise SystemExit(f"no finished runs under {out / 'runs'} for these variants and seeds")
        command = "python benchmarks/ablations.py " + " ".join(a for a in sys.argv[1:])
        groups = list(dict.fromkeys(BY_NAME[name].group for name in results))
        for group in groups:
            write_markdown(Path(args.report), markdown_table(results, group), command, group)
            print(markdown_table(results, group))
        table2 = {n: r for n, r in results.items() if BY_NAME[n].group == "table2"}
        if args.chart and table2:
            bar_chart(table2, Path(args.chart))
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        return 0

    if args.data:
        train_spec, val_spec, names = args.data[0], args.data[1], []
    else:
        train_spec, val_spec, names = ensure_data(out, args.train_images, args.val_images)
    common = [f"data.train=['{train_spec}']", f"data.val={val_spec}", *names,
              f"solver.max_iter={args.iters}", "solver.max_minutes=0", f"solver.checkpoint_period={args.iters}",
              *args.overrides]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(v, s) for s in args.seeds for v in variants]  # seed-major: every variant gets seed 0 first
    print(f"{len(jobs)} runs of {args.iters} iterations, {args.jobs} at a time with {threads} threads each", flush=True)
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: train_one(out, job[0], job[1], args.config, common, threads), jobs):
            print(line, flush=True)
            failed += "FAILED" in line
    print(f"{len(jobs) - failed} of {len(jobs)} runs finished; table: --report ABLATIONS.md --chart docs/ablations.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
