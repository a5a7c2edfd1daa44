"""`attention`: captured weights, maps, rollout, entropy/distance statistics and Swin's recomputed window attention,
each checked against independent code (direct need_weights=True calls, plain numpy loops, torchvision's own softmax
output), plus end-to-end runs through `pipeline.run`."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.models.swin_transformer as swin
from omegaconf import OmegaConf
from torch import nn

from reportgen.analyses._attention_math import rollout
from reportgen.analyses.attention import Attention, AttentionConfig
from reportgen.analyses.base import Batch, RunContext, capture_engine_for
from reportgen.engine.capture import CaptureEngine, count_hooks
from reportgen.errors import ConfigError
from reportgen.inputs.demo.models import demo_vit
from reportgen.runs.pipeline import run
from reportgen.inputs.tasks import ModelOutputs
from tests.helpers import compose_config
from tests.tiny_models import TinyNet

VIT_LAYERS = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(4)]
FAST = ["runtime.num_workers=0", "runtime.progress=false"]


def make_batches(images: torch.Tensor, sizes):
    """Split (N, 3, H, W) inputs into Batch objects of the given sizes (display images derived from the inputs)."""
    batches, start = [], 0
    for size in sizes:
        x = images[start: start + size]
        batches.append(Batch(indices=torch.arange(start, start + size), paths=[f"img_{i}.png" for i in
                                                                               range(start, start + size)],
                             images=(x.clamp(0, 1) * 255).to(torch.uint8), inputs=x,
                             labels=torch.full((size,), -1)))
        start += size
    return batches


def run_attention(model, batches, results_dir, num_images=None, **options) -> Attention:
    """The analysis driven the way the pipeline drives it: begin, requires, one hooked forward per batch, update.
    `num_images`: the whole folder's size when `batches` is one shard of it."""
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), options)
    ctx = RunContext(model=model, loaded=SimpleNamespace(class_names=[], synsets=[]), dataset_classes=[],
                     num_images=num_images or sum(len(b.paths) for b in batches), device=torch.device("cpu"),
                     results_dir=results_dir,
                     report=SimpleNamespace(thumbnail_size=32, gallery_size=8, figure_dpi=40, image_format="jpeg"))
    analysis = Attention(cfg, ctx)
    analysis.begin(batches[0])
    with capture_engine_for(model, [analysis]) as engine:
        for batch in batches:
            captures = engine.start_batch(batch)
            with torch.inference_mode():
                analysis.update(batch, ModelOutputs("classification", logits=model(batch.inputs)), captures)
    assert count_hooks(model) == 0
    return analysis


def direct_vit_weights(model, x):
    """Reference: each encoder block's MHA called directly with need_weights=True on its own input (ln_1's output,
    taken with plain hooks); (layers, B, heads, N, N) as numpy."""
    inputs = {}
    handles = [getattr(model.encoder.layers, f"encoder_layer_{i}").ln_1.register_forward_hook(
        lambda module, args, output, i=i: inputs.__setitem__(i, output)) for i in range(4)]
    with torch.no_grad():
        model(x)
        out = []
        for i in range(4):
            mha = getattr(model.encoder.layers, f"encoder_layer_{i}").self_attention
            _, w = mha(inputs[i], inputs[i], inputs[i], need_weights=True, average_attn_weights=False)
            out.append(w.numpy())
    for handle in handles:
        handle.remove()
    return np.stack(out).astype(np.float64)


def numpy_rollout(weights, discard_ratio=0.0):
    """Abnar & Zuidema written plainly, one image at a time: (layers, B, heads, N, N) -> (B, N-1) class-token rows."""
    layers, batch, _, tokens, _ = weights.shape
    rows = []
    for b in range(batch):
        result = np.eye(tokens)
        for layer in range(layers):
            fused = weights[layer, b].mean(axis=0)
            if discard_ratio:
                flat = fused.flatten()
                lowest = np.argsort(flat)[: int(flat.size * discard_ratio)]
                flat[lowest[lowest != 0]] = 0.0
                fused = flat.reshape(tokens, tokens)
            step = fused + np.eye(tokens)
            step = step / step.sum(axis=1, keepdims=True)
            result = step @ result
        rows.append(result[0, 1:])
    return np.stack(rows)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return demo_vit(pretrained=True).eval()


@pytest.fixture(scope="module")
def vit_images():
    torch.manual_seed(1)
    return torch.randn(5, 3, 64, 64)


