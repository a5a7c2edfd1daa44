"""`knn`: the blockwise search and vote equal a plain (whole-matrix) re-implementation of DINO's eval_knn, through
the analysis and through the real pipeline with a timm backbone, whole and as merged shards."""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reportgen.analyses._knn_math import nearest_neighbours
from reportgen.analyses.base import Batch, RunContext
from reportgen.analyses.knn import Knn, KnnConfig
from reportgen.errors import ConfigError
from reportgen.inputs.preprocess import Preprocess
from reportgen.inputs.tasks import ModelOutputs


def plain_knn(features, labels, k, temperature, shown):
    """DINO's eval_knn over the whole similarity matrix, leave-one-out: (neighbour rows (N, kk), their
    similarities, predicted (N,), top-1 hit, top-5 hit, k used). Ties: stable sorts, so the lower row / class first;
    a class without votes is never a top-5 hit."""
    feats = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(labels)
    n = len(labels)
    pool = labels >= 0 if (labels >= 0).any() else torch.ones(n, dtype=torch.bool)
    sim = feats @ feats.T
    sim[:, ~pool] = float("-inf")
    sim.fill_diagonal_(float("-inf"))
    order = sim.argsort(dim=1, descending=True, stable=True)
    k = min(k, int(pool.sum()) - 1)
    kk = max(k, min(shown, int(pool.sum())))
    rows, sims = order[:, :kk], sim.gather(1, order[:, :kk])
    rows[torch.isinf(sims)] = -1
    num_classes = int(labels.max()) + 1
    retrieved = labels[order[:, :k]].clamp_min(0)
    one_hot = torch.zeros(n * k, num_classes).scatter_(1, retrieved.reshape(-1, 1), 1)
    weights = sims[:, :k].clone().div_(temperature).exp_()
    probs = torch.sum(one_hot.view(n, -1, num_classes) * weights.view(n, -1, 1), 1)
    ranked = probs.argsort(dim=1, descending=True, stable=True)
    target = labels.clamp_min(0)
    voted = probs.gather(1, target[:, None])[:, 0] > 0
    hit1 = (ranked[:, 0] == labels) & voted
    hit5 = (ranked[:, :5] == labels[:, None]).any(dim=1) & voted
    return rows.numpy(), sims.numpy(), ranked[:, 0].numpy(), hit1.numpy(), hit5.numpy(), k


def expected_files(features, labels, classes, paths, k, temperature, shown):
    """knn.json numbers and neighbours.csv rows a plain re-implementation gives."""
    rows, sims, predicted, hit1, hit5, k_used = plain_knn(features, labels, k, temperature, shown)
    labels = np.asarray(labels)
    scored = labels >= 0
    present = sorted(set(labels[scored].tolist()))
    per_class = {classes[c]: {"images": int((labels == c).sum()), "correct": int(hit1[labels == c].sum()),
                              "top1_accuracy": int(hit1[labels == c].sum()) / int((labels == c).sum())}
                 for c in present}
    totals = {"k": k_used, "temperature": temperature, "top1_accuracy": hit1[scored].sum() / scored.sum(),
              "top5_accuracy": hit5[scored].sum() / scored.sum() if len(present) > 5 else None,
              "per_class": per_class}
    table = []
    for i, path in enumerate(paths):
        row = [path, classes[labels[i]] if labels[i] >= 0 else "", classes[predicted[i]]]
        for j in range(shown):
            row += [paths[rows[i, j]], float(sims[i, j])]
        table.append(row)
    return totals, table


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [[float(c) if h.startswith("similarity_") and c else c for h, c in zip(header, row)]
                        for row in reader]


def assert_same_rows(rows, expected, tolerance=1e-6):
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert [c for c in got if not isinstance(c, float)] == [c for c in want if not isinstance(c, float)], got[0]
        assert np.allclose([c for c in got if isinstance(c, float)], [c for c in want if isinstance(c, float)],
                           atol=tolerance, rtol=0), got[0]


def assert_same_totals(got, want):
    for key, value in want.items():
        if key == "per_class":
            assert got[key].keys() == value.keys()
            for name, numbers in value.items():
                assert got[key][name] == pytest.approx(numbers, abs=1e-12), name
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def tie_features(count, seed):
    """Rows of eight 0/1 values with exactly four ones: normalised to 0.5 entries, every similarity (0, .25, .5,
    .75, 1) exact in float32 however it is summed, and many rows equal (70 patterns): ties everywhere."""
    rng = np.random.default_rng(seed)
    features = np.zeros((count, 8), np.float32)
    for row in features:
        row[rng.choice(8, 4, replace=False)] = 1.0
    return features


