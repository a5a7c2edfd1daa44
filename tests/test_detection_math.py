"""Detection ground truth (COCO, YOLO, VOC readers) and detection metrics: COCO numbers against pycocotools run the
usual file-based way, precision/recall/F1 against a brute-force matcher, confusion and per-image error labels on
hand-made images."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from reportgen.analyses import _detection_math as dm
from reportgen.errors import ConfigError
from reportgen.inputs.annotations import GroundTruth, ImageBoxes, match_categories, read_annotations


def _problems(truth: GroundTruth) -> dict:
    """location -> reason (each location once in these tests)."""
    locations = [loc for loc, _ in truth.problems]
    assert len(locations) == len(set(locations)), truth.problems
    return dict(truth.problems)


def _truth(boxes, labels, ignore=None) -> ImageBoxes:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ignore = np.zeros(len(labels), bool) if ignore is None else np.asarray(ignore, bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return ImageBoxes(boxes, np.asarray(labels, np.int64), ignore, area)


def _pred(boxes, scores, labels) -> dm.ImagePredictions:
    return dm.as_predictions(np.asarray(boxes, np.float64).reshape(-1, 4), scores, labels)


# ------------------------------------------------------------------------------------------------------ COCO read


def test_coco_read_keeps_ids_crowd_area_and_lists_problems(tmp_path):
    data = {
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
        "images": [{"id": 10, "file_name": "sub/a.jpg", "height": 100, "width": 200},
                   {"id": 11, "file_name": "val2017/b.jpg"},  # matched by its unique base name
                   {"id": 12, "file_name": "c.jpg"},  # listed without annotations: zero objects
                   {"id": 13, "file_name": "elsewhere.jpg"}],  # not in the folder
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 900.5, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 50, 50], "area": 2000, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1.5, 2.5, 3, 4]},  # no area: the box's
            {"id": 4, "image_id": 13, "category_id": 3, "bbox": [1, 1, 5, 5]},
            {"id": 5, "image_id": 13, "category_id": 3, "bbox": [2, 2, 5, 5]},
            {"id": 20, "image_id": 10, "category_id": 1, "bbox": [1, 2, 3]},
            {"id": 21, "image_id": 10, "category_id": 1, "bbox": [1, 2, 0, 3]},
            {"id": 22, "image_id": 10, "category_id": 2, "bbox": [1, 2, 3, 3]},
            {"id": 23, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 3]},
            {"id": 24, "image_id": 10, "category_id": 1, "bbox": [1, "x", 3, 3]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    truth = read_annotations(path, ["sub/a.jpg", "b.jpg", "c.jpg", "d.jpg"])

    assert truth.format == "coco"
    assert [(c.id, c.name) for c in truth.categories] == [(1, "person"), (3, "car"), (7, "dog")]
    assert "gaps" in truth.id_rule
    assert sorted(truth.images) == ["b.jpg", "c.jpg", "sub/a.jpg"]
    assert truth.unlabelled == ["d.jpg"]
    a = truth.images["sub/a.jpg"]
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [0, 0, 50, 50]])
    np.testing.assert_array_equal(a.labels, [1, 7])
    np.testing.assert_array_equal(a.ignore, [False, True])
    np.testing.assert_array_equal(a.area, [900.5, 2000])
    np.testing.assert_array_equal(truth.images["b.jpg"].boxes, [[1.5, 2.5, 4.5, 6.5]])
    np.testing.assert_array_equal(truth.images["b.jpg"].area, [12.0])
    assert len(truth.images["c.jpg"]) == 0
    assert truth.sizes == {"sub/a.jpg": (100, 200)}

    problems = _problems(truth)
    assert "bbox must be a list" in problems["instances.json annotation id 20"]
    assert "not positive" in problems["instances.json annotation id 21"]
    assert "category_id 2 is not in categories" in problems["instances.json annotation id 22"]
    assert "image_id 99 is not in images" in problems["instances.json annotation id 23"]
    assert "not a finite number" in problems["instances.json annotation id 24"]
    assert problems["instances.json"].startswith("2 annotations on 1 images")  # one summary line
    assert len(problems) == 6


def test_coco_ambiguous_base_name_is_a_problem(tmp_path):
    data = {"categories": [{"id": 1, "name": "x"}], "annotations": [],
            "images": [{"id": 1, "file_name": "other/b.jpg"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    truth = read_annotations(path, ["p/b.jpg", "q/b.jpg"])
    assert truth.images == {} and truth.unlabelled == ["p/b.jpg", "q/b.jpg"]
    assert "fits 2 scanned images" in _problems(truth)["gt.json images[0]"]


# ------------------------------------------------------------------------------------------------------ YOLO read


def _yolo_folder(tmp_path: Path) -> Path:
    labels = tmp_path / "dataset" / "labels"
    (labels / "sub").mkdir(parents=True)
    (labels / "sub" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"  # line 1: fine
        "1 0.5 0.5 0.2\n"  # line 2: 4 fields
        "1 0.5 abc 0.2 0.2\n"  # line 3: not a number
        "1 0.5 1.5 0.2 0.2\n"  # line 4: outside [0, 1]
        "5 0.5 0.5 0.2 0.2\n"  # line 5: class not in the names
        "\n"  # line 6: blank, skipped
        "2 0.5 0.5 0.0 0.2\n"  # line 7: zero width
        "0 0.1 0.2 0.3 0.4 0.5 0.6\n"  # line 8: a polygon
        "2 0.25 0.75 0.5 0.5\n")  # line 9: fine
    (labels / "b.txt").write_text("1 0.5 0.5 1 1\n")  # flat: image other/b.jpg
    (labels / "c.txt").write_text("")  # empty: zero objects
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image
    return labels


def test_yolo_read_with_data_yaml_and_sizes(tmp_path):
    labels = _yolo_folder(tmp_path)
    (tmp_path / "dataset" / "data.yaml").write_text("path: .\nnames:\n  0: person\n  1: car\n  2: dog\n")
    images = ["sub/a.jpg", "other/b.jpg", "c.jpg", "d.jpg"]
    sizes = {"sub/a.jpg": (100, 200), "other/b.jpg": (10, 20), "c.jpg": (5, 5), "d.jpg": (5, 5)}
    truth = read_annotations(labels, images, image_sizes=sizes)

    assert truth.format == "yolo" and not truth.normalized
    assert [(c.id, c.name) for c in truth.categories] == [(0, "person"), (1, "car"), (2, "dog")]
    assert "0-based" in truth.id_rule and "../data.yaml" in truth.id_rule
    assert truth.unlabelled == ["d.jpg"]
    a = truth.images["sub/a.jpg"]
    # (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.4) of 200 x 100 -> x 80..120, y 30..70
    np.testing.assert_allclose(a.boxes, [[80, 30, 120, 70], [0, 50, 100, 100]])
    np.testing.assert_array_equal(a.labels, [0, 2])
    np.testing.assert_allclose(a.area, [40 * 40, 100 * 50])
    np.testing.assert_allclose(truth.images["other/b.jpg"].boxes, [[0, 0, 20, 10]])
    assert len(truth.images["c.jpg"]) == 0

    problems = _problems(truth)
    assert "4 fields" in problems["sub/a.txt:2"]
    assert "not a number" in problems["sub/a.txt:3"]
    assert "[0, 1]" in problems["sub/a.txt:4"]
    assert "class 5 is not among the 3 class names" in problems["sub/a.txt:5"]
    assert "not positive" in problems["sub/a.txt:7"]
    assert "polygon" in problems["sub/a.txt:8"]
    assert problems["orphan.txt"].startswith("1 label files match no scanned image")
    assert len(problems) == 7


def test_yolo_read_with_classes_txt_stays_normalised_until_resolved(tmp_path):
    labels = _yolo_folder(tmp_path)
    (labels / "classes.txt").write_text("person\ncar\ndog\ncat\n\n")
    truth = read_annotations(labels, ["sub/a.jpg", "other/b.jpg", "c.jpg"])

    assert [c.name for c in truth.categories] == ["person", "car", "dog", "cat"]
    assert "classes.txt" in truth.id_rule
    assert "sub/a.txt:5" in _problems(truth)  # class 5 is still unknown with 4 names
    assert truth.normalized
    np.testing.assert_allclose(truth.images["sub/a.jpg"].boxes[0], [0.4, 0.3, 0.6, 0.7])
    with pytest.raises(ValueError, match="normalised"):
        dm.coco_evaluate(truth.images, {"sub/a.jpg": _pred([], [], [])}, truth.categories)

    resolved = truth.resolved({"sub/a.jpg": (10, 10), "c.jpg": (5, 5)})  # other/b.jpg: no size
    assert not resolved.normalized
    np.testing.assert_allclose(resolved.images["sub/a.jpg"].boxes[0], [4, 3, 6, 7])
    assert "other/b.jpg" not in resolved.images
    assert resolved.problems[-1][0] == "other/b.jpg" and "no known size" in resolved.problems[-1][1]


def test_yolo_without_names_names_classes_by_id(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("3 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    truth = read_annotations(labels, ["a.png"], image_sizes={"a.png": (10, 10)})
    assert [(c.id, c.name) for c in truth.categories] == [(0, "0"), (3, "3")]
    assert "no names found" in truth.id_rule and truth.problems == []


def test_yolo_same_stem_in_two_folders_is_ambiguous_for_flat_files(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    truth = read_annotations(labels, ["x/b.jpg", "y/b.jpg"], names=["thing"])
    assert truth.images == {} and truth.unlabelled == ["x/b.jpg", "y/b.jpg"]
    assert "fits 2 scanned images" in _problems(truth)["b.txt"]


# ------------------------------------------------------------------------------------------------------- VOC read


def _voc_xml(*objects: str, size: str = "<size><width>200</width><height>100</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>x.jpg</filename>{size}{''.join(objects)}</annotation>"


def _voc_object(name: str, box, difficult: str = "0") -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def test_voc_read_keeps_difficult_and_sorted_ids(tmp_path):
    root = tmp_path / "Annotations"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.xml").write_text(_voc_xml(
        _voc_object("dog", (10, 20, 50, 80)),
        "<object><name>cat</name></object>",  # object 2: no bndbox
        _voc_object("cat", (1, 2, "wide", 4)),  # object 3: not a number
        _voc_object("cat", (30, 20, 30, 40)),  # object 4: zero width
        _voc_object("cat", (5, 6, 7, 9), difficult="1"),  # object 5: difficult
    ))
    (root / "b.xml").write_text(_voc_xml())  # no object: zero objects
    (root / "c.xml").write_text("<annotation><object>")  # broken: unlabelled
    truth = read_annotations(root, ["sub/a.jpg", "b.jpg", "c.jpg", "d.jpg"])

    assert truth.format == "voc"
    assert [(c.id, c.name) for c in truth.categories] == [(0, "cat"), (1, "dog")]
    assert "sorted order" in truth.id_rule
    a = truth.images["sub/a.jpg"]
    np.testing.assert_array_equal(a.boxes, [[10, 20, 50, 80], [5, 6, 7, 9]])  # as given, not shifted
    np.testing.assert_array_equal(a.labels, [1, 0])
    np.testing.assert_array_equal(a.ignore, [False, True])
    np.testing.assert_array_equal(a.area, [40 * 60, 2 * 3])
    assert len(truth.images["b.jpg"]) == 0
    assert sorted(truth.unlabelled) == ["c.jpg", "d.jpg"]
    assert truth.sizes["sub/a.jpg"] == (100, 200)

    problems = _problems(truth)
    assert "no <bndbox>" in problems["sub/a.xml object 2"]
    assert "not a number" in problems["sub/a.xml object 3"]
    assert "not positive" in problems["sub/a.xml object 4"]
    assert "not well-formed XML" in problems["c.xml"]
    assert len(problems) == 4


def test_voc_with_names_given_flags_unknown_names(tmp_path):
    root = tmp_path / "Annotations"
    root.mkdir()
    (root / "a.xml").write_text(_voc_xml(_voc_object("dog", (1, 1, 5, 5)), _voc_object("emu", (1, 1, 5, 5))))
    truth = read_annotations(root, ["a.jpg"], names=["cat", "dog"])
    assert [(c.id, c.name) for c in truth.categories] == [(0, "cat"), (1, "dog")]
    np.testing.assert_array_equal(truth.images["a.jpg"].labels, [1])
    assert "'emu' is not among the 2 names" in _problems(truth)["a.xml object 2"]


def test_unusable_paths_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.annotations"):
        read_annotations(tmp_path / "missing", ["a.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt or .xml"):
        read_annotations(tmp_path / "empty", ["a.jpg"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="COCO"):
        read_annotations(tmp_path / "bad.json", ["a.jpg"])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="'images'"):
        read_annotations(tmp_path / "list.json", ["a.jpg"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("")
    (mixed / "b.xml").write_text("<annotation/>")
    with pytest.raises(ConfigError, match="both"):
        read_annotations(mixed, ["a.jpg"])
    with pytest.raises(ValueError, match="format must be one of coco, yolo, voc"):
        read_annotations(mixed, ["a.jpg"], format="kitti")
    with pytest.raises(ValueError, match="names cannot be given"):
        read_annotations(tmp_path / "list.json", ["a.jpg"], names=["x"])
    forced = read_annotations(mixed, ["a.jpg"], format="yolo")  # the format named: .xml files are not read
    assert forced.format == "yolo" and len(forced.images["a.jpg"]) == 0 and forced.problems == []


def test_match_categories_by_name():
    model = ["__background__", "person", "N/A", "Dining Table", "car", "N/A"]
    dataset = [(1, "person"), (3, "diningtable"), (5, "zebra")]
    match = match_categories(dataset, model)
    assert match.model_to_dataset == {1: 1, 3: 3}
    assert match.unmatched_dataset == ["zebra"]
    assert match.unmatched_model == ["car"]  # placeholders are not reported
    mapped, keep = match.map_labels(np.array([1, 4, 3, 0]))
    np.testing.assert_array_equal(mapped, [1, 3])
    np.testing.assert_array_equal(keep, [True, False, True, False])


# --------------------------------------------------------------------------------------------- detection store


def test_store_packs_merges_and_round_trips():
    rng = np.random.default_rng(0)
    first, second, expected = dm.DetectionStore(), dm.DetectionStore(), {}
    for i in range(1500):  # more than one packing block
        n = int(rng.integers(0, 4))
        boxes, scores, labels = rng.random((n, 4)) * 100, rng.random(n), rng.integers(0, 5, n)
        expected[f"img{i:04d}.jpg"] = (boxes.astype(np.float32), scores.astype(np.float32), labels)
        (first if i % 2 else second).add(f"img{i:04d}.jpg", boxes, scores, labels)
    first.add("nan.jpg", [[0, 0, 1, 1], [0, 0, np.nan, 1]], [0.5, 0.6], [1, 1])
    first.merge(dm.DetectionStore.from_state(second.state_dict()))
    assert len(first) == 1501 and first.nonfinite == 1
    loaded = dm.DetectionStore.from_state(first.state_dict())
    for image, (boxes, scores, labels) in expected.items():
        got = loaded[image]
        np.testing.assert_array_equal(got.boxes, boxes)
        np.testing.assert_array_equal(got.scores, scores)
        np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(loaded["nan.jpg"].scores, np.float32([0.5]))
    with pytest.raises(ValueError, match="both detection stores"):
        first.merge(second)
    with pytest.raises(ValueError, match="already added"):
        first.add("nan.jpg", [], [], [])


def test_box_iou_and_ioa():
    a = [[0, 0, 10, 10]]
    b = [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]]
    np.testing.assert_allclose(dm.box_iou(a, b), [[50 / 150, 0, 25 / 100]])
    np.testing.assert_allclose(dm.box_ioa(a, b), [[50 / 100, 0, 25 / 100]])


# --------------------------------------------------------------------------------------------------- COCO metrics


def _quarter(values):
    """Rounded to quarter pixels: exact in float32 and float64, so xyxy <-> xywh loses nothing."""
    return np.round(np.asarray(values) * 4) / 4


def _random_coco_problem(rng):
    """A COCO file (dict) with a category-id gap, crowd regions and mask-like areas, and detections (xywh dicts)
    near, off and between its objects, one image with more than 100 and one detection of an unknown category."""
    categories = [{"id": 1, "name": "a"}, {"id": 4, "name": "b"}, {"id": 9, "name": "c"}, {"id": 12, "name": "d"}]
    images, annotations, detections = [], [], []
    for image_id in range(1, 9):
        images.append({"id": image_id * 10, "file_name": f"img{image_id}.jpg", "height": 480, "width": 640})
        for _ in range(int(rng.integers(0, 7))):
            w, h = _quarter(rng.uniform(8, 250, 2))
            x, y = _quarter(rng.uniform(0, 350, 2))
            category = int(rng.choice([1, 4, 9]))  # category 12 has no object
            crowd = int(rng.random() < 0.12)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id * 10, "category_id": category,
                                "bbox": [float(x), float(y), float(w), float(h)],
                                "area": float(w * h * rng.uniform(0.4, 1.0)), "iscrowd": crowd})
            for _ in range(int(rng.integers(0, 3))):  # detections near the object
                jitter = _quarter(rng.normal(0, 0.15, 4) * [w, h, w, h])
                label = category if rng.random() < 0.75 else int(rng.choice([1, 4, 9, 12]))
                detections.append({"image_id": image_id * 10, "category_id": label,
                                   "bbox": [float(x + jitter[0]), float(y + jitter[1]),
                                            float(max(w + jitter[2], 1)), float(max(h + jitter[3], 1))],
                                   "near": True})
        extra = 120 if image_id == 3 else int(rng.integers(0, 4))
        for _ in range(extra):  # false positives anywhere
            w, h = _quarter(rng.uniform(4, 200, 2))
            x, y = _quarter(rng.uniform(0, 400, 2))
            detections.append({"image_id": image_id * 10, "category_id": int(rng.choice([1, 4, 9, 12])),
                               "bbox": [float(x), float(y), float(w), float(h)], "near": False})
    detections.append({"image_id": 10, "category_id": 77, "bbox": [1.0, 1.0, 10.0, 10.0], "near": False})
    ranks = rng.permutation(len(detections))  # distinct scores; those near an object above the others
    for det, rank in zip(detections, ranks):
        det["score"] = float(np.float32((rank + 1) / (len(detections) + 1) / 2 + (0.5 if det.pop("near") else 0)))
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _file_based_eval(gt_file: Path, dt_file: Path, category_ids=None):
    """pycocotools the usual way: COCO(file), loadRes(file), COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(str(dt_file))
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        if category_ids is not None:
            evaluation.params.catIds = category_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def test_coco_metrics_equal_pycocotools_file_based(tmp_path):
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(7)
    data, detections = _random_coco_problem(rng)
    gt_file, dt_file = tmp_path / "instances.json", tmp_path / "results.json"
    gt_file.write_text(json.dumps(data))
    dt_file.write_text(json.dumps([detections[i] for i in rng.permutation(len(detections))]))
    reference = _file_based_eval(gt_file, dt_file)

    names = [f"img{i}.jpg" for i in range(1, 9)]
    truth = read_annotations(gt_file, names)
    assert truth.problems == [] and sorted(truth.images) == names
    shards = [dm.DetectionStore(), dm.DetectionStore()]  # two shards, merged as a run would
    for index, name in enumerate(names):
        mine = [d for d in detections if d["image_id"] == (index + 1) * 10]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]
        shards[index % 2].add(name, np.asarray(boxes).reshape(-1, 4), [d["score"] for d in mine],
                              [d["category_id"] for d in mine])
    store = shards[0]
    store.merge(dm.DetectionStore.from_state(shards[1].state_dict()))

    result = dm.coco_evaluate(truth.images, store, truth.categories)
    assert result["stats_raw"] == [float(v) for v in reference.stats]
    assert 0.05 < result["stats"]["AP"] < 0.95 and result["stats"]["AP50"] > result["stats"]["AP75"]
    assert result["images"] == 8 and result["unscored_detections"] == 1
    assert result["detections"] == len(detections) - 1

    for category in truth.categories:  # per class: a single-category run of pycocotools gives its AP and AP50
        got = result["per_class"][category.id]
        if category.id == 12:
            assert got["ap"] is None and got["ap50"] is None and got["detections"] > 0
            assert result["pr_curves"]["precision"][12] is None
            continue
        single = _file_based_eval(gt_file, dt_file, [category.id])
        assert got["ap"] == single.stats[0] and got["ap50"] == single.stats[1]
        k = reference.params.catIds.index(category.id)
        np.testing.assert_array_equal(result["pr_curves"]["precision"][category.id],
                                      reference.eval["precision"][0, :, k, 0, 2])
        np.testing.assert_array_equal(result["pr_curves"]["scores"][category.id],
                                      reference.eval["scores"][0, :, k, 0, 2])
    np.testing.assert_array_equal(result["pr_curves"]["recall"], np.linspace(0, 1, 101))


