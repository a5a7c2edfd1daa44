"""`embedding_maps`: class-token attention and its mass masks against attention recomputed by hand from timm's
`qkv` and against transformers' own `output_attentions`, patch-PCA colours against a plain numpy SVD of
`forward_features`, exact shard merges, the not-applicable lines, and one end-to-end run through `pipeline.run`."""
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from reportgen.analyses.base import Batch, NotApplicable, RunContext, build_analysis, capture_engine_for
from reportgen.analyses.embedding_maps import EmbeddingMaps, EmbeddingMapsConfig
from reportgen.engine.capture import count_hooks
from reportgen.errors import ConfigError
from reportgen.inputs.tasks import ModelOutputs
from reportgen.state.run_state import RunState, load_state, save_state

REG4 = "vit_small_patch14_reg4_dinov2"
SMALL = dict(pretrained=False, num_classes=0, depth=2, embed_dim=48, num_heads=2)


def make_batches(images: torch.Tensor, sizes, start=0):
    """(N, 3, H, W) inputs -> Batch objects of the given sizes, indices from `start`."""
    batches = []
    for size in sizes:
        x = images[start: start + size]
        batches.append(Batch(indices=torch.arange(start, start + size),
                             paths=[f"img_{i}.png" for i in range(start, start + size)],
                             images=(x.clamp(0, 1) * 255).to(torch.uint8), inputs=x,
                             labels=torch.full((size,), -1)))
        start += size
    return batches


def loaded_facts(token_layer, prefix, task="embedding"):
    return SimpleNamespace(task=task, token_layer=token_layer, prefix_tokens=prefix, class_names=[], synsets=[],
                           pooling="class token")


def embedding_of(raw):
    return raw if isinstance(raw, torch.Tensor) else raw.pooler_output


def run_maps(model, batches, results_dir, loaded, num_images=None, **options) -> EmbeddingMaps:
    """The analysis driven as the pipeline drives it: begin, requires, one hooked forward per batch, update."""
    cfg = OmegaConf.merge(OmegaConf.structured(EmbeddingMapsConfig), options)
    results_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(model=model, loaded=loaded, dataset_classes=[],
                     num_images=num_images or sum(len(b.paths) for b in batches), device=torch.device("cpu"),
                     results_dir=results_dir,
                     report=SimpleNamespace(thumbnail_size=32, gallery_size=8, figure_dpi=40, image_format="jpeg"))
    analysis = EmbeddingMaps(cfg, ctx)
    analysis.begin(batches[0])
    with capture_engine_for(model, [analysis]) as engine:
        for batch in batches:
            captures = engine.start_batch(batch)
            with engine.forward_mode():
                outputs = ModelOutputs("embedding", embedding=embedding_of(model(batch.inputs)))
                analysis.update(batch, outputs, captures)
    assert count_hooks(model) == 0
    return analysis


def numpy_masks(maps: np.ndarray, mass: float) -> np.ndarray:
    """(..., gh, gw) -> the fewest cells whose share of the map's sum reaches `mass`, taken largest first, one
    map at a time."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).astype(np.float64)
    out = np.zeros(flat.shape, dtype=bool)
    for i, row in enumerate(flat):
        share = row / row.sum()
        total = 0.0
        for cell in np.argsort(-share):
            out[i, cell] = True
            total += share[cell]
            if total >= mass:
                break
    return out.reshape(maps.shape)


def numpy_pca_rgb(tokens: np.ndarray):
    """(n, P, D) patch tokens -> ((n, P, 3) colours, (3,) explained variance ratio): numpy SVD of the centred
    tokens of all images together, each component's largest loading made positive, projections min-max scaled."""
    x = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:3] * np.sign(vt[:3][np.arange(3), np.abs(vt[:3]).argmax(axis=1)])[:, None]
    proj = centred @ basis.T
    rgb = (proj - proj.min(axis=0)) / (proj.max(axis=0) - proj.min(axis=0))
    return rgb.reshape(tokens.shape[0], tokens.shape[1], 3), (s[:3] ** 2) / (s ** 2).sum()


@pytest.fixture(scope="module")
def reg4():
    """A random reg4 DINOv2 ViT (class + 4 registers, 4×4 patches of 14 px), attention sharpened so masks are
    not near-uniform."""
    torch.manual_seed(0)
    model = timm.create_model(REG4, img_size=56, **SMALL).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(5, 3, 56, 56)


