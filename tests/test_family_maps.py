"""Grad-CAM and attention on timm and transformers models (tiny random configs, no downloads), each held against
independent code: pytorch-grad-cam with its documented reshape transforms, the libraries' own (non-fused / eager)
attention softmax, and a rollout written plainly in numpy."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_grad_cam import GradCAM as OracleGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

pytest.importorskip("timm")
pytest.importorskip("transformers")

from reportgen.analyses.attention import Attention, AttentionConfig  # noqa: E402
from reportgen.analyses.base import Batch, RunContext, capture_engine_for  # noqa: E402
from reportgen.analyses.gradcam import GradCAM, GradCAMConfig  # noqa: E402
from reportgen.engine.capture import CaptureEngine, count_hooks  # noqa: E402
from reportgen.engine.layers import named_modules  # noqa: E402
from reportgen.errors import ConfigError  # noqa: E402
from reportgen.inputs.tasks import ModelOutputs
from tests import tiny_models  # noqa: E402

REPORT = SimpleNamespace(thumbnail_size=32, gallery_size=4, figure_dpi=40, image_format="jpeg")


def make_batch(x: torch.Tensor) -> Batch:
    size = x.shape[0]
    return Batch(indices=torch.arange(size), paths=[f"img_{i}.png" for i in range(size)],
                 images=(x.clamp(0, 1) * 255).to(torch.uint8), inputs=x, labels=torch.full((size,), -1))


def drive(analysis_class, config_class, model, x, results_dir, **options):
    """An analysis driven the way the pipeline drives it: begin, requires, one hooked forward, update, finalize."""
    cfg = OmegaConf.merge(OmegaConf.structured(config_class), options)
    ctx = RunContext(model=model, loaded=SimpleNamespace(class_names=[], synsets=[]), dataset_classes=[], num_images=len(x),
                     device=torch.device("cpu"), results_dir=results_dir, report=REPORT)
    analysis = analysis_class(cfg, ctx)
    batch = make_batch(x)
    analysis.begin(batch)
    needs = analysis.requires()
    with capture_engine_for(model, [analysis]) as engine:
        captures = engine.start_batch(batch)
        with torch.enable_grad() if needs.gradients else torch.inference_mode():
            analysis.update(batch, ModelOutputs("classification", logits=model(batch.inputs)), captures)
    assert count_hooks(model) == 0
    return analysis, analysis.finalize()


# ---------------------------------------------------------------- Grad-CAM


def tokens_to_grid(prefix, rows, columns):
    """pytorch-grad-cam's documented ViT reshape transform: drop the prefix tokens, tokens to the patch grid,
    channels first."""
    def reshape(tensor):
        return tensor[:, prefix:].reshape(tensor.size(0), rows, columns, tensor.size(2)).permute(0, 3, 1, 2)
    return reshape


def channels_last_to_first(tensor):
    """timm Swin stages are (B, H, W, C): pytorch-grad-cam wants (B, C, H, W)."""
    return tensor.permute(0, 3, 1, 2)


FAMILIES = {  # builder: (input size, expected default layer, reshape transform for the oracle, map size)
    "timm_vit_tiny": ((32, 32), "blocks.1.norm1", tokens_to_grid(1, 2, 2), (2, 2)),
    "timm_deit_distilled_tiny": ((48, 32), "blocks.1.norm1", tokens_to_grid(2, 3, 2), (3, 2)),
    "timm_convnext_tiny": ((64, 64), "stages", None, (2, 2)),
    "timm_swin_tiny": ((40, 40), "layers", channels_last_to_first, (5, 5)),
    "hf_vit_tiny": ((32, 32), "model.vit.layers.1.layernorm_before", tokens_to_grid(1, 4, 4), (4, 4)),
    "hf_convnext_tiny": ((64, 64), "model.convnext.encoder.stages.1", None, (8, 8)),
    # stage outputs are token sequences: 40 px / 4 px patches = 10x10, halved by patch merging to 5x5, no prefix;
    # the final layernorm is the first module output holding the last block's residual sum (stages return tuples)
    "hf_swin_tiny": ((40, 40), "model.swin.layernorm", tokens_to_grid(0, 5, 5), (5, 5)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_gradcam_layer_and_maps_match_pytorch_grad_cam(family, tmp_path):
    size, layer, reshape, grid = FAMILIES[family]
    model = getattr(tiny_models, family)()
    torch.manual_seed(20)
    x = torch.randn(3, 3, *size)
    analysis, _ = drive(GradCAM, GradCAMConfig, model, x, tmp_path)
    assert analysis.layer == layer
    cams = np.load(tmp_path / "gradcam.npz")["cams"]  # (B, h, w) raw maps as the report stores them
    assert cams.shape == (3, *grid)
    with torch.no_grad():
        targets = model(x).argmax(1)
    with OracleGradCAM(model=model, target_layers=[named_modules(model)[layer]], reshape_transform=reshape) as cam:
        oracle = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])  # (B, H, W)
    scaled = scale_cam_image(cams, (size[1], size[0]))  # the oracle's own upsampling and normalisation
    for ours, theirs in zip(scaled, oracle):
        assert theirs.std() > 0, "the oracle map must not be flat"
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999


def test_gradcam_layer_without_a_grid_is_a_config_error_naming_grid_layers(tmp_path):
    model = tiny_models.timm_vit_tiny()
    with pytest.raises(ConfigError, match="analysis.gradcam.layer") as error:
        drive(GradCAM, GradCAMConfig, model, torch.randn(1, 3, 32, 32), tmp_path, layer="head")
    assert "head outputs 1×3" in str(error.value) and "blocks.1.mlp" in str(error.value)


def test_gradcam_on_a_model_without_spatial_layers_says_so(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    _, section = drive(GradCAM, GradCAMConfig, model, torch.randn(2, 3, 2, 2), tmp_path)
    text = " ".join(getattr(e, "text", "") for e in section.elements)
    assert "Not applicable" in text and "analysis.gradcam.layer" in text


# ---------------------------------------------------------------- attention of global self-attention


def timm_softmax_reference(model, x):
    """Each block's attention softmax recomputed from its norm1 output, as timm's non-fused path does it
    (qkv projection, q/k norms, scale, q k^T, softmax); (layers, B, heads, N, N)."""
    inputs = []
    handles = [block.norm1.register_forward_hook(lambda m, a, out: inputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(x)
        out = []
        for block, tokens in zip(model.blocks, inputs):
            attn = block.attn
            batch, n, _ = tokens.shape
            qkv = attn.qkv(tokens).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            out.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).numpy())
    for handle in handles:
        handle.remove()
    return np.stack(out).astype(np.float64)


def hf_attentions_reference(model, x):
    """transformers' own eager attentions (output_attentions=True); (layers, B, heads, N, N)."""
    with torch.no_grad():
        output = model.model(pixel_values=x, output_attentions=True)
    return np.stack([a.numpy() for a in output.attentions]).astype(np.float64)


