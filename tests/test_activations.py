"""The `activations` analysis against brute force: plain forward hooks, numpy over every stacked activation, numpy's
SVD for the PCA; merging two halves against one pass over the whole; state that does not grow with the folder."""
import csv
import json

import numpy as np
import pytest
import torch

from reportgen.analyses.activations import QUANTILES, Activations, crop_at, histogram_quantiles
from reportgen.analyses.base import Batch, RunContext, capture_engine_for
from reportgen.engine.capture import CaptureEngine, count_hooks
from reportgen.engine.tensors import channel_view
from reportgen.errors import ConfigError
from reportgen.inputs.data import ImageFolderDataset, collate, scan_folder
from reportgen.inputs.models import load_model
from reportgen.runs.pipeline import run
from reportgen.state.channel_reducers import (HIST_SAMPLE, ChannelStats, ChannelTopK, CovarianceMoments, Scratch,
                                              batch_reductions, histogram_stride, peak_positions, sampled_positions,
                                              symlog_edges)
from reportgen.state.reducers import BoundedTop, FixedHistogram
from reportgen.inputs.tasks import ModelOutputs
from tests.helpers import TINY, compose_config

MOMENT_BOUND = 2.0 ** -20  # the stated accuracy of channel mean and std, in units of the channel's root mean square
KEYS = ["conv", "act", "shared", "shared#2"]  # call order of TinyNet's selected layers (shared runs twice)
LAYERS = ["analysis=[activations]", "analysis.activations.layers=[conv,act,shared]",
          "analysis.activations.saturation=0.5", "analysis.activations.top_k=3"]


@pytest.fixture(params=["cpu_kernels", "eager"])
def reduction_path(request, monkeypatch):
    """Run a test both ways a CPU batch can be reduced: the fused C kernels (the default for float32 maps) and the
    eager torch ops (CUDA, float64, no compiled library, REPORTGEN_CPU_KERNELS=0)."""
    from reportgen.state import cpu_kernels

    if request.param == "eager":
        monkeypatch.setattr(cpu_kernels, "takes", lambda x: False)
    else:
        assert cpu_kernels.takes(torch.zeros(1, 1, 1)), "map_kernels.c not built: pip install -e . needs a C compiler"
    return request.param