def timm_last_attention(model, x):
    """The last block's attention written out from its parameters: tokens through every earlier block, then the
    last block's norm1, qkv, q·kᵀ·scale and softmax. (B, heads, T, T) float64."""
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        block = model.blocks[-1]
        h = block.norm1(tokens).double()  # (B, T, D)
        attn = block.attn
        assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        batch, count, dim = h.shape
        qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()  # (B, T, 3D)
        q, k, _ = qkv.reshape(batch, count, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, heads, T, T)


def test_class_token_attention_and_masks_equal_a_hand_written_attention(reg4, images, tmp_path):
    analysis = run_maps(reg4, make_batches(images, [3, 2]), tmp_path, loaded_facts("norm", 5), n_images=4)
    assert analysis.attention_module == "blocks.1.attn"
    assert analysis.requires().attention == ["blocks.1.attn"] and analysis.requires().activations == ["norm"]
    assert reg4.blocks[-1].attn.fused_attn, "the engine put timm's fused path back"
    section = analysis.finalize()
    saved = np.load(tmp_path / "embedding_maps.npz")
    assert list(saved["indices"]) == [0, 1, 2, 3] and list(saved["paths"]) == [f"img_{i}.png" for i in range(4)]
    expected = timm_last_attention(reg4, images[:4])[:, :, 0, 5:].reshape(4, 2, 4, 4).numpy()  # registers out
    np.testing.assert_allclose(saved["attention"], expected, atol=1e-6)
    masks = numpy_masks(expected, 0.6)
    np.testing.assert_array_equal(saved["masks"], masks)
    assert 1 < masks.sum(axis=(-2, -1)).min() and masks.sum(axis=(-2, -1)).max() < 16, "masks are not trivial"
    share = expected / expected.sum(axis=(-2, -1), keepdims=True)
    assert ((share * masks).sum(axis=(-2, -1)) >= 0.6).all()
    # another mass: the masks follow it
    analysis.cfg.mass = 0.3
    np.testing.assert_array_equal(analysis.compute()["masks"], numpy_masks(expected, 0.3))
    analysis.cfg.mass = 0.6
    # the report: one strip per image with input, PCA, 2 heads and 2 masks
    strips = [e for e in section.elements if getattr(e, "kind", "") == "strip"]
    assert len(strips) == 4 and [p.title for p in strips[0].panels] == [
        "input", "patch PCA", "head 0", "head 1", "head 0 mask", "head 1 mask"]
    assert all(p.image.shape == (32, 32, 3) and p.image.dtype == np.uint8 for p in strips[0].panels)


def test_pca_colours_equal_a_numpy_svd_of_forward_features(reg4, images, tmp_path):
    analysis = run_maps(reg4, make_batches(images, [2, 3]), tmp_path, loaded_facts("norm", 5), n_images=3)
    analysis.finalize()
    saved = np.load(tmp_path / "embedding_maps.npz")
    with torch.no_grad():
        tokens = reg4.forward_features(images[:3])[:, 5:].numpy()  # (3, 16, 48): class and registers out
    rgb, ratio = numpy_pca_rgb(tokens)
    assert saved["rgb"].shape == (3, 4, 4, 3)
    np.testing.assert_allclose(saved["rgb"].reshape(3, 16, 3), rgb, atol=1e-5)
    np.testing.assert_allclose(saved["pca_explained_variance_ratio"], ratio, rtol=1e-5)
    assert saved["pca_components"].shape == (3, 48)
    for channel in range(3):  # min-max over the shown images together
        assert saved["rgb"][..., channel].min() == 0.0 and saved["rgb"][..., channel].max() == pytest.approx(1.0)


