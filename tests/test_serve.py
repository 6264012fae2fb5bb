"""The HTTP service over real HTTP on 127.0.0.1: good image, non-image, oversize, the scheduler (a full queue,
batching, deadlines, clients that leave, slow uploads), health, metrics and access log, the page."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.api import load_model
from maskrcnn.serve import create_app
from support import Running, gated_server, metric, png_bytes, ready, wait_for


def post(url: str, data: bytes, timeout: float = 60, **headers):
    return httpx.post(f"{url}/predict", files={"file": ("a.png", data, "image/png")}, timeout=timeout, headers=headers)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(None, weights=checkpoint)


@pytest.fixture(scope="module")
def server(model):
    running = Running(create_app(model, max_upload=200_000, score_threshold=0.0))
    yield running
    running.stop()


def test_health_model_and_docs(server, model):
    ready(server.url)
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["ready"] and health["max_queue"] == 8 and health["queued"] == 0
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "ok"}
    info = httpx.get(f"{server.url}/model").json()
    assert [c["name"] for c in info["classes"]] == ["square", "circle", "triangle"]
    assert info["config"]["model"]["num_classes"] == 3
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/health", "/health/live", "/health/ready", "/metrics", "/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_predict_json_matches_the_model(server, model):
    data = png_bytes()
    response = httpx.post(f"{server.url}/predict", files={"file": ("a.png", data, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (128, 96)
    expected = model.predict(np.asarray(Image.open(io.BytesIO(data))), score_threshold=0.0)[0]
    assert len(body["detections"]) == len(expected["boxes"]) > 0
    for det, box, score, mask in zip(body["detections"], expected["boxes"], expected["scores"], expected["masks"]):
        assert det["box"] == pytest.approx(box.tolist(), abs=0.01) and det["score"] == pytest.approx(float(score), abs=1e-5)
        decoded = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
    # The raw image as the body works too, and the threshold filters.
    raw = httpx.post(f"{server.url}/predict?score_threshold=0.99", content=data, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and all(d["score"] >= 0.99 for d in raw.json()["detections"])


def test_overlay_png(server):
    response = httpx.post(f"{server.url}/predict?overlay=1", files={"file": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (128, 96)


def test_non_images_are_refused(server):
    text = httpx.post(f"{server.url}/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert text.status_code == 415 and "not an image type" in text.json()["detail"]
    garbage = httpx.post(f"{server.url}/predict", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")})
    assert garbage.status_code == 400 and "the upload" in garbage.json()["detail"]
    assert "maskrcnn-upload" not in garbage.json()["detail"]
    empty = httpx.post(f"{server.url}/predict", content=b"", headers={"content-type": "image/png"})
    assert empty.status_code == 400
    wrong_field = httpx.post(f"{server.url}/predict", files={"image": ("a.png", png_bytes(), "image/png")})
    assert wrong_field.status_code == 400 and "'file'" in wrong_field.json()["detail"]


def test_oversize_upload_is_413(server):
    big = png_bytes((600, 600), seed=1)  # random pixels do not compress: ~1 MB, over the 200 kB limit
    assert len(big) > 200_000
    multipart = httpx.post(f"{server.url}/predict", files={"file": ("big.png", big, "image/png")})
    assert multipart.status_code == 413
    raw = httpx.post(f"{server.url}/predict", content=big, headers={"content-type": "image/png"})
    assert raw.status_code == 413 and "limit" in raw.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]
    streamed = httpx.post(f"{server.url}/predict", content=chunks(), headers={"content-type": "image/png"})
    assert streamed.status_code == 413


def test_requests_beyond_the_queue_get_503(model):
    with gated_server(model, score_threshold=0.0, max_concurrent=1, max_queue=2) as (gated, running):
        data = png_bytes()
        gated.hold()
        with ThreadPoolExecutor(3) as pool:
            admitted = [pool.submit(post, running.url, data) for _ in range(3)]  # 1 running + 2 queued
            wait_for(lambda: httpx.get(f"{running.url}/health").json()["queued"] == 2, "2 queued requests")
            extra = [post(running.url, data) for _ in range(2)]
            assert [r.status_code for r in extra] == [503, 503]
            assert int(extra[0].headers["retry-after"]) >= 1 and "busy" in extra[0].json()["detail"]
            assert gated.batches == [1]  # one inference at a time; the others wait in the queue
            gated.release()
            assert [f.result().status_code for f in admitted] == [200, 200, 200]
        assert httpx.get(f"{running.url}/health").json()["queued"] == 0
        assert metric(running.url, 'maskrcnn_rejected_total{reason="queue_count"}') == 2
        assert metric(running.url, 'maskrcnn_http_requests_total{route="/predict",status="503"}') == 2


def test_queued_requests_run_as_one_batch_and_each_gets_its_own_answer(model):
    """While one image runs, four arrive; they go to the model as one batch of four, and each client gets the
    detections of its own image (different sizes, so a mix-up shows)."""
    sizes = [(96, 128), (80, 112), (120, 90), (64, 64), (100, 100)]
    images = [png_bytes(size, seed=i) for i, size in enumerate(sizes)]
    with gated_server(model, score_threshold=0.0, max_batch=4, max_queue=8) as (gated, running):
        gated.hold()
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(post, running.url, images[0])
            wait_for(lambda: gated.batches == [1], "the first image in the model")
            rest = [pool.submit(post, running.url, data) for data in images[1:]]
            wait_for(lambda: httpx.get(f"{running.url}/health").json()["queued"] == 4, "4 queued requests")
            gated.release()
            answers = [first.result()] + [f.result() for f in rest]
        assert gated.batches == [1, 4]
        for data, answer in zip(images, answers):
            assert answer.status_code == 200, answer.text
            expected = model.predict(np.asarray(Image.open(io.BytesIO(data))), score_threshold=0.0)[0]
            body = answer.json()
            assert (body["height"], body["width"]) == Image.open(io.BytesIO(data)).size[::-1]
            assert [d["score"] for d in body["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-4)
        assert metric(running.url, "maskrcnn_batch_size_count") == 2
        assert metric(running.url, "maskrcnn_batch_size_sum") == 5


def test_a_batch_waits_max_delay_for_more_images(model):
    with gated_server(model, score_threshold=0.0, max_batch=3, max_delay=1.5) as (gated, running):
        with ThreadPoolExecutor(3) as pool:
            answers = []
            for _ in range(3):  # 0.2 s apart: all within the first one's 1.5 s
                answers.append(pool.submit(post, running.url, png_bytes()))
                time.sleep(0.2)
            assert [a.result().status_code for a in answers] == [200] * 3
        assert gated.batches == [3]


def test_deadline_drops_queued_requests_and_answers_504(model):
    with gated_server(model, score_threshold=0.0, max_concurrent=1, timeout=1.0) as (gated, running):
        gated.hold()
        with ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(post, running.url, png_bytes())
            wait_for(lambda: gated.batches == [1], "the first image in the model")
            queued_one = pool.submit(post, running.url, png_bytes())
            start = time.monotonic()
            answers = [running_one.result(), queued_one.result()]
            assert time.monotonic() - start < 10  # at the 1 s deadline, not when the model is done (30 s)
        assert [a.status_code for a in answers] == [504, 504] and "deadline" in answers[1].json()["detail"]
        gated.release()
        assert gated.batches == [1]  # the queued one never ran
        assert metric(running.url, 'maskrcnn_dropped_total{reason="deadline"}') == 1
        assert metric(running.url, "maskrcnn_expired_while_running_total") == 1
        assert httpx.get(f"{running.url}/health").json()["queued"] == 0


def test_a_client_that_leaves_is_dropped_before_it_runs(model):
    with gated_server(model, score_threshold=0.0, max_concurrent=1) as (gated, running):
        gated.hold()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, running.url, png_bytes())
            wait_for(lambda: gated.batches == [1], "the first image in the model")
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                post(running.url, png_bytes(), timeout=1.0)
            wait_for(lambda: metric(running.url, 'maskrcnn_dropped_total{reason="disconnected"}') == 1,
                     "the queued request of the client that left to be dropped")
            assert httpx.get(f"{running.url}/health").json()["queued"] == 0
            gated.release()
            assert first.result().status_code == 200
        assert gated.batches == [1]


def slow_upload(url: str, data: bytes, pause: float, chunks: int = 4) -> tuple[int, bytes]:
    """POST `data` as the raw body over a plain socket, in `chunks` pieces `pause` s apart; return the status
    and the body of the answer (status 0 if the server closed the connection without one)."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        step = -(-len(data) // chunks)
        try:
            for start in range(0, len(data), step):
                time.sleep(pause)
                sock.sendall(data[start : start + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (408) and closed before the upload ended
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body


def test_slow_uploads_hold_no_queue_place_and_time_out(model):
    """Admission comes after the body: three clients trickling uploads do not keep a fourth out of a queue of
    one; an upload slower than --read-timeout gets 408."""
    with gated_server(model, score_threshold=0.0, max_concurrent=1, max_queue=1, read_timeout=3.0) as (gated, running):
        with ThreadPoolExecutor(4) as pool:  # uploads of 1.2, 1.8 and 2.4 s: they end one by one
            slow = [pool.submit(slow_upload, running.url, png_bytes(), pause) for pause in (0.3, 0.45, 0.6)]
            time.sleep(0.3)
            assert post(running.url, png_bytes()).status_code == 200
            assert [f.result()[0] for f in slow] == [200, 200, 200]
            status, body = slow_upload(running.url, png_bytes(), 1.0)  # 4 s, over the 3 s read timeout
        assert status == 408 and b"not complete in time" in body


def test_uploads_beyond_max_uploads_get_503(model):
    running = Running(create_app(model, max_uploads=1, read_timeout=20))
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(slow_upload, running.url, png_bytes(), 0.5)  # 2 s of upload
            wait_for(lambda: httpx.get(f"{running.url}/health").json()["reading"] == 1, "the slow upload")
            refused = post(running.url, png_bytes())
            assert refused.status_code == 503 and "uploads are being read" in refused.json()["detail"]
            assert slow.result()[0] == 200
        assert metric(running.url, 'maskrcnn_rejected_total{reason="uploads"}') == 1
    finally:
        running.stop()


def test_live_answers_while_an_answer_is_drawn(model):
    """An overlay of 100 image-sized masks takes a while to draw and encode; it happens in a worker thread, so
    /health/live keeps answering meanwhile (drawn on the event loop, a probe waited for the whole drawing)."""
    running = Running(create_app(model, score_threshold=0.0))
    data = png_bytes((1200, 1600), seed=3)
    try:
        ready(running.url)
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            answer = pool.submit(lambda: httpx.post(f"{running.url}/predict?overlay=1", content=data, timeout=120,
                                                    headers={"content-type": "image/png"}))
            probes = []
            while not answer.done():
                begin = time.monotonic()
                httpx.get(f"{running.url}/health/live", timeout=60).raise_for_status()
                probes.append(time.monotonic() - begin)
                time.sleep(0.02)
            took = time.monotonic() - start
        assert answer.result().status_code == 200
        print(f"request {took:.2f} s, {len(probes)} probes, slowest {max(probes) * 1000:.0f} ms, "
              f"median {np.median(probes) * 1000:.0f} ms")
        assert len(probes) >= 5 and max(probes) < max(0.1, took / 4)
    finally:
        running.stop()


def test_request_ids_access_log_and_metrics(server, caplog):
    ready(server.url)
    with caplog.at_level("INFO", logger="maskrcnn.serve.access"):
        mine = post(server.url, png_bytes(), **{"X-Request-ID": "client-id.42"})
        theirs = post(server.url, png_bytes(), **{"X-Request-ID": "not a plain token\t!"})
        refused = httpx.post(f"{server.url}/predict", files={"file": ("n.txt", b"hello", "text/plain")})
        ids = {"client-id.42", theirs.headers["x-request-id"], refused.headers["x-request-id"]}
        deadline = time.monotonic() + 10
        while True:  # the server logs a request once its response is sent, so the client may see it first
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "maskrcnn.serve.access"]
            by_id = {line["id"]: line for line in lines}
            if ids <= by_id.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert mine.headers["x-request-id"] == "client-id.42"
    assert re.fullmatch(r"queue;dur=[0-9.]+, inference;dur=[0-9.]+", mine.headers["server-timing"])
    assert len(theirs.headers["x-request-id"]) == 16 and theirs.headers["x-request-id"] != refused.headers["x-request-id"]
    line = by_id["client-id.42"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/predict", 200)
    assert line["bytes_in"] == len(png_bytes()) and line["batch"] == 1 and line["queue_ms"] >= 0 and line["ms"] > 0
    assert by_id[refused.headers["x-request-id"]]["status"] == 415
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("maskrcnn_http_requests_total", "maskrcnn_http_request_seconds_bucket", "maskrcnn_queue_wait_seconds",
                 "maskrcnn_inference_seconds", "maskrcnn_batch_size", "maskrcnn_queue_depth", "maskrcnn_ready 1.0"):
        assert name in text, name
    assert metric(server.url, 'maskrcnn_http_requests_total{route="/predict",status="415"}') >= 1


def test_serve_command_over_http(checkpoint, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", str(checkpoint),
                                "--port", str(port), "--max-upload-mb", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.time() < deadline, "serve did not start"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "<canvas" in page.text and "score" in page.text
        response = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("a.png", png_bytes(), "image/png")})
        assert response.status_code == 200 and "detections" in response.json()
    finally:
        process.terminate()
        process.wait(timeout=20)


def _chromium() -> str | None:
    """Return a system Chromium/Chrome executable (Debian's `chromium` package, ...), if any."""
    for name in (os.environ.get("MASKRCNN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _page_canvas(page) -> np.ndarray:
    """Return the page's canvas as an HxWx3 uint8 array."""
    size, data = page.evaluate("""() => {
        const c = document.getElementById('view');
        return [[c.height, c.width], Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""")
    return np.array(data, dtype=np.uint8).reshape(*size, 4)[..., :3]


def _expected_canvas(picture: np.ndarray, shown: list[dict], palette: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Return the picture with the `shown` detections' masks blended in half and half with their class
    colours, as the page draws them, and where box outlines and labels may cover that (not compared)."""
    expected = picture.astype(np.float64)
    for d in shown:
        mask = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)
        colour = np.array(palette[(d["label"] - 1) % len(palette)], dtype=np.float64)
        expected[mask] = np.round(0.5 * expected[mask] + 0.5 * colour)  # a Uint8ClampedArray rounds each time
    h, w = picture.shape[:2]
    covered = np.zeros((h, w), dtype=bool)
    for d in shown:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        outline = np.zeros((h, w), dtype=bool)
        outline[max(0, y1 - 3):y2 + 4, max(0, x1 - 3):x2 + 4] = True
        outline[y1 + 4:max(y1 + 4, y2 - 3), x1 + 4:max(x1 + 4, x2 - 3)] = False  # the 2-px stroke, antialiased
        baseline = max(12, y1 - 3)  # the "name 0.93" label: 14-px text from x1 + 2 at this baseline
        covered |= outline
        covered[max(0, baseline - 16):baseline + 6, max(0, x1 - 1):x1 + 140] = True
    return expected.astype(np.uint8), covered


@pytest.fixture()
def spread_server(model):
    """A server of the tiny model with its class scores spread over several of the page slider's 0.01 steps
    (the plain tiny model scores its ten detections of a noise image within 0.002 of each other)."""
    spread = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        spread.roi_heads.box_predictor.class_logits.weight.normal_(std=0.3)
        # The untrained mask logits sit at ~0, a coin flip at the 0.5 threshold: make every mask fill its box
        # so the page has mask pixels to draw whatever the backbone's normalisation does to the features.
        spread.roi_heads.mask_head.predictor.bias.fill_(2.0)
    running = Running(create_app(spread, score_threshold=0.0))
    yield running
    running.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2
def test_web_page_in_a_browser(spread_server, artifacts):
    """Playwright drives headless Chromium: upload an image, see its masks drawn, filter them by score."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    data = png_bytes(size=(240, 320))
    picture = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    image = artifacts / "upload.png"
    image.write_bytes(data)
    # The page shows what the service answers; the same model answers the same here.
    detections = httpx.post(f"{spread_server.url}/predict?score_threshold=0",
                            files={"file": ("a.png", data, "image/png")}).json()["detections"]
    # A slider position (its steps are 0.01) that keeps about half of the detections, and at least one.
    scores = [d["score"] for d in detections]
    steps = [t / 100 for t in range(101) if 0 < sum(s >= t / 100 for s in scores) < len(scores)]
    assert steps, f"the model's scores {sorted(scores)} fall within one 0.01 step of the slider"
    threshold = min(steps, key=lambda t: abs(sum(s >= t for s in scores) - len(scores) / 2))
    with sync_api.sync_playwright() as p:
        executable = _chromium()
        try:
            browser = p.chromium.launch(headless=True, executable_path=executable)
        except sync_api.Error as e:
            pytest.skip(f"Chromium does not start for Playwright ({executable or 'no chromium on PATH'}; install "
                        f"Debian's chromium or set MASKRCNN_CHROMIUM): {str(e).splitlines()[0]}")
        try:
            page = browser.new_page()
            page.goto(spread_server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('square')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('view').dataset.shown !== undefined", timeout=30_000)
            palette = page.evaluate("palette")

            def assert_drawn(minimum: float) -> int:
                """Check the canvas holds the masks of the detections scoring >= minimum; return how many."""
                shown = [d for d in detections if d["score"] >= minimum]
                assert int(page.get_attribute("#view", "data-shown")) == len(shown)
                assert page.locator("#detections tr").count() == len(shown) + 1  # + the header row
                assert page.text_content("#status").startswith(f"{len(shown)} of {len(detections)} detections shown")
                expected, covered = _expected_canvas(picture, shown, palette)
                canvas = _page_canvas(page)
                compared = ~covered
                # Within 1 of the expected value: a browser's colour handling may round differently.
                differ = int((np.abs(canvas.astype(int) - expected)[compared] > 1).any(-1).sum())
                assert differ == 0, f"{differ} pixels differ from the picture with the masks blended in"
                blended = (expected != picture).any(-1) & compared
                print(f"score >= {minimum}: {len(shown)} shown, {compared.mean():.0%} of the pixels compared, "
                      f"{blended.sum()} of them in masks")
                assert blended.sum() >= 200, "too few mask pixels left to compare"
                return len(shown)

            page.focus("#score")
            page.keyboard.press("Home")  # the slider to 0: every detection
            assert assert_drawn(0.0) == len(detections) > 1
            page.screenshot(path=str(artifacts / "all-detections.png"), full_page=True)
            page.eval_on_selector("#score", "(slider, value) => { slider.value = value; "
                                  "slider.dispatchEvent(new Event('input')); }", str(threshold))
            assert 0 < assert_drawn(threshold) < len(detections)
            page.screenshot(path=str(artifacts / f"score-{threshold:.2f}.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (it checks the page's RLE decoder)")
def test_page_rle_decoder_matches_pycocotools():
    import json

    from maskrcnn.rle import encode_masks
    from maskrcnn.serve.page import INDEX_HTML

    script = INDEX_HTML.split("<script>")[1].split("</script>")[0]
    decoder = script[script.index("function decodeRLE"):script.index("function draw")]
    masks = np.zeros((3, 37, 53), dtype=bool)
    masks[0, 5:20, 10:40] = True
    masks[1] = np.random.default_rng(0).random((37, 53)) > 0.5
    masks[2] = True
    code = decoder + f"console.log(JSON.stringify({json.dumps(encode_masks(masks))}.map(r => Array.from(decodeRLE(r)))));"
    decoded = json.loads(subprocess.run(["node", "-e", code], capture_output=True, text=True, check=True).stdout)
    assert np.array_equal(np.array(decoded, dtype=bool).reshape(masks.shape), masks)


class HandMadeModel:
    """A stand-in for the model whose every answer is the same hand-made detections on a 40 x 50 image: a
    disc, an L (not symmetric: a row-major or flipped RLE decodes to another shape), a bar reaching the
    bottom-right corner (the RLE's last pixel), and one scoring under 0.5. No model code makes them."""

    def __init__(self):
        from maskrcnn.config import load_config

        self.cfg = load_config("shapes", ["model.category_ids=[11,12,13]"])
        self.class_names = ["square", "circle", "triangle"]
        yy, xx = np.mgrid[:40, :50]
        self.masks = np.stack([
            (yy - 12) ** 2 + (xx - 15) ** 2 <= 36,  # disc: rows 6..18, columns 9..21
            ((yy >= 20) & (yy < 35) & (xx >= 5) & (xx < 9)) | ((yy >= 31) & (yy < 35) & (xx >= 5) & (xx < 20)),
            (yy >= 37) & (xx >= 30),  # reaches the bottom-right corner
            (yy >= 2) & (yy < 5) & (xx >= 40) & (xx < 45),
        ])
        self.boxes = [[8.25, 5.5, 22.0, 19.75], [4.0, 19.0, 21.0, 36.0], [29.5, 36.5, 50.0, 40.0], [39.0, 1.0, 46.0, 6.0]]
        self.scores, self.labels = [0.9, 0.8, 0.6, 0.3], [2, 1, 3, 1]

    def predict(self, images, batch_size=1, score_threshold=None):
        return [{"boxes": torch.tensor(self.boxes), "scores": torch.tensor(self.scores),
                 "labels": torch.tensor(self.labels), "masks": torch.from_numpy(self.masks),
                 "names": [self.class_names[label - 1] for label in self.labels]} for _ in images]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
def test_served_detections_are_the_models_hand_made_ones():
    """The answer, read back with pycocotools alone: each mask decodes to the hand-made mask, with the
    pixel count and extent counted here by numpy; boxes, scores, category ids as made; the threshold applies."""
    hand = HandMadeModel()
    running = Running(create_app(hand, score_threshold=0.5))
    try:
        ready(running.url)
        data = png_bytes(size=(40, 50), seed=3)
        response = httpx.post(f"{running.url}/predict", files={"file": ("a.png", data, "image/png")})
        everything = httpx.post(f"{running.url}/predict?score_threshold=0", content=data,
                                headers={"content-type": "image/png"})
    finally:
        running.stop()
    assert response.status_code == everything.status_code == 200, response.text
    body = response.json()
    assert (body["height"], body["width"]) == (40, 50)
    served = body["detections"]
    assert [d["score"] for d in served] == [0.9, 0.8, 0.6]  # 0.3 is under the server's 0.5
    assert [d["label"] for d in served] == [2, 1, 3] and [d["category_id"] for d in served] == [12, 11, 13]
    assert [d["name"] for d in served] == ["circle", "square", "triangle"]
    assert [d["box"] for d in served] == hand.boxes[:3]
    for d, mask in zip(served, hand.masks):
        rle = {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}
        assert d["mask"]["size"] == [40, 50]
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask), d["label"]
        ys, xs = np.nonzero(mask)
        assert int(mask_utils.area(rle)) == int(mask.sum())
        assert mask_utils.toBbox(rle).tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert [d["score"] for d in everything.json()["detections"]] == [0.9, 0.8, 0.6, 0.3]
