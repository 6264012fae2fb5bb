"""Make label_studio_preannotation.png: Label Studio showing our model's predicted regions on an image.

Needs a running Label Studio (started as docs/deploy-labeling.md says, with ML_BLOCK_LOCAL_IP=false
SSRF_PROTECTION_ENABLED=false), a user's e-mail and password, `make label-studio` (.venv-label-studio) and a
Chromium (Debian's `chromium`). It logs in and makes a personal access token, serves the model with
`maskrcnn serve`, creates a polygon project labelled with the model's class names through
tests/label_studio_client.py (label-studio-sdk), connects the backend and lets Label Studio retrieve
predictions, then opens the task in headless Chromium and takes the screenshot:

    .venv/bin/python docs/images/label_studio_preannotation.py --url http://127.0.0.1:8080 --email E \\
        --password P --weights runs/mine/checkpoints/model_final.pth --image some.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from support import label_studio_token  # noqa: E402  (the tests' login, one copy)
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def label_config(names: list[str]) -> str:
    """Return a polygon labelling config with one label per class of the model."""
    labels = "".join(f'<Label value="{name}" background="{COLOURS[i % len(COLOURS)]}"/>'
                     for i, name in enumerate(names))
    return (f'<View><Image name="image" value="$image" zoom="true"/><PolygonLabels name="label" toName="image" '
            f'strokeWidth="2" opacity="0.3">{labels}</PolygonLabels></View>')


def serve(weights: str, token: str, threshold: float) -> tuple[subprocess.Popen, str]:
    """Start `maskrcnn serve` on a free port; return the process and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", weights,
                                "--port", str(port), "--label-studio-token", token, "--score-threshold", str(threshold)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            httpx.get(f"{url}/health", timeout=2)
            return process, url
        except httpx.TransportError:
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit("maskrcnn serve did not start")
            time.sleep(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--token", help="the user's personal access token (default: a new one)")
    p.add_argument("--weights", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--out", default=str(Path(__file__).with_name("label_studio_preannotation.png")))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    token = args.token or label_studio_token(args.url, args.email, args.password)
    process, backend = serve(args.weights, token, args.score_threshold)
    try:
        names = [c["name"] for c in httpx.get(f"{backend}/model", timeout=60).json()["classes"]]
        job = {"url": args.url, "token": token, "backend": f"{backend}/label-studio", "projects": [
            {"title": "maskrcnn pre-annotation", "label_config": label_config(names), "uploads": [args.image],
             "tasks": []}]}
        client = [str(ROOT / ".venv-label-studio/bin/python"), str(ROOT / "tests/label_studio_client.py")]
        done = subprocess.run(client, input=json.dumps(job), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"tests/label_studio_client.py failed:\n{done.stderr[-4000:]}")
    finally:
        process.terminate()
        process.wait(timeout=60)
    project = json.loads(done.stdout)[0]
    task = project["tasks"][0]
    print(f"project {project['id']}, task {task['id']}: {len(task['predictions'][0]['result'])} regions")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(headless=True, executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{args.url}/user/login/")
        page.fill("input[name=email]", args.email)
        page.fill("input[name=password]", args.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{args.url}/projects/{project['id']}/data?task={task['id']}")
        page.wait_for_selector("canvas", timeout=120_000)
        page.wait_for_timeout(5000)
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
