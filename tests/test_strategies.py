"""`strategies` (SpRAy): the spectral clustering against a plain dense re-implementation (scikit-learn's k-means),
and, through the real pipeline, a small CNN trained to use a planted corner square for a third of one class: the
clustering must put those images in a flagged cluster of their own."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reportgen.analyses._spray_math import (adjacency_edges, eigengap_count, kmeans, knn_graph, laplacian_spectrum,
                                            prepare_maps, spectral_clusters)
from reportgen.analyses.strategies import Strategies, StrategiesConfig
from reportgen.errors import ConfigError
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config, make_colour_folder

# --- the math ----------------------------------------------------------------------------------------------------


def plain_spray(maps, k, max_clusters, seed):
    """SpRAy written out densely: all pairwise distances, binary symmetric k-NN adjacency, L = I - D^-1/2 A D^-1/2 by
    numpy's eigh, the largest eigengap in 2..max_clusters, scikit-learn's KMeans on the row-normalised eigenvectors.
    -> (labels, eigenvalues (max_clusters + 1,), clusters)."""
    KMeans = pytest.importorskip("sklearn.cluster").KMeans  # noqa: N806

    x = torch.as_tensor(maps, dtype=torch.float64).reshape(len(maps), -1)
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.argsort(dim=1, stable=True)[:, :k]
    adjacency = torch.zeros(len(x), len(x), dtype=torch.float64)
    adjacency.scatter_(1, nearest, 1.0)
    adjacency = torch.maximum(adjacency, adjacency.T)
    scale = adjacency.sum(dim=1).rsqrt()
    laplacian = torch.eye(len(x), dtype=torch.float64) - scale[:, None] * adjacency * scale[None, :]
    values, vectors = np.linalg.eigh(laplacian.numpy())
    gaps = np.diff(values[1: max_clusters + 1])  # lambda_(c+1) - lambda_c for c = 2..max_clusters
    clusters = int(np.argmax(gaps)) + 2
    embedding = vectors[:, :clusters] / np.linalg.norm(vectors[:, :clusters], axis=1, keepdims=True)
    labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(embedding)
    return labels, values[: max_clusters + 1], clusters


def same_partition(a, b):
    """True when two labelings group the points identically (cluster numbers aside)."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(a)) == len(set(b))


def blob_maps(rng, count, corner, size=8, noise=0.3):
    """(count, size, size) non-negative maps with a bright 2 x 2 blob at `corner` (row, column) plus noise."""
    maps = rng.random((count, size, size)) * noise
    maps[:, corner[0]:corner[0] + 2, corner[1]:corner[1] + 2] += 1.0
    return maps


def test_prepare_maps_pools_to_side_and_sums_to_one():
    cams = np.zeros((3, 32, 32), dtype=np.float32)
    cams[0, :2, :2] = 4.0
    cams[1] = 1.0
    cams[2, 0, 0] = np.nan  # nothing positive: made uniform and reported
    maps, empty = prepare_maps(cams, 16)
    assert maps.shape == (3, 16, 16)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0)
    assert maps[0, 0, 0] == pytest.approx(1.0)  # the 2 x 2 corner is one pooled cell
    np.testing.assert_allclose(maps[1:], 1.0 / 256)
    assert empty.tolist() == [False, False, True]
    assert prepare_maps(cams[:, :32, :24], 16)[0].shape == (3, 16, 16)  # each side at most 16
    assert prepare_maps(cams[:, :7, :5], 16)[0].shape == (3, 7, 5)  # never upsampled


