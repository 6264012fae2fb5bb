"""Pre-annotation in Label Studio end to end, with Label Studio itself as the client of our ML backend.

Label Studio (its own virtual environment, .venv-label-studio, made by `make label-studio`; `make test-slow`
makes it too) runs on 127.0.0.1 with a SQLite database in a temporary folder; tests/label_studio_client.py
creates projects through label-studio-sdk, uploads images, imports a task with a local path, connects
`maskrcnn serve`'s /label-studio backend and has Label Studio retrieve predictions, then reads them back.
Label Studio's first start (database migrations) takes minutes on 2 cores: `slow`. The brush RLE test beside
it is quick but needs .venv-label-studio (label-studio-sdk's decoder), which make test does not install.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from maskrcnn.api import load_model
from maskrcnn.serve import create_app
from maskrcnn.serve.labeling import LabelStudioAccess, brush_rle, class_names, instances, model_version, polygon
from maskrcnn.structures import detections_to_cpu
from support import Running, label_studio_token, masks_to_test, png_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = ROOT / ".venv-label-studio" / "bin"
EMAIL, PASSWORD = "maskrcnn@example.com", "not-a-secret-0"
POLYGON_CONFIG = """<View><Image name="img" value="$image"/>
  <PolygonLabels name="outline" toName="img">
    <Label value="Square"/><Label value="round" predicted_values="circle"/><Label value="tree"/>
  </PolygonLabels></View>"""
BRUSH_CONFIG = """<View><Image name="picture" value="$photo"/>
  <BrushLabels name="paint" toName="picture"><Label value="square"/><Label value="circle"/></BrushLabels></View>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio on a free port of 127.0.0.1, its data and SQLite database in a temporary folder."""
    if not (LS_BIN / "label-studio").exists():
        pytest.fail("no .venv-label-studio: run `make label-studio`")
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    log = open(data / "server.log", "w")
    # A backend on 127.0.0.1: Label Studio refuses local addresses for ML backends and their webhooks otherwise.
    # ML_TIMEOUT_PREDICT: Label Studio gives a backend 100 s per /predict by default, short on a loaded CPU.
    # No version check (it asks pypi.org at start) and no analytics: the test needs no network.
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "ML_BLOCK_LOCAL_IP": "false",
           "SSRF_PROTECTION_ENABLED": "false", "ML_TIMEOUT_PREDICT": "1500", "LATEST_VERSION_CHECK": "false",
           "COLLECT_ANALYTICS": "false"}
    process = subprocess.Popen(
        [str(LS_BIN / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data), "--database", str(data / "label_studio.sqlite3"),
         "--username", EMAIL, "--password", PASSWORD],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    deadline = started + 1200  # its first start migrates a new database: 6 minutes on 2 busy cores
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, (data / "server.log").read_text()[-3000:]
        assert time.time() < deadline, "Label Studio did not start"
        time.sleep(1)
    print(f"Label Studio started in {time.time() - started:.0f} s")
    try:
        yield url, label_studio_token(url, EMAIL, PASSWORD)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def expected(model, image: np.ndarray, threshold: float):
    """Return the model's detections on `image` with non-empty masks, as the backend sees them."""
    output = detections_to_cpu(model.predict(image, score_threshold=threshold)[0])
    return list(instances(output, class_names(model)))