def random_case(count=97, dim=12, classes=7, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    labels[rng.random(count) < 0.1] = -1  # some unlabelled images: neighbours, no score
    return rng.normal(size=(count, dim)).astype(np.float32), labels


@pytest.mark.parametrize("block,chunk,cache", [(3, 2, 0), (5, 7, 0), (16, 50, 1 << 30), (1000, 8192, 0)])
@pytest.mark.parametrize("features_of", ["random", "ties"])
def test_blockwise_search_equals_the_whole_matrix(block, chunk, cache, features_of):
    features, labels = random_case()
    if features_of == "ties":
        features = tie_features(len(labels), 1)
    unit = F.normalize(torch.as_tensor(features), dim=1).numpy()
    pool = labels >= 0
    rows, sims, *_ = plain_knn(features, labels, 20, 0.07, 5)
    found = list(nearest_neighbours(lambda a, b: unit[a:b], len(unit), pool, 20, torch.device("cpu"), block, chunk,
                                    cache))
    assert [(a, b) for a, b, _, _ in found] == [(a, min(a + block, len(unit))) for a in range(0, len(unit), block)]
    got_rows = np.concatenate([r.numpy() for _, _, _, r in found])
    got_sims = np.concatenate([s.numpy() for _, _, s, _ in found])
    assert (got_rows == rows).all()  # the same neighbours in the same order, ties to the lower row
    assert np.allclose(got_sims, sims, atol=1e-6, rtol=0)
    assert not (got_rows == np.arange(len(unit))[:, None]).any()  # never its own neighbour


def make_ctx(tmp_path, classes, count):
    loaded = SimpleNamespace(task="embedding", preprocess=Preprocess(resize=8, crop=8), class_names=[], synsets=[])
    report = SimpleNamespace(figure_dpi=40, thumbnail_size=16)
    return RunContext(model=None, loaded=loaded, dataset_classes=classes, num_images=count,
                      device=torch.device("cpu"), results_dir=tmp_path, report=report, dataset_root=None)


def feed(analysis, features, labels, paths, batch):
    for start in range(0, len(labels), batch):
        stop = min(start + batch, len(labels))
        images = torch.zeros(stop - start, 3, 8, 8, dtype=torch.uint8)
        analysis.update(Batch(indices=torch.arange(start, stop), paths=paths[start:stop], images=images,
                              inputs=images.float(), labels=torch.as_tensor(labels[start:stop])),
                        ModelOutputs("embedding", embedding=torch.as_tensor(features[start:stop])), None)


@pytest.mark.parametrize("block,k,features_of", [(1, 20, "ties"), (7, 20, "random"), (4096, 200, "random")])
def test_analysis_files_equal_the_plain_protocol(tmp_path, monkeypatch, block, k, features_of):
    monkeypatch.setattr("reportgen.analyses._knn_math.VOTE_VALUES", 50)  # the vote in groups of one query
    features, labels = random_case(count=61)
    if features_of == "ties":
        features = tie_features(len(labels), 2)
    classes = [f"class_{c}" for c in range(7)]
    paths = [f"image_{i:03d}.png" for i in range(len(labels))]
    analysis = Knn(KnnConfig(k=k, block_size=block, queries=3, worst=2), make_ctx(tmp_path, classes, len(labels)))
    feed(analysis, features, labels, paths, 10)
    section = analysis.finalize()
    totals = json.loads((tmp_path / "knn.json").read_text())
    want, table = expected_files(features, labels, classes, paths, k, 0.07, 5)
    assert_same_totals(totals, want)
    assert totals["k_requested"] == k and totals["feature_dtype"] == "float32"
    header, rows = read_csv(tmp_path / "neighbours.csv")
    assert header[:5] == ["path", "label", "predicted", "neighbour_1", "similarity_1"] and len(header) == 13
    assert_same_rows(rows, table)
    assert any(row[1] == "" and row[3] for row in rows)  # unlabelled images get neighbours too
    kinds = [type(e).__name__ for e in section.elements]
    assert kinds.count("ImageStrip") == 5 and "Table" in kinds and kinds.count("Figure") == 2  # bars, confusion
    clamped = [a.message for a in section.alerts if "k = 200" in a.message]
    assert bool(clamped) == (k == 200)
    assert (totals["k"] == len([lab for lab in labels if lab >= 0]) - 1) == (k == 200)


def test_half_precision_features_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("reportgen.analyses.knn.HALF_PRECISION_VALUES", 0)
    _, labels = random_case(count=40)
    features = tie_features(40, 3)  # 0.5 entries: exact in float16 too
    classes = [f"class_{c}" for c in range(7)]
    paths = [f"image_{i:03d}.png" for i in range(40)]
    analysis = Knn(KnnConfig(), make_ctx(tmp_path, classes, 40))
    feed(analysis, features, labels, paths, 16)
    section = analysis.finalize()
    totals = json.loads((tmp_path / "knn.json").read_text())
    want, table = expected_files(features, labels, classes, paths, 20, 0.07, 5)
    assert_same_totals(totals, want)
    assert_same_rows(read_csv(tmp_path / "neighbours.csv")[1], table)
    assert totals["feature_dtype"] == "float16" and "float16 past 1 GiB" in str(section.elements[0].items)


def test_no_accuracy_without_two_classes_and_nonfinite_features(tmp_path):
    features, _ = random_case(count=12)
    features[3] = np.nan
    paths = [f"x_{i}.png" for i in range(12)]
    # no labels at all: every image is the pool, for the neighbours only
    analysis = Knn(KnnConfig(), make_ctx(tmp_path, [], 12))
    feed(analysis, features, np.full(12, -1), paths, 5)
    section = analysis.finalize()
    totals = json.loads((tmp_path / "knn.json").read_text())
    assert totals["top1_accuracy"] is None and totals["top5_accuracy"] is None and totals["per_class"] == {}
    assert "no class subfolders" in totals["no_accuracy"] and "no accuracy" in section.summary
    assert not any("%" in str(value) for element in section.elements if type(element).__name__ == "KeyValues"
                   for _, value in element.items)
    _, rows = read_csv(tmp_path / "neighbours.csv")
    assert rows[3][3:] == [""] * 10  # NaN features: no neighbours, and never anyone's neighbour
    assert all(row[2] == "" and "x_3.png" not in row[3:] for row in rows)
    assert rows[0][3] and any("NaN or Inf" in a.message for a in section.alerts)
    # one class: no accuracy either
    (tmp_path / "one").mkdir()
    analysis = Knn(KnnConfig(), make_ctx(tmp_path / "one", ["a"], 12))
    feed(analysis, features, np.zeros(12, dtype=np.int64), paths, 12)
    analysis.finalize()
    assert "only one class" in json.loads((tmp_path / "one" / "knn.json").read_text())["no_accuracy"]


def test_bad_options_are_config_errors():
    for bad in ({"k": 0}, {"temperature": 0.0}, {"temperature": 0.005}, {"block_size": 0}, {"neighbours": -1}):
        with pytest.raises(ConfigError, match="analysis.knn"):
            Knn.check_config(KnnConfig(**bad))


# --- through the real pipeline ------------------------------------------------------------------------------------

TIMM_BACKBONE = ["model=timm", "model.name=vit_small_patch14_dinov2", "model.weights=null",
                 "+model.kwargs.img_size=28", "+model.kwargs.num_classes=0", "+model.kwargs.depth=2",
                 "+model.kwargs.embed_dim=48", "+model.kwargs.num_heads=2",
                 "+model.kwargs.global_pool=avg",  # DINOv2's layer scale starts at 1e-5: a random class token
                 #   hardly depends on the image (every similarity 0.99999...), the patch mean does
                 "analysis=[summary,knn]", "runtime.num_workers=0", "runtime.progress=false"]


def plain_features(cfg, files):
    """The run's model rebuilt as the pipeline builds it (same seed), fed timm's own eval transform."""
    import timm

    from reportgen.inputs.models import load_model
    from reportgen.runs.pipeline import seed_everything

    seed_everything(int(cfg.runtime.seed))
    model = load_model(cfg.model).module.eval()
    data = timm.data.resolve_model_data_config(model, args={"img_size": 28})
    transform = timm.data.create_transform(**data)
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])  # (N, 3, 28, 28)
    with torch.no_grad():
        return model(batch).numpy()  # (N, 48)


