"""Detectors end to end: the detections equal a plain loop of the library's model and post-processing, the metrics
equal pycocotools' COCOeval run by plain code on detections.json and the annotations, YOLO and VOC copies of the
annotations give the same numbers, shards merge to the single run, and the reports open clean in Chromium with
the boxes drawn where the results file puts them."""
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reportgen.runs.merge import main as merge_main
from reportgen.runs.pipeline import run
from tests.det_scenes import (DET_IMAGES, DETECTOR_KWARGS, UNLABELLED, build_detector, make_det_folder,
                              save_spread_detector)
from tests.helpers import compose_config

pytest.importorskip("pycocotools")
FAST = ["runtime.num_workers=0", "runtime.progress=false", "analysis=[summary,detection]",
        "analysis.detection.metrics_threshold=0.0", "analysis.detection.score_threshold=0.2",
        "analysis.detection.gallery=3", "analysis.detection.cam_images=2", "analysis.detection.cam_boxes=2",
        "report.image_format=png"]
KWARGS = [f"+model.kwargs.{k}={v}" for k, v in DETECTOR_KWARGS.items()]


@pytest.fixture(scope="module")
def det_folder(tmp_path_factory):
    return make_det_folder(tmp_path_factory.mktemp("det"))


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return save_spread_detector(tmp_path_factory.mktemp("ckpt") / "frcnn.pt")


# the hand-made detector of the scenes (tests/det_scenes.py): real hits and mistakes, so the metrics are not 0
COLOUR_DETECTOR = ["model=target", "model.target._target_=tests.det_scenes.colour_box_detector",
                   "model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]"]


def det_run(folder, checkpoint, out, annotations="instances.json", extra=()):
    """A report of the Faster R-CNN checkpoint (`checkpoint`) or, with checkpoint None, of the colour detector."""
    model = (["model=checkpoint", "model.arch=fasterrcnn_mobilenet_v3_large_320_fpn", f"model.path={checkpoint}",
              *KWARGS] if checkpoint is not None else COLOUR_DETECTOR)
    overrides = [*model, f"dataset.root={folder / 'images'}", "runtime.batch_size=3", *FAST, *extra]
    if annotations:
        overrides.append(f"dataset.annotations={folder / annotations}")
    return run(compose_config(overrides), out_dir=out)


