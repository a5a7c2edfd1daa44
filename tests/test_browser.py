"""Reports in a real browser: no errors, every image loads, nothing leaves the folder, no script from data runs."""
import json
import os
import shutil

import pytest

from reportgen.runs.pipeline import run
from tests.browser import CHROMIUM, chromium_page, open_page
from tests.helpers import TINY, compose_config

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Chromium is not installed (make system-deps / apt-get install chromium)")


def assert_clean(check):
    assert check.console_errors == [] and check.page_errors == [] and check.dialogs == []
    assert check.outside_requests == []
    assert check.pending_images == [] and check.broken_images == [] and check.images > 0
    assert check.missing_anchors == []
    assert check.accessibility == []  # axe-core: no serious or critical violation (checked where axe is installed)


def test_demo_report_in_chromium(tmp_path):
    cfg = compose_config(["runtime.progress=false", "analysis=[summary,predictions,gradcam]"])
    index = run(cfg, out_dir=tmp_path / "demo")
    check = open_page(index, screenshot=tmp_path / "demo.png")
    assert_clean(check)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "demo" / "results" / "manifest.json").read_text())
    assert manifest["counts"]["processed"] == 240


def test_file_and_label_names_are_text_not_markup(colour_folder, tmp_path):
    evil_label = "<img src=x onerror=alert(1)>"
    shutil.move(colour_folder / "red", colour_folder / evil_label)
    # '/' cannot be part of a file name, so this "name" is a folder '"><script>alert(1)<' holding 'script>.jpg'
    evil_file = colour_folder / "green" / '"><script>alert(1)</script>.jpg'
    evil_file.parent.mkdir()
    shutil.copy(colour_folder / evil_label / "red_0.png", evil_file)
    (colour_folder / "blue" / "<b>bold<b>.jpg").write_bytes(b"not an image")  # a failed file with markup in it
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "report.title='<script>alert(2)</script>'",
                                 "analysis=[summary,predictions,gradcam]"])
    index = run(cfg, out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html and "&lt;b&gt;bold&lt;b&gt;.jpg" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    check = open_page(index)
    assert_clean(check)


def test_single_file_report_is_self_contained_and_clean(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "report.single_file=true",
                                 "analysis=[summary,predictions,gradcam]"])
    path = run(cfg, out_dir=tmp_path / "run")
    assert path == tmp_path / "run" / "report.html"
    html = path.read_text(encoding="utf-8")
    assert 'src="assets/' not in html and 'href="assets/' not in html and "data:image/jpeg;base64," in html
    moved = tmp_path / "mailed" / "inbox"  # opened somewhere else entirely: nothing may be missing
    moved.mkdir(parents=True)
    shutil.copy(path, moved / "report.html")
    check = open_page(moved / "report.html")
    assert_clean(check)


def test_thumbnail_click_opens_the_full_image(tmp_path):
    cfg = compose_config(["runtime.progress=false", "analysis=[predictions]", "dataset.limit=12", "report.thumbnail_size=32",
                          "runtime.num_workers=0"])
    index = run(cfg, out_dir=tmp_path / "run")
    with chromium_page() as page:
        page.goto(index.resolve().as_uri())
        page.click("a.zoom >> nth=0")
        page.wait_for_function("() => { const img = document.querySelector('.lightbox img');"
                               " return img && img.complete && img.naturalWidth > 0; }")
        size = page.evaluate("() => { const img = document.querySelector('.lightbox img');"
                             " return [img.naturalWidth, img.naturalHeight]; }")
        assert size == [64, 64]  # the full model input (the demo crop), not the thumbnail
        page.keyboard.press("Escape")
        assert page.query_selector(".lightbox") is None
