"""Load test of `maskrcnn serve` on 127.0.0.1, bounded in requests and time, against `maskrcnn predict` offline.

Starts the server (a subprocess) with the given options, waits for /health/ready, then runs N clients in
threads: they share a fixed list of requests (good images mixed with bad uploads: a text file, a truncated
PNG, an image over --max-upload-mb), some clients upload slowly (their body in pieces, paused), and a client
answered 503 waits its Retry-After and sends again, as a real client does. Meanwhile /health/live is polled
every 50 ms and the server's memory (RSS) sampled. Reports per run: statuses, served images/s, latency and
queue-wait percentiles, /health/live p99, RSS; and `maskrcnn predict`'s throughput on the same images and
backend (timed on K and 2K images, so start-up and model loading cancel out).

    python benchmarks/serve_load.py --weights model_final.pth --images data/test --clients 12 32 \\
        --server-options "--max-batch 4 --max-delay-ms 10" --backend pytorch --out runs/serve-load.json
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"
MAX_RETRIES = 30


@dataclass
class Upload:
    """One request of the load: the body, its declared type, and whether it is a good image."""

    kind: str  # good, text, truncated, oversize
    data: bytes
    content_type: str

    @property
    def good(self) -> bool:
        return self.kind == "good"


@dataclass
class Results:
    """What the clients saw (appended from several threads; list.append is atomic)."""

    statuses: Counter = field(default_factory=Counter)
    bad_ok: int = 0  # bad uploads answered 200: must stay 0
    transport_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # good images: first try to answer, retries included
    queue_ms: list[float] = field(default_factory=list)
    retries: int = 0
    gave_up: int = 0
    served: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_uploads(images: list[Path], count: int, bad_fraction: float, max_upload_mb: float, seed: int) -> list[Upload]:
    """Return `count` requests: good images (cycled) with about `bad_fraction` bad uploads mixed in."""
    rng = random.Random(seed)
    side = int((max_upload_mb * 2**20 / 3) ** 0.5) + 64  # random pixels do not compress: over the limit
    oversize = png(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))
    good = [p.read_bytes() for p in images]
    bad = [Upload("text", b"not an image\n" * 20, "text/plain"),
           Upload("truncated", good[0][: len(good[0]) // 3], "image/png"),
           Upload("oversize", oversize, "image/png")]
    uploads = []
    for i in range(count):
        uploads.append(rng.choice(bad) if rng.random() < bad_fraction else Upload("good", good[i % len(good)], "image/png"))
    return uploads


def slowly(data: bytes, pieces: int, pause: float):
    """Yield `data` in `pieces`, `pause` s apart (a slow client's upload, sent chunked)."""
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
        time.sleep(pause)
        yield data[start : start + step]


def client(url: str, work: "queue.SimpleQueue[Upload]", results: Results, stop_at: float, slow: bool) -> None:
    """Send uploads from `work` until it is empty or time is up; on 503 wait Retry-After and send again."""
    with httpx.Client(timeout=httpx.Timeout(120.0)) as http:
        while time.monotonic() < stop_at:
            try:
                upload = work.get_nowait()
            except queue.Empty:
                return
            first = time.monotonic()
            response = send(http, url, upload, results, stop_at, slow)
            if response is None or response.status_code != 200:
                continue
            if not upload.good:
                results.bad_ok += 1
                continue
            results.served += 1
            results.latencies.append(time.monotonic() - first)
            timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
            results.queue_ms.append(float(timing["queue"]))


def send(http: httpx.Client, url: str, upload: Upload, results: Results, stop_at: float,
         slow: bool) -> httpx.Response | None:
    """POST one upload, again after each 503's Retry-After; return the last answer (None: the connection failed)."""
    for attempt in range(MAX_RETRIES + 1):
        body = slowly(upload.data, 4, 0.15) if slow else upload.data
        try:
            response = http.post(f"{url}/predict", content=body, headers={"content-type": upload.content_type})
        except httpx.TransportError as e:
            results.transport_errors.append(f"{type(e).__name__}: {e}")
            return None
        results.statuses[response.status_code] += 1
        if response.status_code != 503:
            return response
        if attempt == MAX_RETRIES or time.monotonic() > stop_at:
            results.gave_up += 1
            return response
        results.retries += 1
        time.sleep(float(response.headers.get("retry-after", "1")))
    return None


def poll_live(url: str, stop: threading.Event, seconds: list[float]) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            start = time.perf_counter()
            http.get(f"{url}/health/live").raise_for_status()
            seconds.append(time.perf_counter() - start)
            stop.wait(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sample_memory(pid: int, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        samples.append(rss_mb(pid))
        stop.wait(0.2)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", args.weights, "--backend", args.backend,
               "--host", HOST, "--port", str(port), "--max-upload-mb", str(args.max_upload_mb), "--no-access-log",
               *shlex.split(args.server_options)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"http://{HOST}:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server was not ready within 600 s")
        time.sleep(0.2)


def run_load(args: argparse.Namespace, clients: int, uploads: list[Upload]) -> dict:
    """Start a server, run `clients` clients over `uploads`, stop it; return the measurements."""
    port = free_port()
    server = start_server(args, port)
    url = f"http://{HOST}:{port}"
    try:
        work: queue.SimpleQueue[Upload] = queue.SimpleQueue()
        for upload in uploads:
            work.put(upload)
        results, live, memory, stop = Results(), [], [], threading.Event()
        idle_mb = rss_mb(server.pid)
        helpers = [threading.Thread(target=poll_live, args=(url, stop, live)),
                   threading.Thread(target=sample_memory, args=(server.pid, stop, memory))]
        slow_clients = max(1, clients // 6)
        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(url, work, results, start + args.seconds, i < slow_clients))
                   for i in range(clients)]
        for t in helpers + threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        stop.set()
        for t in helpers:
            t.join()
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    dropped = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("maskrcnn_dropped_total"))
    batches = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(("maskrcnn_batch_size_count", "maskrcnn_batch_size_sum"))]
    return {"clients": clients, "slow_clients": slow_clients, "requests": len(uploads),
            "good": sum(u.good for u in uploads), "served": results.served, "wall_s": round(wall, 2),
            "images_per_s": round(results.served / wall, 3),
            "statuses": dict(sorted(results.statuses.items())), "retries": results.retries,
            "gave_up": results.gave_up, "bad_answered_200": results.bad_ok,
            "transport_errors": len(results.transport_errors), "transport_error_examples": results.transport_errors[:3],
            "latency_p50_s": round(percentile(results.latencies, 50), 3),
            "latency_p95_s": round(percentile(results.latencies, 95), 3),
            "queue_p50_ms": round(percentile(results.queue_ms, 50), 1),
            "queue_p95_ms": round(percentile(results.queue_ms, 95), 1),
            "live_p99_ms": round(percentile(live, 99) * 1000, 1), "live_max_ms": round(max(live) * 1000, 1),
            "live_probes": len(live), "rss_idle_mb": round(idle_mb), "rss_peak_mb": round(max(memory)),
            "dropped": dropped, "mean_batch": round(batches[1] / batches[0], 2) if len(batches) == 2 and batches[0] else None}