@pytest.fixture(scope="module")
def coco_run(det_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_run")
    det_run(det_folder, None, out)
    return out


def plain_detections(folder: Path, checkpoint: Path):
    """path -> (boxes, scores, labels) of the model called on each image alone, as torchvision documents it."""
    model = build_detector()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    found = {}
    for name, _ in DET_IMAGES:
        with Image.open(folder / "images" / name) as image:
            x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255  # (3, H, W)
        with torch.no_grad():
            out = model([x])[0]
        found[name] = (out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy())
    return found


def test_detections_equal_a_plain_loop(det_folder, detector, tmp_path):
    det_run(det_folder, detector, tmp_path / "run")
    results = tmp_path / "run" / "results"
    ids = {entry["id"]: entry for entry in json.loads((results / "images.json").read_text())}
    rows = json.loads((results / "detections.json").read_text())
    plain = plain_detections(det_folder, detector)
    assert {e["path"] for e in ids.values()} == {name for name, _ in DET_IMAGES}
    for image_id, entry in ids.items():
        assert (entry["height"], entry["width"]) == dict(DET_IMAGES)[entry["path"]]
        boxes, scores, labels = plain[entry["path"]]
        mine = [r for r in rows if r["image_id"] == image_id]
        # the run scores the labels the annotations have (person 1, car 3, dog 18: torchvision's COCO ids)
        kept = np.isin(labels, [1, 3, 18])
        assert len(mine) == int(kept.sum())
        order = np.argsort(-scores[kept], kind="stable")
        expected_boxes = boxes[kept][order]
        got = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
        np.testing.assert_allclose(got, expected_boxes, atol=2e-3)  # batched with equal sizes vs one at a time
        np.testing.assert_allclose([r["score"] for r in mine], scores[kept][order], atol=1e-5)
        assert [r["category_id"] for r in mine] == labels[kept][order].tolist()
    assert len(rows) > 5


def test_metrics_equal_cocoeval_on_the_results_files(det_folder, coco_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = coco_run / "results"
    ids = {entry["path"]: entry["id"] for entry in json.loads((results / "images.json").read_text())}
    original = json.loads((det_folder / "instances.json").read_text())
    renumber = {image["id"]: ids[image["file_name"]] for image in original["images"]}
    gt = {"images": [dict(image, id=renumber[image["id"]]) for image in original["images"]],
          "annotations": [dict(a, image_id=renumber[a["image_id"]]) for a in original["annotations"]],
          "categories": original["categories"]}
    labelled = set(renumber.values())  # detections.json holds the unlabelled image's detections too
    detections = [d for d in json.loads((results / "detections.json").read_text()) if d["image_id"] in labelled]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    metrics = json.loads((results / "detection_metrics.json").read_text())
    assert 0.2 < metrics["map_50"] < 1.0 and metrics["mar_100"] > 0.2  # hits and mistakes: a real test of ids
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]
    for key, value in zip(keys, evaluation.stats[:9]):
        assert metrics[key] == (None if value == -1 else pytest.approx(float(value), abs=1e-12)), key
    assert metrics["labelled_images"] == len(DET_IMAGES) - 1
    rows = {r["path"]: r for r in csv.DictReader((results / "detection_images.csv").open(encoding="utf-8"))}
    assert rows[UNLABELLED]["labelled"] == "0" and rows["a.png"]["labelled"] == "1"
    objects = sum(1 for a in original["annotations"])
    assert sum(int(r["objects"]) for r in rows.values() if r["labelled"] == "1") == objects
    for r in rows.values():
        if r["labelled"] == "1":
            assert int(r["true_positives"]) + int(r["missed"]) == int(r["objects"])


@pytest.mark.parametrize("copy", ["yolo", "voc"])
def test_yolo_and_voc_copies_give_the_same_numbers(det_folder, coco_run, copy, tmp_path):
    det_run(det_folder, None, tmp_path / copy, annotations=copy)
    coco = json.loads((coco_run / "results" / "detection_metrics.json").read_text())
    other = json.loads((tmp_path / copy / "results" / "detection_metrics.json").read_text())
    for key in ("map", "map_50", "map_75", "mar_1", "mar_10", "mar_100", "labelled_images"):
        assert other[key] == pytest.approx(coco[key], abs=1e-9), key
    by_name = {c["name"]: c for c in coco["per_class"]}
    for entry in other["per_class"]:
        assert entry["ap"] == pytest.approx(by_name[entry["name"]]["ap"], abs=1e-9)
        assert entry["ground_truth"] == by_name[entry["name"]]["ground_truth"]


def test_detection_shards_merge_to_the_single_run(det_folder, coco_run, tmp_path):
    for shard in range(2):
        det_run(det_folder, None, tmp_path / "sweep" / str(shard), extra=[f"runtime.shard={shard}/2"])
    assert merge_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "merged")]) == 0
    for name in ("detection_metrics.json", "images.json", "detection_images.csv"):
        assert (tmp_path / "merged" / "results" / name).read_text() == (coco_run / "results" / name).read_text()
    whole = json.loads((coco_run / "results" / "detections.json").read_text())
    merged = json.loads((tmp_path / "merged" / "results" / "detections.json").read_text())
    assert len(whole) == len(merged)
    for a, b in zip(whole, merged):  # batches differ between the runs: equal-size images batched otherwise
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=2e-3)


def test_report_without_annotations_counts_predictions(det_folder, tmp_path):
    det_run(det_folder, None, tmp_path / "run", annotations=None)
    results = tmp_path / "run" / "results"
    assert not (results / "detection_metrics.json").exists()
    rows = json.loads((results / "detections.json").read_text())
    assert rows and len({r["image_id"] for r in rows}) == len(DET_IMAGES)
    html = (tmp_path / "run" / "report" / "index.html").read_text(encoding="utf-8")
    assert "no annotations: nothing is scored" in html


