"""End to end: the real config composed as run.py does, `pipeline.run` into tmp_path, every output checked."""
import csv
import json

import pytest
import torch

from reportgen.engine.capture import count_hooks
from reportgen.errors import RunError
from reportgen.inputs.data import ImageFolderDataset, collate, scan_folder
from reportgen.inputs.models import load_model
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config
from tests.tiny_models import LAST_BUILT


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_report_and_results_and_lists_the_broken_file(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "runtime.batch_size=5"])
    index = run(cfg, out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    for heading in ("Overview", "Alerts", "Architecture summary", "Predictions"):
        assert heading in html
    assert "green/broken.jpg" in html and str(colour_folder) + "/green" not in html
    results = tmp_path / "run" / "results"
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["counts"] == {"found": 13, "processed": 12, "failed": 1, "classes": 3}
    assert manifest["config"]["runtime"]["batch_size"] == 5 and manifest["versions"]["torch"] == torch.__version__
    failed = read_csv(results / "failed.csv")
    assert [row["path"] for row in failed] == ["green/broken.jpg"] and failed[0]["reason"]
    assert len(read_csv(results / "predictions.csv")) == 12
    assert (results / "summary.csv").is_file() and (results / "summary.json").is_file()
    assert not list((tmp_path / "run").glob("*.partial-*")), "no partial report folder left behind"
    assert count_hooks(LAST_BUILT["tiny_net"]) == 0


def test_predictions_equal_a_plain_argmax_loop(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "runtime.batch_size=4"])
    run(cfg, out_dir=tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "results" / "predictions.csv")
    # independent loop: same decode and preprocessing, model(x).argmax one image at a time
    loaded = load_model(cfg.model)
    scan = scan_folder(colour_folder, list(cfg.dataset.extensions))
    dataset = ImageFolderDataset(scan, loaded.preprocess)
    expected = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            if len(batch.indices):
                logits = loaded.module(loaded.preprocess.normalize(batch.images))
                expected[scan.paths[i]] = (int(logits.argmax(1)), float(torch.softmax(logits, 1).max()))
    assert [r["path"] for r in rows] == sorted(expected)
    for row in rows:
        top1, prob = expected[row["path"]]
        assert int(row["top1_index"]) == top1
        assert float(row["top1_prob"]) == pytest.approx(prob, abs=1e-6)
        assert row["label"] == row["path"].split("/")[0]
        assert row["top1_name"] == ["red", "green", "blue"][top1]


def test_accuracy_matches_predictions_csv(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}"])
    index = run(cfg, out_dir=tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "results" / "predictions.csv")
    correct = sum(r["label"] == r["top1_name"] for r in rows)
    assert f"({correct}/12)" in index.read_text(encoding="utf-8")


def test_forward_error_names_the_batch_files_and_leaves_no_hooks(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "model.target._target_=tests.tiny_models."
                                 "exploding_net", "runtime.batch_size=4"])
    with pytest.raises(RunError) as info:
        run(cfg, out_dir=tmp_path / "run")
    assert "blue/blue_0.png" in str(info.value) and "boom" in str(info.value)
    model = LAST_BUILT["exploding_net"]
    assert count_hooks(model) == 0
    assert not (tmp_path / "run" / "report" / "index.html").exists(), "no report claiming success"


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "notes.txt").write_text("hello")
    cfg = compose_config(TINY + [f"dataset.root={tmp_path / 'empty'}"])
    with pytest.raises(RunError, match="no image files"):
        run(cfg, out_dir=tmp_path / "run")


def test_random_weights_torchvision_model_on_any_folder_is_bannered(colour_folder, tmp_path):
    cfg = compose_config([f"dataset.root={colour_folder}", "model=mobilenet_v3_small", "model.weights=null",
                          "runtime.num_workers=0", "runtime.progress=false", "dataset.limit=6"])
    index = run(cfg, out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    assert "Random weights" in html
    assert "No folder name matches a model class name" in html  # red/green/blue are not ImageNet classes
    summary = json.loads((tmp_path / "run" / "results" / "summary.json").read_text())
    model = load_model(cfg.model).module
    assert summary["params"] == sum(p.numel() for p in model.parameters())


def test_demo_run_end_to_end_with_workers(tmp_path):
    """The default config (python run.py): demo CNN on the generated shapes folder, 2 decode workers."""
    cfg = compose_config(["runtime.progress=false"])
    index = run(cfg, out_dir=tmp_path / "demo")
    results = tmp_path / "demo" / "results"
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["counts"]["processed"] == 240 and manifest["counts"]["failed"] == 2
    rows = read_csv(results / "predictions.csv")
    accuracy = sum(r["label"] == r["top1_name"] for r in rows) / len(rows)
    assert accuracy > 0.8, f"the demo model should be clearly better than chance (1/6), got {accuracy:.2f}"
    assert len(list((index.parent / "assets").iterdir())) > 20


def test_an_analysis_reading_anothers_results_is_finalized_after_it():
    from types import SimpleNamespace

    from reportgen.analyses.base import finalize_order

    made = [SimpleNamespace(name=n, reads=r) for n, r in [("explorer", ("strategies", "predictions")),
                                                         ("strategies", ("gradcam",)), ("gradcam", ()),
                                                         ("predictions", ()), ("summary", ("absent",))]]
    assert [a.name for a in finalize_order(made)] == ["gradcam", "strategies", "predictions", "explorer", "summary"]
