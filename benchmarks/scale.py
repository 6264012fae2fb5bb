"""Scale within a fixed memory (issue 25): COCO-size annotation files, workers, and huge polygons.

Generates, under --out (reused when already there with the same sizes):

- a COCO-format file with `--images` images and `--annotations` polygon annotations (COCO train2017
  has 118 287 images and 860 001 annotations; a few % are crowd RLEs here too), image files absent;
- a one-image file whose one annotation is a simple (star-shaped) polygon of `--polygon-points` points.

and measures, each in a fresh process so that peak RSS is that measurement's own:

- `load`: `CocoDataset(...)` time and peak RSS;
- `cache`: the same with `data.cache_dir` set, cold (parse + write) and warm (read back);
- `workers`: the memory of forked DataLoader-style workers that iterate every image's records
  (total = the parent's RSS + each worker's private memory; copy-on-read shows up as private memory);
- `polygon`: `maskrcnn check-dataset` on the huge polygon;
- `check-coco`: `maskrcnn check-dataset` on the COCO-size file (slow before; off by default);
The training step on a dense image (issue 25, part 1) has its own script: `benchmarks/dense_scene.py`.

`--before REV` runs the same measurements on a `git archive` copy of revision REV too (the current
tree is "after"). The default sizes are COCO's; `--images 20000 --annotations 145000` is a quick run.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --before a821b39 [--out runs/scale] \\
        [--sections load cache workers polygon] [--images N --annotations M --polygon-points P]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
SECTIONS = ("load", "cache", "workers", "polygon", "check-coco")
DEFAULT_SECTIONS = ("load", "cache", "workers", "polygon")


# ---- data ---------------------------------------------------------------------------------------


def make_coco_file(path: Path, num_images: int, num_annotations: int, seed: int = 0) -> None:
    """Write a COCO instances file of random polygons (and ~1% crowd RLEs) at COCO's sizes and shape.

    Polygons have 8..40 points with two decimals, as COCO's do; images are 640x480 or 480x640. Written
    one annotation at a time, so generating needs little memory.
    """
    rng = np.random.default_rng(seed)
    image_of = np.sort(rng.integers(1, num_images + 1, num_annotations))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write('{"info":{"description":"benchmarks/scale.py"},"licenses":[],"images":[')
        for i in range(1, num_images + 1):
            w, h = (640, 480) if i % 3 else (480, 640)
            f.write(("," if i > 1 else "") + json.dumps(
                {"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h, "license": 1}))
        f.write('],"annotations":[')
        for k in range(num_annotations):
            iid = int(image_of[k])
            w, h = (640, 480) if iid % 3 else (480, 640)
            cx, cy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
            r = rng.uniform(3, min(cx, cy, w - cx, h - cy, 150))
            ann = {"id": k + 1, "image_id": iid, "category_id": int(rng.integers(1, 81)), "iscrowd": 0}
            if k % 97 == 0:  # a crowd region as uncompressed RLE (COCO's crowds are)
                top, left = int(cy - r / 2), int(cx - r / 2)
                side = max(int(r), 1)
                counts = []
                pos = 0
                for col in range(left, left + side):  # column-major runs of a side x side square
                    start = col * h + top
                    counts += [start - pos, side]
                    pos = start + side
                counts.append(w * h - pos)
                ann.update(iscrowd=1, segmentation={"size": [h, w], "counts": counts},
                           bbox=[left, top, side, side], area=side * side)
            else:
                n = int(rng.integers(8, 41))
                theta = np.sort(rng.uniform(0, 2 * math.pi, n))
                rad = r * rng.uniform(0.5, 1.0, n)
                xy = np.round(np.stack([cx + rad * np.cos(theta), cy + rad * np.sin(theta)], 1), 2)
                x1, y1 = xy.min(0)
                x2, y2 = xy.max(0)
                ann.update(segmentation=[xy.reshape(-1).tolist()], area=round(float((x2 - x1) * (y2 - y1)) / 2, 2),
                           bbox=[round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2),
                                 round(float(y2 - y1), 2)])
            f.write(("," if k else "") + json.dumps(ann, separators=(",", ":")))
        cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
        f.write('],"categories":' + json.dumps(cats) + "}")
    os.replace(tmp, path)


def make_polygon_file(path: Path, points: int, seed: int = 0) -> None:
    """Write a one-image COCO file whose one annotation is a simple star-shaped polygon of `points` points."""
    rng = np.random.default_rng(seed)
    theta = np.linspace(0, 2 * math.pi, points, endpoint=False)
    rad = 1500 + 400 * np.sin(7 * theta) + rng.uniform(-2, 2, points)  # a wavy contour, as tracing gives
    xy = np.round(np.stack([2000 + rad * np.cos(theta), 2000 + rad * np.sin(theta)], 1), 2)
    x1, y1 = xy.min(0)
    x2, y2 = xy.max(0)
    data = {
        "images": [{"id": 1, "file_name": "big.png", "width": 4000, "height": 4000}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "segmentation": [xy.reshape(-1).tolist()]}],
        "categories": [{"id": 1, "name": "blob"}],
    }
    path.write_text(json.dumps(data))


def prepare_data(out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Generate (or reuse) the files; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    coco = out / f"coco_{args.images}_{args.annotations}.json"
    poly = out / f"polygon_{args.polygon_points}.json"
    if not coco.exists():
        t = time.time()
        make_coco_file(coco, args.images, args.annotations)
        print(f"generated {coco} ({coco.stat().st_size / 2**20:.0f} MiB) in {time.time() - t:.0f} s", flush=True)
    if not poly.exists():
        make_polygon_file(poly, args.polygon_points)
    # check-dataset needs the polygon's image to exist, so its checks reach the polygon as they would
    img = out / "images" / "big.png"
    if not img.exists():
        from PIL import Image

        Image.new("L", (4000, 4000)).save(img)
    return {"coco": coco, "polygon": poly, "images": out / "images"}


# ---- measurements (each in a child process) -----------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mib(pid: int | str = "self") -> float:
    """Return a process's private (unshared) memory: what copy-on-write has copied, plus its own."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(ann: str, images: str, cache_dir: str | None):
    from maskrcnn.data.coco import CocoDataset

    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    return CocoDataset(ann, images, **kwargs)


