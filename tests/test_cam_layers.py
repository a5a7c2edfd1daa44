"""The default Grad-CAM layer on one model of each mechanism the zoo showed wrong, against pytorch-grad-cam on the
layer it chooses (with the reshape the layout needs), and the layout evidence itself on exact shapes:
- channels read on the wrong axis (timm MambaOut's channels-last stages; a Swin-named module with channels-first
  output, as timm SwinV2-CR);
- a tensor inside an attention module (CaiT's talking heads, ConViT's gated positional scores, CoaT's
  relative-position term);
- the images not on the first axis (MobileViT's and TNT's patch-folded blocks);
- the stem although token stages follow (Mixer, LeViT; transformers LeViT);
- a residual branch or an upsampling pool (AlexNet's adaptive pool; transformers Hiera's MLP output).
Heads are given random weights where the library initialises them to zero, so that the score reaches the layers."""
import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM as OracleGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from reportgen.analyses.gradcam import GradCAM, GradCAMConfig, default_target_layer, grid_layout
from reportgen.engine.grids import plausible_grid, spatial_layout
from reportgen.engine.layers import named_modules
from reportgen.inputs.hf_models import HFClassifier
from tests.test_family_maps import drive
from tests.test_gradcam import correlations


def random_head(model: nn.Module, *heads: nn.Module) -> nn.Module:
    """Random weights for every linear layer of the heads (timm and transformers zero some of them)."""
    torch.manual_seed(1)
    for head in heads:
        for layer in head.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.5)
    return model.eval()


def lively(model: nn.Module) -> nn.Module:
    """LeViT's initialisation (weights of std 0.02, the last batch norm of each residual branch zero) makes a random
    model's last stage the same at every token (the std across tokens falls from 0.6 to 0): every map would be flat.
    He-initialised weights and random norm scales keep the tokens apart."""
    torch.manual_seed(3)
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight)
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.uniform_(layer.weight, 0.5, 1.5)
    return model


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    if name.startswith("levit"):
        lively(model)
    head = model.get_classifier()
    return random_head(model, *(head if isinstance(head, tuple) else (head,)))


def hf_model(model_cls, config_cls, **config):
    """A transformers classifier from a small config (LeViT's made lively, see `lively`)."""
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=5, **config)).eval()
    if model_cls.startswith("Levit"):
        lively(model)
    return random_head(HFClassifier(model), model.classifier)


def alexnet():
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None, num_classes=5).eval()


# name: (builder, input side, expected layer, layout kind, grid, prefix tokens)
CASES = {
    "mambaout (channels-last stages)": (lambda: timm_model("mambaout_femto"), 64, "stages", "nhwc", (2, 2), 0),
    "cait (talking-heads tensors)": (lambda: timm_model("cait_xxs24_224", img_size=64), 64,
                                     "blocks_token_only.1.norm1", "tokens", (4, 4), 1),
    "convit (gated positional scores)": (lambda: timm_model("convit_tiny", img_size=64), 64, "blocks.11.norm1",
                                         "tokens", (4, 4), 1),
    "coat (relative-position term)": (lambda: timm_model("coat_lite_tiny", img_size=128), 128,
                                      "serial_blocks4.1.norm1", "tokens", (4, 4), 1),
    "mobilevit (patch-folded batch)": (lambda: timm_model("mobilevit_xxs"), 64, "final_conv", "nchw", (2, 2), 0),
    "tnt (inner tokens)": (lambda: timm_model("tnt_s_patch16_224", img_size=64), 64, "blocks.11.norm_out",
                           "tokens", (4, 4), 1),
    "mixer (token stages after the stem)": (lambda: timm_model("mixer_s16_224", img_size=64), 64, "blocks",
                                            "tokens", (4, 4), 0),
    "levit (token stages after a convolutional stem)": (lambda: timm_model("levit_128s", img_size=128), 128,
                                                        "stages", "tokens", (2, 2), 0),
    "alexnet (upsampling adaptive pool)": (alexnet, 160, "features", "nchw", (4, 4), 0),
    "hf levit": (lambda: hf_model("LevitForImageClassification", "LevitConfig", image_size=224,
                                  hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                                  key_dim=[8, 8, 8]), 224, "model.levit.encoder.stages.2", "tokens", (4, 4), 0),
    "hf hiera (residual branches)": (lambda: hf_model("HieraForImageClassification", "HieraConfig",
                                                      image_size=[128, 128], embed_dim=16, depths=[1, 1, 2, 1],
                                                      num_heads=[1, 2, 2, 4]), 128,
                                     "model.hiera.encoder.stages.3.layers.0.layernorm_after", "tokens", (4, 4), 0),
}


