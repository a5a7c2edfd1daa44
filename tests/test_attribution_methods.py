"""The attribution methods (`reportgen.analyses._attribution_methods`) against their references: Captum called
directly for the pixel methods, the gradcam analysis's own path (`tests.test_gradcam.our_cams`) for the Grad-CAM
family, pytorch-grad-cam's EigenCAM / ScoreCAM / AblationCAM for the gradient-free CAMs; costs, controls, display
scaling, and that the model is left as it was."""
import numpy as np
import pytest
import torch
import torchvision
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

from reportgen.analyses._attribution_methods import (CAM_METHODS, METHODS, PIXEL_METHODS, MethodOptions,
                                                      attribute, control_maps, display_maps)
from reportgen.engine.capture import count_hooks, replace_output
from tests.test_gradcam import correlations, our_cams

OPTIONS = MethodOptions(n_steps=8, internal_batch_size=64, noise_samples=4, occlusion_window=16,
                        occlusion_stride=8, seed=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny forwards on a shared 2-core machine are many times faster without contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def state(model):
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


def test_pixel_methods_equal_captum_called_directly(resnet):
    model, x, targets = resnet
    direct = {
        "saliency": lambda: Saliency(model).attribute(x.clone().requires_grad_(), target=targets, abs=True),
        "input_x_gradient": lambda: InputXGradient(model).attribute(x.clone().requires_grad_(), target=targets),
        "occlusion": lambda: Occlusion(model).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8),
                                                        target=targets, perturbations_per_eval=21),
    }
    for method, reference in direct.items():
        result = attribute(model, method, x, targets, OPTIONS)
        expected = reference().detach()
        torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.maps, expected.abs().sum(1).numpy(), rtol=1e-5, atol=1e-6)
    result = attribute(model, "integrated_gradients", x, targets, OPTIONS)
    expected, delta = IntegratedGradients(model).attribute(x, target=targets, n_steps=8, internal_batch_size=64,
                                                           return_convergence_delta=True)
    torch.testing.assert_close(result.raw, expected.detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.delta, delta.numpy(), rtol=1e-4, atol=1e-5)
    assert result.delta.shape == (3,)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_tunnel_equals_captum_per_image_with_that_images_noise(resnet, nt_type):
    """Captum takes one stdev per input tensor: the reference runs it image by image with noise_std * (max - min);
    one seed before the loop draws the same noise as one seed before the batched call (one partition)."""
    model, x, targets = resnet
    result = attribute(model, nt_type, x, targets, OPTIONS)
    torch.manual_seed(OPTIONS.seed)
    expected = torch.cat([NoiseTunnel(Saliency(model)).attribute(
        x[i:i + 1], nt_type=nt_type, nt_samples=4, stdevs=float(0.15 * (x[i].max() - x[i].min())),
        target=int(targets[i]), abs=False) for i in range(len(x))])
    torch.testing.assert_close(result.raw, expected.detach(), rtol=1e-3, atol=1e-6)
    assert (result.forwards, result.backwards) == (4, 4)
    again = attribute(model, nt_type, x, targets, OPTIONS)
    assert torch.equal(again.raw, result.raw), "seeded by options.seed"
    other = attribute(model, nt_type, x, targets, MethodOptions(noise_samples=4, seed=4))
    assert not torch.equal(other.raw, result.raw)


def test_noise_tunnel_leaves_the_callers_rng_alone(resnet):
    model, x, targets = resnet
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    attribute(model, "smoothgrad", x, targets, OPTIONS)
    assert torch.equal(torch.rand(3), expected)