def numpy_rollout(weights, prefix):
    """Abnar & Zuidema one image at a time over every token: (layers, B, heads, N, N) -> (B, patches), the class
    token's row without the prefix columns."""
    layers, batch, _, tokens, _ = weights.shape
    rows = []
    for b in range(batch):
        result = np.eye(tokens)
        for layer in range(layers):
            step = weights[layer, b].mean(axis=0) + np.eye(tokens)
            result = (step / step.sum(axis=1, keepdims=True)) @ result
        rows.append(result[0, prefix:])
    return np.stack(rows)


VITS = {  # builder: (input size, attention module names, reference, prefix tokens, grid)
    "timm_vit_tiny": ((32, 32), ["blocks.0.attn", "blocks.1.attn"], timm_softmax_reference, 1, (2, 2)),
    "timm_deit_distilled_tiny": ((48, 32), ["blocks.0.attn", "blocks.1.attn"], timm_softmax_reference, 2, (3, 2)),
    "hf_vit_tiny": ((32, 32), ["model.vit.layers.0.attention", "model.vit.layers.1.attention"],
                    hf_attentions_reference, 1, (4, 4)),
}


@pytest.mark.parametrize("family", sorted(VITS))
def test_vit_attention_equals_the_library_softmax_and_rollout_is_built_from_it(family, tmp_path):
    size, layers, reference, prefix, grid = VITS[family]
    model = getattr(tiny_models, family)()
    torch.manual_seed(21)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        plain = model(x)
    analysis, section = drive(Attention, AttentionConfig, model, x, tmp_path, n_images=1, heads=[0])
    expected = reference(model, x)  # (layers, B, heads, N, N)
    saved = np.load(tmp_path / "attention.npz")
    assert list(saved["layers"]) == layers
    assert [analysis.layers[k].prefix for k in layers] == [prefix, prefix]
    for i, name in enumerate(layers):
        cls_map = expected[i][:, :, 0, prefix:].mean(axis=1).reshape(3, *grid)  # class token row, head average
        np.testing.assert_allclose(saved["cls_" + name.replace(".", "_")], cls_map, atol=1e-6)
    np.testing.assert_allclose(saved["rollout"], numpy_rollout(expected, prefix).reshape(3, *grid), atol=1e-6)
    assert "no attention layers" not in section.summary and "rollout over 2 layers" in section.summary
    # the pass left the model as it was: outputs unchanged, timm's fused path and transformers' config restored
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)
    if family.startswith("timm"):
        assert all(block.attn.fused_attn for block in model.blocks)


