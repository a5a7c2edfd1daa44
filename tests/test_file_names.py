r"""Any file name the file system allows: processed like any other, recorded in every results file as an escaped name
(reportgen/inputs/paths.py) that decodes back to the exact bytes, shown escaped in the page; shards and resume
carry them too. The names are made with os.open on bytes, so the invalid UTF-8 is really on disk."""
import csv
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reportgen.analyses.predictions import Predictions
from reportgen.inputs.paths import escape_name, os_name, unescape_name
from reportgen.runs.merge import main as merge_main
from reportgen.runs.pipeline import run
from reportgen.state.run_state import load_state
from tests.helpers import WIDE, compose_config, make_colour_folder
from tests.run_compare import assert_same_results

# relative paths as bytes: every one is a real file, most decode, one is broken
ODD_GOOD = [
    b"red/caf\xe9 latin-1.png",  # not UTF-8: a Latin-1 e-acute
    b"red/\xff\xfe\xfd.png",  # not UTF-8 at all
    b"red/line\nbreak.png",
    b"red/tab\tand\rcr.png",
    b"green/\"double\" & 'single'.png",
    b'green/<img src=x onerror="alert(1)">.png',
    "green/emoji \U0001F600 and \u732b.png".encode(),
    b"green/-leading-dash.png",
    b"green/back\\slash.png",
    "green/\u202egnp.exe.png".encode(),  # a right-to-left override that would reorder the name on screen
    b"bl\xe4u/in a class folder that is not UTF-8.png",
]
ODD_BROKEN = b"blue/broken \xe9\n<b>.png"


def write_bytes_named(root: Path, rel: bytes, data: bytes) -> None:
    path = os.fsencode(root) + b"/" + rel
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture
def odd_folder(tmp_path):
    """The colour folder (3 x 4 images) plus the odd names above."""
    root = make_colour_folder(tmp_path / "data", per_class=4, noise=40, seed=3)
    for i, rel in enumerate(ODD_GOOD):
        encoded = io.BytesIO()
        Image.fromarray(np.full((20, 24, 3), 20 * i, dtype=np.uint8)).save(encoded, format="PNG")
        write_bytes_named(root, rel, encoded.getvalue())
    write_bytes_named(root, ODD_BROKEN, b"not an image")
    return root


def test_the_escaping_rule_by_example():
    assert escape_name(os.fsdecode(b"cats/caf\xe9.jpg")) == r"cats/caf\xe9.jpg"
    assert escape_name("a\nb.png") == r"a\x0ab.png"
    assert escape_name("C:\\photos.png") == r"C:\x5cphotos.png"
    assert escape_name("\u202egnp.exe") == r"\xe2\x80\xaegnp.exe"
    assert escape_name("Ünïcödé 猫 \U0001F600.png") == "Ünïcödé 猫 \U0001F600.png"  # printable text stays as it is
    assert escape_name(os.fsdecode(b"\xc3\xa9")) == "é"  # valid UTF-8 bytes are the character
    assert unescape_name(r"caf\xe9.jpg") == b"caf\xe9.jpg"
    with pytest.raises(ValueError, match="starts no"):
        unescape_name("a\\b")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"").replace(b"\0", b"") or b"x"))
def test_any_name_escapes_to_utf8_text_that_decodes_to_its_bytes(raw):
    name = os.fsdecode(raw)  # as os.walk hands it over
    escaped = escape_name(name)
    escaped.encode("utf-8")  # valid UTF-8: writable by every writer
    assert unescape_name(escaped) == raw and os_name(escaped) == name
    assert not any(ch in escaped for ch in "\n\r\t\x00\x1b")


def _escaped(rel: bytes) -> str:
    return escape_name(os.fsdecode(rel))


