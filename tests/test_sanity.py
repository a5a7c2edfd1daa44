"""The model-parameter randomisation test (reportgen/analyses/_sanity.py): blocks, cascades, randomised copies, map
similarity, and the method's point on a tiny CNN (gradients change, an edge map of the input does not)."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity
from torch import nn

from reportgen.analyses._sanity import (GROUP, RandomizationStep, cascade, compare_to_original, randomization_blocks,
                                        randomized_copy, spearman_abs, ssim)


def _resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def _trained(model: nn.Module) -> nn.Module:
    """Every parameter and batch-norm statistic moved off its initial value, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
        for name, tensor in model.named_buffers():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


def _owned(model: nn.Module, blocks) -> dict:
    """Parameter name -> how many blocks hold it."""
    counts = {name: 0 for name, _ in model.named_parameters()}
    for block in blocks:
        for module in block.split(GROUP):
            for name, _ in model.get_submodule(module).named_parameters(prefix=module):
                counts[name] += 1
    return counts


def test_blocks_of_resnet18_are_stem_stages_and_head():
    model = _resnet18()
    blocks = randomization_blocks(model, torch.randn(1, 3, 64, 64))
    assert blocks == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert set(_owned(model, blocks).values()) == {1}  # every parameter in exactly one block


def test_blocks_of_a_timm_vit_are_patch_embed_every_encoder_block_norm_and_head():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    blocks = randomization_blocks(model, torch.randn(1, 3, 32, 32))
    assert blocks == ["patch_embed"] + [f"blocks.{i}" for i in range(12)] + ["norm", "head"]
    counts = _owned(model, blocks)
    assert {n for n, c in counts.items() if c == 0} == {"cls_token", "pos_embed"}  # the root's own: no block
    assert set(counts.values()) == {0, 1}


def test_blocks_of_a_sequential_group_the_parameters_before_each_stage_output():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    blocks = randomization_blocks(model, torch.randn(1, 3, 16, 16))
    assert blocks == ["0", "3+4", "8"]  # conv at 16 x 16; conv + batch norm at 8 x 8; the head
    assert set(_owned(model, blocks).values()) == {1}


def test_a_model_with_fewer_than_two_blocks_returns_what_it_has():
    assert randomization_blocks(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), torch.randn(1, 3, 4, 4)) == ["1"]
    assert randomization_blocks(nn.Linear(4, 3), torch.randn(2, 4)) == []  # the root's own parameters only


def test_cascade_top_down_starts_at_the_head_and_accumulates():
    steps = cascade(["conv1+bn1", "layer1", "fc"], "top_down")
    assert steps == [RandomizationStep("fc", ("fc",)),
                     RandomizationStep("fc … layer1", ("fc", "layer1")),
                     RandomizationStep("fc … conv1+bn1", ("fc", "layer1", "conv1", "bn1"))]


def test_cascade_bottom_up_starts_at_the_stem_and_accumulates():
    steps = cascade(["conv1+bn1", "layer1", "fc"], "bottom_up")
    assert [s.label for s in steps] == ["conv1+bn1", "conv1+bn1 … layer1", "conv1+bn1 … fc"]
    assert [s.modules for s in steps] == [("conv1", "bn1"), ("conv1", "bn1", "layer1"),
                                          ("conv1", "bn1", "layer1", "fc")]
    assert cascade([], "bottom_up") == []


def test_cascade_rejects_another_order():
    with pytest.raises(ValueError, match="top_down"):
        cascade(["a", "b"], "random")