def test_engine_captures_exactly_transformers_attentions_and_restores_a_sdpa_config():
    from transformers import ViTConfig, ViTForImageClassification

    from reportgen.inputs.hf_models import HFClassifier

    torch.manual_seed(22)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    model = HFClassifier(ViTForImageClassification(config).eval()).eval()  # the default, SDPA
    assert model.model.config._attn_implementation == "sdpa"
    names = ["model.vit.layers.0.attention", "model.vit.layers.1.attention"]
    x = torch.randn(2, 3, 32, 32)
    with CaptureEngine(model, attention=names) as engine:
        captures = engine.start_batch()
        with torch.no_grad():
            model(x)
    assert all(model.model.vit.layers[i].attention.config is model.model.config for i in range(2))
    assert model.model.config._attn_implementation == "sdpa"
    model.model.config._attn_implementation = "eager"
    expected = model.model(pixel_values=x, output_attentions=True).attentions
    for name, weights in zip(names, expected):
        assert torch.equal(captures.attention[name], weights)


def test_timm_fused_attention_is_restored_after_an_exception():
    model = tiny_models.timm_vit_tiny()
    assert model.blocks[0].attn.fused_attn
    with pytest.raises(RuntimeError, match="boom"):
        with CaptureEngine(model, attention=["blocks.0.attn"]):
            assert not model.blocks[0].attn.fused_attn and model.blocks[1].attn.fused_attn  # hooked module only
            raise RuntimeError("boom")
    assert model.blocks[0].attn.fused_attn and count_hooks(model) == 0


def test_activations_lay_deit_tokens_on_the_patch_grid_without_both_prefix_tokens():
    from reportgen.analyses.activations import Activations, ActivationsConfig

    model = tiny_models.timm_deit_distilled_tiny()
    x = torch.randn(2, 3, 48, 32)
    cfg = OmegaConf.merge(OmegaConf.structured(ActivationsConfig), {"layers": ["blocks.1"]})
    ctx = RunContext(model=model, loaded=SimpleNamespace(class_names=[], synsets=[]), dataset_classes=[], num_images=2,
                     device=torch.device("cpu"), results_dir=None, report=REPORT)
    analysis = Activations(cfg, ctx)
    analysis.begin(make_batch(x))
    (call,) = analysis.calls
    assert call.grid == (3, 2) and call.tokens.prefix == 2  # 2 + 3*2 = 8 tokens; a square-root guess finds none


class OwnAttention(torch.nn.Module):
    """Attention written by hand with F.scaled_dot_product_attention: no weights any engine path can read."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, features):  # (B, 8, N) flattened conv features
        q, k, v = self.qkv(features.transpose(1, 2)).chunk(3, dim=-1)  # (B, N, 8) each
        return F.scaled_dot_product_attention(q, k, v)  # (B, N, 8)


def test_attention_the_engine_cannot_read_is_not_supported_never_no_attention_layers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(2), OwnAttention(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16, 3)).eval()
    _, section = drive(Attention, AttentionConfig, model, torch.randn(1, 3, 16, 16), tmp_path)
    text = " ".join(getattr(e, "text", "") for e in section.elements)
    assert "Not supported" in text and "OwnAttention" in text and "no attention layers" not in text


# ---------------------------------------------------------------- Swin window attention (timm, transformers)


def window_index(height, width, window, shift, shift_first):
    """For each window, the input token each of its rows holds (-1 for padding), worked out on an index grid:
    timm rolls the grid then pads, transformers pads then rolls."""
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    index = np.arange(height * width).reshape(height, width)
    if shift_first:
        index = np.roll(index, (-shift, -shift), axis=(0, 1))
        grid = -np.ones((padded_h, padded_w), dtype=np.int64)
        grid[:height, :width] = index
    else:
        grid = -np.ones((padded_h, padded_w), dtype=np.int64)
        grid[:height, :width] = index
        grid = np.roll(grid, (-shift, -shift), axis=(0, 1))
    return np.stack([grid[i:i + window, j:j + window].flatten() for i in range(0, padded_h, window)
                     for j in range(0, padded_w, window)])


def timm_swin_reference(model, x):
    """timm's own softmax (its `softmax` module on the non-fused path, recorded with plain hooks) per attention
    module, with the block's grid, window and shift."""
    recorded, grids = {}, {}
    handles = []
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{b}.attn"
            block.attn.fused_attn = False
            handles.append(block.attn.softmax.register_forward_hook(
                lambda m, a, out, name=name: recorded.__setitem__(name, out)))
            handles.append(block.register_forward_pre_hook(
                lambda m, a, name=name: grids.__setitem__(name, tuple(a[0].shape[1:3]))))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    blocks = {f"layers.{s}.blocks.{b}.attn": block for s, stage in enumerate(model.layers)
              for b, block in enumerate(stage.blocks)}
    return {name: (probs, grids[name], blocks[name].window_size[0], blocks[name].shift_size[0], True)
            for name, probs in recorded.items()}


