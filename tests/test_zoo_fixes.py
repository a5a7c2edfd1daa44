"""Defects found by running the torchvision/timm zoo, each against independent code:
- a Grad-CAM leaf followed by an in-place op (densenet, squeezenet) ran into autograd's leaf check: pytorch-grad-cam
  is the oracle for the maps, plain forward hooks for the captured values;
- FLOPs: nn.MultiheadAttention's fused fast path and the CPU attention kernel went uncounted (vit_b_32 5.90 G of
  8.82 G), and timm PiT / CaiT got no count at all: FlopCounterMode on a grad-enabled forward with the math attention
  kernel (only ops it has formulas for) and torchvision's published multiply-adds are the oracles;
- all-zero Grad-CAM maps were drawn as normal overlays: hand-set weights give the exact counts."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from pytorch_grad_cam import GradCAM as OracleGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from reportgen.analyses.base import Batch, RunContext, capture_engine_for
from reportgen.analyses.gradcam import GradCAM, GradCAMConfig, default_target_layer
from reportgen.analyses.summary import profile_modules
from reportgen.engine.capture import CaptureEngine, count_hooks
from reportgen.engine.layers import named_modules
from reportgen.inputs.tasks import ModelOutputs
from reportgen.runs.pipeline import run
from tests.helpers import compose_config
from tests.test_capture import plain_hook_outputs
from tests.test_gradcam import correlations, our_cams

FAST = ["runtime.num_workers=0", "runtime.progress=false", "model.preprocess.resize=64", "model.preprocess.crop=64"]


# --- 1. a gradient leaf followed by an in-place op -------------------------------------------------------------


class Copy(nn.Module):
    def forward(self, x):
        return x.clone()


def oracle_with_copy_after(model, layer, x, targets):
    """pytorch-grad-cam on the same network with a copy after `layer`, so the model's in-place op downstream acts on
    the copy: the oracle then reads the layer's own output, as a Grad-CAM of that layer must. (On the unchanged
    densenet, pytorch-grad-cam keeps the very tensor F.relu(inplace=True) then overwrites, and its map is that of
    the ReLU's output instead: correlation 0.96 with the layer's.)"""
    model = copy.deepcopy(model)
    parent, _, child = layer.rpartition(".")
    owner = named_modules(model)[parent] if parent else model
    target = getattr(owner, child)
    setattr(owner, child, nn.Sequential(target, Copy()))
    with OracleGradCAM(model=model, target_layers=[target]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@pytest.mark.parametrize("arch, layer", [("densenet121", "features"), ("squeezenet1_1", "classifier.1")])
def test_gradcam_on_a_layer_followed_by_an_in_place_op_matches_pytorch_grad_cam(arch, layer):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(2, 3, 128, 128)
    assert default_target_layer(model, x[:1]) == layer
    with torch.no_grad():
        targets = model(x).argmax(1)
    ours = our_cams(model, x, layer, "gradcam", targets)  # raised "a leaf Variable ... in-place operation" before
    assert ours.shape[1:] == {"densenet121": (4, 4), "squeezenet1_1": (7, 7)}[arch]
    oracle = oracle_with_copy_after(model, layer, x, targets)
    assert min(correlations(ours, oracle, (128, 128))) >= 0.999
    assert count_hooks(model) == 0


def test_captured_leaf_keeps_the_layer_output_although_the_model_then_changes_it_in_place():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    reference = plain_hook_outputs(model, x, ["features"])["features"][0]  # cloned before densenet's in-place ReLU
    assert (reference < 0).any(), "the in-place ReLU must have something to change"
    with CaptureEngine(model, gradients=["features"]) as engine:
        captures = engine.start_batch()
        with engine.forward_mode():
            logits = model(x)
            (grad,) = torch.autograd.grad(logits[0, 0], captures["features"])
    assert torch.allclose(captures["features"].detach(), reference, atol=1e-5)
    assert grad.abs().sum() > 0 and ((grad == 0) | (reference > 0)).all(), "the ReLU's gradient passes through"
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5), "the model's output is unchanged"


def test_densenet121_report_with_gradcam_runs_through(colour_folder, tmp_path):
    cfg = compose_config(FAST + ["model=densenet121", "model.weights=null", f"dataset.root={colour_folder}",
                                 "dataset.limit=3", "analysis=[gradcam]"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert 'id="gradcam"' in html and "Class activation maps" in html
    data = np.load(tmp_path / "run" / "results" / "gradcam.npz")
    assert str(data["layer"]) == "features" and data["cams"].shape == (3, 2, 2)
    assert (data["cams"].reshape(3, -1) > 0).any(axis=1).all()
    assert "maps are all zero" not in html, "a model whose maps show something gets no all-zero alert"


# --- 2. FLOPs ----------------------------------------------------------------------------------------------------


def independent_flops(model, x):
    """FlopCounterMode on a plain grad-enabled forward (no MHA fast path) with the math attention kernel, which
    decomposes into bmm: every op that runs has a stock formula."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["vit_b_32", "densenet121"])
