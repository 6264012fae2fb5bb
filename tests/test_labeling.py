"""Pre-annotation for the labelling tools (maskrcnn/serve/labeling.py), checked with the tools' own code:
CVAT's SDK (its models, mask decoder and encoder, its auto-annotation driver's validation, cvat-cli's function
loader) and nuclio's SDK for the function handler; the routes share /predict's scheduler. Label Studio's
brush decoder and Label Studio itself as the client: tests/test_label_studio.py (slow, .venv-label-studio)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from maskrcnn.api import load_model
from maskrcnn.serve import create_app
from maskrcnn.serve.labeling import (LabelingError, LabelStudioAccess, class_names, cvat_mask, fetch_task_image,
                                     instances, parse_label_config, polygon)
from maskrcnn.structures import detections_to_cpu
from support import Running, gated_server, masks_to_test, metric, png_bytes, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(None, weights=checkpoint)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("local-files")
    (root / "a.png").write_bytes(png_bytes())
    running = Running(create_app(model, score_threshold=0.5, labeling=LabelStudioAccess(local_root=root)))
    running.root = root
    yield running
    running.stop()


def expected(model, data: bytes, threshold: float = 0.5):
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return list(instances(detections_to_cpu(model.predict(image, score_threshold=threshold)[0]), class_names(model)))


# ---- CVAT -----------------------------------------------------------------------------------------


def cvat_server_points(mask_field: list[int]) -> list[int]:
    """What CVAT's server stores for a detector's "mask": run lengths of the flat 0/1 values (starting
    with a run of zeros), then the box; the CVAT SDK's encode_mask writes this layout."""
    values, box = np.array(mask_field[:-4]), mask_field[-4:]
    edges = np.flatnonzero(np.diff(values)) + 1
    runs = np.diff(np.concatenate([[0], edges, [len(values)]])).tolist()
    return ([0] if values[0] else []) + runs + box


def test_cvat_mask_is_what_the_cvat_sdk_encodes_and_decodes():
    from cvat_sdk.masks import decode_mask, encode_mask

    for mask in masks_to_test():
        if not mask.any():
            with pytest.raises(ValueError, match="empty"):
                cvat_mask(mask)
            continue
        field = cvat_mask(mask)
        assert cvat_server_points(field) == encode_mask(mask)
        decoded = decode_mask(cvat_server_points(field), image_width=mask.shape[1], image_height=mask.shape[0])
        assert np.array_equal(decoded, mask)


def test_cvat_detect_route_answers_as_a_nuclio_detector(server, model):
    from cvat_sdk import models
    from cvat_sdk.masks import decode_mask

    data = png_bytes()
    reply = httpx.post(f"{server.url}/cvat/detect", json={"image": base64.b64encode(data).decode(), "threshold": 0.5},
                       timeout=60)
    assert reply.status_code == 200, reply.text
    found, want = reply.json(), expected(model, data)
    assert len(found) == len(want) > 0
    for entry, instance in zip(found, want):
        assert entry["label"] == instance.name and entry["type"] == "mask"
        assert entry["confidence"] == pytest.approx(instance.score, abs=1e-5)
        points = cvat_server_points(entry["mask"])
        shape = models.LabeledShapeRequest(type="mask", points=points, label_id=1, frame=0)  # the SDK's model takes it
        assert np.array_equal(decode_mask(shape.points, image_width=128, image_height=96), instance.mask)
        assert np.allclose(np.reshape(entry["points"], (-1, 2)), polygon(instance.mask))
        models.LabeledShapeRequest(type="polygon", points=entry["points"], label_id=1, frame=0)
    polygons = httpx.post(f"{server.url}/cvat/detect?shape=polygon", json={"image": base64.b64encode(data).decode()},
                          timeout=60).json()
    assert [p["type"] for p in polygons] == ["polygon"] * len(want) and "mask" not in polygons[0]
    strict = httpx.post(f"{server.url}/cvat/detect", json={"image": base64.b64encode(data).decode(), "threshold": 1.0},
                        timeout=60).json()
    assert len(strict) < len(want)


@pytest.mark.parametrize("body, message", [
    ({"threshold": 0.5}, "base64 image"),
    ({"image": "!!not base64!!"}, "not valid base64"),
    ({"image": base64.b64encode(b"hello").decode()}, "the upload"),
    ({"image": base64.b64encode(png_bytes()).decode(), "threshold": 7}, "from 0 to 1"),
])
def test_cvat_detect_refuses_bad_requests_in_one_line(server, body, message):
    reply = httpx.post(f"{server.url}/cvat/detect", json=body, timeout=60)
    assert reply.status_code == 400 and message in reply.json()["detail"] and "\n" not in reply.json()["detail"]