def test_costs_per_image(resnet):
    model, x, targets = resnet
    costs = {m: (r.forwards, r.backwards) for m in PIXEL_METHODS
             for r in [attribute(model, m, x, targets, OPTIONS)]}
    windows = (((48 - 16) + 7) // 8 + 1) ** 2  # Captum: ceil((48 - 16) / 8) + 1 = 5 per side
    assert costs == {"saliency": (1, 1), "input_x_gradient": (1, 1), "integrated_gradients": (8 + 2, 8),
                     "smoothgrad": (4, 4), "vargrad": (4, 4), "occlusion": (windows + 1, 0)}
    for method, expected in {"gradcam": (1, 1), "hirescam": (1, 1), "eigencam": (1, 0),
                             "scorecam": (1 + 512, 0), "ablationcam": (1 + 512, 0)}.items():
        result = attribute(model, method, x[:1], targets[:1], OPTIONS, "layer4", ("nchw", None))
        assert (result.forwards, result.backwards) == expected, method


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
def test_gradient_cams_equal_the_gradcam_path(resnet, method):
    model, x, targets = resnet
    result = attribute(model, method, x, targets, OPTIONS, "layer3", ("nchw", None))
    expected = our_cams(model, x, "layer3", method, targets)  # (B, 3, 3)
    assert torch.equal(result.raw, torch.from_numpy(expected))
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(expected)[:, None], size=(48, 48),
                                                mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_array_equal(result.maps, upsampled.numpy())
    assert result.maps.shape == (3, 48, 48) and result.maps.dtype == np.float32


def test_default_layer_is_the_gradcam_default(resnet):
    model, x, targets = resnet
    result = attribute(model, "gradcam", x, targets, OPTIONS)
    assert torch.equal(result.raw, torch.from_numpy(our_cams(model, x, "layer4", "gradcam", targets)))


@pytest.fixture(scope="module")
def small_layer_net():
    """resnet18 cut after layer2 (128 channels) so the per-channel oracles stay fast; ReLU output (min 0), so
    pytorch-grad-cam's ablation zeroes channels as ours does."""
    torch.manual_seed(5)
    full = torchvision.models.resnet18(weights=None, num_classes=5)
    model = torch.nn.Sequential(full.conv1, full.bn1, full.relu, full.maxpool, full.layer1, full.layer2,
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 5)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1)
    assert (logits.gather(1, targets[:, None]) > 0).all(), "ablation's /|y| equals the oracle's /y for y > 0"
    return model, x, targets


@pytest.mark.parametrize("method", ["eigencam", "scorecam", "ablationcam"])
def test_gradient_free_cams_match_pytorch_grad_cam(small_layer_net, method):
    """pytorch-grad-cam returns each map ReLU'd, min-max normalised and resized (cv2); `correlations` applies the
    same to ours, so only the method itself is compared."""
    from pytorch_grad_cam import AblationCAM, EigenCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, targets = small_layer_net
    result = attribute(model, method, x, targets, MethodOptions(internal_batch_size=48), "5", ("nchw", None))
    assert result.raw.shape == (2, 8, 8) and result.maps.shape == (2, 64, 64)
    oracle = {"eigencam": EigenCAM, "scorecam": ScoreCAM, "ablationcam": AblationCAM}[method]
    with oracle(model=model, target_layers=[model[5]]) as cam:
        if method == "scorecam":
            cam.batch_size = 64
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert min(correlations(result.raw.numpy(), expected, (64, 64))) >= 0.99
    assert count_hooks(model) == 0


def test_vit_token_layout_for_gradcam_and_eigencam():
    timm = pytest.importorskip("timm")
    from reportgen.analyses._cam_layer import default_cam_layer
    from reportgen.analyses.gradcam import grid_layout

    torch.manual_seed(6)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    layer = default_cam_layer(model, x[:1])
    layout = grid_layout(model, layer, x[:1])
    assert layout[0] == "tokens" and layout[1].grid == (4, 4)
    targets = torch.tensor([1, 3])
    grad = attribute(model, "gradcam", x, targets, OPTIONS, layer, layout)
    assert grad.raw.shape == (2, 4, 4) and grad.maps.shape == (2, 32, 32)
    assert torch.equal(attribute(model, "gradcam", x, targets, OPTIONS).raw, grad.raw), "layer and layout probed"
    assert grad.raw.abs().sum() > 0
    eigen = attribute(model, "eigencam", x, targets, OPTIONS, layer, layout)
    assert eigen.raw.shape == (2, 4, 4) and eigen.maps.shape == (2, 32, 32) and (eigen.maps >= 0).all()
    ablation = attribute(model, "ablationcam", x[:1], targets[:1], OPTIONS, layer, layout)
    assert ablation.forwards == 1 + 192 and ablation.maps.shape == (1, 32, 32)


def test_model_state_is_left_as_it_was():
    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    model.train()
    model.layer1.eval()  # mixed modes stay mixed
    for param in model.layer2.parameters():
        param.requires_grad_(False)
    before = state(model)
    x, targets = torch.randn(1, 3, 32, 32), torch.tensor([2])
    options = MethodOptions(n_steps=2, noise_samples=2, occlusion_window=16, occlusion_stride=16)
    for method in METHODS:
        layer = "layer4" if method in CAM_METHODS else None
        result = attribute(model, method, x, targets, options, layer, ("nchw", None) if layer else None)
        assert state(model) == before, method
        assert count_hooks(model) == 0, method
        assert result.maps.shape == (1, 32, 32) and (result.maps >= 0).all() and np.isfinite(result.maps).all()