def test_flops_equal_an_independent_count_and_torchvision_published_multiply_adds(arch):
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.rand(1, 3, 224, 224)
    rows, total, uncounted = profile_modules(model, x)
    assert uncounted == {}
    assert total == independent_flops(model, x)
    published = torchvision.models.get_model_weights(arch).DEFAULT.meta["_ops"] * 2e9  # GMACs -> FLOPs
    assert abs(total - published) <= 0.02 * published  # vit_b_32 was 5.90e9 against 8.82e9
    if arch == "vit_b_32":
        attention = [r for r in rows if r["type"] == "MultiheadAttention"]
        # per block, 50 tokens of 768: q, k, v and output projections (4 * 50 * 768^2) + q k^T and weights v
        # (2 * 50^2 * 768) multiply-adds
        assert len(attention) == 12
        assert all(r["flops"] == 2 * (4 * 50 * 768 ** 2 + 2 * 50 ** 2 * 768) for r in attention)


def test_timm_pit_gets_a_flop_count():
    model = timm.create_model("pit_ti_224", pretrained=False).eval()
    x = torch.rand(1, 3, 224, 224)
    rows, total, uncounted = profile_modules(model, x)  # AssertionError "Expected gradient function to be set" before
    assert uncounted == {}
    assert total == independent_flops(model, x)
    assert 1.3e9 < total < 1.5e9  # timm's table: 0.7 GMACs
    assert all(p.requires_grad for p in model.parameters()), "the probe's freeze is undone"


class FusedAttentionNet(nn.Module):
    """Calls the fused attention op directly, which has no FLOP formula: the count must say that it is low."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, 8)
        a = self.attention
        out, _ = torch._native_multi_head_attention(tokens, tokens, tokens, 8, 2, a.in_proj_weight, a.in_proj_bias,
                                                    a.out_proj.weight, a.out_proj.bias, need_weights=False)
        return out.mean(1)


def test_an_attention_op_without_formula_is_reported_not_silently_left_out():
    _, total, uncounted = profile_modules(FusedAttentionNet().eval(), torch.rand(1, 8, 2, 2))
    assert uncounted == {"aten._native_multi_head_attention": 1} and total == 0


# --- 3. all-zero Grad-CAM maps -----------------------------------------------------------------------------------


class RedHead(nn.Module):
    """`feat` is the red channel (>= 0); logits = mean red * (1, -1, 0). Grad-CAM on `feat`: class 0 maps the red
    channel; class 1's gradient is negative, so every location's sum is negative and the ReLU leaves 0; class 2's
    gradient is zero (a zero head row)."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 1, kernel_size=1, bias=False)
        self.head = nn.Linear(1, 3, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))

    def forward(self, x):
        return self.head(self.feat(x).mean(dim=(2, 3)))  # (B, 3)