def test_cvat_sdk_function_module_passes_the_sdks_validation(checkpoint):
    """cvat-cli's own loader builds the function from our module; the auto-annotation driver's mapper (what
    `annotate_task` runs on every frame) accepts its masks and polygons against a task's labels."""
    import cvat_sdk.auto_annotation as cvataa
    from cvat_cli._internal.common import FunctionLoader
    from cvat_sdk import models
    from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
    from cvat_sdk.masks import decode_mask

    function = FunctionLoader("maskrcnn.serve.cvat_function", None, {"weights": str(checkpoint)}).load()
    assert isinstance(function.spec, cvataa.DetectionFunctionSpec)
    data = png_bytes()
    want = expected(function.model, data)
    task_labels = [models.Label(id=10 + i, name=name, type="any", attributes=[], sublabels=[])  # as a task lists them
                   for i, name in enumerate(function.names)]
    for to_poly in (False, True):
        context = _DetectionFunctionContextImpl(frame_name="a.png", conf_threshold=0.5, conv_mask_to_poly=to_poly)
        shapes = function.detect(context, Image.open(io.BytesIO(data)))
        mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels,
                                   allow_unmatched_labels=False, conv_mask_to_poly=to_poly)
        _, accepted = mapper.validate_and_remap(shapes, 3)
        assert len(accepted) == len(want) > 0
        for shape, instance in zip(accepted, want):
            assert shape.frame == 3 and shape.label_id == 10 + function.names.index(instance.name)
            if to_poly:
                assert shape.type.value == "polygon"
                assert np.allclose(np.reshape(shape.points, (-1, 2)), polygon(instance.mask))
            else:
                assert shape.type.value == "mask"
                assert np.array_equal(decode_mask(shape.points, image_width=128, image_height=96), instance.mask)
    with pytest.raises(ValueError, match="weights"):
        FunctionLoader("maskrcnn.serve.cvat_function", None, {}).load()