def test_unknown_method_names_the_choices(resnet):
    model, x, targets = resnet
    with pytest.raises(ValueError, match="integrated_gradients.*ablationcam"):
        attribute(model, "gradient_shap", x, targets, OPTIONS)


def test_replace_output_second_call_only_and_removed():
    from tests.tiny_models import TinyNet

    model = TinyNet().eval()
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        plain = model(x)
        with replace_output(model, "shared#2", torch.zeros_like):
            zeroed = model(x)
            again = model(x)  # the call count restarts with each forward
        assert count_hooks(model) == 0
        assert torch.equal(model(x), plain)
    expected = torch.tensor([0.0, 0.0, 0.25]).expand(2, 3)  # fc of a zero feature map: its bias
    assert torch.equal(zeroed, expected) and torch.equal(again, expected)
    with pytest.raises(Exception):
        with replace_output(model, "shared", torch.zeros_like):
            raise RuntimeError("inside")
    assert count_hooks(model) == 0


def test_control_maps():
    torch.manual_seed(8)
    images = torch.rand(2, 3, 20, 30)
    for kind in ("random", "sobel", "gaussian"):
        maps = control_maps(kind, images, seed=1)
        assert maps.shape == (2, 20, 30) and maps.dtype == np.float32 and (maps >= 0).all()
    random = control_maps("random", images, seed=1)
    assert np.array_equal(random, control_maps("random", images, seed=1))
    assert not np.array_equal(random, control_maps("random", images, seed=2))
    assert 0 <= random.min() and random.max() < 1
    gaussian = control_maps("gaussian", images)
    assert np.array_equal(gaussian[0], gaussian[1])
    centre = np.unravel_index(gaussian[0].argmax(), gaussian[0].shape)
    assert centre in {(9, 14), (9, 15), (10, 14), (10, 15)} and np.isclose(gaussian[0].max(), 1, atol=0.01)
    assert np.isclose(gaussian[0, 9, 14 - 5], np.exp(-(0.5 ** 2 + 5.5 ** 2) / (2 * 5.0 ** 2)), rtol=1e-5)
    constant = torch.full((1, 3, 16, 16), 0.4)
    assert np.allclose(control_maps("sobel", constant), 0)
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0  # a vertical edge between columns 7 and 8
    sobel = control_maps("sobel", edge)[0]
    assert set(np.unique(sobel.argmax(axis=1))) <= {7, 8} and sobel[:, 7].min() > 0
    assert np.allclose(sobel[:, :7], 0) and np.allclose(sobel[:, 9:], 0)
    with pytest.raises(ValueError, match="random, sobel, gaussian"):
        control_maps("edges", images)


def test_display_maps():
    maps = np.zeros((3, 10, 10), np.float32)
    maps[0] = np.arange(100).reshape(10, 10)
    maps[2, 0, 0] = 5.0  # sparse: its 99th percentile is 0, so its maximum scales it
    shown = display_maps(maps)
    assert shown.shape == (3, 10, 10) and shown.dtype == np.float32
    assert shown.min() >= 0 and shown.max() <= 1
    np.testing.assert_allclose(shown[0], np.clip(maps[0] / np.percentile(maps[0], 99), 0, 1))
    assert not shown[1].any(), "a zero map stays zero"
    assert shown[2, 0, 0] == 1 and shown[2].sum() == 1
    half = display_maps(maps, percentile=50)
    assert (half[0] == 1).mean() >= 0.5


def test_blur_baseline_is_rises_blur(resnet):
    from reportgen.analyses._faithfulness import rise_blur

    model, x, targets = resnet
    options = MethodOptions(n_steps=4, baseline="blur", occlusion_window=16, occlusion_stride=16)
    blurred = rise_blur(x)
    result = attribute(model, "integrated_gradients", x, targets, options)
    expected, delta = IntegratedGradients(model).attribute(x, baselines=blurred, target=targets, n_steps=4,
                                                           internal_batch_size=64, return_convergence_delta=True)
    torch.testing.assert_close(result.raw, expected.detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.delta, delta.numpy(), rtol=1e-4, atol=1e-5)
    result = attribute(model, "occlusion", x, targets, options)
    expected = Occlusion(model).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16),
                                          baselines=blurred, target=targets, perturbations_per_eval=21)
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="zeros, blur"):
        attribute(model, "saliency", x, targets, MethodOptions(baseline="mean"))