def child_load(ann: str, images: str, cache_dir: str | None) -> dict:
    """Load the dataset; return seconds, CPU seconds of the process (imports included: steadier than the
    wall time on a shared machine) and peak RSS."""
    t = time.perf_counter()
    ds = _load(ann, images, cache_dir)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": _peak_rss_mib(), "images": len(ds)}


def _records_fetcher(ds):
    """Return index -> (info, records): the new method, or the old lists' items."""
    if hasattr(ds, "_image_records"):
        return ds._image_records
    return lambda i: (ds._images[i], ds._records[i])


def _touch(records: list) -> int:
    """Read every number of the records as `__getitem__` does (boxes, and polygons into arrays, as
    pycocotools' frPyObjects reads them); return how many polygons were read."""
    n = 0
    for r in records:
        np.asarray(r["box"])
        if isinstance(r["segmentation"], list):
            for p in r["segmentation"]:
                np.asarray(p, dtype=np.float64)
                n += 1
    return n


def child_workers(ann: str, images: str, workers: int) -> dict:
    """Load, fork `workers` processes that read every image's records between them; return memory figures.

    Each worker reports its private memory after reading its share (what reference counts and
    allocations copied) and again after a full garbage collection (which writes the header of every
    tracked Python object: long-running workers do such collections now and then).
    """
    ds = _load(ann, images, None)
    fetch = _records_fetcher(ds)
    n = len(ds)
    pipes, pids = [], []
    t0 = time.perf_counter()
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker, as DataLoader's fork start method makes them
            os.close(r)
            first = None
            polygons = 0
            for i in range(w, n, workers):  # each worker its share, as a DataLoader's workers take turns
                info, records = fetch(i)
                polygons += _touch(records)
                if first is None:
                    first = time.perf_counter() - t0
            private = _private_mib()
            gc.collect()
            msg = json.dumps({"private_mib": private, "private_after_gc_mib": _private_mib(), "first_s": first,
                              "polygons": polygons, "seconds": time.perf_counter() - t0})
            os.write(wfd, msg.encode())
            os.close(wfd)
            os._exit(0)
        os.close(wfd)
        pipes.append(r)
        pids.append(pid)
    results = []
    for r in pipes:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        results.append(json.loads(b"".join(chunks)))
    for pid in pids:
        os.waitpid(pid, 0)
    parent = _rss_mib()
    return {"workers": workers, "parent_rss_mib": parent,
            "worker_private_mib": [x["private_mib"] for x in results],
            "worker_private_after_gc_mib": [x["private_after_gc_mib"] for x in results],
            "total_mib": parent + sum(x["private_mib"] for x in results),
            "total_after_gc_mib": parent + sum(x["private_after_gc_mib"] for x in results),
            "first_record_s": max(x["first_s"] for x in results),
            "worker_seconds": max(x["seconds"] for x in results), "polygons": sum(x["polygons"] for x in results)}


