"""`label_issues` end to end: a colour folder with a few labels flipped gives exactly cleanlab's own answer on the
run's probabilities.npy, catches the flips, and shards merged give the same files."""
import csv
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from reportgen.errors import ConfigError
from reportgen.inputs.data import ImageFolderDataset, collate, scan_folder
from reportgen.inputs.models import load_model
from reportgen.runs.merge import merge_runs
from reportgen.runs.pipeline import run
from tests.helpers import compose_config, make_colour_folder

pytest.importorskip("cleanlab")


class ColourNet(nn.Module):
    """(B, 3, H, W) -> (B, 3) logits = 12 x the mean of each channel: the strongest channel wins, so the colour
    folder's red/green/blue images are all classified right. Its penultimate features are the mean colour (3-d)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(12.0 * torch.eye(3))
            self.fc.bias.zero_()
        self.class_names = ["red", "green", "blue"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def colour_net() -> ColourNet:
    return ColourNet().eval()


COLOUR = ["model=target", "model.target._target_=tests.test_label_issues.colour_net", "model.preprocess.resize=16",
          "model.preprocess.crop=16", "model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]",
          "runtime.num_workers=0", "runtime.progress=false", "runtime.batch_size=8"]
FLIPS = {"red/red_3.png": "green", "red/red_17.png": "blue", "green/green_5.png": "blue",
         "blue/blue_11.png": "red"}  # 4 of 75 images (5%) moved into another class folder


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """3 classes x 25 noisy images, 4 of them moved into a wrong class folder; its label_issues run."""
    root = make_colour_folder(tmp_path_factory.mktemp("flipped") / "data", per_class=25, noise=25, seed=3)
    moved = []
    for path, wrong in FLIPS.items():
        target = f"{wrong}/flipped_{path.split('/')[1]}"
        shutil.move(root / path, root / target)
        moved.append(target)
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = compose_config(COLOUR + [f"dataset.root={root}", "analysis=[predictions,label_issues]"])
    run(cfg, out_dir=out)
    return root, out, cfg, moved


def cleanlab_on(results):
    """cleanlab's find_label_issues called as the module docstring says: labelled rows, the classes present,
    probabilities renormalised over them."""
    from cleanlab.filter import find_label_issues

    rows = read_rows(results / "predictions.csv")[1:]
    probs = np.load(results / "probabilities.npy")
    classes = ["red", "green", "blue"]
    targets = np.array([classes.index(r[1]) for r in rows])
    columns = np.unique(targets)
    pred_probs = probs[:, columns].astype(np.float64)
    pred_probs /= pred_probs.sum(axis=1, keepdims=True)
    labels = np.searchsorted(columns, targets)
    ranked = find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate",
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    return [[rows[i][0], rows[i][1], classes[columns[pred_probs[i].argmax()]], pred_probs[i, labels[i]], rank]
            for rank, i in enumerate(ranked, start=1)]


def test_label_issues_equal_cleanlab_and_catch_the_flips(flipped):
    root, out, _, moved = flipped
    results = out / "results"
    rows = read_rows(results / "label_issues.csv")
    assert rows[0] == ["path", "given", "suggested", "self_confidence", "rank"]
    expected = cleanlab_on(results)
    assert [r[:3] + [r[4]] for r in rows[1:]] == [[p, g, s, str(k)] for p, g, s, _, k in expected]
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], [e[3] for e in expected], atol=1e-6)
    found = {r[0] for r in rows[1:]}
    assert len(found & set(moved)) >= 3, (found, moved)  # most planted flips are found
    suggested = {r[0]: r[2] for r in rows[1:]}
    for path, original in zip(moved, FLIPS):
        if path in suggested:
            assert suggested[path] == original.split("/")[0]  # the class it came from
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "Label issues" in html and "Likely mislabelled" in html and "undercounts" in html


def test_probabilities_are_a_plain_softmax_loop(flipped):
    root, out, cfg, _ = flipped
    probs = np.load(out / "results" / "probabilities.npy")
    assert probs.dtype == np.float32
    rows = read_rows(out / "results" / "predictions.csv")[1:]
    loaded = load_model(cfg.model)
    scan = scan_folder(root, list(cfg.dataset.extensions))
    dataset = ImageFolderDataset(scan, loaded.preprocess)
    expected = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            logits = loaded.module(loaded.preprocess.normalize(batch.images))
            expected[scan.paths[i]] = torch.softmax(logits, 1)[0].numpy()
    assert probs.shape == (len(rows), 3) == (len(expected), 3)
    np.testing.assert_allclose(probs, np.stack([expected[r[0]] for r in rows]), atol=1e-6)


def test_two_shards_merged_give_the_same_files(flipped, tmp_path):
    root, out, _, _ = flipped
    shards = []
    for i in range(2):
        shard = tmp_path / f"shard{i}"
        run(compose_config(COLOUR + [f"dataset.root={root}", "analysis=[predictions,label_issues]",
                                     f"runtime.shard={i}/2", f"runtime.batch_size={5 + i}"]), out_dir=shard)
        shards.append(shard)
    merge_runs(shards, tmp_path / "merged")
    merged = tmp_path / "merged" / "results"
    np.testing.assert_allclose(np.load(merged / "probabilities.npy"), np.load(out / "results" / "probabilities.npy"),
                               atol=1e-6)
    whole, parts = read_rows(out / "results" / "label_issues.csv"), read_rows(merged / "label_issues.csv")
    assert [r[:3] + [r[4]] for r in parts] == [r[:3] + [r[4]] for r in whole]
    assert not list(merged.glob(".*"))  # the probability stream's folder is gone


def test_without_predictions_or_with_a_multi_label_head_the_section_says_why(flipped, tmp_path):
    root = flipped[0]
    index = run(compose_config(COLOUR + [f"dataset.root={root}", "analysis=[label_issues]"]), out_dir=tmp_path / "a")
    assert "add predictions to the run" in index.read_text(encoding="utf-8")
    index = run(compose_config(COLOUR + [f"dataset.root={root}", "analysis=[predictions,label_issues]",
                                         "analysis.predictions.activation=sigmoid"]), out_dir=tmp_path / "b")
    assert "Not applicable because the head is multi-label" in index.read_text(encoding="utf-8")
    assert not (tmp_path / "b" / "results" / "label_issues.csv").exists()


def test_bad_options_are_config_errors():
    from reportgen.analyses.label_issues import LabelIssues, LabelIssuesConfig

    with pytest.raises(ConfigError, match="filter_by"):
        LabelIssues.check_config(LabelIssuesConfig(filter_by="all"))
    with pytest.raises(ConfigError, match="rank_by"):
        LabelIssues.check_config(LabelIssuesConfig(rank_by="margin"))
    with pytest.raises(ConfigError, match="gallery"):
        LabelIssues.check_config(LabelIssuesConfig(gallery=-1))


def test_folders_matching_no_model_class_are_left_out_and_said(tmp_path):
    root = make_colour_folder(tmp_path / "data", per_class=8, noise=25, seed=4)
    (root / "mauve").mkdir()
    for i in range(3):
        shutil.copy(root / "red" / f"red_{i}.png", root / "mauve" / f"mauve_{i}.png")
    index = run(compose_config(COLOUR + [f"dataset.root={root}", "analysis=[predictions,label_issues]"]),
                out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    assert "folder class matches no model class: 3" in html and "24 labelled images" in html
    assert not any(r[0].startswith("mauve/") for r in read_rows(tmp_path / "run" / "results" / "label_issues.csv"))
