"""`attention` on the model zoo's attention families: attention found by behaviour on the probe (never "no
attention layers" where the forward has attention), the softmax / scaled_dot_product_attention / attn_drop captures
held against the modules' own arithmetic, token grids from each module's own call, spatial-reduction keys on their
own grid with finite statistics, and one "not supported" line per module type that is not shown."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

timm = pytest.importorskip("timm")

from reportgen.analyses.attention import Attention, AttentionConfig  # noqa: E402
from reportgen.engine.capture import CaptureEngine, count_hooks, find_attention  # noqa: E402
from tests.test_family_maps import drive  # noqa: E402


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def section_text(section) -> str:
    return section.summary + " " + " ".join(getattr(e, "text", "") for e in section.elements)


@pytest.mark.parametrize("name, size, has_attention", [
    ("resnet18", 64, False), ("skresnet18", 64, False),  # SK's 2-way softmax and the classifier are no attention
    ("lambda_resnet26t", 64, True), ("halonet26t", 256, True), ("botnet26t_256", 256, True),
    ("convit_tiny", 64, True), ("coat_lite_tiny", 64, True)])
def test_no_attention_layers_only_where_the_forward_has_no_attention(name, size, has_attention, tmp_path):
    model = timm_model(name, **({"img_size": size} if name in ("convit_tiny", "coat_lite_tiny") else {}))
    _, section = drive(Attention, AttentionConfig, model, torch.randn(1, 3, size, size), tmp_path, n_images=1,
                       heads=[0], matrix=False)
    assert ("no attention layers" in section.summary) is not has_attention
    if has_attention:  # shown, or named with a reason: never silent
        assert "attention layers" in section.summary or "Not supported: " in section_text(section)


def captured(model: nn.Module, x: torch.Tensor, names):
    """(logits without capture, logits with capture, captured weights) for the `names` modules."""
    hooks = count_hooks(model)  # the test's own
    with torch.no_grad():
        plain = model(x)
    with CaptureEngine(model, attention=names) as engine:
        captures = engine.start_batch()
        with torch.inference_mode():
            hooked = model(x)
    assert count_hooks(model) == hooks and not _get_current_function_mode_stack()
    return plain, hooked, captures.attention


def test_softmax_capture_equals_levit_scores_recomputed_from_its_own_q_and_k():
    model = timm_model("levit_128s")
    x = torch.randn(2, 3, 224, 224)
    found = find_attention(model, x[:1])
    modules = dict(model.named_modules())
    names = [n for n in found if type(modules[n]).__name__ == "Attention"]
    assert names and all(found[n].kind == "softmax" for n in names)
    qkv = {}
    handles = [modules[n].qkv.register_forward_hook(lambda m, a, o, n=n: qkv.setdefault(n, o)) for n in names]
    plain, hooked, weights = captured(model, x, names)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    for name in names:
        module = modules[name]
        out = qkv[name]  # (B, N, heads * (2 key_dim + val_dim))
        q, k, _ = out.view(2, out.shape[1], module.num_heads, -1).split(
            [module.key_dim, module.key_dim, module.val_dim], dim=3)
        logits = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * module.scale + module.get_attention_biases("cpu")
        torch.testing.assert_close(weights[name], logits.softmax(dim=-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(weights[name].sum(-1), torch.ones(weights[name].shape[:-1]))


class MaskedSDPA(nn.Module):
    """scaled_dot_product_attention with every argument that changes the weights: a float mask, or a boolean mask
    with grouped key/value heads, or causality, and a scale."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(8, 8 if mode == "gqa" else 16)
        self.bias = nn.Parameter(torch.randn(2, 16, 16))

    def forward(self, x):  # (B, 16, 8)
        q = self.q(x).view(x.shape[0], 16, 2, 4).transpose(1, 2)  # (B, 2, 16, 4)
        heads = 1 if self.mode == "gqa" else 2
        k, v = self.kv(x).view(x.shape[0], 16, 2, heads, 4).permute(2, 0, 3, 1, 4)  # (B, heads, 16, 4) each
        if self.mode == "gqa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[0] > 0, scale=0.3, enable_gqa=True)
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


