"""Config presets, KEY=VALUE overrides and their errors."""

from __future__ import annotations

import pytest
import yaml

from maskrcnn.cli import main
from maskrcnn.config import Config, ConfigError, apply_overrides, list_presets, load_config


def test_overrides_set_nested_values_with_types():
    cfg = load_config(None, ["solver.base_lr=0.01", "model.backbone.depth=101", "input.min_size_train=[640,800]",
                             "model.mask_head.enabled=false", "data.val=a.json:imgs"])
    assert cfg.solver.base_lr == 0.01 and isinstance(cfg.solver.base_lr, float)
    assert cfg.model.backbone.depth == 101
    assert cfg.input.min_size_train == [640, 800]
    assert cfg.model.mask_head.enabled is False
    assert cfg.data.val == "a.json:imgs"


def test_integer_given_for_float_is_accepted_and_scalar_becomes_list():
    cfg = load_config(None, ["solver.base_lr=1", "input.min_size_train=512"])
    assert cfg.solver.base_lr == 1.0 and cfg.input.min_size_train == [512]


@pytest.mark.parametrize("override, nearest", [
    ("solver.base_lrr=0.1", "solver.base_lr"),
    ("model.backbone.deph=50", "model.backbone.depth"),
    ("solver.base_lr.x=1", "solver.base_lr"),
])
def test_unknown_key_names_it_and_the_nearest_valid_key(override, nearest):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert override.split("=")[0] in message and f"did you mean '{nearest}'" in message


@pytest.mark.parametrize("override, words", [
    ("solver.max_iter=abc", "expects an integer"),
    ("model.mask_head.enabled=maybe", "expects true/false"),
    ("solver.base_lr=[1,2]", "expects a number"),
    ("model.backbone.norm=batchnorm", "not one of"),
    ("model.backbone.depth=42", "not one of"),
    ("solver.base_lr", "is not KEY=VALUE"),
])
def test_bad_values_are_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value) and override.split("=")[0] in str(err.value)


def test_every_preset_loads_and_validates():
    presets = list_presets()
    assert {"shapes", "torchvision-r50-fpn", "torchvision-r50-fpn-v2", "R50-FPN-1x", "R50-FPN-3x",
            "R101-FPN-3x", "X101-32x4d-FPN-3x", "X101-32x8d-FPN-3x", "X101-64x4d-FPN-3x", "R50-C4-1x"} <= set(presets)
    for name in presets:
        load_config(name)
    assert load_config("R50-FPN-3x").input.min_size_train == [640, 672, 704, 736, 768, 800]
    assert load_config("X101-64x4d-FPN-3x").model.backbone.groups == 64


def test_yaml_file_with_base_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: shapes\nsolver: {max_iter: 7}\n")
    cfg = load_config(str(path), ["solver.seed=3"])
    assert cfg.solver.max_iter == 7 and cfg.solver.seed == 3 and cfg.model.backbone.depth == 10
    saved = tmp_path / "resolved.yaml"
    cfg.save(saved)
    again = load_config(str(saved))
    assert again.to_dict() == cfg.to_dict()


def test_bad_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: {depth: 50}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: {bakbone: {depth: 50}}\n")
    with pytest.raises(ConfigError, match="model.bakbone"):
        load_config(str(unknown))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("shapess")


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", "--config", "shapes", "solver.base_lrr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "solver.base_lr" in err


def test_defaults_are_the_papers_recipe():
    cfg = Config()
    assert (cfg.model.rpn.fg_iou_thresh, cfg.model.rpn.bg_iou_thresh, cfg.model.rpn.nms_thresh) == (0.7, 0.3, 0.7)
    assert (cfg.model.box_head.batch_size_per_image, cfg.model.box_head.positive_fraction) == (512, 0.25)
    assert (cfg.model.box_head.score_thresh, cfg.model.box_head.nms_thresh) == (0.05, 0.5)
    assert cfg.model.box_head.detections_per_image == 100
    assert yaml.safe_load(cfg.to_yaml())["solver"]["momentum"] == 0.9