class _VisibleText(HTMLParser):
    """The text a reader sees in the page (no script or style), with entities decoded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._hidden = [], 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def visible_text(page: str) -> str:
    parser = _VisibleText()
    parser.feed(page)
    return "".join(parser.parts)


def test_odd_names_go_through_every_results_file_and_the_page(odd_folder, tmp_path):
    overrides = WIDE + [f"dataset.root={odd_folder}", "report.gallery_size=30"]
    index = run(compose_config(overrides), out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results"
    for path in results.iterdir():  # every results file is valid UTF-8 text (or an npz of plain strings)
        if path.suffix in (".csv", ".json", ".dot"):
            path.read_text(encoding="utf-8")
    with open(results / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    processed = {unescape_name(row["path"]) for row in rows}
    assert set(ODD_GOOD) <= processed and len(processed) == 12 + len(ODD_GOOD)
    assert all("\n" not in row["path"] for row in rows)
    labels = {unescape_name(row["path"]): row["label"] for row in rows}
    assert labels[b"bl\xe4u/in a class folder that is not UTF-8.png"] == r"bl\xe4u"
    with open(results / "failed.csv", newline="", encoding="utf-8") as handle:
        failed = list(csv.DictReader(handle))
    assert [unescape_name(row["path"]) for row in failed] == [ODD_BROKEN]
    assert "cannot identify" in failed[0]["reason"] and str(odd_folder) not in failed[0]["reason"]
    for name in ("gradcam.npz", "embeddings.npz"):
        paths = np.load(results / name)["paths"]
        assert paths.dtype.kind == "U" and {unescape_name(str(p)) for p in paths} == processed, name
    topk = json.loads((results / "topk.json").read_text(encoding="utf-8"))
    shown = {unescape_name(entry["path"]) for layer in topk.values() for channel in layer.values() for entry in channel}
    assert shown & set(ODD_GOOD)
    manifest = json.loads((results / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "ok" and manifest["counts"] == {"found": 13 + len(ODD_GOOD),
                                                                 "processed": 12 + len(ODD_GOOD), "failed": 1,
                                                                 "classes": 4}
    page = index.read_text(encoding="utf-8")
    text = visible_text(page)
    for rel in ODD_GOOD + [ODD_BROKEN]:
        assert _escaped(rel) in text, rel
    assert "<img src=x" not in page and "<b>.png" not in page  # markup in a name is text, never markup
    assert "\u202e" not in page


def test_attention_npz_carries_the_escaped_names(odd_folder, tmp_path):
    cfg = compose_config(["experiment=demo_vit", "analysis=[attention]", "runtime.num_workers=0",
                          "runtime.progress=false", f"dataset.root={odd_folder}"])
    run(cfg, out_dir=tmp_path / "run")
    paths = np.load(tmp_path / "run" / "results" / "attention.npz")["paths"]
    assert set(ODD_GOOD) <= {unescape_name(str(p)) for p in paths}


def test_shards_merge_and_resume_carry_odd_names(odd_folder, tmp_path, monkeypatch):
    overrides = WIDE + [f"dataset.root={odd_folder}", "analysis=[summary,predictions,gradcam,activations]"]
    run(compose_config(overrides), out_dir=tmp_path / "whole")
    for i in range(2):
        run(compose_config(overrides + [f"runtime.shard={i}/2"]), out_dir=tmp_path / "sweep" / str(i))
    assert merge_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "merged")]) == 0
    assert_same_results(tmp_path / "whole", tmp_path / "merged")

    real_update, calls = Predictions.update, []

    def update_then_interrupt(self, batch, logits, captures):
        calls.append(1)
        if len(calls) == 4:  # killed in the middle of the pass, after the checkpoint of batch 3
            raise KeyboardInterrupt("interrupted mid-pass")
        real_update(self, batch, logits, captures)

    monkeypatch.setattr(Predictions, "update", update_then_interrupt)
    interrupted = overrides + ["runtime.checkpoint_every=1"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(interrupted), out_dir=tmp_path / "resumed")
    state = load_state(tmp_path / "resumed" / "results" / "state.pt")
    assert 0 < state.done < 13 + len(ODD_GOOD)
    monkeypatch.setattr(Predictions, "update", real_update)
    run(compose_config(interrupted), out_dir=tmp_path / "resumed")
    assert_same_results(tmp_path / "whole", tmp_path / "resumed")


def test_a_config_value_that_is_not_utf8_is_refused_before_hydra_with_the_key():
    from reportgen.config.store import check_cli_overrides
    from reportgen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'dataset.root'.*valid UTF-8.*ln -s"):
        check_cli_overrides([os.fsdecode(b"dataset.root=/data/caf\xe9")])
