"""check-dataset: each defect of a small hand-written COCO set is found, exit codes, report, --fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.coco_checks import BAD_RLE
from maskrcnn.data.shapes import make_shapes
from maskrcnn.data.validate import KINDS, check_data, polygon_self_intersects, validate_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2

# Images 1 and 2 are 40 wide x 30 high, image 3 is 24 x 32.
SIZES = {1: (40, 30), 2: (40, 30), 3: (24, 32)}


def _rle(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    """A compressed RLE (JSON form) of the rectangle x1, y1, x2, y2 in an h x w image."""
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _clean_data() -> dict:
    """A valid dataset: polygons, an RLE, a crowd RLE, two categories (both used)."""
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": w, "height": h} for i, (w, h) in SIZES.items()]
    square = [5.0, 5.0, 20.0, 5.0, 20.0, 20.0, 5.0, 20.0]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square], "bbox": [5, 5, 15, 15], "area": 225, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "segmentation": _rle(30, 40, (10, 2, 30, 12)),
         "bbox": [10, 2, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": _rle(30, 40, (0, 20, 40, 30)),
         "bbox": [0, 20, 40, 10], "area": 400, "iscrowd": 1},
        {"id": 4, "image_id": 3, "category_id": 2, "segmentation": [[2, 2, 20, 2, 11, 28]],
         "bbox": [2, 2, 18, 26], "area": 234, "iscrowd": 0},
    ]
    categories = [{"id": 1, "name": "box"}, {"id": 2, "name": "blob"}]
    return {"info": {"description": "test"}, "images": images, "annotations": annotations, "categories": categories}


def _write(root: Path, data: dict | str) -> tuple[Path, Path]:
    """Write the images (if absent) and the annotation file; return (ann file, image dir)."""
    image_dir = root / "images"
    if not image_dir.exists():
        image_dir.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i, (w, h) in SIZES.items():
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / f"{i:03d}.png")
    ann = root / "ann.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    return ann, image_dir


def _spec(ann: Path, image_dir: Path) -> str:
    return f"{ann}:{image_dir}"


def _kinds(findings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in findings:
        out.setdefault(f.kind, []).append(f.ref())
    return out


def test_clean_dataset_exits_0(tmp_path, capsys):
    ann, image_dir = _write(tmp_path, _clean_data())
    assert validate_dataset(ann, image_dir) == []
    assert main(["check-dataset", _spec(ann, image_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 images, 4 annotations, 2 categories" in out and "OK: 0 errors, 0 warnings" in out


def test_synthetic_shapes_are_clean(tmp_path):
    # 20 images: enough for the threaded header reads to kick in
    (ann, image_dir), _ = make_shapes(tmp_path, num_train=20, num_val=0, seed=3, image_size=48).values()
    assert validate_dataset(ann, image_dir) == []
    (image_dir / "000007.png").unlink()
    assert _kinds(validate_dataset(ann, image_dir)) == {"missing-image": ["image 7"]}


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


# (defect, mutation of the clean data, expected kind, the entry it names)
DEFECTS = [
    ("unknown image", lambda d: _ann(d, 1).update(image_id=99), "unknown-image-id", "ann 1"),
    ("unknown category", lambda d: _ann(d, 2).update(category_id=7), "unknown-category-id", "ann 2"),
    ("duplicate image id", lambda d: d["images"].append({**d["images"][0], "file_name": "002.png"}),
     "duplicate-image-id", "image 1"),
    ("duplicate annotation id", lambda d: d["annotations"].append({**_ann(d, 1)}), "duplicate-annotation-id", "ann 1"),
    ("duplicate category id", lambda d: d["categories"].append({"id": 2, "name": "again"}),
     "duplicate-category-id", "category 2"),
    ("bbox outside", lambda d: _ann(d, 1).update(bbox=[50, 5, 10, 10]), "bbox-outside-image", "ann 1"),
    ("bbox partly outside", lambda d: _ann(d, 1).update(bbox=[35, 5, 15, 10]), "bbox-partly-outside", "ann 1"),
    ("bbox zero width", lambda d: _ann(d, 1).update(bbox=[5, 5, 0, 10]), "bbox-non-positive", "ann 1"),
    ("bbox negative height", lambda d: _ann(d, 1).update(bbox=[5, 5, 10, -1]), "bbox-non-positive", "ann 1"),
    ("bbox malformed", lambda d: _ann(d, 1).update(bbox=[5, 5, 10]), "bad-bbox", "ann 1"),
    ("empty polygon", lambda d: _ann(d, 1).update(segmentation=[[]]), "empty-polygon", "ann 1"),
    ("two points", lambda d: _ann(d, 1).update(segmentation=[[1, 1, 9, 9]]), "polygon-too-few-points", "ann 1"),
    ("odd coordinates", lambda d: _ann(d, 1).update(segmentation=[[1, 1, 9, 1, 9, 9, 1]]),
     "polygon-odd-coordinates", "ann 1"),
    ("self-intersecting", lambda d: _ann(d, 1).update(segmentation=[[5, 5, 20, 20, 20, 5, 5, 20]]),
     "polygon-self-intersection", "ann 1"),
    ("collinear polygon", lambda d: _ann(d, 1).update(segmentation=[[1, 1, 5, 5, 9, 9]]), "polygon-zero-area", "ann 1"),
    ("polygon outside", lambda d: _ann(d, 1).update(segmentation=[[50, 5, 60, 5, 60, 9]]),
     "polygon-outside-image", "ann 1"),
    ("no segmentation", lambda d: _ann(d, 4).pop("segmentation"), "missing-segmentation", "ann 4"),
    ("RLE size transposed", lambda d: _ann(d, 2).update(segmentation=_rle(40, 30, (2, 2, 8, 8))), "rle-size-mismatch", "ann 2"),
    ("RLE empty", lambda d: _ann(d, 2).update(segmentation=_rle(30, 40, (0, 0, 0, 0))), "empty-mask", "ann 2"),
    ("RLE bad counts", lambda d: _ann(d, 2).update(segmentation={"size": [30, 40], "counts": [5, 5]}), "bad-rle", "ann 2"),
    ("crowd polygon", lambda d: _ann(d, 1).update(iscrowd=1), "crowd-polygon", "ann 1"),
    ("iscrowd 2", lambda d: _ann(d, 1).update(iscrowd=2), "bad-iscrowd", "ann 1"),
    ("unused category", lambda d: d["categories"].append({"id": 5, "name": "never"}), "unused-category", "category 5"),
    ("no annotation id", lambda d: _ann(d, 4).pop("id"), "missing-annotation-id", "annotations[3]"),
    ("no width", lambda d: d["images"][2].pop("width"), "bad-image-size", "image 3"),
    ("width mismatch", lambda d: d["images"][0].update(width=41), "size-mismatch", "image 1"),
    ("missing file", lambda d: d["images"][2].update(file_name="nope.png"), "missing-image", "image 3"),
]


@pytest.mark.parametrize("name,mutate,kind,ref", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_defect_is_reported(tmp_path, name, mutate, kind, ref):
    data = _clean_data()
    mutate(data)
    ann, image_dir = _write(tmp_path, data)
    findings = validate_dataset(ann, image_dir)
    kinds = _kinds(findings)
    assert kind in kinds, f"{name}: expected {kind}, got {kinds}"
    assert ref in kinds[kind]
    expected_exit = 1 if any(f.severity == "error" for f in findings) else 0
    assert (KINDS[kind][0] == "error") <= (expected_exit == 1)
    # nothing else is wrong with the clean data, so a warning alone is the only finding
    if KINDS[kind][0] == "warning" and kind not in ("missing-annotation-id",):
        assert expected_exit == 0, kinds


def test_exit_status_and_table(tmp_path, capsys):
    data = _clean_data()
    _ann(data, 1)["category_id"] = 7
    _ann(data, 4)["category_id"] = 7
    data["categories"].append({"id": 5, "name": "never"})
    ann, image_dir = _write(tmp_path, data)
    assert main(["check-dataset", _spec(ann, image_dir)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("unknown-category-id "))
    assert row.split()[1:4] == ["error", "2", "ann"] and "ann 1, ann 4" in row
    assert any(line.startswith("unused-category ") and "warning" in line for line in out.splitlines())
    assert "FAILED: 2 errors, 1 warning" in out

    # warnings alone pass
    data = _clean_data()
    data["categories"].append({"id": 5, "name": "never"})
    ann.write_text(json.dumps(data))
    assert main(["check-dataset", _spec(ann, image_dir)]) == 0
    assert "OK: 0 errors, 1 warning" in capsys.readouterr().out


def test_rle_short_of_the_image_is_reported_by_check_dataset_and_skipped_by_the_loader(tmp_path, capsys):
    data = _clean_data()
    short = _rle(30, 39, (10, 2, 30, 12))["counts"]  # compressed runs that cover 30 x 39 pixels, not 30 x 40
    _ann(data, 2)["segmentation"] = {"size": [30, 40], "counts": short}
    assert mask_utils.area({"size": [30, 40], "counts": short.encode()}) == 200  # pycocotools trusts it
    ann, image_dir = _write(tmp_path, data)
    findings = validate_dataset(ann, image_dir)
    assert _kinds(findings) == {"bad-rle": ["ann 2"]}
    assert findings[0].message == "annotation 2 has RLE counts that cover 1170 pixels, not the image's 30x40 = 1200"
    assert main(["check-dataset", _spec(ann, image_dir)]) == 1
    assert "FAILED: 1 error" in capsys.readouterr().out
    assert dict(CocoDataset(ann, image_dir).skipped) == {BAD_RLE: 1}


def test_unreadable_and_truncated_images(tmp_path):
    ann, image_dir = _write(tmp_path, _clean_data())
    (image_dir / "001.png").write_bytes(b"not an image at all")
    png = (image_dir / "002.png").read_bytes()
    (image_dir / "002.png").write_bytes(png[: len(png) // 2])  # header intact, pixels cut off
    fast = _kinds(validate_dataset(ann, image_dir))
    assert fast == {"unreadable-image": ["image 1"]}  # headers only: the truncated file looks fine
    full = validate_dataset(ann, image_dir, decode=True)
    assert _kinds(full) == {"unreadable-image": ["image 1", "image 2"]}
    assert "truncated or corrupt" in full[1].message and "002.png" in full[1].message  # the image reader's words


@pytest.mark.parametrize("suffix", ["jpg", "png", "tif"])
def test_exif_rotation_counts_as_upright_size(tmp_path, suffix):
    data = _clean_data()
    ann, image_dir = _write(tmp_path, data)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide x 40 high, shown rotated: 40 x 30 as the JSON says
    Image.new("RGB", (30, 40)).save(image_dir / f"r.{suffix}", exif=exif)
    data["images"][0]["file_name"] = f"r.{suffix}"
    ann.write_text(json.dumps(data))
    assert validate_dataset(ann, image_dir) == []
    data["images"][0].update(width=30, height=40)  # the stored size is not what training sees
    ann.write_text(json.dumps(data))
    assert _kinds(validate_dataset(ann, image_dir))["size-mismatch"] == ["image 1"]


def test_self_intersection_check():
    assert not polygon_self_intersects(np.array([[0, 0], [4, 0], [4, 4], [0, 4]]))
    assert not polygon_self_intersects(np.array([[0, 0], [4, 0], [4, 4], [2, 1], [0, 4]]))  # concave
    assert not polygon_self_intersects(np.array([[0, 0], [2, 0], [4, 0], [4, 4], [0, 4], [0, 0]]))  # redundant points
    assert polygon_self_intersects(np.array([[0, 0], [4, 4], [4, 0], [0, 4]]))  # bow tie
    assert polygon_self_intersects(np.array([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]]))  # vertex on an edge
    assert polygon_self_intersects(np.array([[0, 0], [4, 0], [2, 0], [2, 3]]))  # folds back along itself
    big = np.stack([np.cos(t := np.linspace(0, 2 * np.pi, 400, endpoint=False)), np.sin(t)], axis=1) * 100
    assert not polygon_self_intersects(big)


def test_check_data_from_python_without_images():
    findings = check_data(_clean_data())  # no probe: image files are not looked at
    assert findings == []
    data = _clean_data()
    data["annotations"][0]["image_id"] = 42
    (f,) = check_data(data)
    assert (f.kind, f.severity, f.annotation_id, f.image_id) == ("unknown-image-id", "error", 1, 42)


@pytest.mark.parametrize("text,words", [
    ("{\"images\": [", "not valid JSON"),
    (json.dumps({"images": [], "categories": []}), "no 'annotations' key"),
    (json.dumps([1, 2]), "not a COCO object"),
    (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' must be a list"),
])
def test_malformed_file_is_one_line_error(tmp_path, capsys, text, words):
    ann, image_dir = _write(tmp_path, text)
    assert main(["check-dataset", _spec(ann, image_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(ann) in err


def test_missing_image_folder_is_one_line_error(tmp_path, capsys):
    ann, image_dir = _write(tmp_path, _clean_data())
    assert main(["check-dataset", f"{ann}:{tmp_path / 'nowhere'}"]) == 2
    assert "image directory" in capsys.readouterr().err


def test_fix_names_what_it_cannot_fix(tmp_path, capsys):
    data = _clean_data()
    for a in data["annotations"]:
        a["category_id"] = 9
    ann, image_dir = _write(tmp_path, data)
    out = tmp_path / "clean.json"
    assert main(["check-dataset", _spec(ann, image_dir), "--fix", str(out)]) == 1
    assert "still has 1 error that dropping entries cannot fix: no-usable-annotations" in capsys.readouterr().out
    assert json.loads(out.read_text())["annotations"] == []


def test_json_report(tmp_path):
    data = _clean_data()
    _ann(data, 2)["image_id"] = 9
    ann, image_dir = _write(tmp_path, data)
    report = tmp_path / "out" / "report.json"
    assert main(["check-dataset", _spec(ann, image_dir), "--json", str(report)]) == 1
    r = json.loads(report.read_text())
    assert (r["errors"], r["warnings"], r["counts"]) == (1, 0, {"unknown-image-id": 1})
    (f,) = r["findings"]
    assert f["kind"] == "unknown-image-id" and f["severity"] == "error" and f["annotation_id"] == 2 and f["image_id"] == 9


def test_fix_writes_a_clean_loadable_dataset(tmp_path, capsys):
    data = _clean_data()
    data["images"][0]["width"] = 41  # corrected from the file
    data["images"].append({"id": 7, "file_name": "gone.png", "width": 10, "height": 10})  # dropped
    data["annotations"] += [
        {**_ann(data, 4)},  # duplicate id: the first is kept
        {"id": 10, "image_id": 7, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]], "bbox": [1, 1, 4, 4], "area": 8},
        {"id": 11, "image_id": 3, "category_id": 9, "segmentation": [[1, 1, 5, 1, 5, 5]], "bbox": [1, 1, 4, 4], "area": 8},
        {"id": 12, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 5]], "bbox": [1, 1, 4, 4], "area": 8},
        {"image_id": 3, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]], "bbox": [1, 1, 8, 8], "area": 32},
    ]
    data["categories"].append({"id": 1, "name": "dup"})
    ann, image_dir = _write(tmp_path, data)
    before = ann.read_text()
    out = tmp_path / "fixed" / "clean.json"
    assert main(["check-dataset", _spec(ann, image_dir), "--fix", str(out)]) == 1  # the input had errors
    printed = capsys.readouterr().out
    assert f"cleaned copy: {out}" in printed and "corrected the size of 1 image" in printed
    assert ann.read_text() == before

    fixed = json.loads(out.read_text())
    assert [i["id"] for i in fixed["images"]] == [1, 2, 3] and fixed["images"][0]["width"] == 40
    assert [c["name"] for c in fixed["categories"]] == ["box", "blob"]
    ids = [a["id"] for a in fixed["annotations"]]
    assert ids[:4] == [1, 2, 3, 4] and len(ids) == 5 and ids[4] not in ids[:4]  # the id-less one got a new id
    assert fixed["info"] == data["info"]
    assert validate_dataset(out, image_dir) == []
    assert main(["check-dataset", _spec(out, image_dir)]) == 0
    ds = CocoDataset(out, image_dir)
    assert len(ds) == 3 and ds[0][0].shape == (3, 30, 40)


def test_fix_drops_annotations_of_a_resized_image_whose_rle_no_longer_fits(tmp_path):
    data = _clean_data()
    data["images"][1]["width"], data["images"][1]["height"] = 30, 40  # transposed; the RLEs match the JSON
    for a in data["annotations"][1:3]:
        a["segmentation"] = _rle(40, 30, (0, 0, 10, 10))
    ann, image_dir = _write(tmp_path, data)
    out = tmp_path / "clean.json"
    assert main(["check-dataset", _spec(ann, image_dir), "--fix", str(out)]) == 1
    fixed = json.loads(out.read_text())
    assert [a["id"] for a in fixed["annotations"]] == [1, 4]
    assert validate_dataset(out, image_dir) == []


def test_fix_keeps_annotations_that_fit_the_corrected_size(tmp_path):
    data = _clean_data()
    data["images"][1]["width"] = 41  # the file is 40 wide, as its RLEs say
    ann, image_dir = _write(tmp_path, data)
    findings = validate_dataset(ann, image_dir)
    assert _kinds(findings) == {"size-mismatch": ["image 2"], "rle-size-mismatch": ["ann 2", "ann 3"]}
    assert "matches the image file" in findings[1].message
    out = tmp_path / "clean.json"
    assert main(["check-dataset", _spec(ann, image_dir), "--fix", str(out)]) == 1
    fixed = json.loads(out.read_text())
    assert fixed["images"][1]["width"] == 40 and [a["id"] for a in fixed["annotations"]] == [1, 2, 3, 4]
    assert validate_dataset(out, image_dir) == []


def test_fix_refuses_to_overwrite_the_input(tmp_path, capsys):
    data = _clean_data()
    _ann(data, 1)["image_id"] = 99
    ann, image_dir = _write(tmp_path, data)
    before = ann.read_text()
    for target in (str(ann), str(tmp_path / "." / "ann.json")):
        assert main(["check-dataset", _spec(ann, image_dir), "--fix", target]) == 2
        assert "--fix" in capsys.readouterr().err
    assert ann.read_text() == before