def test_nuclio_handler_forwards_to_the_server(server):
    """deploy/cvat/main.py with nuclio's own Event and Context; function.yaml is what the server writes."""
    import nuclio_sdk

    spec = importlib.util.spec_from_file_location("cvat_nuclio_main", ROOT / "deploy" / "cvat" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    context = nuclio_sdk.Context(logger=logging.getLogger("nuclio"))
    context.user_data = type("UserData", (), {})()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASKRCNN_URL", server.url)
        main.init_context(context)
    body = json.dumps({"image": base64.b64encode(png_bytes()).decode(), "threshold": 0.5}).encode()
    response = main.handler(context, nuclio_sdk.Event(body=body, content_type="application/json"))
    direct = httpx.post(f"{server.url}/cvat/detect", content=body, timeout=60)
    assert response.status_code == 200 and json.loads(response.body) == direct.json()
    bad = main.handler(context, nuclio_sdk.Event(body=b'{"threshold": 0.5}'))
    assert bad.status_code == 400

    written = yaml.safe_load(httpx.get(f"{server.url}/cvat/function.yaml").text)
    checked_in = yaml.safe_load((ROOT / "deploy" / "cvat" / "function.yaml").read_text())
    assert written["spec"]["env"] == [{"name": "MASKRCNN_URL", "value": server.url}]
    written["spec"]["env"] = checked_in["spec"]["env"]
    assert written == checked_in
    assert [label["name"] for label in json.loads(written["metadata"]["annotations"]["spec"])] == \
           ["square", "circle", "triangle"]


# ---- Label Studio ---------------------------------------------------------------------------------


def test_label_config_is_matched_to_the_classes_by_name():
    names = ["square", "circle", "triangle"]
    target = parse_label_config("""<View><Image name="i" value="$img"/><BrushLabels name="b" toName="i">
        <Label value="SQUARE"/><Label value="disc" predicted_values="circle, ball"/><Label value="sky"/>
        </BrushLabels></View>""", names)
    assert (target.kind, target.from_name, target.to_name, target.data_key) == ("brushlabels", "b", "i", "img")
    assert target.labels == {"square": "SQUARE", "circle": "disc"}
    for config, message in [
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"/></View>', "no <PolygonLabels>"),
        ('<View><PolygonLabels name="p" toName="x"><Label value="square"/></PolygonLabels></View>', 'toName="x"'),
        ('<View><Image name="i" value="$img"/><PolygonLabels name="p" toName="i"><Label value="sky"/>'
         '</PolygonLabels></View>', "none of the project's labels (sky) is a class of the model"),
    ]:
        with pytest.raises(LabelingError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_label_config(config, names)


def test_task_images_local_paths_stay_under_the_root(tmp_path):
    (tmp_path / "x.png").write_bytes(b"png")
    access = LabelStudioAccess(local_root=tmp_path)
    assert fetch_task_image(str(tmp_path / "x.png"), access, None, 100) == b"png"
    assert fetch_task_image("/data/local-files/?d=x.png", access, None, 100) == b"png"
    for ref, message in [("/etc/passwd", "outside --local-files-root"),
                         ("/data/local-files/?d=../../etc/passwd", "outside --local-files-root"),
                         (str(tmp_path / "missing.png"), "no file"),
                         ("s3://bucket/x.png", "cloud storage"),
                         ("/data/upload/1/x.png", "Label Studio's address is unknown")]:
        with pytest.raises(LabelingError, match=message):
            fetch_task_image(ref, access, None, 100)
    with pytest.raises(LabelingError, match="--local-files-root DIR"):
        fetch_task_image(str(tmp_path / "x.png"), LabelStudioAccess(), None, 100)


def test_label_studio_routes_report_bad_input(server):
    config = ('<View><Image name="i" value="$image"/><PolygonLabels name="p" toName="i"><Label value="square"/>'
              '</PolygonLabels></View>')
    assert httpx.get(f"{server.url}/label-studio/health").json()["status"] == "UP"
    assert httpx.post(f"{server.url}/label-studio/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200
    setup = httpx.post(f"{server.url}/label-studio/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200 and setup.json()["model_version"].startswith("maskrcnn-")
    bad = httpx.post(f"{server.url}/label-studio/setup", json={"project": "1.1", "schema": "<View/>"})
    assert bad.status_code == 400 and "no <PolygonLabels>" in bad.json()["detail"]
    missing = httpx.post(f"{server.url}/label-studio/predict", timeout=60,
                         json={"tasks": [{"id": 7, "data": {"image": "/nowhere/a.png"}}], "label_config": config})
    assert missing.status_code == 400 and missing.json()["detail"].startswith("task 7: ")
    assert "outside --local-files-root" in missing.json()["detail"]
    task = {"id": 7, "data": {"image": str(server.root / "a.png")}}
    local = httpx.post(f"{server.url}/label-studio/predict", timeout=60, json={"tasks": [task], "label_config": config})
    assert local.status_code == 200 and local.json()["results"][0]["result"]


def test_labeling_routes_share_the_predict_scheduler(model, tmp_path):
    """CVAT's and Label Studio's images wait in /predict's queue and run in its batches: while one /predict image
    runs, a CVAT and a Label Studio image queue and then go to the model as one batch of two; a third finds the
    queue full and gets /predict's 503 with Retry-After."""
    (tmp_path / "a.png").write_bytes(png_bytes(seed=3))
    config = ('<View><Image name="i" value="$image"/><PolygonLabels name="p" toName="i"><Label value="square"/>'
              '<Label value="circle"/><Label value="triangle"/></PolygonLabels></View>')
    cvat_body = {"image": base64.b64encode(png_bytes()).decode(), "threshold": 0.5}
    ls_body = {"tasks": [{"id": 1, "data": {"image": str(tmp_path / "a.png")}}], "label_config": config}
    with gated_server(model, score_threshold=0.5, max_batch=2, max_queue=2,
                      labeling=LabelStudioAccess(local_root=tmp_path)) as (gated, running):
        gated.hold()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(httpx.post, f"{running.url}/predict", timeout=60,
                                files={"file": ("a.png", png_bytes(seed=5), "image/png")})
            wait_for(lambda: gated.batches == [1], "the /predict image in the model")
            cvat = pool.submit(httpx.post, f"{running.url}/cvat/detect", json=cvat_body, timeout=60)
            label_studio = pool.submit(httpx.post, f"{running.url}/label-studio/predict", json=ls_body, timeout=60)
            wait_for(lambda: httpx.get(f"{running.url}/health").json()["queued"] == 2, "2 queued images")
            full = httpx.post(f"{running.url}/cvat/detect", json=cvat_body, timeout=60)
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1, full.text
            gated.release()
            answers = [first.result(), cvat.result(), label_studio.result()]
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert gated.batches == [1, 2]
        want = expected(model, png_bytes())
        assert [(d["label"], round(d["confidence"], 4)) for d in answers[1].json()] == \
               [(i.name, round(i.score, 4)) for i in want]
        regions = answers[2].json()["results"][0]["result"]
        assert len(want) > 0 and len(regions) > 0
        assert [r["score"] for r in regions] == pytest.approx([i.score for i in expected(model, png_bytes(seed=3))],
                                                               abs=1e-5)
        assert metric(running.url, "maskrcnn_batch_size_sum") == 3
        assert metric(running.url, 'maskrcnn_rejected_total{reason="queue_count"}') == 1
        assert httpx.get(f"{running.url}/health").json()["served"] == 3