def run_client(job: dict) -> list[dict]:
    """Run tests/label_studio_client.py in Label Studio's environment; return its JSON."""
    done = subprocess.run([str(LS_BIN / "python"), str(Path(__file__).with_name("label_studio_client.py"))],
                          input=json.dumps(job), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_label_studio_preannotates_with_our_backend(label_studio, checkpoint, tmp_path):
    url, token = label_studio
    model = load_model(None, weights=checkpoint)
    local = tmp_path / "local"
    local.mkdir()
    images = {}
    for name, size, seed in [("a.png", (96, 128), 0), ("b.png", (80, 60), 1), ("c.png", (64, 100), 2)]:
        (local / name).write_bytes(png_bytes(size, seed=seed))
        images[name] = np.asarray(Image.open(local / name).convert("RGB"))
    access = LabelStudioAccess(token=token, local_root=local)
    server = Running(create_app(model, score_threshold=0.5, weights=str(checkpoint), labeling=access))
    try:
        started = time.time()
        projects = run_client({"url": url, "token": token, "backend": f"{server.url}/label-studio", "projects": [
            {"title": "polygons", "label_config": POLYGON_CONFIG,
             "uploads": [str(local / "a.png"), str(local / "b.png")], "tasks": [{"image": str(local / "c.png")}]},
            {"title": "brush", "label_config": BRUSH_CONFIG, "uploads": [str(local / "b.png")],
             "tasks": [{"photo": str(local / "a.png")}]},
        ]})
        print(f"Label Studio client: {time.time() - started:.1f} s")
    finally:
        server.stop()

    version = model_version(str(checkpoint), model)
    labels = {"polygonlabels": {"square": "Square", "circle": "round"},
              "brushlabels": {"square": "square", "circle": "circle"}}
    regions_seen = 0
    for project, kind, uploads, imported in zip(projects, ["polygonlabels", "brushlabels"], [2, 1], [1, 1]):
        assert (project["backend_state"], project["backend_error"]) == ("CO", None), project  # connected
        refs = [next(iter(task["data"].values())) for task in project["tasks"]]
        assert sum(ref.startswith("/data/upload/") for ref in refs) == uploads
        assert sum(ref.startswith(str(local)) for ref in refs) == imported
        assert len(refs) == uploads + imported
        for task, ref in zip(project["tasks"], refs):
            name = next(n for n in images if ref.endswith(n))
            assert len(task["predictions"]) == 1, task
            prediction = task["predictions"][0]
            assert prediction["model_version"] == version
            image = images[name]
            height, width = image.shape[:2]
            want = [i for i in expected(model, image, 0.5) if i.name in labels[kind]]  # no "triangle" label
            assert len(prediction["result"]) == len(want) > 0
            print(f"project {project['id']} ({kind}), task {task['id']} {ref}: {len(want)} regions "
                  f"{sorted(r['value'][kind][0] for r in prediction['result'])}, score {prediction['score']:.3f}")
            assert prediction["score"] == pytest.approx(np.mean([i.score for i in want]), abs=1e-4)
            for region, instance in zip(prediction["result"], want):
                assert (region["original_width"], region["original_height"]) == (width, height)
                assert region["score"] == pytest.approx(instance.score, abs=1e-5)
                assert region["type"] == kind and region["value"][kind] == [labels[kind][instance.name]]
                if kind == "polygonlabels":
                    points = np.array(region["value"]["points"]) / 100 * [width, height]
                    assert np.allclose(points, polygon(instance.mask), atol=1e-3)
                else:
                    bits = np.frombuffer(base64.b64decode(region["decoded_mask"]), dtype=np.uint8)
                    decoded = np.unpackbits(bits)[: height * width].reshape(height, width).astype(bool)
                    assert np.array_equal(decoded, instance.mask)
                regions_seen += 1
    assert regions_seen > 0


def test_brush_rle_is_what_label_studio_decodes():
    """label-studio-sdk's brush decoder (a port of the editor's) reads our RLE back to the same RGBA pixels."""
    if not (LS_BIN / "python").exists():
        pytest.fail("no .venv-label-studio: run `make label-studio`")
    masks = masks_to_test()
    script = ("import json, sys, numpy as np\nfrom label_studio_sdk.converter.brush import decode_rle\n"
              "print(json.dumps([decode_rle(r).tolist() for r in json.load(sys.stdin)]))")
    done = subprocess.run([str(LS_BIN / "python"), "-c", script], input=json.dumps([brush_rle(m) for m in masks]),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for mask, decoded in zip(masks, json.loads(done.stdout)):
        assert np.array_equal(np.array(decoded, np.uint8).reshape(*mask.shape, 4),
                              np.repeat(mask[..., None] * 255, 4, axis=2))