def run_gradcam(model, images, labels, results_dir, start=0, num_images=None):
    """The analysis driven as the pipeline drives it, target = each image's folder class (classes a, b, c), on
    images number `start`... of a folder of `num_images` (a shard when that is more than these)."""
    cfg = OmegaConf.merge(OmegaConf.structured(GradCAMConfig), {"layer": "feat", "target": "label"})
    ctx = RunContext(model=model, loaded=SimpleNamespace(class_names=["a", "b", "c"], synsets=[]),
                     dataset_classes=["a", "b", "c"], num_images=num_images or len(labels), device=torch.device("cpu"),
                     results_dir=results_dir,
                     report=SimpleNamespace(thumbnail_size=32, gallery_size=8, figure_dpi=40, image_format="jpeg"))
    results_dir.mkdir(parents=True)
    analysis = GradCAM(cfg, ctx)
    indices = range(start, start + len(labels))
    batch = Batch(indices=torch.tensor(indices), paths=[f"img_{i}.png" for i in indices],
                  images=(images.clamp(0, 1) * 255).to(torch.uint8), inputs=images, labels=torch.tensor(labels))
    analysis.begin(batch)
    with capture_engine_for(model, [analysis]) as engine:
        captures = engine.start_batch(batch)
        with engine.forward_mode():
            analysis.update(batch, ModelOutputs("classification", logits=model(batch.inputs)), captures)
    return analysis


def zero_alerts(section):
    return [a.message for a in section.alerts if "all zero" in a.message]


def test_all_zero_maps_are_counted_with_their_reason_and_shards_add_up(tmp_path):
    torch.manual_seed(0)
    model = RedHead().eval()
    images = torch.rand(5, 3, 6, 6) * 0.9 + 0.1  # red > 0 everywhere
    labels = [0, 1, 2, 2, 1]
    whole = run_gradcam(model, images, labels, tmp_path / "whole")
    assert (whole.zero, whole.zero_grad) == (4, 2)
    first = run_gradcam(model, images[:3], labels[:3], tmp_path / "first", num_images=5)
    second = run_gradcam(model, images[3:], labels[3:], tmp_path / "second", start=3, num_images=5)
    first.merge(second.state_dict())
    assert (first.zero, first.zero_grad, first.count) == (4, 2, 5)
    for analysis in (whole, first):
        (message,) = zero_alerts(analysis.finalize())
        assert message.startswith("4 of 5 Grad-CAM maps are all zero")
        assert "2 of them because the gradient of the target score with respect to feat is zero everywhere" in message
        assert "zero-initialised or untrained head" in message
        assert "2 because the weighted sum is negative at every location" in message
    normal = run_gradcam(model, images, [0] * 5, tmp_path / "normal")
    assert normal.zero == 0 and zero_alerts(normal.finalize()) == []


def test_nonfinite_alert_says_how_many_of_how_many(tmp_path):
    model = RedHead().eval()
    images = torch.rand(3, 3, 6, 6) + 0.1
    images[1, 0, 2, 2] = float("inf")
    analysis = run_gradcam(model, images, [0, 0, 0], tmp_path / "run")
    section = analysis.finalize()
    assert [a.message for a in section.alerts if "NaN or Inf" in a.message] == [
        "1 of 3 Grad-CAM maps contain NaN or Inf (shown as 0), from the target layer's output or its gradient"]


def test_vit_b_32_with_random_weights_reports_its_all_zero_maps(colour_folder, tmp_path):
    """torchvision zero-initialises the ViT head, so with random weights every gradient, and every map, is 0."""
    cfg = compose_config(FAST + ["model=vit_b_32", "model.weights=null", "+model.kwargs.image_size=64",
                                 f"dataset.root={colour_folder}", "dataset.limit=3", "analysis=[gradcam]"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert "3 of 3 Grad-CAM maps are all zero" in html
    assert "3 of them because the gradient of the target score" in html
    assert "map all zero: nothing to show" in html
