"""The model zoo: every entry builds and fits its publisher's layout; fetching against a real local HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from maskrcnn import zoo
from maskrcnn.api import config_from_checkpoint
from maskrcnn.cli import main
from maskrcnn.detectron2 import convert_detectron2_state_dict
from maskrcnn.detectron2.config import _flatten, read_chain
from maskrcnn.modeling import build_model, import_state_dict
from maskrcnn.zoo import download
from support import our_name_to_detectron2

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny_zoo_model"
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: not a weight (load_weights ignores it too)


# ---- the built-in table -------------------------------------------------------------------------


def _without_counters(state: dict) -> dict:
    return {k: v.shape for k, v in state.items() if not k.endswith(COUNTER)}


@pytest.mark.parametrize("name", [n for n, e in zoo.entries().items() if e.publisher == "torchvision"])
def test_torchvision_entry_builds_and_takes_torchvision_layout(name):
    import torchvision.models.detection as detection

    entry = zoo.get_entry(name)
    cfg = zoo.entry_config(entry)
    with torch.device("meta"):  # shapes and names only: nothing allocated, nothing initialised
        ours = build_model(cfg)
        theirs = getattr(detection, name)(weights=None, weights_backbone=None)  # the builder the file is for
    imported = _without_counters(import_state_dict(ours, theirs.state_dict()))
    assert imported == _without_counters(ours.state_dict())
    assert len(cfg.model.class_names) == cfg.model.num_classes


@pytest.mark.parametrize("name", [n for n, e in zoo.entries().items() if e.publisher == "torchvision"])
def test_torchvision_entry_is_the_installed_torchvisions_default(name):
    from torchvision.models import get_model_weights

    entry = zoo.get_entry(name)
    weights = get_model_weights(name).DEFAULT
    assert entry.url == weights.url
    assert entry.size_mb == weights.meta["_file_size"]
    reported = weights.meta["_metrics"]["COCO-val2017"]
    ours = {"box_map": "box", "mask_map": "mask", "kp_map": "keypoints"}
    assert entry.metrics == {ours[k]: v for k, v in reported.items()}


@pytest.mark.parametrize("name", [n for n, e in zoo.entries().items() if e.publisher == "Detectron2"])
def test_detectron2_entry_builds_and_takes_detectron2_layout(name):
    entry = zoo.get_entry(name)
    cfg = zoo.entry_config(entry)
    yaml_path = Path(zoo.table.PRESET_DIR) / entry.config
    d2 = _flatten(read_chain(yaml_path))
    # The number of classes the Detectron2 file was trained with, read from its YAML (80 = its default).
    k = d2.get("MODEL.ROI_HEADS.NUM_CLASSES", 80)
    assert cfg.model.num_classes == len(cfg.model.class_names) == len(cfg.model.category_ids) == k
    with torch.device("meta"):
        ours = build_model(cfg)
    own = ours.state_dict()
    c4 = cfg.model.backbone.kind == "c4"
    # The file's layout, named and shaped as Detectron2 stores it: K (not K+1) box-delta and mask rows.
    theirs = {}
    for key, value in own.items():
        if key.endswith(COUNTER):
            continue
        shape = list(value.shape)
        if key.startswith("roi_heads.box_predictor.box_deltas."):
            shape[0] = 4 * k
        if key.startswith("roi_heads.mask_head.predictor."):
            shape[0] = k
        theirs[our_name_to_detectron2(key, c4)] = torch.empty(shape, device="meta")
    converted = convert_detectron2_state_dict(theirs, cfg.model)
    assert _without_counters(converted) == _without_counters(own)
    # The box layers Detectron2 builds for this YAML, read from the YAML alone (not from our model).
    box = {key: value.shape[0] for key, value in theirs.items() if key.startswith("roi_heads.box_")}
    assert box == _detectron2_box_layers(d2, k)
    # Detectron2's URLs are detectron2/<config path without .yaml>/<model id>/model_final_<md5>.pkl.
    config_path = entry.config.removeprefix("detectron2/").removesuffix(".yaml")
    assert entry.url.startswith(f"https://dl.fbaipublicfiles.com/detectron2/{config_path}/")
    assert entry.file_name == f"model_final_{entry.hash_prefix}.pkl"  # Detectron2 names files by MD5 prefix


def _detectron2_box_layers(d2: dict, k: int) -> dict[str, int]:
    """Return Detectron2's box-head and box-predictor parameter names for a YAML, with their output rows.

    StandardROIHeads: one head (NUM_FC fcs; none for C4, whose box head is res5) and one predictor with
    K+1 logits and 4K box deltas. CascadeROIHeads: one head and one class-agnostic predictor (4 deltas)
    per IoU of ROI_BOX_CASCADE_HEAD.IOUS, numbered from 0 (Detectron2's default IoUs: 0.5, 0.6, 0.7).
    """
    # Defaults as in Detectron2's config/defaults.py.
    cascade = d2.get("MODEL.ROI_HEADS.NAME", "Res5ROIHeads") == "CascadeROIHeads"
    ious = d2.get("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6, 0.7))
    stages = [f"{s}." for s in range(len(ious))] if cascade else [""]
    fc_dim = d2.get("MODEL.ROI_BOX_HEAD.FC_DIM", 1024)
    agnostic = d2.get("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False)  # a cascade YAML must set it
    layers = {}
    for stage in stages:
        for i in range(1, d2.get("MODEL.ROI_BOX_HEAD.NUM_FC", 0) + 1):
            for part in ("weight", "bias"):
                layers[f"roi_heads.box_head.{stage}fc{i}.{part}"] = fc_dim
        for part in ("weight", "bias"):
            layers[f"roi_heads.box_predictor.{stage}cls_score.{part}"] = k + 1
            layers[f"roi_heads.box_predictor.{stage}bbox_pred.{part}"] = 4 if agnostic else 4 * k
    return layers


def test_torchvision_hash_is_the_prefix_in_the_file_name():
    for entry in zoo.entries().values():
        if entry.publisher == "torchvision":
            assert entry.hash == f"sha256:{entry.file_name.rsplit('-', 1)[1].split('.')[0]}"


def test_default_model_is_the_best_torchvision_mask_model():
    torchvision = [e for e in zoo.entries().values() if e.publisher == "torchvision" and "mask" in e.metrics]
    assert zoo.DEFAULT_MODEL == max(torchvision, key=lambda e: e.metrics["mask"]).name


def test_unknown_name_is_one_line_with_the_nearest(capsys):
    assert main(["predict", str(ROOT / "docs" / "demo_overlay.jpg"), "--weights", "maskrcnn_resnet50_fpn_v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'maskrcnn_resnet50_fpn_v2'" in err


# ---- a test entry served by a real HTTP server on 127.0.0.1 -------------------------------------


class _Server(ThreadingHTTPServer):
    """Serves `files` by path; counts requests; can cut responses short or hold one mid-body."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.cut = 0  # this many next responses stop after half the body (then the connection closes)
        self.hold: threading.Event | None = None  # the first response waits here after half the body

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-body (the point of some tests) is not an error here


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        if self.server.cut > 0:
            self.server.cut -= 1
            self.close_connection = True
            return
        hold, self.server.hold = self.server.hold, None
        if hold is not None:
            hold.wait(60)
        self.wfile.write(body[half:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def tiny_zoo(checkpoint, server, tmp_path, monkeypatch):
    """A zoo entry (via $MASKRCNN_ZOO) for the tiny test checkpoint, served under its path on the mirror."""
    data = Path(checkpoint).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cfg = config_from_checkpoint(checkpoint)
    (tmp_path / "tiny.yaml").write_text(cfg.to_yaml())
    m = cfg.model
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"model": {
        "num_classes": m.num_classes, "class_names": list(m.class_names), "category_ids": list(m.category_ids)}}))
    entry = {"name": TINY, "publisher": "test", "architecture": "tiny shapes R18-FPN", "config": str(tmp_path / "tiny.yaml"),
             "classes": str(tmp_path / "classes.yaml"), "url": f"https://example.invalid/models/tiny/tiny-{sha[:8]}.pth",
             "hash": f"sha256:{sha}", "evaluated_on": "nothing", "source": "tests/test_zoo.py", "metrics": {}}
    table = tmp_path / "zoo.yaml"
    table.write_text(yaml.safe_dump({"models": [entry]}))
    server.files[f"/mirror/models/tiny/tiny-{sha[:8]}.pth"] = data
    cache = tmp_path / "cache"
    env = {zoo.EXTRA_TABLE_ENV: str(table), zoo.CACHE_ENV: str(cache),
           zoo.MIRROR_ENV: f"http://127.0.0.1:{server.server_port}/mirror/"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(zoo.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(download, "RETRY_PAUSE_S", 0.0)
    return {"data": data, "sha": sha, "table": table, "cache": cache, "env": env,
            "path": cache / f"tiny-{sha[:8]}.pth", "write_table": lambda **kw: table.write_text(
                yaml.safe_dump({"models": [{**entry, **kw}]}))}


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(path)
    return path


def _one_line_failure(err: str, tiny: dict, url_part: str) -> str:
    """Assert the CLI printed exactly one error line naming the URL, the file and where to put it."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert url_part in line and tiny["path"].name in line and f"put it at {tiny['path']}" in line, line
    return line


def _cache_files(tiny: dict) -> list[str]:
    return sorted(p.name for p in tiny["cache"].iterdir()) if tiny["cache"].exists() else []


def test_first_use_downloads_and_predicts_second_use_makes_no_request(tiny_zoo, server, tmp_path, capsys):
    image = _image(tmp_path)
    assert main(["predict", str(image), "--weights", TINY, "--out", str(tmp_path / "a")]) == 0
    assert len(server.requests) == 1 and server.requests[0].startswith("/mirror/models/tiny/")
    assert _cache_files(tiny_zoo) == [tiny_zoo["path"].name]
    assert tiny_zoo["path"].read_bytes() == tiny_zoo["data"]
    assert (tmp_path / "a" / "predictions.json").is_file() and (tmp_path / "a" / "photo.png").is_file()
    assert main(["predict", str(image), "--weights", TINY, "--out", str(tmp_path / "b")]) == 0
    assert len(server.requests) == 1  # the cached file was used
    first, second = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in "ab")
    assert first == second


def test_load_model_by_name_and_models_listing(tiny_zoo, server, capsys):
    import maskrcnn

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(TINY))
    assert " no " in row  # not cached yet
    model = maskrcnn.load_model(TINY)
    assert model.cfg.model.num_classes == 3 and len(server.requests) == 1
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[TINY]["cached"] is True and rows[TINY]["cache_path"] == str(tiny_zoo["path"])
    assert rows["maskrcnn_resnet50_fpn_v2"]["default"] is True


def test_models_download_fetches_ahead(tiny_zoo, server, capsys):
    assert main(["models", "--download", TINY]) == 0
    assert str(tiny_zoo["path"]) in capsys.readouterr().out and len(server.requests) == 1
    assert main(["models", "--download", TINY, "no_such_model"]) == 2  # names checked before any download
    assert len(server.requests) == 1


def test_wrong_hash_is_refused_and_nothing_stays(tiny_zoo, server, tmp_path, capsys):
    wrong = hashlib.sha256(b"another file").hexdigest()
    tiny_zoo["write_table"](hash=f"sha256:{wrong}")
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY, "--out", str(tmp_path / "out")]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, f"127.0.0.1:{server.server_port}/mirror/")
    assert wrong[:16] in line and tiny_zoo["sha"][:16] in line
    assert _cache_files(tiny_zoo) == []


def test_cut_connection_leaves_no_file_and_the_retry_succeeds(tiny_zoo, server):
    server.cut = 1
    path = zoo.fetch(zoo.get_entry(TINY), progress=False)
    assert len(server.requests) == 2 and path.read_bytes() == tiny_zoo["data"]
    assert _cache_files(tiny_zoo) == [path.name]


def test_temp_file_of_a_killed_download_is_removed_by_the_next(tiny_zoo, server):
    tiny_zoo["cache"].mkdir()
    stale = tiny_zoo["cache"] / f".{tiny_zoo['path'].name}.12345.deadbeef.partial"  # as a SIGKILL leaves it
    stale.write_bytes(tiny_zoo["data"][:100])
    path = zoo.fetch(zoo.get_entry(TINY), progress=False)
    assert _cache_files(tiny_zoo) == [path.name]


def test_connection_cut_every_time_gives_up_in_one_line(tiny_zoo, server, tmp_path, capsys):
    server.cut = download.ATTEMPTS
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY, "--out", str(tmp_path / "out")]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, "/mirror/models/tiny/")
    assert f"failed {download.ATTEMPTS} times" in line
    assert len(server.requests) == download.ATTEMPTS and _cache_files(tiny_zoo) == []


def test_not_found_is_one_line(tiny_zoo, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.MIRROR_ENV, f"http://127.0.0.1:{server.server_port}/elsewhere")
    assert main(["eval", "--weights", TINY, "--data", "a.json:b"]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, "/elsewhere/models/tiny/")
    assert "HTTP 404" in line and len(server.requests) == 1 and _cache_files(tiny_zoo) == []


def test_refused_connection_is_one_line(tiny_zoo, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(zoo.MIRROR_ENV, f"http://127.0.0.1:{port}")
    assert main(["export", "--weights", TINY, "--out", "never.onnx"]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, f"http://127.0.0.1:{port}/models/tiny/")
    assert "cannot connect" in line and "refused" in line.lower()


def test_offline_and_not_cached_is_one_line_without_any_request(tiny_zoo, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, "/mirror/models/tiny/")
    assert zoo.OFFLINE_ENV in line and server.requests == []
    monkeypatch.delenv(zoo.OFFLINE_ENV)
    zoo.fetch(zoo.get_entry(TINY), progress=False)
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")  # cached now: offline use works
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY, "--out", str(tmp_path / "o")]) == 0
    assert len(server.requests) == 1


def test_predict_defaults_to_the_coco_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    monkeypatch.delenv(zoo.MIRROR_ENV, raising=False)
    assert main(["predict", str(_image(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert f"default COCO model '{zoo.DEFAULT_MODEL}'" in err
    entry = zoo.get_entry(zoo.DEFAULT_MODEL)
    assert f"from {entry.url}: " in err and f"put it at {tmp_path / 'cache' / entry.file_name}" in err


def test_cache_is_torch_hubs_checkpoint_folder(tiny_zoo, server, tmp_path, monkeypatch):
    monkeypatch.delenv(zoo.CACHE_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / tiny_zoo["path"].name
    assert zoo.cached_path(zoo.get_entry(TINY)) == hub_file
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(tiny_zoo["data"])  # as torch.hub / torchvision would have left it
    assert zoo.fetch(zoo.get_entry(TINY)) == hub_file and server.requests == []


def test_damaged_cached_file_is_refused_not_deleted(tiny_zoo, server, capsys, tmp_path):
    tiny_zoo["cache"].mkdir()
    tiny_zoo["path"].write_bytes(tiny_zoo["data"][:-10])
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not match" in err and "delete it to download again" in err
    assert tiny_zoo["path"].is_file() and server.requests == []


def test_full_disk_is_one_line_and_leaves_no_partial_file(tiny_zoo, server, tmp_path, monkeypatch, capsys):
    import errno

    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(download, "open", FullDisk, raising=False)
    assert main(["predict", str(_image(tmp_path)), "--weights", TINY]) == 2
    line = _one_line_failure(capsys.readouterr().err, tiny_zoo, "/mirror/models/tiny/")
    assert "no space left on device" in line and zoo.CACHE_ENV in line
    assert _cache_files(tiny_zoo) == [] and len(server.requests) == 1


def test_two_processes_fetching_at_once_end_with_one_verified_file(tiny_zoo, server):
    env = {**os.environ, **tiny_zoo["env"], "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"from maskrcnn import zoo; print(zoo.fetch(zoo.get_entry({TINY!r}), progress=False))"
    hold = server.hold = threading.Event()  # the first download stalls mid-file until released
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    for _ in range(600):
        if server.requests or first.poll() is not None:
            break
        threading.Event().wait(0.1)
    assert server.requests, f"the first process never asked: {first.communicate()}"
    second = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    said = second.stderr.readline()  # what the second process does while the first is mid-file
    hold.set()
    for p in (first, second):
        p.wait(120)
    outputs = [first.communicate(), second.communicate()]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert "waiting for another process" in said, said
    assert outputs[0][0].strip() == outputs[1][0].strip() == str(tiny_zoo["path"])
    assert len(server.requests) == 1
    assert _cache_files(tiny_zoo) == [tiny_zoo["path"].name]
    assert hashlib.sha256(tiny_zoo["path"].read_bytes()).hexdigest() == tiny_zoo["sha"]


def test_config_without_weights_says_random_weights(tmp_path, capsys):
    assert main(["predict", str(_image(tmp_path)), "--config", "shapes", "--out", str(tmp_path / "o")]) == 0
    assert "random weights" in capsys.readouterr().err


def test_finetune_from_a_zoo_name_takes_its_config_and_the_datas_classes(tiny_zoo, server, shapes, tmp_path):
    from maskrcnn.checkpoint import load_checkpoint

    ann, images = shapes["train"]
    data = json.loads(Path(ann).read_text())
    for c in data["categories"]:
        c["name"] = f"my_{c['name']}"  # the user's own classes, not the zoo model's
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(data))
    out = tmp_path / "run"
    assert main(["train", "--weights", TINY, "--out", str(out), f"data.train=['{mine}:{images}']", "device=cpu",
                 "solver.ims_per_batch=2", "solver.max_iter=1", "solver.warmup_iters=1",
                 "model.backbone.trainable_stages=0"]) == 0  # a frozen trunk keeps the zoo model's weights
    assert len(server.requests) == 1
    final = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert final["config"]["model"]["class_names"] == [c["name"] for c in data["categories"]]
    assert final["config"]["model"]["backbone"]["fpn_channels"] == 32  # the zoo entry's (tiny) architecture
    zoo_weights = load_checkpoint(tiny_zoo["path"])["model"]
    for name in ("backbone.trunk.conv1.weight", "backbone.trunk.layer4.0.conv2.weight"):
        assert torch.equal(final["model"][name], zoo_weights[name])