DETECTORS = {  # torchvision's families, random weights, small and fast, with no score floor and a low cap
    "fasterrcnn": ["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=null", *KWARGS],
    "retinanet": ["model=retinanet_resnet50_fpn_v2", "model.weights=null", "+model.kwargs.score_thresh=0.0",
                  "+model.kwargs.detections_per_img=8", "+model.kwargs.min_size=128", "+model.kwargs.max_size=160",
                  "+model.kwargs.topk_candidates=50"],
    "ssdlite": ["model=ssdlite320_mobilenet_v3_large", "model.weights=null", "+model.kwargs.score_thresh=0.0",
                "+model.kwargs.detections_per_img=8", "+model.kwargs.topk_candidates=50"],
    "detr": ["model=hf"],  # model.path: the tiny DETR folder, added in the test
}


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_detector_reports_open_clean_with_boxes_where_the_results_put_them(kind, det_folder, tmp_path):
    """Faster R-CNN, RetinaNet, SSDlite and DETR reports (no annotations: every frame is a plain prediction's blue)
    open in Chromium without an error, and the highest-scoring box of each gallery image is framed where
    detections.json puts it."""
    import re

    from reportgen.report.detection_drawing import KIND_COLOURS
    from tests.browser import CHROMIUM, open_page
    from tests.test_browser import assert_clean

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (make system-deps / apt-get install chromium)")
    overrides = list(DETECTORS[kind])
    if kind == "detr":
        pytest.importorskip("transformers")
        from tests.det_scenes import save_tiny_detr

        save_tiny_detr(tmp_path / "detr")
        overrides.append(f"model.path={tmp_path / 'detr'}")
    index = run(compose_config([*overrides, f"dataset.root={det_folder / 'images'}", "runtime.batch_size=3",
                                *FAST, "analysis.detection.score_threshold=0.0"]), out_dir=tmp_path / "run")
    assert_clean(open_page(index))
    html = index.read_text(encoding="utf-8")
    if kind != "detr":  # torchvision's: the second pass explains boxes; DETR has no `backbone`: a line says so
        assert "What the detector looked at" in html and "Grad-CAM: " in html and "EigenCAM" in html
    results = tmp_path / "run" / "results"
    paths = {e["id"]: e["path"] for e in json.loads((results / "images.json").read_text())}
    best = {}
    for row in json.loads((results / "detections.json").read_text()):
        if row["image_id"] not in best or row["score"] > best[row["image_id"]]["score"]:
            best[row["image_id"]] = row
    shown = re.findall(r'<a class="zoom" href="([^"]+)"[^>]*><img src="[^"]+" alt="([^"]+)"', html)
    assert shown
    blue = np.array(KIND_COLOURS["unscored"])
    for full, path in shown:
        image_id = next(i for i, p in paths.items() if p == path)
        x, y, w, h = best[image_id]["bbox"]
        pixels = np.asarray(Image.open(index.parent / full).convert("RGB")).astype(int)  # (H, W, 3)
        height, width = pixels.shape[:2]
        rows = [r for r in range(int(y + h) - 2, int(y + h) + 2) if 0 <= r < height]  # the bottom edge's band
        columns = range(max(int(x) + 3, 0), min(int(x + w) - 3, width))
        if len(columns) < 3:
            continue
        on_frame = np.mean([any(np.abs(pixels[r, c] - blue).max() <= 2 for r in rows) for c in columns])
        assert on_frame > 0.5, (kind, path, on_frame)


def test_detr_folder_detections_equal_its_processor(det_folder, tmp_path):
    """A transformers DETR folder: the processor's own resize (shortest 64, longest 96, no crop) and
    post_process_object_detection at each image's size, reproduced by the report."""
    transformers = pytest.importorskip("transformers")
    from tests.det_scenes import save_tiny_detr

    model = save_tiny_detr(tmp_path / "detr")
    run(compose_config(["model=hf", f"model.path={tmp_path / 'detr'}", f"dataset.root={det_folder / 'images'}",
                        "runtime.batch_size=3", *FAST]), out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results"
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["model"]["task"] == "detection"
    assert manifest["model"]["preprocess"]["crop_mode"] == "whole" and manifest["model"]["preprocess"]["max_size"] == 96
    ids = {e["path"]: e["id"] for e in json.loads((results / "images.json").read_text())}
    rows = json.loads((results / "detections.json").read_text())
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "detr"), backend="pil")
    for name, (height, width) in DET_IMAGES:
        with Image.open(det_folder / "images" / name) as image:
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            found = processor.post_process_object_detection(model(**inputs), threshold=0.0,
                                                            target_sizes=[(height, width)])[0]
        keep = np.isin(found["labels"].numpy(), [1, 3, 18])  # the annotations' classes are scored
        order = np.argsort(-found["scores"].numpy()[keep], kind="stable")
        mine = [r for r in rows if r["image_id"] == ids[name]]
        assert len(mine) == int(keep.sum()) > 0
        np.testing.assert_allclose([r["score"] for r in mine], found["scores"].numpy()[keep][order], atol=1e-4)
        expected = found["boxes"].numpy()[keep][order]
        got = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
        np.testing.assert_allclose(got, expected, atol=0.05)  # float rounding of the input-to-image scaling
