"""`slices` end to end: a group of look-alike images the model gets wrong becomes the top error slice, and the
per-image scores equal FiftyOne Brain's formulas computed with plain numpy on the run's own files."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from reportgen.errors import ConfigError
from reportgen.runs.merge import merge_runs
from reportgen.runs.pipeline import run
from tests.helpers import compose_config, make_colour_folder
from tests.test_label_issues import COLOUR

pytest.importorskip("sklearn")

PURPLE = (200, 30, 225)  # in the red folder, but blue is its strongest channel: ColourNet calls it blue
RUN = COLOUR + ["analysis=[predictions,activations,slices]", "analysis.activations.layers=[pool]",
                "analysis.activations.n_images=2", "analysis.activations.channels_per_layer=1"]


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def purple(tmp_path_factory):
    """3 classes x 20 noisy images, plus 6 purple images in the red folder (all misclassified as blue); its run."""
    root = make_colour_folder(tmp_path_factory.mktemp("purple") / "data", per_class=20, noise=25, seed=5)
    rng = np.random.default_rng(6)
    for i in range(6):
        pixels = np.clip(np.array(PURPLE) + rng.normal(0, 12, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "red" / f"purple_{i}.png")
    out = tmp_path_factory.mktemp("run") / "run"
    run(compose_config(RUN + [f"dataset.root={root}"]), out_dir=out)
    return root, out


def test_the_misclassified_group_is_the_top_slice(purple):
    _, out = purple
    totals = json.loads((out / "results" / "slices.json").read_text())
    top = totals["slices"][0]
    scores = {r["path"]: r["component"] for r in read_rows(out / "results" / "image_scores.csv")}
    members = {p for p, c in scores.items() if c == str(top["component"])}
    planted = {f"red/purple_{i}.png" for i in range(6)}
    assert planted <= members, (members, totals["slices"])
    assert top["error_rate"] >= 0.8 and top["labels"][0]["class"] == "red"
    assert top["predictions"][0]["class"] == "blue"
    assert set(top["examples"]) <= members and set(top["examples"][:6]) == planted  # wrong images first
    assert totals["error_rate"] == pytest.approx(6 / 66)
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "Error slices" in html and "Slice 1:" in html
    assert not (out / "results" / ".slices").exists()


def test_image_scores_are_fiftyone_formulas(purple):
    _, out = purple
    results = out / "results"
    rows = read_rows(results / "image_scores.csv")
    predictions = read_rows(results / "predictions.csv")
    probs = np.load(results / "probabilities.npy").astype(np.float64)
    assert [r["path"] for r in rows] == [p["path"] for p in predictions]
    p = probs / probs.sum(axis=1, keepdims=True)
    hardness = -(p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose([float(r["hardness"]) for r in rows], hardness, atol=2e-6)
    wrong = np.array([q["label"] != q["top1_name"] for q in predictions])
    mistakenness = (np.where(wrong, 1.0, -1.0) * np.exp(-hardness) + 1) / 2
    np.testing.assert_allclose([float(r["mistakenness"]) for r in rows], mistakenness, atol=2e-6)
    with np.load(results / "embeddings.npz") as archive:
        assert list(archive["paths"]) == [r["path"] for r in rows]
        features = archive["features"].astype(np.float64)  # (N, D)
    distances = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(axis=2))  # (N, N): tiny here
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :3]
    uniqueness = (nearest * [0.6, 0.3, 0.1]).mean(axis=1)
    uniqueness /= uniqueness.max()
    np.testing.assert_allclose([float(r["uniqueness"]) for r in rows], uniqueness, atol=2e-6)


def test_two_shards_merged_give_the_same_slices(purple, tmp_path):
    root, out = purple
    shards = []
    for i in range(2):
        shard = tmp_path / f"shard{i}"
        run(compose_config(RUN + [f"dataset.root={root}", f"runtime.shard={i}/2", f"runtime.batch_size={5 + i}"]),
            out_dir=shard)
        shards.append(shard)
    merge_runs(shards, tmp_path / "merged")
    merged, whole = tmp_path / "merged" / "results", out / "results"
    a, b = read_rows(whole / "image_scores.csv"), read_rows(merged / "image_scores.csv")
    assert [(r["path"], r["component"]) for r in a] == [(r["path"], r["component"]) for r in b]
    for key in ("hardness", "mistakenness", "uniqueness"):
        np.testing.assert_allclose([float(r[key]) for r in a], [float(r[key]) for r in b], atol=1e-5)
    ja, jb = (json.loads((d / "slices.json").read_text()) for d in (whole, merged))
    assert [(s["component"], s["examples"]) for s in ja["slices"]] == [(s["component"], s["examples"])
                                                                       for s in jb["slices"]]


def test_without_activations_only_the_embedding_scores_are_missing(purple, tmp_path):
    root, _ = purple
    index = run(compose_config(COLOUR + [f"dataset.root={root}", "analysis=[predictions,slices]"]),
                out_dir=tmp_path / "run")
    assert "add activations to the run" in index.read_text(encoding="utf-8")
    rows = read_rows(tmp_path / "run" / "results" / "image_scores.csv")
    assert all(r["hardness"] and r["mistakenness"] and not r["uniqueness"] and not r["component"] for r in rows)


def test_bad_options_are_config_errors():
    from reportgen.analyses.slices import Slices, SlicesConfig

    for key, value in (("components", 0), ("min_size", 0), ("label_weight", -1.0), ("fit_sample", 1)):
        with pytest.raises(ConfigError, match=key):
            Slices.check_config(SlicesConfig(**{key: value}))


def test_blockwise_neighbour_distances_equal_brute_force():
    import torch

    from reportgen.analyses._folder_math import nearest_distances

    rng = np.random.default_rng(0)
    features = (rng.normal(5.0, 1.0, (40, 6))).astype(np.float32)  # far from 0: the fast formula's worst case
    features[7] = features[3]  # a duplicate: distance 0
    rows = np.flatnonzero(rng.random(40) < 0.7)  # a pool with gaps
    found = nearest_distances(lambda a, b: features[a:b], rows, 3, torch.device("cpu"),
                              centre=features[rows].mean(axis=0), block_size=5, chunk_rows=7)
    x = features[rows].astype(np.float64)
    brute = np.sqrt(((x[:, None] - x[None]) ** 2).sum(axis=2))
    np.fill_diagonal(brute, np.inf)
    np.testing.assert_allclose(found, np.sort(brute, axis=1)[:, :3], rtol=1e-12, atol=1e-12)
    two = nearest_distances(lambda a, b: features[a:b], np.array([1, 9]), 3, torch.device("cpu"))
    assert np.isfinite(two[:, 0]).all() and np.isinf(two[:, 1:]).all()  # fewer others than k: inf


def test_a_mixture_fitted_on_a_sample_still_finds_the_group(purple, tmp_path):
    root, _ = purple
    run(compose_config(RUN + [f"dataset.root={root}", "analysis.slices.fit_sample=30", "analysis.slices.seed=3"]),
        out_dir=tmp_path / "run")
    totals = json.loads((tmp_path / "run" / "results" / "slices.json").read_text())
    assert totals["mixture"]["fitted_on"] == 30 and totals["mixture"]["images"] == 66
    assert {f"red/purple_{i}.png" for i in range(6)} <= set(totals["slices"][0]["examples"])