def test_coco_evaluate_without_detections_and_without_pycocotools(monkeypatch, capsys):
    pytest.importorskip("pycocotools")
    gt = {"a.jpg": _truth([[0, 0, 50, 50]], [1])}
    result = dm.coco_evaluate(gt, {"a.jpg": _pred([], [], [])}, [(1, "x"), (2, "y")])
    assert capsys.readouterr().out == ""  # pycocotools' progress lines are silenced
    assert result["stats"]["AP"] == 0.0 and result["per_class"][1]["ap"] == 0.0
    assert result["per_class"][2]["ap"] is None
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"reportgen\[detection\]"):
        dm.coco_evaluate(gt, {"a.jpg": _pred([], [], [])}, [(1, "x")])


# ------------------------------------------------------------------------------------------- PR / F1 brute force


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _ioa(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return 0.0 if w <= 0 or h <= 0 else w * h / ((a[2] - a[0]) * (a[3] - a[1]))


def _brute_counts(truth, pred, threshold, category):
    """(tp, fp) of one class in one image keeping the predictions with score >= threshold, matched one by one."""
    kept = [i for i in range(len(pred.scores)) if pred.scores[i] >= threshold and pred.labels[i] == category]
    kept.sort(key=lambda i: -pred.scores[i])  # stable: input order on ties
    objects = [g for g in range(len(truth.labels)) if truth.labels[g] == category and not truth.ignore[g]]
    regions = [g for g in range(len(truth.labels)) if truth.labels[g] == category and truth.ignore[g]]
    used, tp, fp = set(), 0, 0
    for i in kept:
        best, best_iou = None, -1.0
        for g in objects:  # the free object of the highest IoU >= 0.5, the first on ties
            value = _iou(pred.boxes[i], truth.boxes[g])
            if g not in used and value >= 0.5 and value > best_iou:
                best, best_iou = g, value
        if best is not None:
            used.add(best)
            tp += 1
        elif not any(_ioa(pred.boxes[i], truth.boxes[g]) >= 0.5 for g in regions):
            fp += 1
    return tp, fp


def _random_scene(rng, images=12, categories=(1, 2, 3)):
    gt, preds = {}, {}
    for i in range(images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 100, (n, 2))
        boxes = np.hstack([xy, xy + rng.uniform(5, 40, (n, 2))])
        labels = rng.choice(categories, n)
        gt[f"{i}.jpg"] = _truth(boxes, labels, rng.random(n) < 0.15)
        pb, pl = [], []
        for box, label in zip(boxes, labels):
            for _ in range(int(rng.integers(0, 3))):
                pb.append(box + rng.normal(0, 4, 4))
                pl.append(label if rng.random() < 0.8 else rng.choice(categories))
        for _ in range(int(rng.integers(0, 3))):
            xy = rng.uniform(0, 100, 2)
            pb.append(np.r_[xy, xy + rng.uniform(5, 40, 2)])
            pl.append(rng.choice(categories))
        scores = np.round(rng.random(len(pl)) * 20) / 20  # coarse: many ties
        preds[f"{i}.jpg"] = _pred(np.asarray(pb).reshape(-1, 4), scores, pl)
    return gt, preds


def test_pr_curves_match_brute_force():
    gt, preds = _random_scene(np.random.default_rng(3))
    categories = [(1, "a"), (2, "b"), (3, "c")]
    result = dm.pr_curves(gt, preds, categories)
    everything = result["all"]
    all_scores = np.unique(np.concatenate([p.scores for p in preds.values()]))
    assert np.all(np.diff(everything["thresholds"]) < 0)  # distinct scores (of predictions not ignored), descending
    assert set(everything["thresholds"]) <= set(all_scores.tolist()) and len(everything["thresholds"]) > 10
    grid = np.r_[1.5, all_scores[::-1], 0.33, -1.0]
    on_grid = dm.pr_curves(gt, preds, categories, thresholds=grid)
    best = (-1.0, None)
    for c, _ in categories:
        objects = sum(int(((t.labels == c) & ~t.ignore).sum()) for t in gt.values())
        assert result["classes"][c]["objects"] == objects
        for curve in (result["classes"][c], on_grid["classes"][c]):
            for t, tp, fp, precision, recall in zip(curve["thresholds"], curve["tp"], curve["fp"],
                                                    curve["precision"], curve["recall"]):
                counts = [_brute_counts(gt[k], preds[k], t, c) for k in gt]
                assert (tp, fp) == tuple(map(sum, zip(*counts))), (c, t)
                assert np.isnan(precision) if tp + fp == 0 else precision == pytest.approx(tp / (tp + fp))
                assert recall == pytest.approx(tp / objects)
    for t, tp, fp in zip(everything["thresholds"], everything["tp"], everything["fp"]):
        counts = [_brute_counts(gt[k], preds[k], t, c) for k in gt for c, _ in categories]
        assert (tp, fp) == tuple(map(sum, zip(*counts)))
        objects = everything["objects"]
        f1 = 2 * tp / (2 * tp + fp + (objects - tp))
        if f1 > best[0] + 1e-12:  # thresholds descend: the highest wins ties
            best = (f1, t)
    assert everything["best"]["threshold"] == best[1]
    assert everything["best"]["f1"] == pytest.approx(best[0])
    assert 0 < everything["best"]["f1"] < 1
    assert np.isnan(on_grid["all"]["precision"][0])  # nothing kept above 1.5


def test_pr_curve_hand_made_with_f1_tie_and_crowd():
    truth = _truth([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 60, 20]], [1, 1, 1], ignore=[False, False, True])
    pred = _pred([[0, 0, 10, 10],  # 0.9 hit
                  [90, 90, 99, 99],  # 0.8 false
                  [42, 2, 50, 10],  # 0.75 inside the crowd region: ignored, no threshold of its own
                  [0, 0, 10, 9],  # 0.7 duplicate: false
                  [20, 0, 30, 10]],  # 0.6 hit
                 [0.9, 0.8, 0.75, 0.7, 0.6], [1, 1, 1, 1, 1])
    curve = dm.pr_curves({"a": truth}, {"a": pred}, [(1, "x")])["classes"][1]
    np.testing.assert_allclose(curve["thresholds"], np.float32([0.9, 0.8, 0.7, 0.6]))
    np.testing.assert_array_equal(curve["tp"], [1, 1, 1, 2])
    np.testing.assert_array_equal(curve["fp"], [0, 1, 2, 2])
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve["recall"], [1 / 2, 1 / 2, 1 / 2, 1])
    # F1 is 2/3 at 0.9 and at 0.6: the higher threshold is the best
    assert curve["best"]["threshold"] == pytest.approx(0.9) and curve["best"]["f1"] == pytest.approx(2 / 3)
    assert curve["objects"] == 2