def test_knn_graph_and_adjacency_are_symmetric_and_match_all_pairs():
    rng = np.random.default_rng(3)
    points = rng.random((60, 20))
    neighbours = knn_graph(points, 10)
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    np.testing.assert_array_equal(neighbours, np.argsort(distances, axis=1, kind="stable")[:, :10])
    rows, cols = adjacency_edges(neighbours)
    adjacency = np.zeros((60, 60))
    adjacency[rows, cols] = 1
    np.testing.assert_array_equal(adjacency, adjacency.T)
    assert len(rows) == adjacency.sum()  # each edge listed once per direction
    assert (adjacency.sum(axis=1) >= 10).all() and not adjacency.diagonal().any()
    repeated = np.repeat(rng.integers(0, 3, (15, 4)).astype(float), 3, axis=0)  # equal distances everywhere
    distances = np.linalg.norm(repeated[:, None] - repeated[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    for k in (1, 4, 10):  # ties: the lower index first, as a stable sort of all pairs
        np.testing.assert_array_equal(knn_graph(repeated, k), np.argsort(distances, axis=1, kind="stable")[:, :k])


def test_eigengap_rule():
    assert eigengap_count(np.array([0.0, 0.0, 0.9, 0.95, 1.0]), 10) == (2, pytest.approx(0.9))
    assert eigengap_count(np.array([0.0, 0.01, 0.02, 0.6, 0.7, 0.8]), 10) == (3, pytest.approx(0.58))
    assert eigengap_count(np.array([0.0, 0.01, 0.02, 0.6, 0.7, 0.8]), 2)[0] == 2  # capped at max_clusters
    assert eigengap_count(np.array([0.0, 0.1, 0.2, 0.3]), 10) == (2, pytest.approx(0.1))  # equal gaps: smaller c
    assert eigengap_count(np.array([0.0, 0.5]), 10) == (2, 0.0)  # too few eigenvalues


def test_two_groups_give_two_clusters_like_the_dense_reference():
    rng = np.random.default_rng(0)
    raw = np.concatenate([blob_maps(rng, 40, (3, 3)), blob_maps(rng, 14, (0, 0))])
    maps, _ = prepare_maps(raw, 16)
    result = spectral_clusters(maps, 10, 10, seed=0)
    labels, values, clusters = plain_spray(maps, 10, 10, seed=0)
    assert result.clusters == clusters == 2 and result.solver == "dense eigh"
    np.testing.assert_allclose(result.eigenvalues, values, atol=1e-10)
    assert same_partition(result.labels, labels)
    assert result.labels.tolist() == [0] * 40 + [1] * 14  # cluster 0 is the largest
    assert result.gap == pytest.approx(values[2] - values[1])


def test_sparse_solver_and_three_groups_match_the_dense_reference():
    pytest.importorskip("scipy.sparse.linalg")  # without scipy every class takes the dense path
    rng = np.random.default_rng(1)
    raw = np.concatenate([blob_maps(rng, 50, (3, 3)), blob_maps(rng, 30, (0, 6)), blob_maps(rng, 20, (6, 0))])
    maps, _ = prepare_maps(raw, 16)
    dense = spectral_clusters(maps, 10, 10, seed=0)
    sparse = spectral_clusters(maps, 10, 10, seed=0, dense_limit=10)  # eigsh
    labels, values, clusters = plain_spray(maps, 10, 10, seed=0)
    assert sparse.solver == "eigsh" and dense.clusters == sparse.clusters == clusters == 3
    np.testing.assert_allclose(sparse.eigenvalues, values, atol=1e-8)
    assert same_partition(dense.labels, labels) and same_partition(sparse.labels, labels)
    values_only, _, _ = laplacian_spectrum(knn_graph(maps.reshape(100, -1), 10), 11, 0)
    np.testing.assert_allclose(values_only, values, atol=1e-10)


def test_kmeans_matches_scikit_learn_on_separated_points():
    KMeans = pytest.importorskip("sklearn.cluster").KMeans  # noqa: N806

    rng = np.random.default_rng(2)
    points = np.concatenate([rng.normal(centre, 0.1, (25, 3)) for centre in ([0, 0, 0], [2, 0, 0], [0, 2, 1])])
    ours = kmeans(points, 3, seed=0)
    theirs = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(points)
    assert same_partition(ours, theirs)
    np.testing.assert_array_equal(kmeans(points, 3, seed=0), ours)  # seeded


def test_bad_options_are_config_errors():
    for key, value in (("min_images", 2), ("k", 0), ("max_clusters", 1), ("minority", 0.0), ("border", 0.5),
                       ("max_area", 1.5), ("max_images", 5)):
        with pytest.raises(ConfigError):
            Strategies.check_config(StrategiesConfig(**{key: value}))


def finalize_on(folder: Path, cams, classes, **options):
    """strategies.json from an analysis finalized over a hand-made results/gradcam.npz (no pass: no accuracy)."""
    folder.mkdir(parents=True)
    paths = np.array([f"c{c}/{i:03d}.png" for i, c in enumerate(classes)])
    np.savez_compressed(folder / "gradcam.npz", paths=paths, layer=np.array("layer4"), classes=np.array(classes),
                        cams=np.asarray(cams, dtype=np.float32))
    ctx = SimpleNamespace(results_dir=folder, dataset_classes=[], dataset_root=None, row_capacity=len(classes),
                          loaded=SimpleNamespace(class_names=["a", "b", "c"], synsets=[], preprocess=None),
                          report=SimpleNamespace(thumbnail_size=32))
    section = Strategies(StrategiesConfig(**options), ctx).finalize()
    assert not (folder / ".strategies-maps.npy").exists()
    return json.loads((folder / "strategies.json").read_text()), section


def test_maps_stream_in_chunks_and_large_classes_are_sampled(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    classes = rng.permutation([0] * 40 + [1] * 14 + [2] * 5)
    cams = rng.random((len(classes), 20, 20)) * 0.2
    cams[classes == 1, :4, :4] += 1.0
    whole, section = finalize_on(tmp_path / "whole", cams, classes, min_images=10, max_images=30)
    monkeypatch.setattr("reportgen.analyses.strategies.COPY_ROWS", 7)  # rows streamed 7 at a time
    chunked, _ = finalize_on(tmp_path / "chunked", cams, classes, min_images=10, max_images=30)
    assert chunked == whole
    assert whole["pooled_size"] == [16, 16] and whole["skipped"] == {"c": 5}
    a, b = whole["classes"]["a"], whole["classes"]["b"]
    assert (a["images"], a["clustered"], a["sampled"]) == (40, 30, True)
    assert (b["images"], b["clustered"], b["sampled"]) == (14, 14, False)
    members = [p for cluster in a["clusters"] for p in cluster["members"]]
    assert len(set(members)) == 30 and all(p.startswith("c0/") for p in members)
    again, _ = finalize_on(tmp_path / "again", cams, classes, min_images=10, max_images=30)
    assert again == whole  # the sample is seeded
    assert not whole["accuracy_available"] and all(c["accuracy"] is None for c in a["clusters"])
    assert dict(section.elements[0].items)["sampling"].endswith("from larger classes: a")


# --- a planted shortcut, through the real pipeline ---------------------------------------------------------------

COLOURS = {"blue": (30, 50, 220), "green": (30, 200, 50), "red": (220, 40, 30)}
PER_CLASS, PLANTED = 36, 12  # blue images with the corner square (a third of the class), red or green underneath
SIDE, SQUARE = 24, 5


class ShortcutNet(nn.Module):
    """(B, 3, 24, 24) -> (B, classes): two convolutions (12 x 12 after the first pool), global average pool, linear
    (tests/test_attribution.py trains it on another folder)."""

    def __init__(self, class_names=tuple(COLOURS)):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, len(class_names))
        self.class_names = list(class_names)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def shortcut_net(path: str, class_names=tuple(COLOURS)) -> nn.Module:
    """The `_target_` factory: the trained net from its state dict."""
    model = ShortcutNet(class_names)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def make_shortcut_folder(root: Path, seed: int = 0):
    """blue/green/red folders of noisy 24 px images; PLANTED blue images are red or green with a white square in
    the top-left corner instead. -> (root, planted paths relative to root, (N, 3, 24, 24) pixels in [0, 1], labels,
    the planted images' pixels without their square)."""
    rng = np.random.default_rng(seed)
    paths, images, labels, bare = [], [], [], []
    for label, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            planted = name == "blue" and i < PLANTED
            colour = COLOURS[["green", "red"][i % 2]] if planted else COLOURS[name]
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (SIDE, SIDE, 3)), 0, 255)
            if planted:
                bare.append(pixels.copy())
                pixels[1:1 + SQUARE, 1:1 + SQUARE] = 255
            relative = f"{name}/{name}_{i:02d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(root / relative)
            paths.append(relative)
            images.append(np.asarray(Image.open(root / relative), dtype=np.float32) / 255)
            labels.append(label)
    as_tensor = lambda arrays: torch.as_tensor(np.stack(arrays)).permute(0, 3, 1, 2).float()  # noqa: E731
    planted = [p for p in paths if p.startswith("blue/") and int(p[-6:-4]) < PLANTED]
    bare = [b.astype(np.uint8) / 255.0 for b in bare]
    return root, planted, as_tensor(images), torch.tensor(labels), as_tensor(bare)


