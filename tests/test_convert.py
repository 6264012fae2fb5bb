"""maskrcnn convert: each reader on small files in its tool's real layout, exact round trips, warnings, errors.

Every converted dataset is also run through check-dataset's checker (no errors allowed).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.cli import main
from maskrcnn.commands import convert as convert_command
from maskrcnn.data.convert import INPUT_FORMATS, OUTPUT_FORMATS, Options, read_annotations, write_coco
from maskrcnn.data.convert import geometry
from maskrcnn.data.convert.masks import voc_colours
from maskrcnn.data.validate import ImageProber, check_data, validate_dataset
from maskrcnn.rle import decode_rle, rle_from_polygons, rle_from_positions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2

W, H = 40, 30  # every test image is 40 wide, 30 high


def _photo(path: Path, w: int = W, h: int = H) -> Path:
    """Write a small RGB image (the 'photo' annotations refer to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _errors(data: dict, image_dir: Path) -> list[str]:
    """Return check-dataset's error findings for a converted dataset (warnings are allowed)."""
    findings = check_data(data, ImageProber(image_dir), "<converted>")
    return [f"{f.kind}: {f.message}" for f in findings if f.severity == "error"]


def _mask(seg, h: int = H, w: int = W) -> np.ndarray:
    """Return the boolean mask of a COCO segmentation (polygons or RLE), as pycocotools rasterises it."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _convert(fmt: str, path: Path, caplog=None, **options) -> tuple[dict, Path]:
    data, image_dir, _ = read_annotations(fmt, path, Options(**options))
    return data, image_dir


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "maskrcnn.data.convert"]


def _names(data: dict) -> dict[int, str]:
    return {c["id"]: c["name"] for c in data["categories"]}


# ---- LabelMe ----------------------------------------------------------------------------------------


def _labelme_shape(label, points, shape_type="polygon", group_id=None, **extra) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "description": "", "shape_type": shape_type,
            "flags": {}, "mask": None, **extra}


def _labelme_file(path: Path, image_path: str, shapes: list[dict], w: int = W, h: int = H) -> None:
    """Write a LabelMe 5.x JSON file as the tool saves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                                "imageData": None, "imageHeight": h, "imageWidth": w}, indent=2))