def test_maps_and_rollout_equal_direct_need_weights_calls_and_a_numpy_loop(vit, vit_images, tmp_path):
    analysis = run_attention(vit, make_batches(vit_images, [3, 2]), tmp_path)
    analysis.finalize()
    saved = np.load(tmp_path / "attention.npz")
    weights = direct_vit_weights(vit, vit_images)  # (4, 5, 4, 65, 65)
    assert list(saved["paths"]) == [f"img_{i}.png" for i in range(5)]
    for layer, name in enumerate(VIT_LAYERS):
        expected = weights[layer][:, :, 0, 1:].mean(axis=1).reshape(5, 8, 8)  # class token row, head average
        np.testing.assert_allclose(saved["cls_" + name.replace(".", "_")], expected, atol=1e-6)
    np.testing.assert_allclose(saved["rollout"], numpy_rollout(weights).reshape(5, 8, 8), atol=1e-6)
    assert list(saved["layers"]) == VIT_LAYERS and list(saved["heads"]) == [4] * 4 and list(saved["keys"]) == [65] * 4
    # per-head class-token maps of the kept images: (heads, gh, gw), equal to the direct weights
    examples = sorted((item for _, _, item in analysis.first.items()), key=lambda e: e["index"])
    assert [e["index"] for e in examples] == [0, 1, 2, 3, 4]
    for e in examples:
        for layer, name in enumerate(VIT_LAYERS):
            assert tuple(e["heads"][name].shape) == (4, 8, 8)
            np.testing.assert_allclose(e["heads"][name].numpy(),
                                       weights[layer][e["index"], :, 0, 1:].reshape(4, 8, 8), atol=1e-6)
    assert (tmp_path / ".attention").exists(), "per-image rows kept after packing, until the run is finished"


def test_rollout_runs_over_every_layer_when_one_is_shown_and_discard_ratio_matches_numpy(vit, vit_images, tmp_path):
    analysis = run_attention(vit, make_batches(vit_images, [5]), tmp_path, layers=[VIT_LAYERS[3]],
                             discard_ratio=0.3)
    analysis.finalize()
    saved = np.load(tmp_path / "attention.npz")
    weights = direct_vit_weights(vit, vit_images)
    assert [k for k in saved.files if k.startswith("cls_")] == ["cls_" + VIT_LAYERS[3].replace(".", "_")]
    np.testing.assert_allclose(saved["rollout"], numpy_rollout(weights, 0.3).reshape(5, 8, 8), atol=1e-6)
    # the math function on its own, random row-stochastic weights, no discard
    rng = np.random.default_rng(0)
    raw = rng.random((3, 2, 4, 10, 10))
    raw /= raw.sum(axis=-1, keepdims=True)
    got = rollout([torch.tensor(w) for w in raw]).numpy()  # (B, N, N)
    np.testing.assert_allclose(got[:, 0, 1:], numpy_rollout(raw), atol=1e-6)


def brute_force_vit_statistics(weights):
    """(layers, heads) mean row entropy and mean patch-to-patch attention distance (pixels, patches 8 px apart),
    with plain loops over images and heads."""
    layers, batch, heads, _, _ = weights.shape
    coords = np.array([(r * 8.0, c * 8.0) for r in range(8) for c in range(8)])
    distances = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))  # (64, 64)
    entropy = np.zeros((layers, heads))
    distance = np.zeros((layers, heads))
    for layer in range(layers):
        for h in range(heads):
            for b in range(batch):
                p = weights[layer, b, h]
                entropy[layer, h] += np.mean([-(row[row > 0] * np.log(row[row > 0])).sum() for row in p]) / batch
                patches = p[1:, 1:]
                distance[layer, h] += np.mean((patches * distances).sum(1) / patches.sum(1)) / batch
    return entropy, distance


def test_entropy_and_distance_equal_brute_force_and_two_halves_merge_into_the_whole(vit, vit_images, tmp_path):
    batches = make_batches(vit_images, [3, 2])
    whole = run_attention(vit, batches, tmp_path / "whole")
    first = run_attention(vit, batches[:1], tmp_path / "a", num_images=5)
    second = run_attention(vit, batches[1:], tmp_path / "b", num_images=5)
    first.merge(second.state_dict())
    entropy, distance = brute_force_vit_statistics(direct_vit_weights(vit, vit_images))
    for analysis in (whole, first):
        keys, got_entropy, got_distance = analysis.layer_statistics()
        assert keys == VIT_LAYERS and analysis.images == 5
        np.testing.assert_allclose(got_entropy, entropy, rtol=1e-5)
        np.testing.assert_allclose(got_distance, distance, rtol=1e-5)
    assert [i for _, i, _ in first.first.items()] == [i for _, i, _ in whole.first.items()]
    # entropy is in nats: a uniform row over 65 keys would be ln 65
    assert (entropy > 0).all() and (entropy < np.log(65)).all()


