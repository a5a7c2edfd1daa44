"""Comparing object detection runs: fake run folders written here in the detection results format
(results/manifest.json, detection_metrics.json, detection_images.csv) are compared through the command users run;
the page's numbers equal the files, the per-image error counts and the sign test equal a plain recount with
math.comb, class lists that differ are compared on the classes all runs have, a segmentation or classifier run mixed
in is refused, and the page passes Chromium and axe-core."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from reportgen.errors import RunError
from reportgen.report.compare_detection import read_detection_images
from reportgen.report.compare_stats import sign_test
from reportgen.runs.compare import compare_runs, main
from tests.browser import AXE, CHROMIUM, open_page
from tests.helpers import binomial_p
from tests.test_compare_segmentation import write_classifier_run
from tests.test_compare_segmentation import write_run as write_segmentation_run

METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
Counts = Tuple[int, int, int]  # (objects, true positives, false positives) of one image
# (category id, name, AP, AP50, ground-truth objects, detections) per class
CLASSES_A = [(1, "person", 0.512345, 0.801234, 120, 140), (2, "bicycle", 0.301234, 0.55, 14, 9),
             (3, "car", 0.451234, 0.72, 60, 75), (10, "traffic light", 0.2, 0.41, 22, 30),
             (44, "bottle", None, None, 0, 3)]
CLASSES_B = [(1, "person", 0.562345, 0.841234, 120, 131), (2, "bicycle", 0.281234, 0.5, 14, 12),
             (3, "car", 0.501234, 0.77, 60, 66), (10, "traffic light", 0.25, 0.46, 22, 25),
             (44, "bottle", None, None, 0, 1)]
METRICS_A = dict(zip(METRIC_KEYS, (0.366012, 0.612345, 0.381234, 0.151234, 0.401234, 0.521234, 0.281234, 0.451234,
                                   0.481234)))
METRICS_B = dict(zip(METRIC_KEYS, (0.398765, 0.643210, 0.412345, 0.182345, 0.432109, 0.553210, 0.301234, 0.472345,
                                   0.501234)))


def write_run(folder: Path, model: str, classes: Sequence[tuple], images: Dict[str, Optional[Counts]],
              metrics: Optional[dict] = None, score_threshold: float = 0.5, task: str = "detection") -> Path:
    """A finished run folder in the detection results format; `images`: path -> (objects, true positives, false
    positives), None for an image without annotations (its counts are empty, as the detection analysis writes)."""
    results = folder / "results"
    results.mkdir(parents=True)
    manifest = {"status": "ok", "command": f"python run.py model={model}",
                "config": {"model": {"name": model}, "dataset": {"root": "/data/streets"}},
                "model": {"name": model, "task": task}, "counts": {"failed": 0}, "images_per_second": 7.5}
    (results / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    labelled = [c for c in images.values() if c is not None]
    totals = {**{key: None for key in METRIC_KEYS}, **((metrics or {}) if labelled else {}),
              "images": len(images), "labelled_images": len(labelled), "score_threshold": score_threshold,
              "per_class": [{"id": i, "name": n, "ap": ap, "ap50": ap50, "ground_truth": gt, "detections": det}
                            for i, n, ap, ap50, gt, det in classes]}
    (results / "detection_metrics.json").write_text(json.dumps(totals), encoding="utf-8")
    with open(results / "detection_images.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labelled", "objects", "detections", "true_positives", "false_positives", "missed"])
        for path, counts in images.items():
            if counts is None:
                writer.writerow([path, 0, "", 4, "", "", ""])
            else:
                objects, tp, fp = counts
                writer.writerow([path, 1, objects, tp + fp, tp, fp, objects - tp])
    (results / "detections.json").write_text("[]", encoding="utf-8")
    (results / "images.json").write_text(json.dumps([{"id": i, "path": p, "width": 64, "height": 48}
                                                     for i, p in enumerate(images)]), encoding="utf-8")
    return folder


def read_rows(run: Path) -> Dict[str, Optional[dict]]:
    """path -> {objects, missed, false_positives} (ints) of the labelled images, None for the others, by plain csv
    reading."""
    with open(run / "results" / "detection_images.csv", newline="", encoding="utf-8") as handle:
        return {row["path"]: {key: int(row[key]) for key in ("objects", "missed", "false_positives")}
                if row["labelled"] == "1" else None for row in csv.DictReader(handle)}


def recount(a: Path, b: Path) -> dict:
    """The per-image comparison of two run folders, by plain Python over their csv files."""
    ra, rb = read_rows(a), read_rows(b)
    paths = sorted(p for p in set(ra) & set(rb) if ra[p] is not None and rb[p] is not None)
    errors_a = {p: ra[p]["missed"] + ra[p]["false_positives"] for p in paths}
    errors_b = {p: rb[p]["missed"] + rb[p]["false_positives"] for p in paths}
    diffs = {p: errors_b[p] - errors_a[p] for p in paths}
    fewer, more = sum(d < 0 for d in diffs.values()), sum(d > 0 for d in diffs.values())

    def row(p: str) -> dict:
        return {"path": p, "objects": ra[p]["objects"], "errors_a": errors_a[p], "errors_b": errors_b[p],
                "missed_a": ra[p]["missed"], "false_positives_a": ra[p]["false_positives"],
                "missed_b": rb[p]["missed"], "false_positives_b": rb[p]["false_positives"]}

    return {"shared": len(set(ra) & set(rb)), "paired": len(paths), "fewer": fewer, "more": more,
            "tied": len(paths) - fewer - more, "mean_difference": sum(diffs.values()) / len(paths),
            "errors_a": sum(errors_a.values()), "errors_b": sum(errors_b.values()),
            "missed_a": sum(ra[p]["missed"] for p in paths), "missed_b": sum(rb[p]["missed"] for p in paths),
            "false_positives_a": sum(ra[p]["false_positives"] for p in paths),
            "false_positives_b": sum(rb[p]["false_positives"] for p in paths),
            "sign_p": binomial_p(fewer, more),
            "largest_gains": [row(p) for p in sorted((p for p in paths if diffs[p] < 0), key=lambda p: diffs[p])[:5]],
            "largest_losses": [row(p) for p in sorted((p for p in paths if diffs[p] > 0), key=lambda p: -diffs[p])[:5]]}


def image_sets(seed: int, fewer: int, more: int, tied: int) -> tuple:
    """Per-image counts of runs a and b: b makes fewer errors on `fewer` images, more on `more`, as many on `tied`
    (by moving a detection between true and false positive, or adding a false positive); plus two images without
    annotations, one image only a has and one that only b has annotations for."""
    rng = random.Random(seed)
    a: Dict[str, Optional[Counts]] = {}
    b: Dict[str, Optional[Counts]] = {}
    signs = [-1] * fewer + [1] * more + [0] * tied
    rng.shuffle(signs)
    for i, sign in enumerate(signs):
        path = f"street/{i:03d}.jpg"
        objects = rng.randint(2, 9)
        tp, fp = rng.randint(1, objects - 1), rng.randint(1, 4)
        a[path] = (objects, tp, fp)
        step = rng.randint(1, 3)
        if sign < 0:  # b finds more objects (and makes no more false positives): fewer errors
            b[path] = (objects, min(objects, tp + step), max(0, fp - rng.randint(0, 1)))
        elif sign > 0:  # b makes more false positives
            b[path] = (objects, tp, fp + step)
        else:  # one more object found, one more false positive: as many errors, other counts
            b[path] = (objects, tp + 1, fp + 1) if rng.random() < 0.5 else (objects, tp, fp)
    a["street/nolabel_0.jpg"] = b["street/nolabel_0.jpg"] = None
    a["street/nolabel_1.jpg"] = b["street/nolabel_1.jpg"] = None
    a["street/only_a.jpg"] = (3, 1, 1)
    a["street/half.jpg"], b["street/half.jpg"] = None, (4, 2, 0)
    return a, b


@pytest.fixture
def two_runs(tmp_path) -> List[Path]:
    images_a, images_b = image_sets(seed=1, fewer=29, more=7, tied=4)
    return [write_run(tmp_path / "a", "det_a", CLASSES_A, images_a, metrics=METRICS_A),
            write_run(tmp_path / "b", "det_b", CLASSES_B, images_b, metrics=METRICS_B)]


def test_sign_test_equals_a_brute_force_binomial():
    for n in range(0, 41):
        for k in range(n + 1):
            assert sign_test(k, n - k) == pytest.approx(binomial_p(k, n - k), rel=1e-12), (k, n)


def test_two_detection_runs_page_and_data_equal_the_files(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    assert "comparison:" in capsys.readouterr().out
    data = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert data["task"] == "detection"
    assert [r["name"] for r in data["runs"]] == ["model=det_a", "model=det_b"]
    for entry, run in zip(data["runs"], two_runs):
        own = json.loads((run / "results" / "detection_metrics.json").read_text(encoding="utf-8"))
        for key in (*METRIC_KEYS, "images", "labelled_images", "score_threshold"):
            assert entry[key] == own[key], key
    classes = data["classes"]
    assert classes["compared"] == [c[1] for c in CLASSES_A] and classes["missing"] == {}
    for (_, name, ap_a, ap50_a, gt, _), (_, _, ap_b, ap50_b, _, _) in zip(CLASSES_A, CLASSES_B):
        assert classes["ap"][name] == {"model=det_a": ap_a, "model=det_b": ap_b}
        assert classes["ap50"][name] == {"model=det_a": ap50_a, "model=det_b": ap50_b}
        assert classes["objects"][name] == gt

    [pair] = data["pairs"]
    expected = recount(*two_runs)
    assert (expected["fewer"], expected["more"], expected["tied"], expected["paired"]) == (29, 7, 4, 40)
    assert expected["shared"] == 43  # 40 + two without annotations + one with annotations in b only
    for key, value in expected.items():
        if isinstance(value, list):  # the images with the largest differences: paths and counts as in the files
            assert pair[key] == value and len(value) == 5, key
        else:
            assert pair[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert pair["sign_p"] == pytest.approx(binomial_p(29, 7), rel=1e-12)
    assert pair["sign_p"] < 0.001 and pair["winner"] == "model=det_b" and pair["objects_differ"] == 0

    html = (out / "index.html").read_text(encoding="utf-8")
    for metrics in (METRICS_A, METRICS_B):
        for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
            assert f"{100 * metrics[key]:.2f}%" in html, key
    for header in ("mAP", "AP50", "AP75", "AP small", "AP medium", "AP large", "AR@100", "score threshold",
                   "GFLOPs/img", "images/s"):
        assert f'<th scope="col">{header}</th>' in html, header
    assert (f"model=det_b makes fewer errors (missed objects + false positives) than model=det_a on 29 of 40 images "
            f"(more on 7, as many on 4; {expected['errors_b']} against {expected['errors_a']} errors in all); sign "
            f"test p &lt; 0.001: model=det_b makes fewer errors.") in html
    assert f"{expected['mean_difference']:+.3f} errors per image" in html
    for row in expected["largest_gains"] + expected["largest_losses"]:
        assert row["path"] in html
    assert "street/only_a.jpg" not in html and "street/half.jpg" not in html  # never paired

    with open(out / "per_class.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == [c[1] for c in CLASSES_A]
    assert [r["model=det_b: ap"] for r in rows] == ["" if c[2] is None else str(c[2]) for c in CLASSES_B]
    assert [r["model=det_a: ap50"] for r in rows] == ["" if c[3] is None else str(c[3]) for c in CLASSES_A]
    assert [int(r["model=det_b: detections"]) for r in rows] == [c[5] for c in CLASSES_B]
    with open(out / "comparison.csv", newline="", encoding="utf-8") as handle:
        images = {r["path"]: r for r in csv.DictReader(handle)}
    b = read_rows(two_runs[1])
    assert set(images) == set(read_rows(two_runs[0])) & set(b)
    for path, row in images.items():
        if b[path] is None:
            assert row["model=det_b: errors"] == row["model=det_b: missed"] == "" and row["model=det_b: detections"]
        else:
            assert int(row["model=det_b: errors"]) == b[path]["missed"] + b[path]["false_positives"], path
            assert int(row["model=det_b: missed"]) == b[path]["missed"], path


def test_a_balanced_pair_is_no_significant_difference_and_a_worse_b_loses(tmp_path):
    images_a, images_b = image_sets(seed=2, fewer=6, more=4, tied=2)
    runs = [write_run(tmp_path / "a", "det_a", CLASSES_A, images_a, metrics=METRICS_A),
            write_run(tmp_path / "b", "det_b", CLASSES_A, images_b, metrics=METRICS_A)]
    page = compare_runs(runs, tmp_path / "cmp")
    [pair] = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))["pairs"]
    assert (pair["fewer"], pair["more"], pair["tied"]) == (6, 4, 2)
    assert pair["sign_p"] == pytest.approx(binomial_p(6, 4), rel=1e-12) and pair["sign_p"] > 0.5
    assert pair["winner"] is None
    html = page.read_text(encoding="utf-8")
    assert f"sign test p = {pair['sign_p']:.3g}: no significant difference." in html

    images_a, images_b = image_sets(seed=3, fewer=2, more=18, tied=5)  # b makes more errors: a wins
    runs = [write_run(tmp_path / "c", "det_a", CLASSES_A, images_a, metrics=METRICS_A),
            write_run(tmp_path / "d", "det_b", CLASSES_A, images_b, metrics=METRICS_A)]
    compare_runs(runs, tmp_path / "cmp2")
    [pair] = json.loads((tmp_path / "cmp2" / "comparison.json").read_text(encoding="utf-8"))["pairs"]
    assert (pair["fewer"], pair["more"]) == (2, 18) and pair["winner"] == "model=det_a"
    assert pair["sign_p"] == pytest.approx(binomial_p(2, 18), rel=1e-12) and pair["sign_p"] < 0.001
    assert pair["sentence"].endswith("sign test p < 0.001: model=det_a makes fewer errors.")


def test_class_lists_that_differ_are_compared_on_the_shared_classes(two_runs, tmp_path):
    # a third run: other ids and order, "traffic light" spelled otherwise, no "bottle", an extra "dog"
    classes_c = [(3, "Car", 0.61, 0.8, 60, 70), (1, "person", 0.44, 0.7, 120, 150), (18, "dog", 0.33, 0.5, 5, 6),
                 (2, "bicycle", None, None, 0, 0), (7, "traffic_light", 0.12, 0.3, 22, 40)]
    images_a = {p: (None if v is None else (v["objects"], v["objects"] - v["missed"], v["false_positives"]))
                for p, v in read_rows(two_runs[0]).items()}
    images_c = {p: (None if v is None else (v[0], v[0], v[2] + 1)) for p, v in images_a.items()}
    third = write_run(tmp_path / "c", "det_c", classes_c, images_c, metrics=METRICS_B)
    page = compare_runs([*two_runs, third], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    classes = data["classes"]
    assert classes["compared"] == ["person", "bicycle", "car", "traffic light"]
    assert classes["missing"] == {"model=det_a": ["dog"], "model=det_b": ["dog"], "model=det_c": ["bottle"]}
    by_name = {c[1].lower().replace("_", " "): c for c in classes_c}
    for cls in classes["compared"]:
        assert classes["ap"][cls]["model=det_c"] == by_name[cls][2], cls
        assert classes["ap50"][cls]["model=det_c"] == by_name[cls][3], cls
        assert classes["ap"][cls]["model=det_a"] == next(c[2] for c in CLASSES_A if c[1] == cls), cls
    assert [(p["a"], p["b"]) for p in data["pairs"]] == [("model=det_a", "model=det_b"), ("model=det_a", "model=det_c"),
                                                         ("model=det_b", "model=det_c")]
    expected = recount(two_runs[0], third)
    for key in ("paired", "fewer", "more", "tied", "sign_p", "mean_difference", "errors_a", "errors_b"):
        assert data["pairs"][1][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    smallest = min(p["sign_p"] for p in data["pairs"])
    assert min(p["sign_p_holm"] for p in data["pairs"]) == pytest.approx(min(1.0, 3 * smallest))
    html = page.read_text(encoding="utf-8")
    assert "model=det_c has no class bottle (another run has)" in html
    assert "model=det_a has no class dog (another run has)" in html
    assert "the per-class comparison is over the 4 classes every run has" in html
    with open(tmp_path / "cmp" / "per_class.csv", newline="", encoding="utf-8") as handle:
        rows = {r["class"]: r for r in csv.DictReader(handle)}
    assert rows["bicycle"]["model=det_c: ap"] == "" and rows["bicycle"]["ap_spread"] == ""


def test_thresholds_and_a_run_without_annotations_are_said(two_runs, tmp_path):
    unlabelled = {p: None for p in read_rows(two_runs[0])}
    third = write_run(tmp_path / "c", "det_c", CLASSES_A, unlabelled, metrics=METRICS_B, score_threshold=0.3)
    page = compare_runs([*two_runs, third], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    assert data["runs"][2]["map"] is None and data["runs"][2]["labelled_images"] == 0
    assert [p["paired"] for p in data["pairs"]] == [40, 0, 0]
    assert data["pairs"][1]["sign_p"] == 1.0 and data["pairs"][1]["winner"] is None
    html = page.read_text(encoding="utf-8")
    assert "model=det_c had no annotations (0 labelled images)" in html
    assert "count per-image errors at different score thresholds (model=det_a: 0.5, model=det_b: 0.5, model=det_c: " \
           "0.3)" in html
    assert "No image is labelled in both model=det_a and model=det_c (44 shared images)" in html


@pytest.mark.parametrize("other", ["segmentation", "classification"])
def test_a_run_of_another_task_mixed_with_detection_runs_is_refused(two_runs, tmp_path, capsys, other):
    if other == "segmentation":
        stranger = write_segmentation_run(tmp_path / "seg", "deeplab", ["background", "car"], [0.9, 0.5],
                                          {"street/000.jpg": 0.7}, metrics={"miou": 0.7})
    else:
        stranger = write_classifier_run(tmp_path / "clf", "resnet18")
    name = "model=deeplab" if other == "segmentation" else "model=resnet18"
    assert main([str(two_runs[0]), str(stranger), "--out", str(tmp_path / "cmp")]) == 2
    error = capsys.readouterr().err
    assert "runs of different tasks cannot be compared" in error
    assert "model=det_a is detection" in error and f"{name} is {other}" in error
    assert "compare detection runs only with detection runs" in error
    assert not (tmp_path / "cmp" / "index.html").exists()
    with pytest.raises(RunError, match=f"{name} is {other}"):
        compare_runs([stranger, *two_runs], tmp_path / "cmp")


def test_a_detection_run_without_its_per_image_file_is_named(two_runs, tmp_path):
    (two_runs[1] / "results" / "detection_images.csv").unlink()
    with pytest.raises(RunError, match=r"need results/detection_metrics.json and results/detection_images.csv; "
                                       r"missing in model=det_b"):
        compare_runs(two_runs, tmp_path / "cmp")


def test_a_count_that_is_not_a_count_is_refused(tmp_path):
    path = tmp_path / "detection_images.csv"
    path.write_text("path,labelled,objects,detections,true_positives,false_positives,missed\n"
                    "a.jpg,1,3,2,1,1.5,2\n", encoding="utf-8")
    with pytest.raises(RunError, match="a count column holds something else"):
        read_detection_images(path)
    path.write_text("path,labelled,objects,detections\na.jpg,1,3,2\n", encoding="utf-8")
    with pytest.raises(RunError, match=r"lacks the column\(s\) \['false_positives', 'missed', 'true_positives'\]"):
        read_detection_images(path)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make system-deps)")
def test_detection_comparison_page_in_chromium_with_axe(two_runs, tmp_path):
    if AXE is None:
        pytest.skip("axe-core is not installed (make system-deps runs npm install; node/npm missing?)")
    page = compare_runs(two_runs, tmp_path / "cmp")
    check = open_page(page, allowed_root=tmp_path)
    assert check.console_errors == [] and check.page_errors == [] and check.dialogs == []
    assert check.outside_requests == [] and check.broken_images == [] and check.pending_images == []
    assert check.missing_anchors == [] and check.images == 2  # the per-class bars and the pair's histogram
    assert check.accessibility == [], check.accessibility