def test_pipeline_knn_equals_plain_protocol_whole_and_sharded(tmp_path):
    from reportgen.runs.merge import merge_runs
    from reportgen.runs.pipeline import run
    from tests.helpers import compose_config, make_colour_folder

    folder = make_colour_folder(tmp_path / "data", per_class=6, noise=60, seed=1)
    (folder / "loose.png").write_bytes((folder / "red" / "red_0.png").read_bytes())  # unlabelled, same pixels
    cfg = compose_config(TIMM_BACKBONE + [f"dataset.root={folder}"])
    run(cfg, out_dir=tmp_path / "whole")
    results = tmp_path / "whole" / "results"
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    classes = ["blue", "green", "red"]
    labels = np.array([classes.index(p.split("/")[0]) if "/" in p else -1 for p in paths])
    features = plain_features(cfg, [folder / p for p in paths])
    want, table = expected_files(features, labels, classes, paths, 20, 0.07, 5)
    totals = json.loads((results / "knn.json").read_text())
    assert_same_totals(totals, want)
    assert totals["k"] == 17 and totals["top5_accuracy"] is None  # 18 labelled images; 3 classes
    _, rows = read_csv(results / "neighbours.csv")
    assert_same_rows(rows, table, tolerance=1e-5)
    loose = rows[paths.index("loose.png")]
    assert loose[1] == "" and loose[2] and loose[3] == "red/red_0.png" and loose[4] == pytest.approx(1.0, abs=1e-5)
    html = (tmp_path / "whole" / "report" / "index.html").read_text(encoding="utf-8")
    assert "k-NN evaluation" in html and "Least agreement with their label" in html

    shards = []
    for i in range(2):
        out = tmp_path / "shards" / str(i)
        run(compose_config(TIMM_BACKBONE + [f"dataset.root={folder}", f"runtime.shard={i}/2",
                                            "runtime.batch_size=4", "analysis.knn.block_size=3"]), out_dir=out)
        shards.append(out)
    merge_runs(shards, tmp_path / "merged")
    merged = tmp_path / "merged" / "results"
    assert json.loads((merged / "knn.json").read_text()) == totals
    _, merged_rows = read_csv(merged / "neighbours.csv")
    assert_same_rows(merged_rows, rows, tolerance=1e-5)
    assert not (merged / ".knn").exists()