def run_child(root: Path, kind: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter importing `maskrcnn` from `root`; return its JSON."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE), "_child", kind, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli_timed(root: Path, *cli_args: str) -> dict:
    """Run `maskrcnn CLI_ARGS` from `root` under /usr/bin/time -v; return seconds, peak RSS, exit code."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    code = "import sys; from maskrcnn.cli import main; sys.exit(main(sys.argv[1:]))"
    t = time.perf_counter()
    # -P: not the current folder first on sys.path, so `maskrcnn` comes from `root` (PYTHONPATH)
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-P", "-c", code, *cli_args], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t
    rss = next((int(line.split(":")[1]) / 1024 for line in proc.stderr.splitlines()
                if "Maximum resident set size" in line), float("nan"))
    errors = [line for line in proc.stderr.splitlines() if "Error" in line and "Command" not in line]
    out = {"seconds": seconds, "peak_rss_mib": rss, "exit": proc.returncode}
    # exit 1 is also "the dataset has errors" (the COCO-size file's images are absent): a traceback is not
    if proc.returncode not in (0, 1) or "Traceback" in proc.stderr:
        out["error"] = (errors or proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return out


# ---- the run ------------------------------------------------------------------------------------


def archive_revision(rev: str, dest: Path) -> Path:
    """Extract `git archive REV` of this repository into dest; return it."""
    tar = dest / "src.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tar), rev], check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest / "src", filter="data")
    return dest / "src"


def measure(label: str, root: Path, files: dict[str, Path], sections: list[str], out: Path,
            args: argparse.Namespace) -> dict:
    """Run the chosen sections with `maskrcnn` from `root`; print and return the figures."""
    res: dict = {}
    ann, images = str(files["coco"]), str(files["images"])
    if "load" in sections:
        res["load"] = run_child(root, "load", ann, images, "")
        print(label, "load", res["load"], flush=True)
    if "cache" in sections and label == "after":
        cache = Path(tempfile.mkdtemp(dir=out, prefix="cache-"))
        res["cache_cold"] = run_child(root, "load", ann, images, str(cache))
        res["cache_warm"] = run_child(root, "load", ann, images, str(cache))
        print(label, "cache", res["cache_cold"], res["cache_warm"], flush=True)
    if "workers" in sections:
        for n in (1, 2):
            res[f"workers{n}"] = run_child(root, "workers", ann, images, str(n))
            print(label, f"workers {n}", res[f"workers{n}"], flush=True)
    if "polygon" in sections:
        res["polygon"] = run_cli_timed(root, "check-dataset", f"{files['polygon']}:{images}")
        print(label, "polygon", res["polygon"], flush=True)
    if "check-coco" in sections:
        res["check_coco"] = run_cli_timed(root, "check-dataset", f"{ann}:{images}")
        print(label, "check-coco", res["check_coco"], flush=True)
    return res


def machine() -> str:
    """Return the CPU model and core count, as lscpu reports them."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    return f"{model}, {os.cpu_count()} cores, {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        kind, rest = argv[1], argv[2:]
        if kind == "load":
            result = child_load(rest[0], rest[1], rest[2] or None)
        else:
            result = child_workers(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--annotations", type=int, default=860_001)
    p.add_argument("--polygon-points", type=int, default=200_000)
    p.add_argument("--before", default="", help="a git revision to measure too (e.g. a821b39)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS))
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    out = Path(args.out)
    files = prepare_data(out, args)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results = {"after": measure("after", REPO, files, args.sections, out, args)}
    if args.before:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            root = archive_revision(args.before, Path(tmp))
            results["before"] = measure("before", root, files, args.sections, out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