def plain_hook_outputs(model, x):
    """Independent oracle: plain forward hooks that clone every call's output (a clone is what keeps the in-place
    ReLU from rewriting conv's output), keyed like the engine."""
    outputs, handles = {}, []
    for name in ("conv", "act", "shared"):
        def hook(module, inputs, output, name=name):
            key = name if name not in outputs else f"{name}#2"
            outputs[key] = output.detach().clone()
        handles.append(dict(model.named_modules())[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


def folder_batches(cfg, folder, size):
    """The folder as the pipeline sees it: decoded, preprocessed, split into Batches of `size` (failed files out)."""
    loaded = load_model(cfg.model)
    scan = scan_folder(folder, list(cfg.dataset.extensions))
    dataset = ImageFolderDataset(scan, loaded.preprocess)
    items = [dataset[i] for i in range(len(dataset))]
    raw = collate([item for item in items if item["image"] is not None])
    batches = []
    for first in range(0, len(raw.indices), size):
        indices = raw.indices[first:first + size]
        images = raw.images[first:first + size]
        batches.append(Batch(indices=indices, paths=[scan.paths[i] for i in indices.tolist()], images=images,
                             inputs=loaded.preprocess.normalize(images),
                             labels=torch.tensor([scan.labels[i] for i in indices.tolist()])))
    return loaded, scan, batches


def feed(cfg, loaded, scan, batches, results_dir, num_images=None):
    """An Activations instance fed `batches` exactly as the pipeline does (begin, requires, engine, update)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(model=loaded.module, loaded=loaded, dataset_classes=scan.class_names,
                     num_images=num_images or len(scan.paths), device=torch.device("cpu"), results_dir=results_dir,
                     report=cfg.report)
    analysis = Activations(cfg.analysis.activations, ctx)
    analysis.begin(batches[0])
    with capture_engine_for(loaded.module, [analysis]) as engine:
        for batch in batches:
            captures = engine.start_batch(batch)
            with torch.inference_mode():
                logits = loaded.module(batch.inputs)
                analysis.update(batch, ModelOutputs("classification", logits=logits), captures)
    return analysis


def assert_moments_within_bound(mean, std, values):
    """mean and std of `values` (any shape, float64 copies of float32 data) within MOMENT_BOUND x their rms of the
    exact (float64, two-pass) ones."""
    rms = float(np.sqrt((values ** 2).mean()))
    assert abs(mean - values.mean()) <= MOMENT_BOUND * rms, (mean, values.mean(), rms)
    assert abs(std - values.std()) <= MOMENT_BOUND * rms, (std, values.std(), rms)


def histogram_of_sampled_positions(edges, outputs, stride):
    """numpy's binning of each image's values at the flat positions 0, stride, 2 stride, ... (B, ...) outputs."""
    expected = FixedHistogram(edges)
    expected.add(outputs.reshape(outputs.shape[0], -1)[:, ::stride])
    return expected.counts


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_engine_captures_equal_plain_hooks_with_reuse_and_in_place(colour_folder, tmp_path):
    cfg = compose_config(TINY + LAYERS + [f"dataset.root={colour_folder}"])
    loaded, scan, batches = folder_batches(cfg, colour_folder, 12)
    model, x = loaded.module, batches[0].inputs
    analysis = feed(cfg, loaded, scan, batches, tmp_path / "results")
    assert [c.key for c in analysis.calls] == KEYS
    with CaptureEngine(model, analysis.layers) as engine:
        captures = engine.start_batch()
        with torch.no_grad():
            model(x)
    assert count_hooks(model) == 0
    expected, _ = plain_hook_outputs(model, x)
    for key in KEYS:
        assert torch.equal(captures[key], expected[key]), key
    # the engine kept conv's pre-ReLU values although act rewrote that very tensor in place
    direct = torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias)
    assert torch.equal(captures["conv"], direct) and (direct < 0).any()
    assert torch.equal(captures["shared#2"], model.shared(model.shared(direct.clamp_min(0))))


def test_pipeline_statistics_and_top_k_equal_brute_force(colour_folder, tmp_path, reduction_path):
    cfg = compose_config(TINY + LAYERS + [f"dataset.root={colour_folder}", "runtime.batch_size=5"])
    index = run(cfg, out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results"
    loaded, scan, batches = folder_batches(cfg, colour_folder, 12)
    (batch,) = batches
    outputs, logits = plain_hook_outputs(loaded.module, batch.inputs)
    rows = read_csv(results / "activation_stats.csv")
    assert [r["layer"] for r in rows] == [k for k in KEYS for _ in range(2)]
    topk = json.loads((results / "topk.json").read_text())
    for key in KEYS:
        values = outputs[key].double().numpy()  # (12, 2, 16, 16): every image of the folder
        for channel in range(2):
            row = rows[KEYS.index(key) * 2 + channel]
            v = values[:, channel]
            assert int(row["count"]) == v.size and int(row["nonfinite"]) == 0
            assert_moments_within_bound(float(row["mean"]), float(row["std"]), v)
            assert float(row["max"]) == v.max() and float(row["min"]) == v.min()
            assert float(row["frac_zero"]) == (v == 0).mean()
            assert float(row["frac_saturated"]) == (np.abs(v) >= 0.5).mean()
            peaks = v.reshape(12, -1).max(axis=1)  # (12,) spatial max per image
            order = sorted(range(12), key=lambda i: (-peaks[i], i))[:3]  # true top 3, earlier file on ties
            got = topk[key][str(channel)]
            assert [e["path"] for e in got] == [batch.paths[i] for i in order]
            assert [e["value"] for e in got] == [float(peaks[i]) for i in order]
            cells = [divmod(int(v[i].reshape(-1).argmax()), v.shape[-1]) for i in order]  # first maximum's cell
            assert [(e["y"], e["x"]) for e in got] == cells
    stats = {r["layer"]: r for r in rows if r["channel"] == "1"}  # channel 1 = 0.5 - green: negative on green
    assert float(stats["conv"]["min"]) < 0 <= float(stats["act"]["min"])  # in-place ReLU did not leak into conv
    embeddings = np.load(results / "embeddings.npz")
    features = torch.nn.functional.adaptive_avg_pool2d(outputs["shared#2"], 1).flatten(1).double().numpy()
    np.testing.assert_array_equal(embeddings["features"], features.astype(np.float32))
    assert list(embeddings["paths"]) == batch.paths
    assert embeddings["predicted"].tolist() == logits.argmax(1).tolist()
    assert str(embeddings["layer"]) == "pool"
    centred = features - features.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    signs = np.sign((embeddings["features_2d"] * projected).sum(axis=0))
    np.testing.assert_allclose(embeddings["features_2d"] * signs, projected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embeddings["explained_variance"], singular[:2] ** 2 / 12, rtol=1e-9)
    html = index.read_text(encoding="utf-8")
    assert "Activations" in html and "activation_stats.csv" in html
    assert not (results / ".activations").exists(), "temporary feature rows removed"


def test_two_halves_merged_equal_one_pass(colour_folder, tmp_path, reduction_path):
    cfg = compose_config(TINY + LAYERS + [f"dataset.root={colour_folder}", "analysis.activations.channels=[1,0]",
                                          "analysis.activations.n_images=4", "analysis.activations.hist_sample=100"])
    loaded, scan, batches = folder_batches(cfg, colour_folder, 3)  # 4 batches of 3
    whole = feed(cfg, loaded, scan, batches, tmp_path / "whole")
    first = feed(cfg, loaded, scan, batches[:2], tmp_path / "a")
    second = feed(cfg, loaded, scan, batches[2:], tmp_path / "b")
    first.merge(second.state_dict())
    assert first.images == whole.images == 12
    for key in KEYS:
        a, b = first.stats[key], whole.stats[key]
        for name in ("count", "zeros", "saturated", "nonfinite", "min", "max"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.m2, b.m2, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(first.hists[key].counts, whole.hists[key].counts)
        np.testing.assert_array_equal(first.topk[key].scores, whole.topk[key].scores)
        np.testing.assert_array_equal(first.topk[key].orders, whole.topk[key].orders)
    images = {int(i): image for b in batches for i, image in zip(b.indices, b.images)}
    calls = {call.key: call for call in whole.calls}
    for key, heaps in whole.crops.items():
        for channel, heap in heaps.items():
            assert [i[:2] for i in first.crops[key][channel].items()] == [i[:2] for i in heap.items()]
            top = whole.topk[key].items(channel)  # brute-force tested: the same ranking, so the same images
            assert [index for _, index, _ in heap.items()] == [index for _, index, _ in top]
            for (_, index, item), (_, _, extra) in zip(heap.items(), top):  # each crop cut at its maximum's cell
                region, centre = crop_at(images[index], calls[key].grid, int(extra["position"]),
                                         float(cfg.analysis.activations.crop_factor))
                np.testing.assert_array_equal(item["region"], region)
                assert item["centre"] == centre
    kept = [[[i[1] for i in heap.items()] for heap in a.gallery] for a in (first, whole)]
    assert kept[0] == kept[1] == [[2], [5], [8], [11]]  # the image nearest the middle of each quarter of the folder
    np.testing.assert_allclose(first.moments.mean, whole.moments.mean, rtol=1e-9)
    np.testing.assert_allclose(first.moments.m2, whole.moments.m2, rtol=1e-9, atol=1e-12)
    # histograms against numpy's binning of the sampled positions of every image
    outputs, _ = plain_hook_outputs(loaded.module, torch.cat([b.inputs for b in batches]))
    assert [c.hist_stride for c in whole.calls] == [7] * 4  # 2 x 16 x 16 values an image, at most 100 counted
    for key in KEYS:
        np.testing.assert_array_equal(whole.hists[key].counts, histogram_of_sampled_positions(
            whole.edges, outputs[key].numpy(), 7))


def test_gallery_maps_are_each_images_strongest_channels_and_its_mean_map(colour_folder, tmp_path):
    """The gallery's feature maps against plain hooks: per drawn layer and gallery image, the channels shown are
    the image's channels_shown strongest by mean, best first (the order up to float32 rounding of the means), their
    maps exact, and the mean map the mean over every channel."""
    cfg = compose_config(TINY + LAYERS + [f"dataset.root={colour_folder}", "analysis.activations.n_images=4",
                                          "analysis.activations.channels_shown=1"])
    loaded, scan, batches = folder_batches(cfg, colour_folder, 5)
    analysis = feed(cfg, loaded, scan, batches, tmp_path / "run")
    outputs, _ = plain_hook_outputs(loaded.module, torch.cat([b.inputs for b in batches]))
    rows = torch.cat([b.indices for b in batches]).tolist()  # the folder's image index of each output row
    items = [(index, item) for heap in analysis.gallery for _, index, item in heap.items()]
    assert len(items) == 4 and all(set(item["maps"]) == set(KEYS) for _, item in items)
    for index, item in items:
        index = rows.index(index)
        for key, (channels, maps, mean_map) in item["maps"].items():
            image = outputs[key][index].float()  # (C, h, w)
            means = image.double().mean(dim=(1, 2)).numpy()
            assert len(channels) == 1 and means[channels[0]] >= means.max() * (1 - 1e-6)
            np.testing.assert_array_equal(maps, image[channels].numpy())
            np.testing.assert_allclose(mean_map.numpy(), image.mean(dim=0).numpy(), rtol=1e-6, atol=1e-7)


def test_state_does_not_grow_with_the_number_of_batches(colour_folder, tmp_path):
    cfg = compose_config(TINY + LAYERS + [f"dataset.root={colour_folder}", "analysis.activations.spread=false"])
    loaded, scan, batches = folder_batches(cfg, colour_folder, 4)
    many = [Batch(indices=b.indices + 100 * r, paths=b.paths, images=b.images, inputs=b.inputs, labels=b.labels)
            for r in range(4) for b in batches]  # the folder 4 times over, as if 4x larger

    def size(analysis):
        arrays = sum(s.nbytes() for s in analysis.stats.values()) + sum(t.nbytes() for t in analysis.topk.values())
        arrays += sum(h.counts.nbytes for h in analysis.hists.values()) + analysis.moments.m2.numel() * 8
        heaps = sum(len(h) for h in analysis.gallery) + sum(len(h) for c in analysis.crops.values() for h in c.values())
        return arrays, heaps

    small = feed(cfg, loaded, scan, many[:3], tmp_path / "small", 48)  # 12 images: every heap already full
    large = feed(cfg, loaded, scan, many, tmp_path / "large", 48)  # 48 images
    assert size(small) == size(large)


def test_channel_top_k_equals_bounded_top_and_pca_equals_numpy_svd():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 3)).astype(np.float64)  # many ties
    top = ChannelTopK(3, 4)
    for first in range(0, 40, 7):
        top.add(scores[first:first + 7], np.arange(first, min(first + 7, 40)))
    for channel in range(3):
        heap = BoundedTop(4)
        for i in range(40):
            heap.push(scores[i, channel], i, None)
        assert [(s, o) for s, o, _ in top.items(channel)] == [(s, o) for s, o, _ in heap.items()]
    features = rng.normal(size=(90, 12)) * np.linspace(3, 0.1, 12) + 5.0
    moments = CovarianceMoments()
    for first in range(0, 90, 32):
        moments.add(torch.as_tensor(features[first:first + 32]))
    mean, components, variance, ratio = moments.pca(2)
    centred = features - features.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(components), np.abs(vt[:2]), atol=1e-9)
    np.testing.assert_allclose(variance, singular[:2] ** 2 / 90, rtol=1e-9)
    np.testing.assert_allclose(ratio, singular[:2] ** 2 / (singular ** 2).sum(), rtol=1e-9)
    edges = symlog_edges(1e-4, 1e4, 8)
    assert np.array_equal(edges, edges.astype(np.float32)) and np.array_equal(edges, -edges[::-1])


def test_top_k_accepts_every_item_it_then_keeps_and_peak_positions_equal_numpy_argmax(reduction_path):
    """Positions of the maximum are found only where the top-k could take the item; that must cover every item
    kept (ties included), and each position is numpy's first argmax of the finite values."""
    rng = np.random.default_rng(4)
    top = ChannelTopK(5, 3)
    for first in range(0, 60, 8):
        scores = rng.integers(0, 4, size=(8, 5)).astype(np.float64)  # many ties with the kept items
        scores[rng.random((8, 5)) < 0.1] = np.nan
        orders = np.arange(first, first + 8)
        wanted = top.accepts(scores, orders)
        assert (wanted.sum(axis=0) <= 3).all(), "at most the batch's own best k per channel"
        before = {(c, o) for c in range(5) for _, o, _ in top.items(c)}
        top.add(scores, orders, position=np.where(wanted, orders[:, None], -1))
        for channel in range(5):
            for _, order, extra in top.items(channel):
                assert (channel, order) in before or extra["position"] == order, "kept without its position"
    x = torch.tensor(rng.integers(0, 3, size=(4, 3, 10)).astype(np.float32))  # ties: the first maximum counts
    x[1, 2, 0], x[2, 0, 4], x[3, 1] = float("inf"), float("nan"), float("nan")
    finite = np.where(np.isfinite(x.numpy()), x.numpy(), -np.inf)
    for share in (0.6, 0.15):  # most pairs (one max over everything) and a few (gathered maps)
        wanted = rng.random((4, 3)) < share
        expected = np.where(wanted, finite.argmax(axis=2), -1)
        np.testing.assert_array_equal(peak_positions(x, wanted), expected)
        strided = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # the same values, channels-last in memory
        np.testing.assert_array_equal(peak_positions(strided, wanted), expected)
        clean = x[:1]  # no NaN/Inf: the caller may say so, and pass the maxima (the kernels scan up to them)
        np.testing.assert_array_equal(peak_positions(clean, wanted[:1], finite=True), expected[:1])
        np.testing.assert_array_equal(peak_positions(clean, wanted[:1], finite=True,
                                                     peaks=clean.amax(dim=2).double().numpy()), expected[:1])


def stream_moments(chunks, stride=1):
    """ChannelStats and histogram counts of (B, C, P) chunks fed one batch at a time, as the analysis does."""
    edges = symlog_edges(1e-4, 1e4, 8)
    stats, hist = ChannelStats(chunks[0].shape[1]), np.zeros(len(edges) - 1, dtype=np.int64)
    for chunk in chunks:
        host = batch_reductions(chunk, torch.as_tensor(edges), hist_stride=stride)
        stats.add(*(host[n] for n in ChannelStats.FIELDS))
        hist += host["hist"]
    return stats, hist, edges


def test_channel_moments_stay_within_the_stated_bound_on_data_built_to_cancel(reduction_path):
    """Per-image float32 moments merged in float64 against (a) closed-form answers on exactly representable data and
    (b) float64 two-pass moments of every value, on channels whose mean dwarfs their spread; batches of uneven size."""
    rng = np.random.default_rng(4)
    images, positions = 29, 56 * 56
    signs = np.where(np.arange(positions) % 2 == 0, -1.0, 1.0)  # half -d, half +d in every image
    exact = np.stack([1000.0 + 2.0 ** -7 * signs,  # mean 1000, std 2^-7 exactly (both float32 numbers)
                      -3.0 + 0.5 * signs,  # mean -3, std 0.5
                      np.full(positions, 0.25)])  # constant: std exactly 0
    noisy = np.stack([1000.0 + 1e-3 * rng.standard_normal(positions), rng.standard_normal(positions) * 1e-6,
                      np.maximum(rng.standard_normal(positions), 0.0) * 50.0])
    data = np.concatenate([np.broadcast_to(exact, (images, 3, positions)),
                           noisy[None] + rng.standard_normal((images, 3, 1)) * [[1e-3], [1e-6], [5.0]]], axis=1)
    data = data.astype(np.float32)  # (29, 6, 3136)
    x = torch.from_numpy(data)
    stats, _, _ = stream_moments([x[:5], x[5:8], x[8:24], x[24:]])
    values = data.astype(np.float64).transpose(1, 0, 2).reshape(6, -1)  # (C, N) every value
    for c, (mean, std) in enumerate([(1000.0, 2.0 ** -7), (-3.0, 0.5), (0.25, 0.0)]):
        rms = np.sqrt(mean ** 2 + std ** 2)
        assert abs(stats.mean[c] - mean) <= MOMENT_BOUND * rms and abs(stats.std[c] - std) <= MOMENT_BOUND * rms
    for c in range(6):
        assert_moments_within_bound(stats.mean[c], stats.std[c], values[c])
        if reduction_path == "cpu_kernels":  # float64 sums: within float64 rounding, far inside the bound
            rms = float(np.sqrt((values[c] ** 2).mean()))
            assert abs(stats.mean[c] - values[c].mean()) <= 2.0 ** -40 * rms
            assert abs(stats.std[c] - values[c].std()) <= 2.0 ** -40 * rms
    # a plain float32 forward hook (torch's own mean / std over the layer) is within twice the bound of ours
    plain_mean, plain_std = x.mean(dim=(0, 2)).double().numpy(), x.std(dim=(0, 2), correction=0).double().numpy()
    rms = np.sqrt((values ** 2).mean(axis=1))
    assert (np.abs(stats.mean - plain_mean) <= 2 * MOMENT_BOUND * rms).all()
    assert (np.abs(stats.std - plain_std) <= 2 * MOMENT_BOUND * rms).all()


def test_channel_moments_stay_within_the_stated_bound_on_maps_of_a_million_positions(reduction_path):
    """A long map (896 x 896 positions, P not a multiple of NORM_BLOCK) where one float32 norm over the whole map
    would lose 2^-19 of the sum of squares: the blocked norms keep mean and std within the bound."""
    from reportgen.state.channel_reducers import NORM_BLOCK

    torch.manual_seed(6)
    positions = 896 * 896 + 5
    assert positions > 32 * NORM_BLOCK and positions % NORM_BLOCK
    x = torch.rand(2, 3, positions) * 10 + 3  # positive, mean 8, std 2.9: a sum of squares with no cancellation
    stats, _, _ = stream_moments([x])
    values = x.double().permute(1, 0, 2).reshape(3, -1).numpy()
    for c in range(3):
        assert_moments_within_bound(stats.mean[c], stats.std[c], values[c])


def test_sampled_histogram_percentiles_within_one_percentile_rank_of_every_value():
    """The default histogram sample (at most HIST_SAMPLE values of each image and layer) against the histogram of
    every value, on a real resnet18's stage outputs (random weights, smooth random images, 24 of them): each
    percentile the report draws from the sample lies between the full histogram's percentiles one percentile rank
    below and above."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.nn.functional.interpolate(torch.rand(24, 3, 12, 12), size=96, mode="bilinear")  # (24, 3, 96, 96)
    outputs = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output.flatten(2)))
        for name in ("layer1", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        model((images - 0.45) / 0.25)
    for handle in handles:
        handle.remove()
    for name, x in outputs.items():  # (24, C, P)
        stride = histogram_stride(x.shape[1], x.shape[2], HIST_SAMPLE)
        assert stride > 1
        sampled, sampled_hist, edges = stream_moments([x[:10], x[10:]], stride=stride)
        whole, whole_hist, _ = stream_moments([x], stride=1)
        assert sampled_hist.sum() == sampled_positions(x, stride).numel() <= 24 * HIST_SAMPLE
        assert whole_hist.sum() == x.numel()
        low, high = float(whole.min.min()), float(whole.max.max())
        got = histogram_quantiles(sampled_hist, edges, QUANTILES, low, high)
        below = histogram_quantiles(whole_hist, edges, [max(q - 0.01, 0.0) for q in QUANTILES], low, high)
        above = histogram_quantiles(whole_hist, edges, [min(q + 0.01, 1.0) for q in QUANTILES], low, high)
        assert (below <= got).all() and (got <= above).all(), (name, below, got, above)


def test_histogram_stride_is_the_smallest_prime_that_fits_the_sample():
    shapes = [(1, 100), (64, 64), (4097, 1), (64, 56 * 56), (512, 7 * 7), (256, 6 * 6), (4096, 2)]
    assert [histogram_stride(c, p, 4096) for c, p in shapes] == [1, 1, 2, 53, 11, 5, 3]  # 7 divides 49, 3 divides 36
    assert histogram_stride(64, 10 ** 6, 0) == 1


def test_sampled_histogram_and_moments_do_not_depend_on_how_images_are_batched(reduction_path):
    torch.manual_seed(5)
    x = torch.randn(13, 5, 7 * 7).relu()  # (B, C, P)
    one, one_hist, edges = stream_moments([x], stride=17)
    split, split_hist, _ = stream_moments([x[:2], x[2:9], x[9:]], stride=17)
    np.testing.assert_array_equal(one_hist, split_hist)
    np.testing.assert_array_equal(one_hist, histogram_of_sampled_positions(edges, x.numpy(), 17))
    for name in ("count", "zeros", "min", "max"):
        np.testing.assert_array_equal(getattr(one, name), getattr(split, name))
    np.testing.assert_allclose(split.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(split.m2, one.m2, rtol=1e-12)


def test_chunks_of_a_few_images_bound_the_work_buffer_and_change_no_result(monkeypatch):
    import reportgen.state.channel_reducers as reducers
    from reportgen.state import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "takes", lambda x: False)  # the eager path's chunks (the kernels take none)
    torch.manual_seed(11)
    x = torch.randn(7, 4, 6 * 6).relu() - 0.25  # (B, C, P): zeros, negatives, values beyond the saturation bounds
    x[1, 2] = 3.0
    edges = torch.as_tensor(symlog_edges(1e-4, 1e4, 8))
    monkeypatch.setattr(reducers, "CHUNK_VALUES", {"cpu": 7 * 4 * 36})  # the whole batch in one chunk
    whole = batch_reductions(x, edges, low=-0.2, high=1.5, hist_stride=5, scratch=Scratch())
    monkeypatch.setattr(reducers, "CHUNK_VALUES", {"cpu": 3 * 4 * 36})  # 3 images a chunk: 3, 3 and 1
    scratch = Scratch()
    chunked = batch_reductions(x, edges, low=-0.2, high=1.5, hist_stride=5, scratch=scratch)
    assert scratch.storage.numel() == 3 * 4 * 36, "the buffer holds one chunk, not the batch"
    assert whole.keys() == chunked.keys()
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)
    assert int(whole["saturated"].sum()) == int(((x >= 1.5) | (x <= -0.2)).sum())
    assert int(whole["zeros"].sum()) == int((x == 0).sum()) and float(whole["max"].max()) == 3.0


def test_cpu_kernels_equal_the_eager_reductions_and_numpy_exactly_where_rounding_does_not_enter(monkeypatch):
    """The fused kernels against numpy on every value: min, max, zero / saturated counts, first-argmax positions and
    sampled histograms exactly (signed zeros, ties, negative maxima, a map of one value; values on each edge and its
    float32 neighbours), sums and M2 to float64 rounding; and the eager torch path gives the same exact parts."""
    from reportgen.state import cpu_kernels

    rng = np.random.default_rng(12)
    data = np.round(rng.standard_normal((5, 7, 97)) * 4) / 4  # ties and exact zeros
    data[0, 0] = -0.0
    data[0, 1, ::2] = 0.0  # +0 and -0 side by side
    data[0, 1, 1::2] = -0.0
    data[1, 2] = -rng.random(97) - 1  # every value negative
    data[2, 3] = 7.0  # one value: max == min == every position
    data = data.astype(np.float32)
    x = torch.from_numpy(data)
    assert cpu_kernels.takes(x) and not cpu_kernels.takes(x.double())
    got = cpu_kernels.map_statistics(x, low=-0.5, high=1.25)
    wide = data.astype(np.float64)
    np.testing.assert_array_equal(got["peak"], data.max(axis=2))
    np.testing.assert_array_equal(got["min"], data.min(axis=2))
    np.testing.assert_array_equal(got["zeros"], (data == 0).sum(axis=2))
    np.testing.assert_array_equal(got["above"], (data >= 1.25).sum(axis=2))
    np.testing.assert_array_equal(got["below"], (data <= -0.5).sum(axis=2))
    np.testing.assert_allclose(got["sum"], wide.sum(axis=2), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["m2"], ((wide - wide.mean(axis=2, keepdims=True)) ** 2).sum(axis=2),
                               rtol=1e-13, atol=1e-12)
    assert "above" not in cpu_kernels.map_statistics(x, None, None) and "hist" not in got
    rows, channels = np.nonzero(np.ones((5, 7), dtype=bool))
    positions = cpu_kernels.first_positions(x, rows, channels, data.max(axis=2)[rows, channels])
    np.testing.assert_array_equal(positions, data.argmax(axis=2)[rows, channels])
    assert cpu_kernels.first_positions(x, np.array([0]), np.array([0]), np.array([99.0]))[0] == -1
    edges = symlog_edges(1e-4, 1e4, 8)
    inner = edges[1:-1].astype(np.float32)  # each edge, its float32 neighbours, values beyond the ends, +-0, +-inf
    at_edges = np.concatenate([inner, np.nextafter(inner, np.float32(np.inf)), np.nextafter(inner, -np.inf),
                               np.float32([0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, np.inf, -np.inf])])
    for values, stride in ((at_edges, 1), (at_edges, 7), (data.reshape(-1), 5)):
        maps = torch.from_numpy(values.astype(np.float32).copy()).reshape(1, 1, -1)
        counts = cpu_kernels.map_statistics(maps, None, None, stride, edges)["hist"]
        expected = np.bincount(np.searchsorted(inner.astype(np.float64), values[::stride].astype(np.float64),
                                               side="right"), minlength=len(edges) - 1)
        np.testing.assert_array_equal(counts, expected)
    two_images = cpu_kernels.map_statistics(x, None, None, 5, edges)["hist"]  # each image from its own flat index 0
    np.testing.assert_array_equal(two_images, histogram_of_sampled_positions(edges, data, 5))
    assert "hist" not in cpu_kernels.map_statistics(x, None, None, 5, np.array([-1.0, 0.0, 1.0]))  # 0 inside
    edges = torch.as_tensor(edges)
    kernel = batch_reductions(x, edges, low=-0.5, high=1.25, hist_stride=3)
    import reportgen.state.channel_reducers as reducers

    monkeypatch.setattr(reducers, "CHUNK_VALUES", {"cpu": 2 * 7 * 97})  # chunks of 2, 2 and 1 images
    scratch = Scratch()
    strided = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # channels-last in memory: copied into rows
    rows = batch_reductions(strided, edges, low=-0.5, high=1.25, hist_stride=3, scratch=scratch)
    assert scratch.storage.numel() == 2 * 7 * 97, "the copy holds one chunk, not the batch"
    for name in kernel:
        np.testing.assert_array_equal(rows[name], kernel[name], err_msg=name)  # the same kernel on the same maps
    kernel = batch_reductions(x, edges, low=-0.5, high=1.25)
    monkeypatch.setattr(cpu_kernels, "takes", lambda x: False)
    eager = batch_reductions(x, edges, low=-0.5, high=1.25)
    assert kernel.keys() == eager.keys()
    for name in ("count", "min", "max", "zeros", "saturated", "nonfinite", "peak", "hist"):
        np.testing.assert_array_equal(kernel[name], eager[name], err_msg=name)
    np.testing.assert_allclose(kernel["mean"], eager["mean"], rtol=1e-6, atol=1e-7)


def test_non_finite_values_are_counted_apart_and_left_out_of_the_rest(reduction_path):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 10)  # (B, C, P)
    x[0, 1, 2], x[2, 1, 5], x[1, 2, 0] = float("nan"), float("inf"), -float("inf")
    x[:, 0, :3] = 0.0
    edges = symlog_edges(1e-4, 1e4, 8)
    out = batch_reductions(x, torch.as_tensor(edges), low=-1.0, high=1.0)
    values = x.double().numpy().transpose(1, 0, 2).reshape(3, -1)  # (C, B*P)
    finite = np.isfinite(values)
    for c in range(3):
        v = values[c][finite[c]]
        assert int(out["count"][c]) == v.size and int(out["nonfinite"][c]) == (~finite[c]).sum()
        assert float(out["mean"][c]) == pytest.approx(v.mean(), rel=1e-12)
        assert float(out["m2"][c]) == pytest.approx(((v - v.mean()) ** 2).sum(), rel=1e-9)
        assert float(out["min"][c]) == v.min() and float(out["max"][c]) == v.max()
        assert int(out["zeros"][c]) == (v == 0).sum() and int(out["saturated"][c]) == (np.abs(v) >= 1).sum()
    expected = FixedHistogram(edges)
    expected.add(values)
    np.testing.assert_array_equal(out["hist"], expected.counts)
    row = x[0, 1].numpy()  # holds the NaN: its peak is the largest finite value
    assert float(out["peak"][0, 1]) == row[np.isfinite(row)].max()


def test_vit_tokens_become_a_grid_and_the_class_token_is_the_embedding():
    from reportgen.inputs.demo.models import demo_vit

    model = demo_vit(pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    ctx = RunContext(model=model, loaded=None, dataset_classes=[], num_images=2, device=torch.device("cpu"),
                     results_dir=None, report=None)
    cfg = compose_config(["analysis=[activations]"]).analysis.activations
    analysis = Activations(cfg, ctx)
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    analysis.begin(Batch(indices=torch.arange(2), paths=["a", "b"], images=images, inputs=x,
                         labels=torch.full((2,), -1)))
    assert [c.key for c in analysis.calls] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert all(c.grid == (8, 8) and c.channels == 96 for c in analysis.calls)
    assert (analysis.embed_key, analysis.embed_recipe) == ("encoder", "first")
    with CaptureEngine(model, analysis.layers) as engine:
        captures = engine.start_batch()
        with torch.no_grad():
            model(x)
    tokens = captures["encoder.layers.encoder_layer_3"]  # (2, 65, 96)
    values, grid = channel_view(tokens)
    assert grid == (8, 8) and torch.equal(values, tokens[:, 1:].transpose(1, 2))  # (2, 96, 64): patches only
    assert count_hooks(model) == 0


def test_unknown_layer_fails_with_close_matches(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[activations]",
                                 "analysis.activations.layers=[shraed]"])
    with pytest.raises(ConfigError, match="analysis.activations.layers") as info:
        run(cfg, out_dir=tmp_path / "run")
    assert "'shared'" in str(info.value)
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[activations]",
                                 "analysis.activations.top_k=0"])
    with pytest.raises(ConfigError, match="analysis.activations.top_k"):
        run(cfg, out_dir=tmp_path / "run2")


def test_crops_cut_the_receptive_field_box_and_are_shrunk_only_when_drawn():
    """crop_at keeps the box around the grid cell as cut (checked through pixel values that encode their own row
    and column); shrink_crop makes the drawn crop and puts the marker on the cell's centre. A box over twice
    CROP_PIXELS is shrunk at once (the kept copy stays small) and draws exactly as the one-step shrink of the box."""
    from reportgen.analyses.activations import CROP_PIXELS, shrink_crop
    from reportgen.report.thumbnails import thumbnail

    rows, columns = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    image = torch.stack([rows, columns, rows]).to(torch.uint8)  # (3, 224, 224): pixel (y, x) holds y, x, y
    region, centre = crop_at(image, (7, 7), 7 * 5 + 6, factor=4.0)  # cell (5, 6): stride 32, side 4 x 32 = 128
    assert region.shape == (3, 128, 128) and (region[0, 0, 0], region[1, 0, 0]) == (224 - 128, 224 - 128)
    assert centre == (5.5 * 32 - 96, 6.5 * 32 - 96)  # the box is shifted to stay inside the image
    crop, marker = shrink_crop(region, centre)
    assert crop.shape == (CROP_PIXELS, CROP_PIXELS, 3) and marker == (80 * 0.75 - 0.5, 112 * 0.75 - 0.5)
    np.testing.assert_array_equal(crop, thumbnail(image[:, 96:, 96:], CROP_PIXELS))

    region, centre = crop_at(image, (2, 2), 3, factor=4.0)  # stride 112: the box is the whole image, 224 > 192
    assert region.shape == (3, CROP_PIXELS, CROP_PIXELS) and centre == (168 * 96 / 224, 168 * 96 / 224)
    crop, marker = shrink_crop(region, centre)
    np.testing.assert_array_equal(crop, thumbnail(image, CROP_PIXELS))
    assert marker == (72 - 0.5, 72 - 0.5)

    region, centre = crop_at(image[:, :100, :150], None, 0, factor=4.0)  # no grid: the whole image, no marker
    crop, marker = shrink_crop(region, centre)
    assert marker is None and crop.shape == (64, 96, 3)
    np.testing.assert_array_equal(crop, thumbnail(image[:, :100, :150], CROP_PIXELS))