class SDPANet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = MaskedSDPA(mode)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.head(self.attn(tokens).mean(dim=(1, 2)))  # (B, 3)


@pytest.mark.parametrize("mode", ["float_mask", "gqa", "causal"])
def test_sdpa_weights_are_exact_and_the_fused_call_still_computes_the_output(mode):
    torch.manual_seed(1)
    model = SDPANet(mode).eval()
    x = torch.randn(3, 3, 16, 16)
    assert find_attention(model, x[:1])["attn"].kind == "sdpa"
    calls = {}
    handle = model.attn.register_forward_hook(lambda m, a, o: calls.update(x=a[0], out=o))
    plain, hooked, weights = captured(model, x, ["attn"])
    handle.remove()
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    got = weights["attn"]  # (B, 2, 16, 16)
    assert got.shape == (3, 2, 16, 16)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 2, 16))
    # the weights applied to v give the fused call's output
    attention = model.attn
    tokens = calls["x"]
    heads = 1 if mode == "gqa" else 2
    with torch.no_grad():
        _, v = attention.kv(tokens).view(3, 16, 2, heads, 4).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(got @ v.expand(3, 2, 16, 4), calls["out"], atol=1e-5, rtol=0)
    if mode == "causal":  # no weight above the diagonal
        assert got.triu(diagonal=1).abs().max() == 0