def _png_b64(patch: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(patch.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_labelme_polygons_rectangles_circles_groups_and_masks(tmp_path, caplog):
    root = tmp_path / "labelme"
    _photo(root / "a.png")
    _photo(tmp_path / "photos" / "b.png")
    patch = np.zeros((4, 5), bool)
    patch[1:3, 1:4] = True
    _labelme_file(root / "a.json", "a.png", [
        _labelme_shape("dog", [[2.5, 3.0], [14.0, 3.0], [14.0, 12.5], [2.5, 12.5]]),
        _labelme_shape("cat", [[16, 2], [30, 9]], "rectangle"),
        _labelme_shape("cat", [[8, 20], [12, 20]], "circle"),  # centre (8, 20), radius 4
        _labelme_shape("dog", [[20, 14], [26, 14], [26, 20]], group_id=1),  # one object of two polygons
        _labelme_shape("dog", [[30, 14], [36, 14], [36, 20]], group_id=1),
        _labelme_shape("cat", [[20, 22], [24, 26]], "mask", mask=_png_b64(patch)),
        _labelme_shape("cat", [[1, 1], [5, 5]], "line"),
        _labelme_shape("cat", [[1, 1], [5, 5]]),  # two points: no polygon
        _labelme_shape("dog", [[32, 24], [46, 24], [46, 35], [32, 35]]),  # past the corner: clipped
        _labelme_shape("dog", [[-9, 2], [-2, 2], [-2, 9]]),  # wholly outside
    ])
    # A subfolder whose image lives elsewhere, named the Windows way.
    _labelme_file(root / "sub" / "b.json", "..\\..\\photos\\b.png", [_labelme_shape("cat", [[1, 1], [9, 1], [5, 8]])])
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("labelme", root)
    assert image_dir == root
    assert _names(data) == {1: "cat", 2: "dog"}  # sorted names -> 1..N
    assert [i["file_name"] for i in data["images"]] == ["a.png", "../photos/b.png"]
    anns = data["annotations"]
    assert len(anns) == 7
    poly, rect, circle, group, mask, clipped, tri = anns
    corners = [tuple(c) for c in np.array(clipped["segmentation"][0]).reshape(-1, 2)]
    start = corners.index((32.0, 24.0))
    assert corners[start:] + corners[:start] == [(32, 24), (40, 24), (40, 30), (32, 30)]  # cut at the border
    assert clipped["bbox"] == [32, 24, 8, 6] and clipped["area"] == 48
    assert poly["segmentation"] == [[2.5, 3.0, 14.0, 3.0, 14.0, 12.5, 2.5, 12.5]] and poly["category_id"] == 2
    assert poly["bbox"] == [2.5, 3.0, 11.5, 9.5]
    assert rect["segmentation"] == [[16.0, 2.0, 30.0, 2.0, 30.0, 9.0, 16.0, 9.0]] and rect["area"] == 14 * 7
    assert circle["bbox"] == pytest.approx([4, 16, 8, 8], abs=0.05)
    assert abs(circle["area"] - np.pi * 16) < 6
    assert len(group["segmentation"]) == 2 and group["category_id"] == 2
    expected = np.zeros((H, W), bool)
    expected[22 + 1:22 + 3, 20 + 1:20 + 4] = True  # the PNG patch placed at its first corner
    assert (_mask(mask["segmentation"]) == expected).all() and mask["area"] == 6
    assert tri["image_id"] == 2
    lines = _warnings(caplog)
    assert len(lines) == 1 and "a.json: skipped 3 of 10 shapes" in lines[0]
    for part in ("1 unsupported shape ('line')", "1 polygon with < 3 points", "1 outside the image"):
        assert part in lines[0], lines[0]
    assert _errors(data, image_dir) == []


def test_warning_line_one_per_file_naming_what_was_skipped(tmp_path, caplog):
    root = tmp_path / "labelme"
    for name in ("a", "b", "c"):
        _photo(root / f"{name}.png")
    square = [[2, 2], [12, 2], [12, 12], [2, 12]]
    _labelme_file(root / "a.json", "a.png", [
        _labelme_shape("cat", square), _labelme_shape("dgo", square), _labelme_shape("catt", square),
        _labelme_shape("cat", [[1, 1], [4, 4]]), _labelme_shape("cat", [[1, 1], [2, 2], [3, 3]]),
        _labelme_shape("dog", [[5, 5], [5, 9]], "rectangle"),
    ])
    _labelme_file(root / "b.json", "b.png", [_labelme_shape("dog", square)])
    _labelme_file(root / "c.json", "gone.png", [_labelme_shape("dog", square), _labelme_shape("dog", square)])
    _labelme_file(root / "d.json", "c.png", [_labelme_shape("dog", square)], w=80, h=60)  # drawn on a larger copy
    (root / "classes.txt").write_text("cat\ndog\n")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("labelme", root, class_map=root / "classes.txt")
    lines = _warnings(caplog)
    assert len(lines) == 3, lines  # b.json is clean: no line
    a_line, c_line, d_line = lines
    assert a_line.startswith(f"{root / 'a.json'}: skipped 5 of 6 shapes (")
    for part in ("2 unknown label ('dgo', 'catt')", "1 polygon with < 3 points", "1 polygon with zero area",
                 "1 degenerate box"):
        assert part in a_line, a_line
    assert c_line == f"{root / 'c.json'}: skipped 1 of 1 image (1 missing image file ('gone.png'); 2 shapes on it)"
    assert d_line == (f"{root / 'd.json'}: skipped 1 of 1 image (1 image size differs from the annotation's "
                      "('c.png: file 40x30, annotation 80x60'); 1 shape on it)")
    assert _names(data) == {1: "cat", 2: "dog"}  # the class file's order
    assert len(data["annotations"]) == 2 and _errors(data, image_dir) == []


# ---- CVAT -------------------------------------------------------------------------------------------

# The mask of CVAT's own XML format page: 13 x 15, runs row by row from a background run.
CVAT_RLE = [3, 5, 7, 7, 5, 9, 3, 11, 2, 11, 2, 12, 1, 12, 1, 26, 1, 12, 1, 12, 2, 11, 3, 9, 5, 7, 7, 5, 3]

CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>4</id>
      <name>segmentation</name>
      <size>2</size>
      <mode>annotation</mode>
      <labels>
        <label><name>car</name><color>#fa3253</color><type>any</type><attributes></attributes></label>
        <label><name>wheel</name><color>#33ddff</color><type>polygon</type><attributes></attributes></label>
        <label><name>tree</name><color>#34d1b7</color><type>any</type><attributes></attributes></label>
        <label><name>s1</name><type>skeleton</type><attributes></attributes></label>
      </labels>
    </task>
    <dumped>2024-05-01 10:00:00.000000+00:00</dumped>
  </meta>
  <image id="0" name="frame_000.png" width="40" height="30">
    <box label="car" source="manual" occluded="0" xtl="2.50" ytl="3.00" xbr="12.50" ybr="9.00" z_order="0">
    </box>
    <box label="car" source="manual" occluded="0" xtl="4.00" ytl="4.00" xbr="4.00" ybr="9.00" z_order="0">
    </box>
    <polygon label="wheel" source="manual" occluded="0" points="20.00,2.00;30.00,2.00;30.00,12.00;20.00,12.00" z_order="0">
    </polygon>
    <mask label="car" source="manual" occluded="0" rle="RLE" left="20" top="14" width="13" height="15" z_order="0">
    </mask>
    <ellipse label="wheel" source="manual" occluded="0" cx="8.00" cy="20.00" rx="4.00" ry="2.00" rotation="90.0" z_order="0">
    </ellipse>
    <polyline label="car" source="manual" occluded="0" points="1.00,1.00;5.00,5.00" z_order="0">
    </polyline>
    <tag label="car" source="manual">
    </tag>
  </image>
  <image id="1" name="frame_001.png" width="40" height="30">
    <polygon label="car" source="manual" occluded="0" points="1.00,1.00;9.00,1.00;5.00,8.00" z_order="0">
    </polygon>
  </image>
</annotations>
""".replace("RLE", ", ".join(map(str, CVAT_RLE)))


def test_cvat_xml_boxes_polygons_masks_ellipses(tmp_path, caplog):
    (tmp_path / "annotations.xml").write_text(CVAT_XML)
    _photo(tmp_path / "images" / "frame_000.png")  # CVAT's export zip: images/ beside annotations.xml
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("cvat-xml", tmp_path / "annotations.xml")
    assert image_dir == tmp_path / "images"
    assert _names(data) == {1: "car", 2: "tree", 3: "wheel"}  # declared labels, used or not (not skeletons)
    box, polygon, mask, ellipse = data["annotations"]
    assert box["segmentation"] == [[2.5, 3.0, 12.5, 3.0, 12.5, 9.0, 2.5, 9.0]] and box["category_id"] == 1
    assert polygon["bbox"] == [20, 2, 10, 10] and polygon["category_id"] == 3
    values = np.zeros(len(CVAT_RLE), bool)
    values[1::2] = True
    expected = np.zeros((H, W), bool)
    expected[14:29, 20:33] = np.repeat(values, CVAT_RLE).reshape(15, 13)
    assert (_mask(mask["segmentation"]) == expected).all() and mask["area"] == int(expected.sum())
    assert ellipse["bbox"] == pytest.approx([6, 16, 4, 8], abs=0.05)  # turned 90 degrees: 4 wide, 8 high
    lines = _warnings(caplog)
    assert len(lines) == 1
    assert "skipped 1 of 2 images (1 missing image file ('frame_001.png'); 1 shape on it)" in lines[0]
    assert "1 degenerate box" in lines[0] and "1 unsupported shape ('polyline')" in lines[0]
    assert _errors(data, image_dir) == []


# ---- VIA --------------------------------------------------------------------------------------------


def _via_project(regions_a: list[dict]) -> dict:
    """A VIA 2.0.x project file as 'Save project' writes it."""
    return {
        "_via_settings": {"ui": {"annotation_editor_height": 25}, "core": {"buffer_size": 18, "filepath": {},
                                                                          "default_filepath": ""},
                          "project": {"name": "via_project_1May2024_10h0m"}},
        "_via_img_metadata": {
            "a.png1234": {"filename": "a.png", "size": 1234, "regions": regions_a, "file_attributes": {}},
            "b.png999": {"filename": "b.png", "size": 999, "regions": [], "file_attributes": {}},
        },
        "_via_attributes": {"region": {
            "type": {"type": "dropdown", "description": "", "options": {"balloon": "", "kite": "", "bird": ""},
                     "default_options": {}},
            "note": {"type": "text", "description": "", "default_value": ""}}, "file": {}},
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": ["a.png1234", "b.png999"],
    }


def _region(shape: dict, label: str | None = "balloon") -> dict:
    return {"shape_attributes": shape, "region_attributes": {"type": label, "note": ""}}


def test_via_project_polygons_rects_circles_ellipses(tmp_path, caplog):
    _photo(tmp_path / "a.png")
    regions = [
        _region({"name": "polygon", "all_points_x": [2, 12, 12, 2], "all_points_y": [2, 2, 10, 10]}),
        _region({"name": "rect", "x": 20, "y": 3, "width": 10, "height": 6}, "kite"),
        _region({"name": "circle", "cx": 8, "cy": 20, "r": 5}),
        _region({"name": "ellipse", "cx": 28, "cy": 20, "rx": 8, "ry": 4, "theta": 0.5}, "kite"),
        _region({"name": "point", "cx": 1, "cy": 1}, "kite"),
        _region({"name": "polygon", "all_points_x": [1, 5, 9], "all_points_y": [1, 1, 1]}, "kite"),
        _region({"name": "rect", "x": 20, "y": 3, "width": 10, "height": 6}, ""),
    ]
    (tmp_path / "via_project.json").write_text(json.dumps(_via_project(regions)))
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("via", tmp_path / "via_project.json")
    assert _names(data) == {1: "balloon", 2: "bird", 3: "kite"}  # the dropdown's options, sorted
    polygon, rect, circle, ellipse = data["annotations"]
    assert polygon["segmentation"] == [[2, 2, 12, 2, 12, 10, 2, 10]] and polygon["area"] == 80
    assert rect["bbox"] == [20, 3, 10, 6] and rect["category_id"] == 3
    assert abs(circle["area"] - np.pi * 25) < 8
    assert abs(ellipse["area"] - np.pi * 32) < 10 and ellipse["bbox"][3] > 2 * 4  # rotated: taller than 2 ry
    lines = _warnings(caplog)
    assert len(lines) == 1
    for part in ("1 of 2 images (1 missing image file ('b.png'))", "3 of 7 regions",
                 "1 unsupported shape ('point')", "1 polygon with zero area", "1 no label"):
        assert part in lines[0], lines[0]
    assert _errors(data, image_dir) == []


def test_via_annotation_export_and_version_1_regions(tmp_path):
    _photo(tmp_path / "a.png")
    regions = {"0": {"shape_attributes": {"name": "polygon", "all_points_x": [2, 12, 7], "all_points_y": [2, 2, 9]},
                     "region_attributes": {"species": "wren"}}}
    (tmp_path / "export.json").write_text(json.dumps({"a.png5": {"filename": "a.png", "size": 5, "regions": regions,
                                                                 "file_attributes": {}}}))
    data, _ = _convert("via", tmp_path / "export.json")
    assert _names(data) == {1: "wren"} and len(data["annotations"]) == 1


# ---- YOLO -------------------------------------------------------------------------------------------


def test_yolo_seg_labels_folder(tmp_path, caplog):
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "data.yaml").write_text("path: ../dataset\ntrain: images/train\nval: images/val\n"
                                  "names:\n  0: person\n  1: bicycle\n")
    _photo(ds / "images" / "train" / "a.jpg")
    labels = ds / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n"
                                  "1 0.5 0.5 0.25 0.2\n"  # a detection line: cx cy w h
                                  "7 0.1 0.1 0.2 0.2 0.3 0.1\n"
                                  "0 0.1 0.1 0.2\n")
    (labels / "b.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("yolo-seg", labels)
    assert image_dir == ds / "images" / "train"
    assert _names(data) == {1: "person", 2: "bicycle"}
    polygon, box = data["annotations"]
    assert polygon["segmentation"] == [[4, 3, 20, 3, 20, 15, 4, 15]] and polygon["category_id"] == 1
    assert box["segmentation"] == [[15, 12, 25, 12, 25, 18, 15, 18]] and box["category_id"] == 2
    lines = _warnings(caplog)
    assert len(lines) == 2
    assert "a.txt: skipped 2 of 4 lines (1 unknown label ('class 7'); 1 malformed coordinates)" in lines[0]
    assert "b.txt: skipped 1 of 1 image (1 missing image file ('b.*'); 1 line on it)" in lines[1]
    assert _errors(data, image_dir) == []


# ---- VOC --------------------------------------------------------------------------------------------


def _voc_palette_png(path: Path, values: np.ndarray, rgb: bool = False) -> None:
    """Write a VOC-style palette PNG (indices = values), or the same colours as plain RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour_of = {v: c for c, v in voc_colours().items()}
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    im.putpalette([(colour_of[i] >> s) & 255 for i in range(256) for s in (16, 8, 0)])
    (im.convert("RGB") if rgb else im).save(path)


def test_voc_masks_void_holes_touching_objects_and_split(tmp_path, caplog):
    root = tmp_path / "VOC2012"
    objects = np.zeros((H, W), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    objects[2:13, 2:15], classes[2:13, 2:15] = 1, 15  # a person with a hole
    objects[5:10, 5:12], classes[5:10, 5:12] = 0, 0
    objects[2:13, 15:25], classes[2:13, 15:25] = 2, 12  # a dog touching it
    objects[15:27, 4:17], classes[15:27, 4:17] = 255, 255  # void border round the third object
    objects[16:26, 5:16], classes[16:26, 5:16] = 3, 15
    objects[20, 10], classes[20, 10] = 255, 255  # a void pixel inside it
    _voc_palette_png(root / "SegmentationObject" / "2007_000032.png", objects)
    _voc_palette_png(root / "SegmentationClass" / "2007_000032.png", classes, rgb=True)  # re-saved as RGB
    _voc_palette_png(root / "SegmentationObject" / "2007_000039.png", objects)  # not in the split
    _photo(root / "JPEGImages" / "2007_000032.jpg")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, image_dir = _convert("voc-masks", root, split="train")
    assert _warnings(caplog) == []  # void is neither an object nor a skipped one
    assert image_dir == root / "JPEGImages"
    assert len(data["categories"]) == 20 and _names(data)[15] == "person" and _names(data)[12] == "dog"
    assert [i["file_name"] for i in data["images"]] == ["2007_000032.jpg"]
    by_value = {1: 15, 2: 12, 3: 15}
    assert len(data["annotations"]) == 3
    for ann, value in zip(data["annotations"], (1, 2, 3)):
        assert ann["category_id"] == by_value[value]
        assert (_mask(ann["segmentation"]) == (objects == value)).all()  # void pixels in no object
    assert _errors(data, image_dir) == []


# ---- label images: round trip ------------------------------------------------------------------------


def _instances(values: list[int]) -> np.ndarray:
    """A 30 x 40 label image: a ring with a hole, objects touching along an edge and at a corner, an
    object in two parts reaching the border, and an object inside another's hole."""
    a, b, c, d, e, f, g = values
    lab = np.zeros((H, W), np.int64)
    lab[3:13, 3:13] = a
    lab[6:10, 6:10] = 0  # a's hole
    lab[3:13, 13:21] = b  # touches a along an edge
    lab[15:23, 3:11] = c
    lab[23:28, 11:16] = d  # touches c at a corner only
    lab[15:19, 25:29] = e
    lab[24:30, 32:40] = e  # e's second part, at the image's corner
    lab[14:23, 16:25] = f
    lab[16:21, 18:23] = 0  # f's hole...
    lab[17:20, 19:22] = g  # ...with g inside it
    return lab


@pytest.mark.parametrize("kind, values", [
    ("png8", [5, 1, 200, 7, 255, 3, 9]),
    ("png16", [1, 300, 1000, 65535, 2, 40000, 7]),
    ("tiff32", [70000, 1, 2**31 + 5, 123456789, 4_000_000_000, 2, 65536]),
])
def test_label_images_round_trip_pixel_for_pixel(tmp_path, kind, values):
    labels = _instances(values)
    if kind == "tiff32":
        import tifffile

        folder = tmp_path / "data"  # photos and masks in one folder, as Cellpose keeps them
        folder.mkdir()
        tifffile.imwrite(folder / "cells_masks.tif", labels.astype(np.uint32))
        _photo(folder / "cells.png")
        images = folder
    else:
        folder, images = tmp_path / "masks", tmp_path / "images"
        folder.mkdir()
        dtype = np.uint8 if kind == "png8" else np.uint16
        Image.fromarray(labels.astype(dtype)).save(folder / "cells_masks.png")
        _photo(images / "cells.png")
        with Image.open(folder / "cells_masks.png") as im:
            assert im.mode == ("L" if kind == "png8" else "I;16")
    data, image_dir = _convert("label-images", folder, images=images)
    assert [i["file_name"] for i in data["images"]] == ["cells.png"]
    assert _names(data) == {1: "object"}
    assert len(data["annotations"]) == len(values)
    decoded = [_mask(a["segmentation"]) for a in data["annotations"]]
    for value in values:
        expected = labels == value
        matches = [k for k, m in enumerate(decoded) if (m == expected).all()]
        assert len(matches) == 1, f"object {value} did not survive"
        ann = data["annotations"][matches[0]]
        ys, xs = np.nonzero(expected)
        assert ann["area"] == expected.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # Written and checked as check-dataset would (the file on disk, the image folder).
    write_coco(data, tmp_path / "out.json")
    assert [f for f in validate_dataset(tmp_path / "out.json", image_dir) if f.severity == "error"] == []


def test_label_images_classes_from_a_map_or_class_images(tmp_path, caplog):
    labels = _instances([1, 2, 3, 4, 5, 6, 7])
    (tmp_path / "masks").mkdir()
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "masks" / "x.png")
    _photo(tmp_path / "images" / "x.png")
    # A label-value map: values 1..6 named, 7 not.
    (tmp_path / "map.yaml").write_text("1: cell\n2: cell\n3: nucleus\n4: cell\n5: nucleus\n6: cell\n")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, _ = _convert("label-images", tmp_path / "masks", images=tmp_path / "images", class_map=tmp_path / "map.yaml")
    assert _names(data) == {1: "cell", 2: "nucleus"} and len(data["annotations"]) == 6
    assert "skipped 1 of 7 objects (1 unknown label ('label 7'))" in _warnings(caplog)[0]
    # A parallel class image: class 2 under objects 1-3, class 5 under the rest; named by their values.
    (tmp_path / "classes").mkdir()
    Image.fromarray(np.where(np.isin(labels, [1, 2, 3]), 2, np.where(labels > 0, 5, 0)).astype(np.uint8)).save(
        tmp_path / "classes" / "x.png")
    data, image_dir = _convert("label-images", tmp_path / "masks", images=tmp_path / "images",
                               class_images=tmp_path / "classes")
    assert _names(data) == {2: "2", 5: "5"}
    assert sorted(a["category_id"] for a in data["annotations"]) == [2, 2, 2, 5, 5, 5, 5]
    assert _errors(data, image_dir) == []


def test_tiff_without_tifffile_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import tifffile

    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "x.tif", np.ones((H, W), np.uint16))
    _photo(tmp_path / "images" / "x.png")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # as if it were not installed
    status = main(["convert", "--from", "label-images", str(tmp_path / "masks"), "--images", str(tmp_path / "images"),
                   "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert status == 2 and err.strip().splitlines() == [f"error: reading the TIFF label image '{tmp_path / 'masks' / 'x.tif'}' "
                                                        "needs tifffile: pip install tifffile"]
    assert not (tmp_path / "out.json").exists()


# ---- COCO -> YOLO -> COCO ---------------------------------------------------------------------------


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def test_coco_to_yolo_and_back_keeps_every_instance(tmp_path, caplog):
    W2, H2 = 60, 40
    _photo(tmp_path / "images" / "p.png", W2, H2)
    holed = np.zeros((H2, W2), bool)
    holed[20:36, 5:21] = True
    holed[25:30, 10:15] = False  # a hole
    holed[30:40, 50:60] = True  # and a second part in the corner
    crowd = np.zeros((H2, W2), bool)
    crowd[0:5, 0:60] = True
    anns = [
        {"segmentation": [[5.3, 4.7, 20.2, 5.1, 18.9, 17.6, 9.4, 15.2, 4.8, 10.05]], "category_id": 3},
        {"segmentation": [[30, 5, 40, 5, 40, 12, 30, 12], [45, 20, 55, 20, 50, 30]], "category_id": 7},
        {"segmentation": _rle(holed), "category_id": 3},
        {"segmentation": [[22, 22, 32, 22, 32, 32, 22, 32], [27, 27, 37, 27, 37, 37, 27, 37]], "category_id": 7},
        {"segmentation": _rle(crowd), "category_id": 3, "iscrowd": 1},
    ]
    coco = {"images": [{"id": 1, "file_name": "p.png", "width": W2, "height": H2}],
            "annotations": [{"id": k + 1, "image_id": 1, "iscrowd": 0, **a} for k, a in enumerate(anns)],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (tmp_path / "in.json").write_text(json.dumps(coco))
    out = tmp_path / "yolo"
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        assert main(["convert", "--from", "coco", str(tmp_path / "in.json"), "--to", "yolo-seg", "--out", str(out)]) == 0
    assert _warnings(caplog) == [f"{tmp_path / 'in.json'}: skipped 1 of 5 annotations (1 crowd region (YOLO has none))"]
    lines = (out / "labels" / "p.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["0", "1", "0", "1"]
    assert all(0 <= float(v) <= 1 for ln in lines for v in ln.split()[1:])
    assert "coco_category_ids:\n- 3\n- 7" in (out / "data.yaml").read_text()

    back, image_dir = _convert("yolo-seg", out / "labels", images=tmp_path / "images")
    assert back["categories"] == [{"id": 3, "name": "cat", "supercategory": ""}, {"id": 7, "name": "dog", "supercategory": ""}]
    assert len(back["annotations"]) == 4
    for orig, new in zip(anns, back["annotations"]):
        assert new["category_id"] == orig["category_id"]
        before, after = _mask(orig["segmentation"], H2, W2), _mask(new["segmentation"], H2, W2)
        iou = (before & after).sum() / (before | after).sum()
        assert iou >= 0.99, iou
    # One polygon in, the same vertices out, well within a pixel.
    first = np.array(back["annotations"][0]["segmentation"][0]).reshape(-1, 2)
    assert np.abs(first - np.array(anns[0]["segmentation"][0]).reshape(-1, 2)).max() < 1e-3
    # Traced masks (RLE with a hole and a separate part, overlapping polygons) come back exactly.
    for k in (2, 3):
        assert (_mask(back["annotations"][k]["segmentation"], H2, W2) == _mask(anns[k]["segmentation"], H2, W2)).all()
    assert _errors(back, image_dir) == []


def test_yolo_output_refuses_to_overwrite_labels(tmp_path, capsys):
    _photo(tmp_path / "p.png")
    coco = {"images": [{"id": 1, "file_name": "p.png", "width": W, "height": H}], "annotations": [],
            "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "in.json").write_text(json.dumps(coco))
    (tmp_path / "yolo" / "labels").mkdir(parents=True)
    (tmp_path / "yolo" / "labels" / "keep.txt").write_text("0 0 0 1 0 1 1\n")
    assert main(["convert", "--from", "coco", str(tmp_path / "in.json"), "--to", "yolo-seg",
                 "--out", str(tmp_path / "yolo")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "yolo" / "labels" / "keep.txt").read_text() == "0 0 0 1 0 1 1\n"


# ---- the command line ---------------------------------------------------------------------------------


def test_command_writes_a_file_check_dataset_accepts(tmp_path, capsys):
    root = tmp_path / "labelme"
    _photo(root / "a.png")
    _labelme_file(root / "a.json", "a.png", [_labelme_shape("cat", [[2, 2], [12, 2], [12, 12], [2, 12]])])
    out = tmp_path / "out" / "train.json"
    out.parent.mkdir()
    out.write_text("old")
    assert main(["convert", "--from", "labelme", str(root), "--out", str(out), "--rle"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 1 image, 1 annotation, 1 category" in printed
    assert f"maskrcnn check-dataset {out}:{root}" in printed
    data = json.loads(out.read_text())
    assert isinstance(data["annotations"][0]["segmentation"], dict)  # --rle
    assert [p.name for p in out.parent.iterdir()] == ["train.json"]  # no temp file left beside it
    assert main(["check-dataset", f"{out}:{root}"]) == 0
    assert "OK: 0 errors, 0 warnings" in capsys.readouterr().out


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(arguments, what the one error line must say) for input that cannot be converted at all."""
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "a.json").write_text('{"shapes": [}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.xml").write_text("<annotations><image></annotations>")
    (tmp_path / "video.xml").write_text("<annotations><track id='0' label='car'/></annotations>")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0 0 1 0 1 1\n")
    return [
        (["--from", "labelme", str(tmp_path / "lm")],
         f"LabelMe file '{tmp_path / 'lm' / 'a.json'}' is not valid JSON (line 1, column 13"),
        (["--from", "labelme", str(tmp_path / "empty")], "no .json files under"),
        (["--from", "voc-masks", str(tmp_path / "empty")], "has no SegmentationObject folder"),
        (["--from", "cvat-xml", str(tmp_path / "bad.xml")], "is not valid XML"),
        (["--from", "cvat-xml", str(tmp_path / "video.xml")], "'CVAT for video' export"),
        (["--from", "via", str(tmp_path / "list.json")], "is not a VIA 2 project or annotation file"),
        (["--from", "yolo-seg", str(tmp_path / "labels"), "--images", str(tmp_path)], "no data.yaml or classes.txt"),
        (["--from", "label-images", str(tmp_path / "empty")], "give --images DIR"),
        (["--from", "coco", str(tmp_path / "list.json"), "--to", "yolo-seg"], "is not a COCO instances file"),
        (["--from", "mask-folders", str(tmp_path / "lm")], "holds no image folders with images/ and masks/"),
        (["--from", "mask-folders", str(tmp_path / "bad.xml")], "is not a folder"),
        (["--from", "labelme", str(tmp_path / "lm"), "--split", "train"], "--split applies to --from voc-masks only"),
        (["--from", "labelme", str(tmp_path / "nowhere")], "does not exist"),
    ]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    for args, message in _bad_inputs(tmp_path):
        status = main(["convert", *args, "--out", str(tmp_path / "out.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert not (tmp_path / "out.json").exists()


def test_command_lists_the_package_formats():
    assert convert_command.INPUT_FORMATS == INPUT_FORMATS and convert_command.OUTPUT_FORMATS == OUTPUT_FORMATS


# ---- geometry ---------------------------------------------------------------------------------------


def test_traced_and_bridged_polygon_covers_exactly_the_mask():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        assert (decode_rle(rle_from_positions(np.flatnonzero(mask.ravel(order="F")), h, w)) == mask).all()
        rings = geometry.mask_rings(mask)
        if not mask.any():
            assert rings == []
            continue
        polygon = geometry.mask_polygon(mask)  # traced within the mask's box, shifted back
        assert (decode_rle(rle_from_polygons([polygon], h, w)) == mask).all()


# ---- mask folders (the 2018 Data Science Bowl's layout) -------------------------------------------------

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"


def _mask_folder(root: Path, name: str, photo: Path | None, masks: dict[str, np.ndarray]) -> Path:
    """Write ROOT/NAME/images/NAME.png (a copy of `photo`, or a random one) and masks/KEY.png (0/255) per mask."""
    folder = root / name
    (folder / "images").mkdir(parents=True)
    if photo is None:
        _photo(folder / "images" / f"{name}.png")
    else:
        (folder / "images" / f"{name}.png").write_bytes(photo.read_bytes())
    (folder / "masks").mkdir()
    for key, m in masks.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / "masks" / f"{key}.png")
    return folder


@pytest.mark.skipif(not (DSB / "train.json").is_file(), reason=f"DSB2018 data not found at {DSB}")
def test_mask_folders_round_trip_dsb_pixel_for_pixel(tmp_path):
    """DSB images' COCO masks written out in the original per-image layout convert back to the same pixels."""
    coco = json.loads((DSB / "train.json").read_text())
    by_size = sorted(coco["images"], key=lambda i: (i["width"] * i["height"], i["id"]))
    chosen = by_size[:2] + [next(i for i in by_size if i["width"] != i["height"])]  # two 256x256, one not square
    originals: dict[str, list[dict]] = {}
    for img in chosen:
        name = Path(img["file_name"]).stem
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        originals[name] = anns
        _mask_folder(tmp_path / "stage1_train", name, DSB / "images" / img["file_name"],
                     {str(a["id"]): _mask(a["segmentation"], img["height"], img["width"]) for a in anns})
    data, image_dir = _convert("mask-folders", tmp_path / "stage1_train", class_name="nucleus")
    assert image_dir == tmp_path / "stage1_train" and _names(data) == {1: "nucleus"}
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (f"{Path(i['file_name']).stem}/images/{i['file_name']}", i["width"], i["height"])
        for i in sorted(chosen, key=lambda i: i["file_name"])]  # folders in name order
    for img in data["images"]:
        name = img["file_name"].split("/")[0]
        converted = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert len(converted) == len(originals[name]) > 5
        decoded = [_mask(a["segmentation"], img["height"], img["width"]) for a in converted]
        for original in originals[name]:
            expected = _mask(original["segmentation"], img["height"], img["width"])
            matches = [k for k, m in enumerate(decoded) if (m == expected).all()]
            assert len(matches) == 1, f"nucleus {original['id']} of {name} did not survive"
            ann = converted[matches[0]]
            assert ann["area"] == original["area"] and ann["bbox"] == original["bbox"]
    write_coco(data, tmp_path / "out.json")
    assert [f for f in validate_dataset(tmp_path / "out.json", image_dir) if f.severity == "error"] == []


def test_mask_folders_skip_bad_folders_and_masks_and_name_them(tmp_path, caplog, capsys):
    root = tmp_path / "data"
    box = np.zeros((H, W), bool)
    box[2:8, 3:9] = True
    other = np.zeros((H, W), bool)
    other[5:12, 6:14] = True  # overlaps `box`
    _mask_folder(root, "good", None, {"a": box, "b": other})
    bad = _mask_folder(root, "bad", None, {"ok": box, "empty": np.zeros((H, W), bool), "small": box[:20]})
    Image.fromarray((box * 255).astype(np.uint8) - other.astype(np.uint8) * 128).save(bad / "masks" / "grey.png")
    (root / "no_images" / "masks").mkdir(parents=True)
    _photo(root / "unlabelled" / "images" / "unlabelled.png")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.convert"):
        data, _ = _convert("mask-folders", root)
    assert _names(data) == {1: "object"}
    assert [i["file_name"] for i in data["images"]] == ["bad/images/bad.png", "good/images/good.png"]
    assert len(data["annotations"]) == 3
    lines = _warnings(caplog)
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"{bad}: skipped 3 of 4 masks (")
    for detail in ("1 empty mask ('masks/empty.png')", f"mask size differs from the image ('masks/small.png: {W}x20, image {W}x{H}')",
                   "non-binary mask (needs 0 and one other value) ('masks/grey.png: values 0, 127, 128, 255')"):
        assert detail in lines[0]
    assert lines[1] == f"{root / 'no_images'}: skipped 1 of 1 image (1 folder without images/ ('no_images'))"
    assert lines[2] == f"{root / 'unlabelled'}: skipped 1 of 1 image (1 folder without masks/ ('unlabelled'))"
    assert lines[3] == f"{root}: 1 image folder with overlapping masks ('good'), kept as they are"
    # The command keeps going past the bad folders and says what it skipped.
    assert main(["convert", "--from", "mask-folders", str(root), "--out", str(tmp_path / "out.json")]) == 0
    assert "3 annotations, 1 category; skipped 3 masks and 2 images (warnings above)" in capsys.readouterr().out
    # One image folder given directly; the photo found in --images where it was moved.
    (tmp_path / "photos").mkdir()
    (root / "good" / "images" / "good.png").rename(tmp_path / "photos" / "good.png")
    data, image_dir = _convert("mask-folders", root / "good", images=tmp_path / "photos")
    assert image_dir == tmp_path / "photos" and [i["file_name"] for i in data["images"]] == ["good.png"]
    assert len(data["annotations"]) == 2