def train_shortcut_net(images, labels, path: Path, class_names=tuple(COLOURS), steps: int = 80) -> ShortcutNet:
    """`steps` full-batch Adam steps (80: about 2 s on one thread; two threads shared with other work are slower),
    the state dict saved to `path`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = ShortcutNet(class_names)
        optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(steps):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), path)
    return model.eval()


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory):
    """The folder and the trained net's state dict, once for the module's tests."""
    tmp = tmp_path_factory.mktemp("shortcut")
    root, planted, images, labels, bare = make_shortcut_folder(tmp / "data")
    model = train_shortcut_net(images, labels, tmp / "net.pt")
    return {"root": root, "planted": planted, "images": images, "labels": labels, "bare": bare, "model": model,
            "weights": tmp / "net.pt"}


def shortcut_overrides(shortcut):
    return ["model=target", "model.target._target_=tests.test_strategies.shortcut_net",
            f"+model.target.path={shortcut['weights']}", "model.preprocess.resize=24", "model.preprocess.crop=24",
            "model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]", f"dataset.root={shortcut['root']}",
            "analysis=[predictions,gradcam,strategies]", "analysis.gradcam.layer=features",
            "analysis.strategies.min_images=10", "runtime.num_workers=0", "runtime.progress=false",
            "runtime.batch_size=16"]


def test_the_trained_net_relies_on_the_square(shortcut):
    with torch.no_grad():
        predicted = shortcut["model"](shortcut["images"]).argmax(dim=1)
        without_square = shortcut["model"](shortcut["bare"]).argmax(dim=1)
    assert (predicted == shortcut["labels"]).float().mean() >= 0.95
    assert (without_square != 0).float().mean() >= 0.9  # the planted images are blue only because of the square


@pytest.fixture(scope="module")
def whole_run(shortcut, tmp_path_factory):
    """The pipeline over the shortcut folder: (its report page, strategies.json)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    index = run(compose_config(shortcut_overrides(shortcut)), out_dir=out)
    assert not (out / "results" / ".strategies-maps.npy").exists(), "the scratch file is removed"
    return index, json.loads((out / "results" / "strategies.json").read_text())