def reshape_for(kind, tokens):
    """pytorch-grad-cam's reshape transform for the layout: channels-last permuted, tokens on their grid."""
    if kind == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if kind == "tokens":
        rows, columns = tokens.grid
        return lambda t: t[:, tokens.prefix:].reshape(t.size(0), rows, columns, t.size(2)).permute(0, 3, 1, 2)
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_layer_is_the_image_grid_the_score_reads_and_maps_equal_pytorch_grad_cam(case, tmp_path):
    build, side, layer, kind, grid, prefix = CASES[case]
    model = build()
    torch.manual_seed(2)
    x = torch.randn(2, 3, side, side)
    assert default_target_layer(model, x[:1]) == layer
    found_kind, tokens = grid_layout(model, layer, x[:1])
    assert found_kind == kind
    if kind == "tokens":
        assert (tokens.grid, tokens.prefix) == (grid, prefix)
    analysis, _ = drive(GradCAM, GradCAMConfig, model, x, tmp_path)
    assert analysis.layer == layer and analysis.grid == grid
    ours = np.load(tmp_path / "gradcam.npz")["cams"]  # (B, h, w) raw maps as the report stores them
    assert (ours > 0).any(axis=(1, 2)).all(), "a map that shows nothing proves nothing"
    with torch.no_grad():
        targets = model(x).argmax(1)
    with OracleGradCAM(model=model, target_layers=[named_modules(model)[layer]],
                       reshape_transform=reshape_for(kind, tokens)) as cam:
        oracle = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert min(correlations(ours, oracle, (side, side))) >= 0.999


@pytest.mark.parametrize("shape, side, channels_last_module, expected", [
    ((1, 768, 7, 7), 224, True, "nchw"),  # timm SwinV2-CR stages: Swin by name, channels-first by shape
    ((1, 7, 7, 288), 224, False, "nhwc"),  # MambaOut stages
    ((1, 16, 16, 384), 256, False, "nhwc"),  # Sequencer2D stages
    ((1, 4, 4, 128), 128, False, "nhwc"),  # transformers FocalNet modulation
    ((1, 14, 14, 14), 224, True, "nhwc"),  # both readings fit: the module's own layout decides
    ((1, 14, 14, 14), 224, False, "nchw"),
    ((1, 196, 196, 4), 224, False, None),  # CaiT's (B, N, N, heads) mixing weights: no stride gives 196 of 224
    ((1, 8, 50, 40), 224, False, None),  # CoaT's relative-position term (B, heads, N, C / heads)
])
def test_channels_first_or_last_is_decided_by_the_image(shape, side, channels_last_module, expected):
    module = nn.LayerNorm(shape[-1]) if channels_last_module else nn.Conv2d(1, 1, 1)
    assert spatial_layout(shape, module, side, side) == expected


def test_plausible_grids_include_valid_convolutions_and_non_square_inputs():
    assert plausible_grid(55, 55, 224, 224) and plausible_grid(6, 6, 224, 224)  # AlexNet's valid convolutions
    assert plausible_grid(7, 10, 224, 320) and not plausible_grid(10, 7, 224, 320)
    assert not plausible_grid(1, 1, 224, 224) and not plausible_grid(300, 300, 224, 224)