# ------------------------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_hand_made():
    categories = [(1, "cat"), (2, "dog")]
    truth = _truth([[0, 0, 10, 10],  # cat: found as cat
                    [20, 0, 30, 10],  # dog: two predictions of equal IoU, the higher-scored (dog) wins
                    [40, 0, 50, 10],  # cat: missed
                    [60, 0, 80, 20]],  # dog crowd region
                   [1, 2, 1, 2], ignore=[False, False, False, True])
    pred = _pred([[0, 0, 10, 10],  # cat 0.9 -> (cat, cat)
                  [20, 0, 30, 9],  # cat 0.6, IoU 0.9 with the dog, which the dog box takes -> (background, cat)
                  [21, 0, 30, 10],  # dog 0.8, IoU 0.9 with the dog, the higher score wins the tie -> (dog, dog)
                  [90, 90, 99, 99],  # dog 0.7 on nothing -> (background, dog)
                  [41, 0, 50, 10],  # cat 0.2 below the threshold: not counted
                  [62, 2, 70, 10],  # dog 0.6 inside the crowd region: ignored
                  [0, 0, 5, 5]],  # label 9: no category
                 [0.9, 0.6, 0.8, 0.7, 0.2, 0.6, 0.9], [1, 1, 2, 2, 1, 2, 9])
    result = dm.confusion_matrix({"a.jpg": truth}, {"a.jpg": pred}, categories, score_threshold=0.5)
    expected = np.array([[1, 0, 1],  # cat: 1 as cat, 1 missed
                         [0, 1, 0],  # dog: found as dog (the 0.8 box)
                         [1, 1, 0]])  # background: the unmatched cat box (0.6) and the dog on nothing
    np.testing.assert_array_equal(result["matrix"], expected)
    assert result["names"] == ["cat", "dog", "background"] and result["ids"] == [1, 2, None]
    assert result["ignored"] == 1 and result["unscored_detections"] == 1

    # class-agnostic and greedy by IoU: a worse-scored box of another class that overlaps more wins the object
    truth = _truth([[0, 0, 10, 10]], [1])
    pred = _pred([[0, 0, 10, 6], [0, 0, 10, 9]], [0.9, 0.6], [1, 2])
    result = dm.confusion_matrix({"a": truth}, {"a": pred}, categories, score_threshold=0.5)
    np.testing.assert_array_equal(result["matrix"], [[0, 1, 0], [0, 0, 0], [1, 0, 0]])


