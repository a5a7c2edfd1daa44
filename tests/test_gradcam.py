"""Grad-CAM inside the pass against pytorch-grad-cam (the `grad-cam` package) as the oracle, and end to end."""
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from reportgen.analyses.gradcam import cam_from, default_target_layer, to_grid
from reportgen.engine.capture import CaptureEngine, count_hooks
from reportgen.engine.layers import named_modules
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config

ORACLES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "hirescam": HiResCAM}


def our_cams(model, x, layer, method, targets):
    """What the gradcam analysis computes: leaf at `layer`, autograd.grad of the target logits, no backward."""
    with CaptureEngine(model, gradients=[layer]) as engine:
        captures = engine.start_batch()
        with torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, captures[layer])
            activation = captures[layer].detach()
    assert count_hooks(model) == 0
    return cam_from(method, to_grid(activation), to_grid(grads)).numpy()


def oracle_cams(model, x, layer, method, targets, reshape=None):
    with ORACLES[method](model=model, target_layers=[named_modules(model)[layer]], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def correlations(ours, oracle, size):
    scaled = scale_cam_image(ours, size)  # the oracle's own upsampling and min-max normalisation
    return [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(scaled, oracle)]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_gradcam_matches_pytorch_grad_cam(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    layer = default_target_layer(model, x[:1])
    assert layer in {"resnet18": ["layer4"], "mobilenet_v3_small": ["features"],
                     "convnext_tiny": ["features"]}[arch]
    with torch.no_grad():
        targets = model(x).argmax(1)
    ours = our_cams(model, x, layer, "gradcam", targets)
    oracle = oracle_cams(model, x, layer, "gradcam", targets)
    assert min(correlations(ours, oracle, (224, 224))) >= 0.999


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "hirescam"])
def test_other_methods_match_pytorch_grad_cam(method):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 160, 160)
    targets = torch.tensor([3, 500])
    ours = our_cams(model, x, "layer3", method, targets)
    oracle = oracle_cams(model, x, "layer3", method, targets)
    assert min(correlations(ours, oracle, (160, 160))) >= 0.999


def test_vit_token_grid_matches_pytorch_grad_cam_with_reshape_transform():
    from reportgen.inputs.demo.models import demo_vit

    torch.manual_seed(2)
    model = demo_vit(pretrained=False).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: all gradients 0
    x = torch.randn(3, 3, 64, 64)
    layer = default_target_layer(model, x[:1])
    assert layer == "encoder.layers.encoder_layer_3.ln_1"
    targets = torch.tensor([0, 2, 5])

    def reshape(tensor):  # pytorch-grad-cam's documented ViT recipe: drop CLS, tokens to an 8x8 grid, channels first
        return tensor[:, 1:].reshape(tensor.size(0), 8, 8, tensor.size(2)).permute(0, 3, 1, 2)

    ours = our_cams(model, x, layer, "gradcam", targets)
    assert ours.shape == (3, 8, 8)
    oracle = oracle_cams(model, x, layer, "gradcam", targets, reshape=reshape)
    assert min(correlations(ours, oracle, (64, 64))) >= 0.999


def test_reused_module_second_call_as_target():
    from tests.tiny_models import TinyNet

    model = TinyNet().eval()
    x = torch.rand(2, 3, 6, 6)
    with CaptureEngine(model, gradients=["shared#2"]) as engine:
        captures = engine.start_batch()
        with torch.enable_grad():
            logits = model(x)
            (grads,) = torch.autograd.grad(logits[:, 1].sum(), captures["shared#2"])
    # d logit1 / d pooled = fc.weight[1] = (0, 1): channel 1 gets 1/36 everywhere, channel 0 nothing
    assert torch.allclose(grads[:, 1], torch.full((2, 6, 6), 1 / 36))
    assert torch.equal(grads[:, 0], torch.zeros(2, 6, 6))


def test_pipeline_writes_gradcam_npz_equal_to_direct_computation(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[gradcam]", "runtime.batch_size=5",
                                 "analysis.gradcam.layer=act"])
    index = run(cfg, out_dir=tmp_path / "run")
    data = np.load(tmp_path / "run" / "results" / "gradcam.npz")
    assert str(data["layer"]) == "act"
    assert data["cams"].shape == (12, 16, 16) and data["paths"].shape == (12,) and data["classes"].shape == (12,)
    assert not (tmp_path / "run" / "results" / ".gradcam").exists(), "temporary files removed"
    from reportgen.inputs.data import ImageFolderDataset, collate, scan_folder
    from reportgen.inputs.models import load_model

    loaded = load_model(cfg.model)
    scan = scan_folder(colour_folder, list(cfg.dataset.extensions))
    dataset = ImageFolderDataset(scan, loaded.preprocess)
    good = [i for i in range(len(dataset)) if dataset[i]["image"] is not None]
    batch = collate([dataset[i] for i in good])
    x = loaded.preprocess.normalize(batch.images)
    with torch.no_grad():
        targets = loaded.module(x).argmax(1)
    expected = our_cams(loaded.module, x, "act", "gradcam", targets)
    assert list(data["paths"]) == [scan.paths[i] for i in good]
    assert data["classes"].tolist() == targets.tolist()
    np.testing.assert_allclose(data["cams"], expected, rtol=1e-5, atol=1e-6)
    assert "Grad-CAM" in index.read_text(encoding="utf-8")


def test_bad_method_and_target_fail_with_choices(colour_folder, tmp_path):
    from reportgen.errors import ConfigError

    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[gradcam]",
                                 "analysis.gradcam.method=gradcampp"])
    with pytest.raises(ConfigError, match="'gradcam\\+\\+'"):
        run(cfg, out_dir=tmp_path / "a")
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[gradcam]",
                                 "analysis.gradcam.target=labels"])
    with pytest.raises(ConfigError, match="analysis.gradcam.target"):
        run(cfg, out_dir=tmp_path / "b")