def test_gated_gpsa_weights_equal_its_own_get_attention_and_convit_shows_every_layer(tmp_path):
    model = timm_model("convit_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    inputs = {}
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    assert find_attention(model, x[:1])["blocks.0.attn"].kind == "dropped"  # two softmaxes, gated, into attn_drop
    plain, hooked, weights = captured(model, x, ["blocks.0.attn"])
    handle.remove()
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = model.blocks[0].attn.get_attention(inputs["x"])  # (B, heads, 16, 16) gated, renormalised
    torch.testing.assert_close(weights["blocks.0.attn"], expected, atol=1e-6, rtol=0)
    analysis, section = drive(Attention, AttentionConfig, model, x, tmp_path, n_images=1, heads=[0], matrix=False)
    assert len(analysis.layers) == 12 and not analysis.unsupported  # 10 GPSA + 2 MHSA
    assert section.summary.startswith("12 attention layers")


def brute_force_distance(weights: np.ndarray, queries, keys, size: float) -> np.ndarray:
    """(B, heads) mean attention distance with plain loops: query and key cell centres, each on its own grid over
    a size x size image, attention renormalised over the keys."""
    def centres(grid):
        return [((r + 0.5) * size / grid[0], (c + 0.5) * size / grid[1]) for r in range(grid[0])
                for c in range(grid[1])]
    q_at, k_at = centres(queries), centres(keys)
    out = np.zeros(weights.shape[:2])
    for b in range(weights.shape[0]):
        for h in range(weights.shape[1]):
            rows = [sum(weights[b, h, i, j] * np.hypot(q_at[i][0] - k_at[j][0], q_at[i][1] - k_at[j][1])
                        for j in range(len(k_at))) / weights[b, h, i].sum() for i in range(len(q_at))]
            out[b, h] = np.mean(rows)
    return out


def test_spatial_reduction_keys_lie_on_their_own_grid_and_statistics_are_finite(tmp_path):
    model = timm_model("pvt_v2_b0")
    x = torch.randn(2, 3, 64, 64)
    analysis, section = drive(Attention, AttentionConfig, model, x, tmp_path, n_images=2, matrix=False)
    keys, entropy, distance = analysis.layer_statistics()
    first = analysis.layers["stages.0.blocks.0.attn"]
    assert (first.queries, first.grid, first.prefix) == ((16, 16), (2, 2), 0)  # 8x spatial reduction
    for row, key in enumerate(keys):
        heads = analysis.layers[key].heads
        assert np.isfinite(entropy[row, :heads]).all() and np.isfinite(distance[row, :heads]).all(), key
    _, _, weights = captured(model, x, ["stages.0.blocks.0.attn"])
    probs = weights["stages.0.blocks.0.attn"].double().numpy()  # (B, 1, 256, 4)
    expected = brute_force_distance(probs, (16, 16), (2, 2), 64.0).mean(axis=0)
    np.testing.assert_allclose(distance[keys.index("stages.0.blocks.0.attn"), :1], expected, rtol=1e-5)
    received = np.load(tmp_path / "attention.npz")["received_stages_0_blocks_0_attn"]  # (B, 2, 2)
    np.testing.assert_allclose(received, (probs.sum(axis=2) * 4 / 256).mean(axis=1).reshape(2, 2, 2), atol=1e-5)


def test_coatnet_tokens_come_from_the_module_grid_without_a_class_token(tmp_path):
    model = timm_model("coatnet_nano_rw_224")
    analysis, _ = drive(Attention, AttentionConfig, model, torch.randn(1, 3, 224, 224), tmp_path, n_images=1,
                        heads=[0], matrix=False)
    grids = {(info.grid, info.prefix, info.class_token) for info in analysis.layers.values()}
    assert grids == {((14, 14), 0, False), ((7, 7), 0, False)}
    assert "cls_" not in " ".join(np.load(tmp_path / "attention.npz").files)


def test_each_unsupported_module_type_gets_one_line_with_its_reason(tmp_path):
    model = timm_model("xcit_nano_12_p16_224", img_size=64)
    analysis, section = drive(Attention, AttentionConfig, model, torch.randn(1, 3, 64, 64), tmp_path, n_images=1,
                              heads=[0], matrix=False)
    lines = [e.text for e in section.elements if getattr(e, "text", "").startswith("Not supported: ")]
    assert len(lines) == 1 and lines[0].startswith("Not supported: XCA (attention over channels")
    assert "12 modules not shown" in lines[0]
    assert sorted(analysis.layers) == ["cls_attn_blocks.0.attn", "cls_attn_blocks.1.attn"]  # class attention shown
    assert all(info.class_token and info.grid == (4, 4) for info in analysis.layers.values())
    assert "rollout" not in section.summary  # channel weights are never chained as tokens


class FoldedHeadsAttention(nn.Module):
    """Self-attention with its heads folded into the batch axis ((B * heads, N, N) scores): it mixes tokens, and the
    report cannot draw it."""

    def forward(self, x):  # (B, N, C)
        batch, tokens, channels = x.shape
        q = x.reshape(batch, tokens, 2, channels // 2).transpose(1, 2).reshape(batch * 2, tokens, channels // 2)
        mixed = (q @ q.transpose(-2, -1)).softmax(dim=-1) @ q  # (B * 2, N, C / 2)
        return x + mixed.reshape(batch, 2, tokens, channels // 2).transpose(1, 2).reshape(batch, tokens, channels)


class MixedNet(nn.Module):
    """A patch embedding, one global self-attention the engine captures, one token-mixing attention it cannot."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = FoldedHeadsAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        tokens = tokens + self.attn(tokens, tokens, tokens)[0]
        return self.head(self.mix(tokens).mean(dim=1))


def test_no_rollout_when_some_attention_layers_are_not_captured(tmp_path):
    torch.manual_seed(0)
    model = MixedNet().eval()
    analysis, section = drive(Attention, AttentionConfig, model, torch.randn(2, 3, 16, 16), tmp_path, n_images=1,
                              heads=[0], matrix=False)
    text = section_text(section) + " ".join(analysis.notes)
    assert "Not supported: FoldedHeadsAttention" in text
    assert analysis.rollout_info is None and "rollout: not computed: 1 of the 2 attention modules" in text