def tiny_swin(v2: bool) -> nn.Module:
    """A two-stage Swin small enough for a unit test: 40x40 input -> 10x10 then 5x5 tokens, window 4 (so padding
    to 12 and 8, and shifted windows with masks, are all exercised)."""
    torch.manual_seed(3)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=3, **extra).eval()


def swin_reference(model, x):
    """torchvision's own attention probabilities (F.softmax inside shifted_window_attention, recorded) and, per
    attention module, the token each window row holds (-1 for padding), worked out plainly on an index grid."""
    recorded, shapes = [], {}
    real_softmax = swin.F.softmax
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, swin.ShiftedWindowAttention)]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: shapes.__setitem__(n, args[0].shape))
               for n, m in modules]

    def recording_softmax(t, dim=None, **kw):
        out = real_softmax(t, dim=dim, **kw)
        recorded.append(out)
        return out

    swin.F.softmax = recording_softmax
    try:
        with torch.no_grad():
            model(x)
    finally:
        swin.F.softmax = real_softmax
        for handle in handles:
            handle.remove()
    reference = {}
    for (name, module), probs in zip(modules, recorded):
        _, height, width, _ = shapes[name]
        wh, ww = module.window_size
        ph, pw = -(-height // wh) * wh, -(-width // ww) * ww
        sh, sw = [0 if w >= p else s for w, p, s in zip((wh, ww), (ph, pw), module.shift_size)]
        index = -np.ones((ph, pw), dtype=np.int64)
        index[:height, :width] = np.arange(height * width).reshape(height, width)
        index = np.roll(index, (-sh, -sw), axis=(0, 1))
        windows = [index[i * wh:(i + 1) * wh, j * ww:(j + 1) * ww].flatten()
                   for i in range(ph // wh) for j in range(pw // ww)]
        probs = probs.reshape(x.shape[0], len(windows), module.num_heads, wh * ww, wh * ww).double().numpy()
        reference[name] = (probs, np.stack(windows), (height, width))
    return reference


@pytest.mark.parametrize("kind", ["tiny_v1", "tiny_v2", "swin_t"])
def test_swin_window_attention_equals_torchvision_own_computation(kind, tmp_path):
    if kind == "swin_t":
        torch.manual_seed(4)
        model, size = swin.swin_t().eval(), 96  # token grids 24, 12, 6, 3: padding, shifts and unshifted stages
    else:
        model, size = tiny_swin(kind == "tiny_v2"), 40
    torch.manual_seed(5)
    x = torch.randn(3, 3, size, size)
    analysis = run_attention(model, make_batches(x, [2, 1]), tmp_path, n_images=1, heads=[0])  # lighter figures
    reference = swin_reference(model, x)
    if kind != "tiny_v2":  # v1 attends to norm1's output; v2 normalises after attention (its input: the block's)
        assert set(analysis.swin_inputs.values()) == {n.rsplit(".", 1)[0] + ".norm1" for n in reference}
    keys, entropy, _ = analysis.layer_statistics()
    assert keys == list(reference)
    first = next(item for _, _, item in analysis.first.items() if item["index"] == 0)
    matrix = analysis.matrix.items()[0][2]["matrices"]
    for row, (name, (probs, windows, (height, width))) in enumerate(reference.items()):
        real = windows >= 0  # (windows, T) rows that hold a real token
        heads = probs.shape[2]
        # mean row entropy over real query tokens and images, per head
        rows = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)  # (B, windows, heads, T)
        expected = np.stack([rows[:, :, h][:, real].mean() for h in range(heads)])
        np.testing.assert_allclose(entropy[row, :heads], expected, rtol=1e-5)
        # attention each real token receives, summed over its window's queries, on the token grid (image 0)
        received = np.zeros((heads, height * width))
        for w in range(windows.shape[0]):
            for t, token in enumerate(windows[w]):
                if token >= 0:
                    received[:, token] = probs[0, w, :, :, t].sum(axis=-1)
        np.testing.assert_allclose(first["heads"][name].numpy(), received.reshape(heads, height, width), atol=1e-6)
        # token x token matrix of image 0: the window holding the centre token, head average
        centre = (height // 2) * width + width // 2
        window = next(w for w in range(windows.shape[0]) if centre in windows[w])
        np.testing.assert_allclose(matrix[name], probs[0, window].mean(axis=0), atol=1e-6)
    section = analysis.finalize()
    assert "Swin" in section.summary and "rollout" not in np.load(tmp_path / "attention.npz").files


def test_a_cnn_gets_one_not_applicable_line(colour_folder, tmp_path):
    cfg = compose_config(FAST + ["model=target", "model.target._target_=tests.tiny_models.tiny_net",
                                 "model.preprocess.resize=16", "model.preprocess.crop=16",
                                 f"dataset.root={colour_folder}", "analysis=[attention]"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert "Not applicable: no attention layers" in html
    assert not (tmp_path / "run" / "results" / "attention.npz").exists()


def test_a_layer_pattern_without_attention_is_a_config_error():
    """Attention is found by behaviour on the probe, so the patterns are checked in `begin`."""
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"layers": ["conv"]})
    ctx = RunContext(model=TinyNet(), loaded=SimpleNamespace(class_names=[], synsets=[]), dataset_classes=[], num_images=1,
                     device=torch.device("cpu"), results_dir=None, report=None)
    with pytest.raises(ConfigError, match="analysis.attention.layers"):
        Attention(cfg, ctx).begin(make_batches(torch.rand(1, 3, 8, 8), [1])[0])


class PatchMHA(nn.Module):
    """A non-torchvision model using nn.MultiheadAttention: 4x4 patch tokens, no class token, mean-pooled; it calls
    the MHA with default arguments (need_weights=True, head-averaged) and uses the weights it gets back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.embed = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        out, weights = self.mha(tokens, tokens, tokens)  # weights (B, 16, 16), averaged over heads
        return self.head(out.mean(1)) + weights.amax(dim=(1, 2))[:, None]


def test_any_mha_model_without_class_token_gets_received_maps_and_keeps_its_outputs(tmp_path):
    model = PatchMHA().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
        tokens = model.embed(x).flatten(2).transpose(1, 2)
        _, direct = model.mha(tokens, tokens, tokens, average_attn_weights=False)  # (B, 2, 16, 16)
    with CaptureEngine(model, attention=["mha"]) as engine:
        engine.start_batch()
        with torch.no_grad():
            hooked = model(x)  # the caller still receives head-averaged weights
    torch.testing.assert_close(hooked, plain)
    analysis = run_attention(model, make_batches(x, [3]), tmp_path)
    analysis.finalize()
    saved = np.load(tmp_path / "attention.npz")
    received = direct.mean(dim=1).sum(dim=1)  # head average, summed over queries: (B, 16)
    np.testing.assert_allclose(saved["received_mha"], received.reshape(3, 4, 4).numpy(), atol=1e-6)
    step = direct.double().mean(1) + torch.eye(16, dtype=torch.float64)
    step = step / step.sum(-1, keepdim=True)
    np.testing.assert_allclose(saved["rollout"], step.mean(1).reshape(3, 4, 4).numpy(), atol=1e-6)


def test_engine_accepts_mha_options_given_by_position():
    model = PatchMHA().eval()
    model.forward = lambda x: model.mha(*(model.embed(x).flatten(2).transpose(1, 2),) * 3, None, False)[0].mean(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
    with CaptureEngine(model, attention=["mha"]) as engine:
        captures = engine.start_batch()
        with torch.no_grad():
            hooked = model(x)
    torch.testing.assert_close(hooked, plain)
    assert captures.attention["mha"].shape == (2, 2, 16, 16)


def test_pipeline_demo_vit_writes_the_npz_and_the_section(tmp_path):
    cfg = compose_config(FAST + ["experiment=demo_vit", "analysis=[attention]", "dataset.limit=24"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert 'id="attention"' in html and "Attention rollout" in html and "entropy" in html
    results = tmp_path / "run" / "results"
    saved = np.load(results / "attention.npz")
    assert saved["paths"].shape == (24,) and saved["rollout"].shape == (24, 8, 8)
    assert saved["rollout"].dtype == np.float32
    for name in VIT_LAYERS:
        assert saved["cls_" + name.replace(".", "_")].shape == (24, 8, 8)
    assert saved["entropy"].shape == (4, 4) and np.isfinite(saved["entropy"]).all()
    share = saved["rollout"].sum(axis=(1, 2))  # the class token's rollout row without its own entry
    assert ((share > 0) & (share <= 1 + 1e-6)).all()
    assert not (results / ".attention").exists()


def test_vit_b_16_random_weights_produces_the_section(tmp_path):
    cfg = compose_config(FAST + ["model=vit_b_16", "model.weights=null", "analysis=[attention]", "dataset.limit=2"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert 'id="attention"' in html and "Attention rollout" in html
    saved = np.load(tmp_path / "run" / "results" / "attention.npz")
    assert saved["rollout"].shape == (2, 14, 14) and len(saved["layers"]) == 12
    assert saved["entropy"].shape == (12, 12)
