"""`weights` numbers against hand values and numpy, layer selection on real architectures, NaN weights, end to end."""
import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from reportgen.analyses.base import Batch, RunContext
from reportgen.analyses.weights import Weights, WeightsConfig, block_average, default_layers, tensor_stats
from reportgen.engine.capture import count_hooks
from reportgen.errors import ConfigError
from reportgen.inputs.demo.models import demo_vit
from reportgen.report.elements import Figure
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config
from tests.tiny_models import LAST_BUILT, TiedNet, TinyNet


def analysis(model, tmp_path, **options):
    cfg = OmegaConf.merge(OmegaConf.structured(WeightsConfig), options)
    ctx = RunContext(model=model.eval(), loaded=None, dataset_classes=[], num_images=1, device=torch.device("cpu"),
                     results_dir=tmp_path, report=SimpleNamespace(figure_dpi=40))
    return Weights(cfg, ctx)


def begin(weights, size=16):
    inputs = torch.rand(2, 3, size, size)  # (B, 3, H, W)
    weights.begin(Batch(indices=torch.arange(2), paths=["a.png", "b.png"], images=None, inputs=inputs,
                        labels=torch.full((2,), -1)))
    return weights


def by_layer(rows):
    return {r["layer"]: r for r in rows}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_exact_statistics_of_the_hand_set_tiny_net(tmp_path):
    weights = begin(analysis(TinyNet(), tmp_path))
    rows = by_layer(weights.rows)
    assert list(rows) == ["conv", "shared", "fc"]  # weights only: biases are not listed
    # conv [[1, 0, 0], [0, -1, 0]]; shared [[1, 0], [0, 2]]; fc [[1, 0], [0, 1], [-1, -1]]
    expected = {
        "conv": dict(count=6, mean=0.0, std=math.sqrt(2 / 6), min=-1.0, max=1.0, l2=math.sqrt(2), frac=4 / 6),
        "shared": dict(count=4, mean=0.75, std=math.sqrt(2.75 / 4), min=0.0, max=2.0, l2=math.sqrt(5), frac=2 / 4),
        "fc": dict(count=6, mean=0.0, std=math.sqrt(4 / 6), min=-1.0, max=1.0, l2=2.0, frac=2 / 6),
    }
    for layer, want in expected.items():
        row = rows[layer]
        assert row["count"] == want["count"] and row["nonfinite"] == 0 and row["param"] == "weight"
        for key in ("mean", "std", "min", "max", "l2"):
            assert row[key] == pytest.approx(want[key], abs=1e-12), (layer, key)
        assert row["frac_near_zero"] == pytest.approx(want["frac"], abs=1e-12)
    assert rows["conv"]["shape"] == "2×3×1×1" and rows["conv"]["type"] == "Conv2d"
    # an independent oracle: numpy on the parameters themselves
    for name, param in TinyNet().named_parameters():
        if name.endswith("weight"):
            values = param.detach().numpy().astype(np.float64)
            row = rows[name.rsplit(".", 1)[0]]
            assert (row["mean"], row["std"], row["l2"]) == pytest.approx(
                (values.mean(), values.std(), np.linalg.norm(values)), abs=1e-12)
            assert sum(row["hist"][0]) == values.size


def test_csv_has_one_row_per_weight_tensor_with_exact_numbers(tmp_path):
    weights = begin(analysis(TinyNet(), tmp_path))
    section = weights.finalize()
    rows = read_csv(tmp_path / "weights.csv")
    assert list(rows[0]) == ["layer", "type", "param", "shape", "count", "mean", "std", "min", "max", "l2",
                             "frac_near_zero", "nonfinite", "shared_with"]
    assert [r["layer"] for r in rows] == ["conv", "shared", "fc"]
    assert float(rows[1]["mean"]) == 0.75 and float(rows[2]["l2"]) == 2.0 and int(rows[0]["nonfinite"]) == 0
    assert float(rows[0]["std"]) == pytest.approx(math.sqrt(1 / 3), abs=1e-15)
    assert not section.alerts
    assert any(isinstance(e, Figure) for e in section.elements)