def assert_close(got, want, path="strategies.json"):
    """Equal JSON, floats to 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), path
    else:
        assert got == want, path


def test_strategies_isolate_the_shortcut_images_in_a_flagged_cluster(shortcut, whole_run):
    index, report = whole_run
    blue = report["classes"]["blue"]
    planted = set(shortcut["planted"])
    best = max(blue["clusters"], key=lambda c: len(planted & set(c["members"])))
    caught = len(planted & set(best["members"]))
    assert best["flagged"] and best["cluster"] > 0, best
    assert caught >= 0.8 * len(planted), (caught, best["size"])
    assert caught >= 0.8 * best["size"], (caught, best["size"])  # few others in it
    assert best["accuracy"] == 1.0  # right for the wrong reason
    assert best["reasons"] == {"minority": True, "concentrated": True, "peripheral": True, "shifted": True}
    assert best["centre"][0] < 0.3 and best["centre"][1] < 0.3  # the top-left corner
    assert report["flagged"] == 1, "nothing else looks like a shortcut"
    html = index.read_text(encoding="utf-8")
    assert "Strategies (SpRAy)" in html and "possible shortcut" in html


def test_shards_merge_to_the_same_clusters(shortcut, whole_run, tmp_path):
    from reportgen.runs.merge import merge_runs

    shards = []
    for i in range(2):
        overrides = shortcut_overrides(shortcut) + [f"runtime.shard={i}/2", "runtime.batch_size=7"]
        run(compose_config(overrides), out_dir=tmp_path / str(i))
        shards.append(tmp_path / str(i))
    merge_runs(shards, tmp_path / "merged")
    assert_close(json.loads((tmp_path / "merged" / "results" / "strategies.json").read_text()), whole_run[1])
    assert not (tmp_path / "merged" / "results" / ".strategies").exists()


def test_sampling_caps_each_class_and_says_so(shortcut, tmp_path):
    overrides = shortcut_overrides(shortcut) + ["analysis.strategies.max_images=20", "analysis=[gradcam,strategies]"]
    run(compose_config(overrides), out_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "results" / "strategies.json").read_text())
    for entry in report["classes"].values():
        assert entry["clustered"] == min(entry["images"], 20)
        assert entry["sampled"] == (entry["images"] > 20)
        assert sum(c["size"] for c in entry["clusters"]) == entry["clustered"]
    assert report["accuracy_available"]  # the pass keeps its own top-1 rows: predictions is not needed


def test_without_gradcam_the_section_says_what_it_needs(tmp_path):
    folder = make_colour_folder(tmp_path / "data", per_class=4, noise=20, seed=0)
    index = run(compose_config(TINY + [f"dataset.root={folder}", "analysis=[strategies]"]), out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    assert "Needs the gradcam analysis: add it to analysis=[...]" in html
    assert not (tmp_path / "run" / "results" / "strategies.json").exists()