def test_shards_merge_exactly_and_the_state_survives_a_checkpoint(reg4, images, tmp_path):
    whole = run_maps(reg4, make_batches(images, [5]), tmp_path / "whole", loaded_facts("norm", 5), n_images=3)
    # shard 2 (images 2-4) merged into shard 1 (images 0-1); and the reverse order
    first = run_maps(reg4, make_batches(images, [2]), tmp_path / "a", loaded_facts("norm", 5), num_images=5,
                     n_images=3)
    second = run_maps(reg4, make_batches(images, [3], start=2), tmp_path / "b", loaded_facts("norm", 5),
                      num_images=5, n_images=3)
    path = tmp_path / "state.pt"
    save_state(path, RunState(config={}, start=0, end=5, done=5, shard=None, found=5,
                              analyses={"embedding_maps": second.state_dict()}))
    restored = load_state(path).analyses["embedding_maps"]  # weights_only with the project's allowlist
    first.merge(restored)
    second.merge(first.state_dict() | {"images": 2})
    expected = whole.compute()
    for merged in (first, second):
        assert merged.images == 5
        got = merged.compute()
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_transformers_dinov2_attention_and_features_equal_its_own_outputs(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        model.encoder.layer[-1].attention.q_proj.weight.mul_(4.0)
    x = torch.rand(3, 3, 56, 56)
    analysis = run_maps(model, make_batches(x, [2, 1]), tmp_path, loaded_facts("layernorm", 1))
    assert analysis.attention_module == "encoder.layer.1.attention"
    analysis.finalize()
    saved = np.load(tmp_path / "embedding_maps.npz")
    model.config._attn_implementation = "eager"  # the oracle: transformers' own attention probabilities
    with torch.no_grad():
        out = model(x, output_attentions=True)
    expected = out.attentions[-1][:, :, 0, 1:].reshape(3, 2, 4, 4).numpy()
    np.testing.assert_allclose(saved["attention"], expected, atol=1e-6)
    np.testing.assert_array_equal(saved["masks"], numpy_masks(expected, 0.6))
    rgb, _ = numpy_pca_rgb(out.last_hidden_state[:, 1:].numpy())
    np.testing.assert_allclose(saved["rgb"].reshape(3, 16, 3), rgb, atol=1e-5)


class TinyCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)  # (B, 4)


def test_models_without_tokens_or_class_token_say_which_part_does_not_apply(images, tmp_path):
    cnn = run_maps(TinyCnn().eval(), make_batches(images, [5]), tmp_path / "cnn", loaded_facts(None, 0))
    section = cnn.finalize()
    assert section.summary.startswith("patch features: not applicable: TinyCnn has no token output")
    assert "class-token attention: not applicable: the model has no class token" in section.summary
    assert not (tmp_path / "cnn" / "embedding_maps.npz").exists()
    # no class token (SigLIP-like, mean pooled): patch features yes, attention one line
    torch.manual_seed(3)
    vit = timm.create_model("vit_small_patch14_dinov2", img_size=56, class_token=False, global_pool="avg",
                            **{**SMALL, "depth": 1}).eval()
    maps = run_maps(vit, make_batches(images, [5]), tmp_path / "vit", loaded_facts("norm", 0), n_images=2)
    section = maps.finalize()
    assert "class-token attention: not applicable: the model has no class token" in " ".join(
        e.text for e in section.elements if getattr(e, "kind", "") == "text")
    saved = np.load(tmp_path / "vit" / "embedding_maps.npz")
    assert saved["rgb"].shape == (2, 4, 4, 3) and "attention" not in saved.files
    assert [p.title for p in [e for e in section.elements if getattr(e, "kind", "") == "strip"][0].panels] == [
        "input", "patch PCA"]
    # a classifier gets the one-line stand-in
    ctx = SimpleNamespace(loaded=loaded_facts(None, 0, task="classification"))
    stand_in = build_analysis("embedding_maps", None, ctx)
    assert isinstance(stand_in, NotApplicable)
    assert stand_in.line.startswith("not applicable to classification models because these maps")
    with pytest.raises(ConfigError):
        EmbeddingMaps.check_config(OmegaConf.structured(EmbeddingMapsConfig(mass=1.5)))


def test_end_to_end_through_the_pipeline(tmp_path):
    from reportgen.runs.pipeline import run
    from tests.helpers import compose_config, make_colour_folder

    folder = make_colour_folder(tmp_path / "data", per_class=2, noise=20.0, seed=0)
    cfg = compose_config(["model=timm", f"model.name={REG4}", "model.weights=null", "+model.kwargs.img_size=28",
                          "+model.kwargs.num_classes=0", "+model.kwargs.depth=2", "+model.kwargs.embed_dim=48",
                          "+model.kwargs.num_heads=2", f"dataset.root={folder}",
                          "analysis=[summary,embedding_maps]", "runtime.num_workers=0", "runtime.progress=false"])
    out = tmp_path / "run"
    run(cfg, out_dir=out)
    saved = np.load(out / "results" / "embedding_maps.npz")
    assert len(saved["paths"]) == 6 and list(saved["indices"]) == list(range(6))
    assert saved["rgb"].shape == (6, 2, 2, 3)  # 28 px / 14 px patches; class + 4 registers left out
    assert saved["attention"].shape == (6, 2, 2, 2) and saved["masks"].shape == (6, 2, 2, 2)
    np.testing.assert_allclose(saved["attention"].sum(axis=(-2, -1)) <= 1.0 + 1e-6, True)
    html = (out / "report" / "index.html").read_text()
    assert "Patch features and class-token attention" in html and "patch PCA" in html