def test_near_zero_is_relative_to_the_largest_weight():
    values = torch.tensor([1.0, 0.5, 0.009, -0.01, 0.0, -0.2])
    small = tensor_stats(values * 1e-6, zero_tolerance=0.01, bins=10)
    large = tensor_stats(values, zero_tolerance=0.01, bins=10)
    assert small["frac_near_zero"] == large["frac_near_zero"] == pytest.approx(3 / 6)  # 0.009, -0.01, 0 (≤ 0.01)
    constant = tensor_stats(torch.zeros(5), zero_tolerance=0.01, bins=10)  # an all-zero tensor is all near zero
    assert constant["frac_near_zero"] == 1.0 and constant["std"] == 0.0


def test_tied_weights_are_listed_once_and_marked_shared(tmp_path):
    weights = begin(analysis(TiedNet(), tmp_path, layers=["dec"]), size=8)
    rows = by_layer(weights.rows)
    assert list(rows) == ["enc", "head"]
    assert rows["enc"]["shared_with"] == "dec" and rows["enc"]["count"] == 144
    assert rows["enc"]["drawn"], "selecting the tensor by its second name draws it"
    weights.finalize()
    csv_rows = read_csv(tmp_path / "weights.csv")
    assert [(r["layer"], r["shared_with"]) for r in csv_rows] == [("enc", "dec"), ("head", "")]


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", ["conv1", "layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2", "fc"]),
    ("resnet50", ["conv1", "layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3", "fc"]),
    ("mobilenet_v3_small", ["features.0.0", "features.1.block.2.0", "features.3.block.2.0",
                            "features.8.block.3.0", "features.12.0", "classifier.3"]),
])
def test_default_selection_is_small_and_sensible_on_torchvision_models(arch, expected):
    model = torchvision.models.get_model(arch, weights=None).eval()
    selected, how = default_layers(model, torch.rand(1, 3, 64, 64))
    assert selected == expected and "stage" in how
    assert count_hooks(model) == 0


def test_demo_vit_default_draws_patch_filters_and_attention_in_proj_heatmaps(tmp_path):
    weights = begin(analysis(demo_vit(pretrained=False), tmp_path), size=64)
    blocks = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(4)]
    assert weights.selection["selected"] == ["conv_proj", *blocks, "heads.head"]
    kinds = {(p["layer"], p["param"]): p["kind"] for p in weights.plots}
    assert kinds[("conv_proj", "weight")] == "rgb"  # 96x3x8x8 patch embedding: colour filters
    assert all(kinds[(b, "in_proj_weight")] == "heatmap" for b in blocks)
    section = weights.finalize()
    captions = [e.caption for e in section.elements if isinstance(e, Figure)]
    assert sum("self_attention.in_proj_weight (288×96)" in c and "q, k, v" in c for c in captions) == 4
    assert any(c.startswith("conv_proj.weight (96×3×8×8): the first 64 of 96 filters") for c in captions)
    assert any(c.startswith("Weight histograms") for c in captions)


def test_pattern_typo_is_a_config_error_with_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'fc'"):
        begin(analysis(TinyNet(), tmp_path, layers=["fcc"]))
    with pytest.raises(ConfigError, match="own a weight"):
        begin(analysis(TinyNet(), tmp_path, layers=["type:ReLU"]))
    with pytest.raises(ConfigError, match="histograms"):
        analysis(TinyNet(), tmp_path, histograms="some")