def test_randomized_copy_leaves_the_model_and_the_global_random_state_unchanged():
    model = _trained(_resnet18()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    copy = randomized_copy(model, ["conv1", "bn1", "layer1", "layer4", "fc"], seed=3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert model.training and not copy.training
    assert torch.equal(rng, torch.get_rng_state())
    assert next(copy.parameters()).device == next(model.parameters()).device


def test_randomized_copy_changes_exactly_the_listed_modules_and_keeps_buffers():
    model = _trained(_resnet18())
    copy = randomized_copy(model, ["layer4", "fc"], seed=0)
    original = dict(model.named_parameters())
    for name, tensor in copy.named_parameters():
        listed = name.startswith(("layer4.", "fc."))
        assert torch.equal(tensor, original[name]) != listed, name
    assert float(copy.fc.bias.detach().abs().max()) <= 512 ** -0.5  # Linear.reset_parameters: |b| <= 1/sqrt(in)
    bn = copy.layer4[0].bn1  # BatchNorm.reset_parameters: weight 1, bias 0
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    buffers = dict(model.named_buffers())
    assert all(torch.equal(tensor, buffers[name]) for name, tensor in copy.named_buffers())  # running stats kept


def test_randomized_copy_is_reproducible_and_each_module_independent_of_the_others():
    model = _trained(_resnet18())
    first, again = randomized_copy(model, ["fc"], seed=5), randomized_copy(model, ["fc"], seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(first.fc.weight, randomized_copy(model, ["fc"], seed=6).fc.weight)
    # a cascade's later step keeps the random head of its first step
    deeper = randomized_copy(model, ["fc", "layer4", "layer3"], seed=5)
    assert torch.equal(first.fc.weight, deeper.fc.weight)


def test_randomized_copy_draws_tensors_without_reset_parameters_at_their_own_scale():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(3.0 + 2.0 * torch.randn(10000))
            self.zeros = nn.Parameter(torch.zeros(5))
            self.constant = nn.Parameter(torch.full((10000,), 0.5))

        def forward(self, x):
            return x * self.gamma[: x.shape[-1]]

    model = nn.Sequential(Scaled())
    layer = randomized_copy(model, ["0"], seed=0)[0]
    gamma, constant = layer.gamma.detach(), layer.constant.detach()
    assert abs(float(gamma.mean())) < 0.1 and float(gamma.std()) == pytest.approx(2.0, rel=0.05)
    assert torch.equal(layer.zeros, torch.zeros(5))  # all zeros stay zero
    assert float(constant.std()) == pytest.approx(0.5, rel=0.05)  # a constant: its magnitude as the std


def test_randomized_copy_rejects_an_unknown_module():
    with pytest.raises(ValueError, match="layer9"):
        randomized_copy(nn.Sequential(nn.Linear(2, 2)), ["layer9"], seed=0)


def _plain_spearman(x: np.ndarray, y: np.ndarray) -> float:
    ranks_x, ranks_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(ranks_x, ranks_y)[0, 1])


def test_spearman_abs_is_the_rank_correlation_of_absolute_values():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 9, 11)), rng.normal(size=(3, 9, 11))  # continuous: no ties
    expected = [_plain_spearman(np.abs(x).ravel(), np.abs(y).ravel()) for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_abs(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(spearman_abs(a, a), 1.0)
    np.testing.assert_allclose(spearman_abs(a, -a), 1.0)  # signs do not matter


def test_spearman_abs_with_ties_equals_scipy_and_constant_maps_give_zero_silently():
    rng = np.random.default_rng(1)
    a, b = rng.integers(-3, 4, size=(2, 8, 8)), rng.integers(0, 3, size=(2, 8, 8))
    expected = [stats.spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_abs(a, b), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = spearman_abs(np.stack([np.zeros((8, 8)), a[0]]), np.stack([a[0], np.full((8, 8), 2.0)]))
    np.testing.assert_array_equal(scores, [0.0, 0.0])


def test_ssim_scales_each_map_by_its_own_maximum_and_matches_scikit_image():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 16, 16)), rng.normal(size=(2, 16, 16))
    np.testing.assert_allclose(ssim(a, a), 1.0)
    np.testing.assert_allclose(ssim(a, 5 * a), 1.0)  # scale-free: each map is divided by its own maximum
    expected = [structural_similarity(np.abs(x) / np.abs(x).max(), np.abs(y) / np.abs(y).max(), data_range=1.0)
                for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b), expected)
    zero = np.zeros((1, 16, 16))
    assert ssim(zero, zero)[0] == pytest.approx(1.0)  # zero maps stay zero (no division by zero)


def test_maps_must_be_two_stacks_of_one_shape():
    with pytest.raises(ValueError, match="B, H, W"):
        spearman_abs(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="B, H, W"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_compare_to_original_gives_means_and_per_image_lists():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 8, 8)), rng.normal(size=(2, 8, 8))
    result = compare_to_original(a, b)
    assert result["spearman_per_image"] == pytest.approx(list(spearman_abs(a, b)))
    assert result["ssim_per_image"] == pytest.approx(list(ssim(a, b)))
    assert result["spearman"] == pytest.approx(np.mean(result["spearman_per_image"]))
    assert result["ssim"] == pytest.approx(np.mean(result["ssim_per_image"]))
    assert all(isinstance(v, float) for v in [result["spearman"], result["ssim"], *result["ssim_per_image"]])


def _gradient_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) -> (B, H, W) |d logit of the class / d input|, summed over channels."""
    images = images.clone().requires_grad_(True)
    logits = model(images)
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), images)
    return grad.abs().sum(dim=1).numpy()


def _edge_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) -> (B, H, W) Sobel gradient magnitude of the grey image: an "explanation" that ignores the
    model, the control that must pass any cascade unchanged."""
    grey = images.mean(dim=1).numpy()
    return np.hypot(ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=2))


def test_top_down_cascade_changes_gradients_but_not_an_edge_map_of_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    images = torch.from_numpy(ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(4, 3, 32, 32)),
                                                      sigma=(0, 0, 2, 2))).float()
    classes = model(images).argmax(dim=1)
    blocks = randomization_blocks(model, images)
    assert blocks == ["0", "3", "6", "10"]
    steps = cascade(blocks, "top_down")
    assert steps[0].label == "10"
    gradients, edges = _gradient_maps(model, images, classes), _edge_maps(model, images, classes)
    rank = []
    for step in steps:
        randomized = randomized_copy(model, step.modules, seed=0)
        rank.append(compare_to_original(gradients, _gradient_maps(randomized, images, classes))["spearman"])
        control = compare_to_original(edges, _edge_maps(randomized, images, classes))
        assert control["spearman"] == 1.0 and control["ssim"] == pytest.approx(1.0)
    assert min(rank) < 0.9  # the explanation depends on the weights
    assert rank[0] < 1.0  # already when only the head is random
    assert torch.equal(classes, model(images).argmax(dim=1))  # and the model under test was never touched