def offline_images_per_s(args: argparse.Namespace, images: list[Path], k: int) -> float:
    """Return `maskrcnn predict`'s images/s on these images and backend: k / (time for 2k − time for k)."""
    def timed(count: int) -> float:
        out = Path(args.work) / f"predict-{count}"
        command = [sys.executable, "-m", "maskrcnn.cli", "predict", *map(str, images[:count]), "--weights",
                   args.weights, "--backend", args.backend, "--out", str(out)]
        start = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.monotonic() - start

    timed(1)  # the first run may export the checkpoint for an ONNX backend: not timed
    return k / (timed(2 * k) - timed(k))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--backend", default="pytorch")
    p.add_argument("--images", required=True, help="folder of good images (PNG/JPEG)")
    p.add_argument("--clients", type=int, nargs="+", default=[12, 32])
    p.add_argument("--requests", type=int, default=120, help="requests per run (default: 120)")
    p.add_argument("--bad-fraction", type=float, default=0.4)
    p.add_argument("--seconds", type=float, default=240, help="a run's time limit (default: 240)")
    p.add_argument("--max-upload-mb", type=float, default=1.0)
    p.add_argument("--server-options", default="", help="more `maskrcnn serve` options, one string")
    p.add_argument("--offline-images", type=int, default=30, help="K for the offline timing (default: 30)")
    p.add_argument("--work", default="runs/serve-load")
    p.add_argument("--out", help="append the results as JSON lines here")
    args = p.parse_args()
    images = sorted(x for x in Path(args.images).iterdir() if x.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(images) < 2 * args.offline_images:
        raise SystemExit(f"need at least {2 * args.offline_images} images in {args.images}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    offline = offline_images_per_s(args, images, args.offline_images)
    for clients in args.clients:
        row = run_load(args, clients, make_uploads(images, args.requests, args.bad_fraction, args.max_upload_mb, clients))
        row.update(backend=args.backend, server_options=args.server_options, offline_images_per_s=round(offline, 3),
                   served_vs_offline=round(row["images_per_s"] / offline, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    offline_after = offline_images_per_s(args, images, args.offline_images)
    for row in rows:
        row["offline_after_images_per_s"] = round(offline_after, 3)
    print(json.dumps({"offline_before": round(offline, 3), "offline_after": round(offline_after, 3)}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