def hf_swin_reference(model, x):
    """transformers' own eager attention probabilities, as each SwinAttention returns them (recorded with plain
    hooks; `output_attentions` keeps only one layer per stage), with the layer's grid, window and shift (the 40 px
    input gives 10x10 then 5x5 tokens)."""
    recorded, layers = {}, {}
    handles = []
    for s, stage in enumerate(model.model.swin.encoder.layers):
        for b, layer in enumerate(stage.blocks):
            name = f"model.swin.encoder.layers.{s}.blocks.{b}.attention"
            layers[name] = (layer, (10, 10) if s == 0 else (5, 5))
            handles.append(layer.attention.register_forward_hook(
                lambda m, a, out, name=name: recorded.__setitem__(name, out[1])))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return {name: (probs, layers[name][1], layers[name][0].window_size, layers[name][0].shift_size, False)
            for name, probs in recorded.items()}


@pytest.mark.parametrize("family,reference", [("timm_swin_tiny", timm_swin_reference),
                                              ("hf_swin_tiny", hf_swin_reference)])
def test_swin_window_attention_equals_the_library_softmax_placed_on_the_token_grid(family, reference, tmp_path):
    model = getattr(tiny_models, family)()
    torch.manual_seed(23)
    x = torch.randn(2, 3, 40, 40)
    analysis, section = drive(Attention, AttentionConfig, model, x, tmp_path, n_images=1, heads=[0])
    expected = reference(getattr(tiny_models, family)(), x)  # a fresh copy: the reference sets fused_attn itself
    keys, entropy, _ = analysis.layer_statistics()
    assert keys == list(expected)
    shifts = set()
    first = next(item for _, _, item in analysis.first.items() if item["index"] == 0)
    for row, (name, (probs, (height, width), window, shift, shift_first)) in enumerate(expected.items()):
        shifts.add(shift)
        windows = window_index(height, width, window, shift, shift_first)  # (nW, T)
        heads = probs.shape[1]
        probs = probs.reshape(2, windows.shape[0], heads, window * window, window * window).double().numpy()
        real = windows >= 0
        rows = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)  # (B, nW, heads, T)
        np.testing.assert_allclose(entropy[row, :heads], [rows[:, :, h][:, real].mean() for h in range(heads)],
                                   rtol=1e-5)
        received = np.zeros((heads, height * width))  # attention each real token receives in its window, image 0
        for w in range(windows.shape[0]):
            for t, token in enumerate(windows[w]):
                if token >= 0:
                    received[:, token] = probs[0, w, :, :, t].sum(axis=-1)
        np.testing.assert_allclose(first["heads"][name].numpy(), received.reshape(heads, height, width), atol=1e-5)
    assert shifts == {0, 2}, "shifted and unshifted windows are both exercised"
    assert "Swin" in section.summary and "rollout" not in np.load(tmp_path / "attention.npz").files


# ---------------------------------------------------------------- end to end through model=timm and model=hf


def pipeline_inputs(cfg, folder):
    """The model the run loaded and the normalised inputs of every decodable image, as the pass saw them."""
    from reportgen.inputs.data import ImageFolderDataset, collate, scan_folder
    from reportgen.inputs.models import load_model

    loaded = load_model(cfg.model)
    scan = scan_folder(folder, list(cfg.dataset.extensions))
    dataset = ImageFolderDataset(scan, loaded.preprocess)
    batch = collate([item for item in (dataset[i] for i in range(len(dataset))) if item["image"] is not None])
    return loaded.module.eval(), loaded.preprocess.normalize(batch.images)


