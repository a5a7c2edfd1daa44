"""End to end on a messy folder: every readable image processed, every unreadable one listed with its reason, the
run goes on; runtime.strict makes the first failure fatal (an empty folder: tests/test_pipeline.py)."""
import csv

import pytest

from reportgen.errors import RunError
from reportgen.inputs.data import scan_folder
from reportgen.runs.pipeline import run
from tests.bad_corpus import build_corpus
from tests.helpers import TINY, compose_config

BOMB_LIMIT = ["dataset.max_pixels=1000000"]


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(tmp_path / "messy")


def test_every_readable_image_processed_every_other_file_listed(corpus, tmp_path):
    root, good, bad = corpus
    cfg = compose_config(TINY + [f"dataset.root={root}", "runtime.batch_size=4"] + BOMB_LIMIT)
    index = run(cfg, out_dir=tmp_path / "run")
    with open(tmp_path / "run" / "results" / "predictions.csv", newline="", encoding="utf-8") as handle:
        processed = {row["path"] for row in csv.DictReader(handle)}
    with open(tmp_path / "run" / "results" / "failed.csv", newline="", encoding="utf-8") as handle:
        failed = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert processed == good
    assert set(failed) == set(bad)
    for path, words in bad.items():
        assert words in failed[path].lower(), (path, failed[path])
    html = index.read_text(encoding="utf-8")
    assert "&lt;b&gt;html&lt;b&gt;.png" in html and "<b>html" not in html
    assert "Ünïcödé 猫.png" in html
    assert str(root) not in html, "no absolute machine paths in the page"


def test_scan_labels_on_the_messy_folder(corpus):
    root, good, _ = corpus
    scan = scan_folder(root, [".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"])
    assert scan.class_names == ["cats", "dogs"]  # empty_class holds no image; hidden folders are skipped
    labels = dict(zip(scan.paths, scan.labels))
    assert labels["root_level.png"] == -1 and labels["cats/plain.jpg"] == 0 and labels["dogs/a/b/c/d/e/deep.png"] == 1
    assert scan.paths == sorted(scan.paths)


def test_strict_stops_at_the_first_failure(corpus, tmp_path):
    root, _, _ = corpus
    cfg = compose_config(TINY + [f"dataset.root={root}", "runtime.strict=true"] + BOMB_LIMIT)
    with pytest.raises(RunError, match="runtime.strict"):
        run(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "report" / "index.html").exists()


def test_a_finished_run_is_never_overwritten(colour_folder, tmp_path):
    """A rerun of the same config (a requeued cluster job) gets the finished report back untouched; another config
    into the same folder is refused."""
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[predictions]"])
    index = run(cfg, out_dir=tmp_path / "run")
    def outputs():  # every file the run wrote (the folder lock, rewritten by each run, is not an output)
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")
                if p.is_file() and p.name != ".reportgen-lock"}

    before = outputs()
    assert run(cfg, out_dir=tmp_path / "run") == index
    assert outputs() == before
    other = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[predictions]",
                                   "analysis.predictions.top_k=2"])
    with pytest.raises(RunError, match=r"already holds a finished run of another config.*top_k: 5 -> 2"):
        run(other, out_dir=tmp_path / "run")


def test_nan_logits_are_counted_and_alerted_not_crashing(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "model.target._target_=tests.tiny_models.nan_net",
                                 "analysis=[summary,predictions,gradcam]"])
    index = run(cfg, out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    assert "4 images produced NaN or Inf logits" in html  # the 4 readable green images
    assert "Grad-CAM" in html and "Architecture summary" in html
