"""Comparing semantic segmentation runs: fake run folders written here in the segmentation results format
(results/manifest.json, segmentation.json, segmentation_images.csv) are compared through the command users run;
the page's numbers equal the files, the per-image counts and the sign test equal a plain recount with math.comb,
class lists that differ are compared on the classes all runs have, a classifier run mixed in is refused, and the
page passes Chromium and axe-core."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from reportgen.errors import RunError
from reportgen.report.compare_stats import sign_test
from reportgen.runs.compare import compare_runs, main
from tests.browser import AXE, CHROMIUM, open_page
from tests.helpers import binomial_p

CLASSES = ["background", "road", "sky", "car", "person"]


def write_run(folder: Path, model: str, class_names: Sequence[str], class_iou: Sequence[Optional[float]],
              images: Dict[str, Optional[float]], task: str = "segmentation", metrics: Optional[dict] = None) -> Path:
    """A finished run folder in the segmentation results format; `images`: path -> IoU (None: no mask)."""
    results = folder / "results"
    results.mkdir(parents=True)
    manifest = {"status": "ok", "command": f"python run.py model={model}",
                "config": {"model": {"name": model}, "dataset": {"root": "/data/streets"}},
                "model": {"name": model, "task": task}, "counts": {"failed": 0}}
    (results / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    labelled = [iou for iou in images.values() if iou is not None]
    totals = {"miou": None, "pixel_accuracy": None, "mean_accuracy": None, "fw_iou": None, "labelled_pixels": 0,
              "labelled_images": len(labelled), "images": len(images), "class_names": list(class_names),
              "ignore_index": 255,
              "per_class": [{"iou": iou, "accuracy": None if iou is None else min(1.0, iou + 0.05),
                             "pixels": 1000 * (i + 1), "predicted_pixels": 900 * (i + 1)}
                            for i, iou in enumerate(class_iou)]}
    if labelled:
        totals.update(metrics or {})
        totals["labelled_pixels"] = 4096 * len(labelled)
    (results / "segmentation.json").write_text(json.dumps(totals), encoding="utf-8")
    with open(results / "segmentation_images.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "iou", "pixel_accuracy", "labelled", "classes_present", "classes_predicted"])
        for path, iou in images.items():
            writer.writerow([path, "" if iou is None else repr(iou), "" if iou is None else repr(min(1.0, iou + 0.1)),
                             0 if iou is None else 1, "" if iou is None else "0 1 2", "0 1 3"])
    return folder


def write_classifier_run(folder: Path, model: str, task: str = "classification") -> Path:
    """A finished classifier (or backbone) run folder with a one-image predictions.csv."""
    results = folder / "results"
    results.mkdir(parents=True)
    manifest = {"status": "ok", "command": f"python run.py model={model}",
                "config": {"model": {"name": model}, "dataset": {"root": "/data/streets"}},
                "model": {"name": model, "task": task}}
    (results / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    if task == "classification":
        (results / "predictions.csv").write_text(
            "path,label,top1_index,top1_name,top1_prob,topk_indices,topk_names,topk_probs\n"
            "a/0.png,cat,0,cat,0.9,0 1,cat|dog,0.9 0.1\n", encoding="utf-8")
        (results / "predictions.json").write_text(json.dumps({"top_k": 2, "per_class_accuracy": {"cat": 1.0}}),
                                                  encoding="utf-8")
    return folder


def read_images(run: Path) -> Dict[str, Optional[float]]:
    """path -> IoU of the labelled images, None for the others, by plain csv reading."""
    with open(run / "results" / "segmentation_images.csv", newline="", encoding="utf-8") as handle:
        return {row["path"]: float(row["iou"]) if row["labelled"] == "1" and row["iou"] else None
                for row in csv.DictReader(handle)}


def recount(a: Path, b: Path) -> dict:
    """The per-image comparison of two run folders, by plain Python over their csv files."""
    ia, ib = read_images(a), read_images(b)
    paths = sorted(p for p in set(ia) & set(ib) if ia[p] is not None and ib[p] is not None)
    diffs = {p: ib[p] - ia[p] for p in paths}
    better = sum(d > 0 for d in diffs.values())
    worse = sum(d < 0 for d in diffs.values())
    gains = sorted((p for p in paths if diffs[p] > 0), key=lambda p: -diffs[p])[:5]
    losses = sorted((p for p in paths if diffs[p] < 0), key=lambda p: diffs[p])[:5]
    return {"shared": len(set(ia) & set(ib)), "paired": len(paths), "better": better, "worse": worse,
            "tied": len(paths) - better - worse, "mean_difference": sum(diffs.values()) / len(paths),
            "sign_p": binomial_p(better, worse),
            "largest_gains": [{"path": p, "iou_a": ia[p], "iou_b": ib[p]} for p in gains],
            "largest_losses": [{"path": p, "iou_a": ia[p], "iou_b": ib[p]} for p in losses]}


def image_sets(seed: int, better: int, worse: int, tied: int) -> tuple:
    """Per-image IoUs of runs a and b: b higher on `better` images, lower on `worse`, equal on `tied`; plus two
    images without masks, one image only a has and one that only b has a mask for."""
    rng = random.Random(seed)
    a: Dict[str, Optional[float]] = {}
    b: Dict[str, Optional[float]] = {}
    signs = [1] * better + [-1] * worse + [0] * tied
    rng.shuffle(signs)
    for i, sign in enumerate(signs):
        path = f"city/{i:03d}.png"
        a[path] = round(rng.uniform(0.2, 0.8), 6)
        b[path] = round(a[path] + sign * rng.uniform(0.01, 0.19), 6)
    a["city/nomask_0.png"] = b["city/nomask_0.png"] = None
    a["city/nomask_1.png"] = b["city/nomask_1.png"] = None
    a["city/only_a.png"] = 0.5
    a["city/half.png"], b["city/half.png"] = None, 0.7
    return a, b


METRICS_A = {"miou": 0.412345, "pixel_accuracy": 0.871234, "mean_accuracy": 0.523456, "fw_iou": 0.781234}
METRICS_B = {"miou": 0.498765, "pixel_accuracy": 0.902345, "mean_accuracy": 0.601234, "fw_iou": 0.812345}
IOU_A = [0.91, 0.62, 0.85, 0.33, None]
IOU_B = [0.93, 0.71, 0.88, 0.41, 0.12]


@pytest.fixture
def two_runs(tmp_path) -> List[Path]:
    images_a, images_b = image_sets(seed=1, better=31, worse=6, tied=3)
    return [write_run(tmp_path / "a", "seg_a", CLASSES, IOU_A, images_a, metrics=METRICS_A),
            write_run(tmp_path / "b", "seg_b", CLASSES, IOU_B, images_b, metrics=METRICS_B)]


def test_two_segmentation_runs_page_and_data_equal_the_files(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    assert "comparison:" in capsys.readouterr().out
    data = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert data["task"] == "segmentation"
    assert [r["name"] for r in data["runs"]] == ["model=seg_a", "model=seg_b"]
    for entry, run in zip(data["runs"], two_runs):
        own = json.loads((run / "results" / "segmentation.json").read_text(encoding="utf-8"))
        for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "labelled_images", "images"):
            assert entry[key] == own[key], key
    assert data["classes"]["compared"] == CLASSES and data["classes"]["missing"] == {}
    for i, cls in enumerate(CLASSES):
        assert data["classes"]["iou"][cls] == {"model=seg_a": IOU_A[i], "model=seg_b": IOU_B[i]}

    [pair] = data["pairs"]
    expected = recount(*two_runs)
    assert (expected["better"], expected["worse"], expected["tied"], expected["paired"]) == (31, 6, 3, 40)
    assert expected["shared"] == 43  # 40 + two without masks + one with a mask in b only
    for key, value in expected.items():
        if isinstance(value, list):  # the images with the largest differences: paths and IoUs as in the files
            assert pair[key] == value and len(value) == 5, key
        else:
            assert pair[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert pair["sign_p"] < 0.001 and pair["winner"] == "model=seg_b"
    assert sign_test(31, 6) == pytest.approx(binomial_p(31, 6), rel=1e-12)

    html = (out / "index.html").read_text(encoding="utf-8")
    for metrics in (METRICS_A, METRICS_B):
        for value in metrics.values():
            assert f"{100 * value:.2f}%" in html
    assert ("model=seg_b has a higher per-image IoU than model=seg_a on 31 of 40 images (lower on 6, equal on 3); "
            "sign test p &lt; 0.001: model=seg_b is better.") in html
    assert f"{pair['mean_difference']:+.4f}" in html
    for row in expected["largest_gains"] + expected["largest_losses"]:
        assert row["path"] in html
    assert "city/only_a.png" not in html  # never paired
    with open(out / "per_class.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == CLASSES
    assert [r["model=seg_b"] for r in rows] == [str(v) for v in IOU_B]
    with open(out / "comparison.csv", newline="", encoding="utf-8") as handle:
        images = {r["path"]: r for r in csv.DictReader(handle)}
    b = read_images(two_runs[1])
    assert set(images) == set(read_images(two_runs[0])) & set(b)
    assert all((images[p]["model=seg_b: iou"] == "") == (b[p] is None) for p in images)
    assert all(float(images[p]["model=seg_b: iou"]) == b[p] for p in images if b[p] is not None)


def test_a_balanced_pair_is_no_significant_difference(tmp_path):
    images_a, images_b = image_sets(seed=2, better=6, worse=4, tied=2)
    runs = [write_run(tmp_path / "a", "seg_a", CLASSES, IOU_A, images_a, metrics=METRICS_A),
            write_run(tmp_path / "b", "seg_b", CLASSES, IOU_A, images_b, metrics=METRICS_A)]
    page = compare_runs(runs, tmp_path / "cmp")
    [pair] = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))["pairs"]
    assert (pair["better"], pair["worse"], pair["tied"]) == (6, 4, 2)
    assert pair["sign_p"] == pytest.approx(binomial_p(6, 4), rel=1e-12) and pair["sign_p"] > 0.5
    assert pair["winner"] is None
    html = page.read_text(encoding="utf-8")
    sentence = f"on 6 of 12 images (lower on 4, equal on 2); sign test p = {pair['sign_p']:.3g}: no significant difference"
    assert sentence in html


def test_class_lists_that_differ_are_compared_on_the_shared_classes(two_runs, tmp_path):
    # a third run: its classes in another order, "Sky" spelled otherwise, no "person", an extra "tree"
    names = ["road", "background", "tree", "Sky", "car"]
    iou_c = [0.55, 0.95, 0.44, 0.8, 0.25]
    images_a = read_images(two_runs[0])
    images_c = {p: (None if v is None else round(1 - v, 6)) for p, v in images_a.items()}
    third = write_run(tmp_path / "c", "seg_c", names, iou_c, images_c, metrics=METRICS_B)
    page = compare_runs([*two_runs, third], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    classes = data["classes"]
    assert classes["compared"] == ["background", "road", "sky", "car"]
    assert classes["missing"] == {"model=seg_a": ["tree"], "model=seg_b": ["tree"], "model=seg_c": ["person"]}
    for cls in classes["compared"]:
        index = [n.lower() for n in names].index(cls)
        assert classes["iou"][cls]["model=seg_c"] == iou_c[index], cls
        assert classes["iou"][cls]["model=seg_a"] == IOU_A[CLASSES.index(cls)], cls
    assert [(p["a"], p["b"]) for p in data["pairs"]] == [("model=seg_a", "model=seg_b"), ("model=seg_a", "model=seg_c"),
                                                         ("model=seg_b", "model=seg_c")]
    expected = recount(two_runs[0], third)
    for key in ("paired", "better", "worse", "tied", "sign_p", "mean_difference"):
        assert data["pairs"][1][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    smallest = min(p["sign_p"] for p in data["pairs"])
    assert min(p["sign_p_holm"] for p in data["pairs"]) == pytest.approx(min(1.0, 3 * smallest))
    html = page.read_text(encoding="utf-8")
    assert "model=seg_c has no class person (another run has)" in html
    assert "the per-class comparison is over the 4 classes every run has" in html


def test_a_classifier_run_mixed_with_segmentation_runs_is_refused(two_runs, tmp_path, capsys):
    classifier = write_classifier_run(tmp_path / "clf", "resnet18")
    assert main([str(two_runs[0]), str(classifier), "--out", str(tmp_path / "cmp")]) == 2
    error = capsys.readouterr().err
    assert "runs of different tasks cannot be compared" in error
    assert "model=seg_a is segmentation" in error and "model=resnet18 is classification" in error
    assert not (tmp_path / "cmp" / "index.html").exists()
    with pytest.raises(RunError, match="model=resnet18 is classification"):
        compare_runs([classifier, *two_runs], tmp_path / "cmp")


def test_a_backbone_mixed_with_a_classifier_keeps_its_own_refusal(tmp_path):
    runs = [write_classifier_run(tmp_path / "clf", "resnet18"),
            write_classifier_run(tmp_path / "emb", "dinov2", task="embedding")]
    with pytest.raises(RunError, match=r"not classifiers .*model=dinov2 \(embedding\); comparing backbones' k-NN"):
        compare_runs(runs, tmp_path / "cmp")


def test_a_segmentation_run_without_its_per_image_file_is_named(two_runs, tmp_path):
    (two_runs[1] / "results" / "segmentation_images.csv").unlink()
    with pytest.raises(RunError, match=r"need results/segmentation.json and results/segmentation_images.csv; "
                                       r"missing in model=seg_b"):
        compare_runs(two_runs, tmp_path / "cmp")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make system-deps)")
def test_segmentation_comparison_page_in_chromium_with_axe(two_runs, tmp_path):
    if AXE is None:
        pytest.skip("axe-core is not installed (make system-deps runs npm install; node/npm missing?)")
    page = compare_runs(two_runs, tmp_path / "cmp")
    check = open_page(page, allowed_root=tmp_path)
    assert check.console_errors == [] and check.page_errors == [] and check.dialogs == []
    assert check.outside_requests == [] and check.broken_images == [] and check.pending_images == []
    assert check.missing_anchors == [] and check.images == 2  # the per-class bars and the pair's scatter
    assert check.accessibility == [], check.accessibility