# --------------------------------------------------------------------------------------------- per-image errors


def test_image_errors_hand_made():
    truth = _truth([[0, 0, 10, 10],  # 0 cat: hit
                    [20, 0, 30, 10],  # 1 dog: only a cat box on it -> missed
                    [40, 0, 50, 10],  # 2 cat: poorly localised box only -> missed
                    [60, 0, 80, 20]],  # 3 cat ignore region
                   [1, 2, 1, 1], ignore=[False, False, False, True])
    pred = _pred([[0, 0, 10, 10],  # 0: cat 0.9 -> tp on 0
                  [0, 0, 10, 8],  # 1: cat 0.8, IoU 0.8 with the taken cat 0 -> duplicate
                  [20, 0, 30, 10],  # 2: cat 0.7 on the dog -> wrong_class
                  [45, 0, 55, 10],  # 3: cat 0.6, IoU 1/3 with cat 2 -> localization
                  [90, 90, 99, 99],  # 4: dog 0.5 on nothing -> background
                  [62, 2, 70, 10],  # 5: cat 0.4 inside the region -> ignored
                  [40, 0, 50, 10]],  # 6: cat 0.1 exactly on cat 2, below the threshold
                 [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1], [1, 1, 1, 1, 2, 1, 1])
    result = dm.image_errors(truth, pred, score_threshold=0.3)
    assert result["pred_kind"] == ["tp", "duplicate", "wrong_class", "localization", "background", "ignored",
                                   dm.BELOW]
    np.testing.assert_array_equal(result["pred_gt"], [0, 0, 1, 2, -1, -1, -1])
    assert result["gt_kind"] == ["matched", "missed", "missed", "ignored"]
    np.testing.assert_array_equal(result["gt_pred"], [0, -1, -1, -1])
    assert result["counts"] == {"tp": 1, "duplicate": 1, "wrong_class": 1, "localization": 1, "background": 1,
                                "ignored": 1, "missed": 2}

    low = dm.image_errors(truth, pred, score_threshold=0.05)  # the 0.1 box now hits cat 2
    assert low["pred_kind"][6] == "tp" and low["pred_kind"][3] == "localization"
    assert low["gt_kind"] == ["matched", "missed", "matched", "ignored"]
    totals = dm.error_totals({"a": truth, "b": truth}, {"a": pred, "b": pred}, score_threshold=0.3)
    assert totals == {k: 2 * v for k, v in result["counts"].items()}


