"""Print the Markdown table of `benchmarks/serve_load.py`'s JSON lines (its --out file).

    python benchmarks/serve_load_table.py runs/serve-load.jsonl
"""

from __future__ import annotations

import json
import sys


def row(r: dict) -> str:
    """One table row; served images/s is compared with the faster of the two offline timings."""
    offline = max(r["offline_images_per_s"], r.get("offline_after_images_per_s", 0.0))
    statuses = " ".join(f"{code}×{count}" for code, count in r["statuses"].items())
    server = r["server_options"] or "(defaults)"
    five_xx = sum(count for code, count in r["statuses"].items() if code.startswith("5") and code != "503")
    return (f"| {r['backend']} | `{server}` | {r['clients']} ({r['slow_clients']} slow) | {statuses} | "
            f"{five_xx} | {r['transport_errors']} | {r['bad_answered_200']} | {r['images_per_s']:.2f} | "
            f"{r['offline_images_per_s']:.2f} / {r.get('offline_after_images_per_s', float('nan')):.2f} | "
            f"{r['images_per_s'] / offline:.2f} | {r['latency_p50_s']:.1f} / {r['latency_p95_s']:.1f} | "
            f"{r['queue_p50_ms'] / 1000:.1f} / {r['queue_p95_ms'] / 1000:.1f} | {r['mean_batch']} | "
            f"{r['live_p99_ms']:.0f} | {r['rss_idle_mb']} → {r['rss_peak_mb']} |")


def main() -> None:
    print("| backend | server options | clients | statuses (incl. retries) | 5xx other than 503 | dropped "
          "connections | bad upload → 200 | served img/s | offline img/s before / after | served ÷ faster offline | "
          "latency p50 / p95 s | queue wait p50 / p95 s | mean batch | /health/live p99 ms | RSS idle → peak MB |")
    print("|" + "---|" * 15)
    with open(sys.argv[1]) as f:
        for line in f:
            if line.strip():
                print(row(json.loads(line)))


if __name__ == "__main__":
    main()