def test_a_container_pattern_stands_for_the_weights_inside_it(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    weights = begin(analysis(model, tmp_path, layers=["layer4.1", "type:Linear"]), size=32)
    assert weights.selection["selected"] == ["layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2", "fc"]
    assert weights.selection["one_d"] == ["layer4.1.bn1", "layer4.1.bn2"]  # norm scales: table and histogram only
    grey = next(p for p in weights.plots if p["layer"] == "layer4.1.conv1")
    assert grey["kind"] == "grey" and grey["data"].shape == (64, 3, 3)  # capped at max_filters, mean over inputs
    np.testing.assert_allclose(grey["data"], model.layer4[1].conv1.weight[:64].mean(dim=1).detach().numpy(),
                               rtol=1e-6)


def test_nan_and_inf_weights_are_counted_alerted_and_still_drawn(tmp_path):
    model = TinyNet()
    with torch.no_grad():
        model.conv.weight[0, 0] = float("nan")  # conv becomes [[nan, 0, 0], [0, -1, 0]]
        model.fc.weight[1, 1] = float("inf")
        model.shared.weight.fill_(float("nan"))  # no finite value at all
    weights = begin(analysis(model, tmp_path, layers=["conv", "shared", "fc"]))
    rows = by_layer(weights.rows)
    assert (rows["conv"]["nonfinite"], rows["fc"]["nonfinite"], rows["shared"]["nonfinite"]) == (1, 1, 4)
    assert (rows["conv"]["mean"], rows["conv"]["min"], rows["conv"]["max"]) == pytest.approx((-0.2, -1.0, 0.0))
    assert rows["fc"]["max"] == 1.0 and math.isnan(rows["shared"]["mean"])
    section = weights.finalize()
    assert [a.level for a in section.alerts] == ["error"]
    assert section.alerts[0].details == ["conv.weight: 1 of 6 entries", "shared.weight: 4 of 4 entries",
                                         "fc.weight: 1 of 6 entries"]
    figures = [e for e in section.elements if isinstance(e, Figure)]
    assert len(figures) == 4 and all(f.data.startswith(b"\x89PNG") for f in figures)  # 3 heatmaps, 1 histogram page
    assert read_csv(tmp_path / "weights.csv")[1]["mean"] == "nan"


def test_block_average_equals_direct_block_means():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(5, 7))
    matrix[0, 0] = np.nan
    small, factors = block_average(matrix, limit=2)
    assert factors == (3, 4) and small.shape == (2, 2)
    for i, rows in enumerate((slice(0, 3), slice(3, 5))):
        for j, cols in enumerate((slice(0, 4), slice(4, 7))):
            block = matrix[rows, cols]
            assert small[i, j] == pytest.approx(np.nanmean(block))
    big = rng.normal(size=(1100, 30))
    assert block_average(big, limit=512)[0].shape == (367, 30)
    assert block_average(big[:10], limit=512)[1] == (1, 1)


def test_heatmap_of_a_big_matrix_is_capped_and_says_so(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 1200))
    weights = begin(analysis(model, tmp_path, layers=["2"], heatmap_size=256))
    plot = weights.plots[0]
    assert plot["data"].shape == (240, 196) and any("block-averaged 5×4" in n for n in plot["notes"])


def test_state_merges_to_one_copy(tmp_path):
    first = begin(analysis(TinyNet(), tmp_path))
    merged = analysis(TinyNet(), tmp_path)
    merged.merge(first.state_dict())
    merged.merge(first.state_dict())
    assert [r["layer"] for r in merged.rows] == ["conv", "shared", "fc"]
    assert merged.rows[1]["mean"] == 0.75 and len(merged.plots) == len(first.plots)


def test_weights_are_read_even_when_no_image_was_processed(tmp_path):
    section = analysis(TinyNet(), tmp_path).finalize()  # begin never ran: no batch could be decoded
    assert section.summary.startswith("3 weight tensors, 16 weights")
    assert [r["layer"] for r in read_csv(tmp_path / "weights.csv")] == ["conv", "shared", "fc"]


def test_pipeline_writes_weights_csv_and_shows_the_figures(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[weights]"])
    index = run(cfg, out_dir=tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "results" / "weights.csv")
    assert [(r["layer"], r["shape"], r["count"]) for r in rows] == [("conv", "2×3×1×1", "6"),
                                                                     ("shared", "2×2×1×1", "4"), ("fc", "3×2", "6")]
    assert float(rows[2]["l2"]) == 2.0
    html = index.read_text(encoding="utf-8")
    assert ">Weights<" in html and "results/weights.csv" in html
    assets = sorted(p.name for p in (index.parent / "assets").glob("weights-*.png"))
    assert len(assets) == 4  # conv, shared, fc heatmaps (1x1 convs as matrices) and one histogram page
    assert all(f'src="assets/{name}"' in html for name in assets)
    assert count_hooks(LAST_BUILT["tiny_net"]) == 0