def test_error_labels_agree_with_pr_counts():
    gt, preds = _random_scene(np.random.default_rng(11))
    categories = [(1, "a"), (2, "b"), (3, "c")]
    totals = dm.error_totals(gt, preds, score_threshold=0.5)
    curve = dm.pr_curves(gt, preds, categories, thresholds=[0.5])["all"]
    assert totals["tp"] == curve["tp"][0]
    errors = totals["duplicate"] + totals["wrong_class"] + totals["localization"] + totals["background"]
    assert errors == curve["fp"][0] and errors > 0
    assert totals["missed"] == curve["objects"] - curve["tp"][0]


# ---------------------------------------------------------------------------------------- without ground truth


def test_prediction_stats():
    preds = {"a": _pred([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 100, 100]], [0.02, 0.5, 1.0], [1, 1, 3]),
             "b": _pred([[0, 0, 31, 31]], [0.75], [3]),
             "c": _pred([], [], [])}
    stats = dm.prediction_stats(preds, score_threshold=0.1, score_bins=4)
    np.testing.assert_array_equal(stats["score_histogram"]["counts"], [1, 0, 1, 2])  # 0.02 | - | 0.5 | .75, 1
    assert stats["detections"] == 3 and stats["images"] == 3
    assert stats["per_class"] == {1: 1, 3: 2}
    np.testing.assert_array_equal(stats["boxes_per_image"]["histogram"], [1, 1, 1])  # 0, 1 and 2 boxes
    assert stats["sizes"] == {"small": 1, "medium": 1, "large": 1}
    assert stats["sizes_per_class"][3] == {"small": 1, "medium": 0, "large": 1}