def save_timm_vit(path):
    from safetensors.torch import save_file

    model = tiny_models.timm_vit_tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return ["model=timm", "model.name=vit_tiny_patch16_224", f"model.path={path}", "+model.kwargs.img_size=32",
            "+model.kwargs.depth=2", "+model.kwargs.pretrained_cfg_overlay.input_size=[3,32,32]"]


def save_hf_vit(folder):
    from transformers import ViTImageProcessor

    tiny_models.hf_vit_tiny().model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return ["model=hf", f"model.path={folder}"]


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_report_of_a_timm_and_a_transformers_vit_has_attention_and_gradcam_equal_to_the_libraries(
        source, tmp_path):
    from reportgen.runs.pipeline import run
    from tests.helpers import compose_config, make_colour_folder

    colour_folder = make_colour_folder(tmp_path / "colours", per_class=3, noise=90, seed=1)  # noisy: varied maps

    model_overrides = (save_timm_vit(tmp_path / "vit.safetensors") if source == "timm"
                       else save_hf_vit(tmp_path / "hf_vit"))
    cfg = compose_config(model_overrides + [f"dataset.root={colour_folder}", "analysis=[gradcam,attention]",
                                            "runtime.num_workers=0", "runtime.progress=false", "runtime.batch_size=5",
                                            "analysis.attention.n_images=2", "report.gallery_size=4"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert 'id="attention"' in html and 'id="gradcam"' in html and "Attention rollout" in html
    assert "no attention layers" not in html and "prefix tokens" in html
    model, x = pipeline_inputs(cfg, colour_folder)
    results = tmp_path / "run" / "results"
    attention, gradcam = np.load(results / "attention.npz"), np.load(results / "gradcam.npz")
    if source == "timm":
        layer, reshape, grid, expected = "blocks.1.norm1", tokens_to_grid(1, 2, 2), (2, 2), timm_softmax_reference
    else:
        layer, reshape, grid = "model.vit.layers.1.layernorm_before", tokens_to_grid(1, 4, 4), (4, 4)
        expected = hf_attentions_reference
    weights = expected(model, x)  # (layers, B, heads, N, N)
    np.testing.assert_allclose(attention["rollout"], numpy_rollout(weights, 1).reshape(-1, *grid), atol=1e-5)
    assert str(gradcam["layer"]) == layer and gradcam["cams"].shape == (len(x), *grid)
    with torch.no_grad():
        targets = model(x).argmax(1)
    assert gradcam["classes"].tolist() == targets.tolist()
    with OracleGradCAM(model=model, target_layers=[named_modules(model)[layer]], reshape_transform=reshape) as cam:
        oracle = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    scaled = scale_cam_image(gradcam["cams"], (32, 32))
    assert sum(b.std() > 0 for b in oracle) >= len(x) // 2, "most oracle maps must not be flat"
    for ours, theirs in zip(scaled, oracle):  # a map that is 0 everywhere (ReLU of a negative map) on both sides
        if theirs.std() == 0:
            assert ours.std() == 0
        else:
            assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999


def test_report_of_a_timm_swin_has_window_attention_and_a_channels_last_gradcam(tmp_path):
    from reportgen.runs.pipeline import run
    from tests.helpers import compose_config, make_colour_folder

    folder = make_colour_folder(tmp_path / "colours", per_class=2, noise=90, seed=2)
    cfg = compose_config(["model=timm", "model.name=swin_tiny_patch4_window7_224", "model.weights=null",
                          "+model.kwargs.img_size=40", "+model.kwargs.window_size=4", "+model.kwargs.depths=[2,2]",
                          "+model.kwargs.num_heads=[2,4]", "+model.kwargs.embed_dim=16",
                          "+model.kwargs.num_classes=3", "+model.kwargs.pretrained_cfg_overlay.input_size=[3,40,40]",
                          f"dataset.root={folder}", "analysis=[gradcam,attention]", "runtime.num_workers=0",
                          "runtime.progress=false", "analysis.attention.n_images=2", "report.gallery_size=3"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert "channels-last map (B, h, w, C)" in html and "Swin windowed attention" in html
    results = tmp_path / "run" / "results"
    assert np.load(results / "gradcam.npz")["cams"].shape == (6, 5, 5)
    saved = np.load(results / "attention.npz")
    assert list(saved["layers"]) == [f"layers.{s}.blocks.{b}.attn" for s in range(2) for b in range(2)]
    assert saved["received_layers_0_blocks_0_attn"].shape == (6, 10, 10)
