"""Faithfulness scores (reportgen.analyses._faithfulness) against plain re-implementations: RISE's deletion and
insertion written out as the authors' loop (one forward per step), pytorch-grad-cam's ROAD (`NoisyLinearImputer`,
`ROADMostRelevantFirst` / `ROADLeastRelevantFirst`), and a hand-weighted model whose answer is known."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADLeastRelevantFirst, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from scipy.ndimage import gaussian_filter

from reportgen.analyses._faithfulness import (ROAD_LEVELS, auc, deletion_insertion, forwards_needed,
                                              noisy_linear_impute, rise_blur, rise_kernel, road, road_combined,
                                              steps_for)

# pytorch-grad-cam calls np.argwhere on torch tensors (NumPy 2's __array_wrap__ deprecation), not our code
GRAD_CAM_NUMPY_WARNING = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def normalize(images01: torch.Tensor) -> torch.Tensor:
    return (images01 - MEAN) / STD


def tiny_net(seed: int = 0) -> nn.Module:
    """A random conv net whose softmax moves visibly when pixels change (last layer scaled up)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with torch.no_grad():
        net[-1].weight.mul_(8.0)
    return net.eval()


def random_batch(seed: int, count: int = 3, size: int = 16):
    """images01 (B, 3, S, S), their normalised inputs, maps (B, S, S) of distinct values, targets (B,)."""
    gen = torch.Generator().manual_seed(seed)
    images01 = torch.rand((count, 3, size, size), generator=gen)
    maps = torch.stack([torch.randperm(size * size, generator=gen).reshape(size, size) for _ in range(count)])
    return images01, normalize(images01), maps.float() / (size * size - 1), torch.tensor([0, 3, 1][:count])


# ---------------------------------------------------------------- RISE

def test_rise_kernel_is_gaussian_filter_of_an_impulse():
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    expected = gaussian_filter(impulse, 5.0)
    assert rise_kernel().dtype == torch.float32
    np.testing.assert_allclose(rise_kernel().numpy(), expected, rtol=1e-6, atol=0)
    small = np.zeros((5, 5))
    small[2, 2] = 1.0
    np.testing.assert_allclose(rise_kernel(5, 1.0).numpy(), gaussian_filter(small, 1.0), rtol=1e-6, atol=0)


def test_rise_blur_is_a_per_channel_convolution():
    inputs = torch.randn((2, 3, 20, 17), generator=torch.Generator().manual_seed(1))
    kernel = rise_kernel()[None, None]  # (1, 1, 11, 11)
    expected = torch.cat([F.conv2d(inputs[:, c:c + 1], kernel, padding=5) for c in range(3)], dim=1)
    blurred = rise_blur(inputs)
    assert blurred.shape == inputs.shape
    torch.testing.assert_close(blurred, expected, rtol=0, atol=1e-6)


def rise_reference(net: nn.Module, image: torch.Tensor, saliency: np.ndarray, target: int, step: int):
    """RISE's CausalMetric.single_run for one image, both games: numpy argsort, pixels copied step by step, one
    forward per step; the blur as the authors' gkern and (C, C, 11, 11) diagonal conv2d."""
    channels, height, width = image.shape
    pixels = height * width
    n = (pixels + step - 1) // step
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    kern = np.zeros((channels, channels, 11, 11))
    for c in range(channels):
        kern[c, c] = gaussian_filter(impulse, 5)
    blurred = F.conv2d(image[None], torch.from_numpy(kern.astype("float32")), padding=5)[0]
    order = np.flip(np.argsort(saliency.reshape(-1)))  # most salient first
    curves = {}
    for game, start, finish in (("deletion", image, torch.zeros_like(image)), ("insertion", blurred, image)):
        current = start.numpy().reshape(channels, pixels).copy()
        final = finish.numpy().reshape(channels, pixels)
        scores = []
        for i in range(n + 1):
            with torch.no_grad():
                logits = net(torch.from_numpy(current.reshape(1, channels, height, width)))
            scores.append(float(torch.softmax(logits, dim=1)[0, target]))
            if i < n:
                coords = order[step * i:step * (i + 1)]
                current[:, coords] = final[:, coords]
        curves[game] = np.array(scores)
    return curves


@pytest.mark.parametrize("step", [8, 7, 256])
def test_deletion_insertion_equals_the_authors_loop(step):
    net = tiny_net()
    _, inputs, maps, targets = random_batch(seed=2)
    curves = deletion_insertion(net, inputs, maps, targets, step, batch_size=64)
    n = math.ceil(16 * 16 / step)
    for b in range(3):
        expected = rise_reference(net, inputs[b], maps[b].numpy(), int(targets[b]), step)
        for game in ("deletion", "insertion"):
            assert curves[game].shape == (3, n + 1)
            np.testing.assert_allclose(curves[game][b], expected[game], rtol=0, atol=1e-6)
    clean = torch.softmax(net(inputs), dim=1).gather(1, targets[:, None])[:, 0].detach().numpy()
    np.testing.assert_allclose(curves["deletion"][:, 0], clean, atol=1e-6)  # both ends included
    np.testing.assert_allclose(curves["insertion"][:, -1], clean, atol=1e-6)


def test_forwards_are_batched_across_images_and_steps():
    net = tiny_net()
    images01, inputs, maps, targets = random_batch(seed=3)
    sizes = []

    def forward(x):
        sizes.append(len(x))
        return net(x)

    deletion_insertion(forward, inputs, maps, targets, step=8, batch_size=64)
    assert sizes == [64, 64, 64, 6]  # 2 games * 3 images * 33 points = 198
    sizes.clear()
    road(forward, images01, normalize, maps, targets, batch_size=64)
    assert sizes == [2 * len(ROAD_LEVELS) * 3]


def test_auc_is_the_trapezoid_on_hand_made_curves():
    assert auc(np.linspace(0.0, 1.0, 33)) == pytest.approx(0.5, abs=1e-15)
    assert auc(np.array([1.0, 0.5, 0.0])) == 0.5
    assert auc(np.array([0.0, 1.0, 0.0])) == 0.5
    assert auc(np.array([1.0, 1.0, 1.0, 1.0])) == 1.0
    assert auc(np.array([0.2, 0.6])) == pytest.approx(0.4)
    curves = np.random.default_rng(0).random((2, 3, 9))
    np.testing.assert_allclose(auc(curves), np.trapezoid(curves, dx=1 / 8, axis=-1), rtol=1e-12)
    with pytest.raises(ValueError):
        auc(np.array([0.3]))


def test_steps_and_forward_counts():
    assert steps_for(224, 224, None) == 1568  # 32 steps
    assert forwards_needed(224, 224, None) == {"deletion": 33, "insertion": 33, "road": 14}
    assert steps_for(10, 10, None) == 4 and forwards_needed(10, 10, None)["deletion"] == 26  # at most 32 steps
    assert steps_for(4, 4, None) == 1
    assert steps_for(224, 224, 224) == 224 and forwards_needed(224, 224, 224)["insertion"] == 225  # the paper's
    assert forwards_needed(16, 16, 7, levels=(10, 50)) == {"deletion": 38, "insertion": 38, "road": 4}
    with pytest.raises(ValueError):
        steps_for(8, 8, 0)


# ---------------------------------------------------------------- ROAD's imputation

def edge_mask(seed: int, size: int = 8) -> torch.Tensor:
    """(size, size) bool: random pixels, plus the four corners and a pixel inside each edge."""
    mask = torch.rand((size, size), generator=torch.Generator().manual_seed(seed)) < 0.4
    for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1), (0, 3), (size - 1, 4), (2, 0),
                 (5, size - 1)):
        mask[y, x] = True
    return mask


@GRAD_CAM_NUMPY_WARNING
def test_noisy_linear_impute_equals_pytorch_grad_cam_without_noise():
    images01 = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    removed = torch.stack([edge_mask(5), edge_mask(6)])
    ours = noisy_linear_impute(images01, removed, noise_std=0.0)
    theirs = torch.stack([NoisyLinearImputer(noise=0.0)(images01[b], (~removed[b]).float()) for b in range(2)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(ours[~removed[:, None].expand_as(ours)], images01[~removed[:, None].expand_as(ours)])


def test_imputation_keeps_a_constant_and_a_linear_ramp():
    removed = edge_mask(7)[None]
    constant = torch.full((1, 3, 8, 8), 0.37)
    torch.testing.assert_close(noisy_linear_impute(constant, removed, noise_std=0.0), constant, rtol=0, atol=1e-6)

    y, x = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    ramp = torch.stack([0.1 + 0.05 * y + 0.03 * x, 0.9 - 0.02 * y, 0.2 + 0.04 * x])[None]  # (1, 3, 12, 12)
    interior = torch.zeros((1, 12, 12), dtype=torch.bool)
    interior[0, 1:-1, 1:-1] = torch.rand((10, 10), generator=torch.Generator().manual_seed(8)) < 0.5
    interior[0, 3:7, 4:9] = True  # a block: removed pixels next to removed pixels
    torch.testing.assert_close(noisy_linear_impute(ramp, interior, noise_std=0.0), ramp, rtol=0, atol=1e-6)


def test_imputation_noise_only_on_removed_pixels():
    images01 = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(9))
    removed = torch.rand((1, 32, 32), generator=torch.Generator().manual_seed(10)) < 0.5
    plain = noisy_linear_impute(images01, removed, noise_std=0.0)
    noisy = noisy_linear_impute(images01, removed, noise_std=0.01, generator=torch.Generator().manual_seed(11))
    again = noisy_linear_impute(images01, removed, noise_std=0.01, generator=torch.Generator().manual_seed(11))
    assert torch.equal(noisy, again)
    where = removed[:, None].expand_as(images01)
    assert torch.equal(noisy[~where], images01[~where])
    noise = (noisy - plain)[where]  # about 1500 draws
    assert abs(float(noise.mean())) < 1e-3 and 0.009 < float(noise.std()) < 0.011


# ---------------------------------------------------------------- ROAD

class QuadrantModel(nn.Module):
    """Class 0's logit is twice the mean of the normalised top-left quadrant, class 1's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_left = 2 * x[:, :, :8, :8].mean(dim=(1, 2, 3))
        return torch.stack([top_left, torch.zeros_like(top_left)], dim=1)


def test_road_on_a_model_whose_answer_is_known():
    images01 = torch.zeros((2, 3, 16, 16))
    images01[:, :, :8, :8] = 1.0
    images01 += 0.05 * torch.rand(images01.shape, generator=torch.Generator().manual_seed(12))
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    quadrant = ((y < 8) & (x < 8)).float()
    good = (quadrant + 0.5 * (1 - torch.hypot(y - 7.5, x - 7.5) / 30)).expand(2, 16, 16)  # quadrant first
    bad = -good  # quadrant last
    targets = torch.zeros(2, dtype=torch.long)
    model = QuadrantModel()
    scores = {name: road(model, images01, lambda t: (t - 0.5) / 0.25, maps, targets)
              for name, maps in (("good", good), ("bad", bad))}
    for name in scores:
        assert scores[name]["morf"].shape == scores[name]["lerf"].shape == (2, len(ROAD_LEVELS))
    assert (scores["good"]["morf"] <= scores["bad"]["morf"] + 1e-6).all()
    assert (scores["good"]["morf"].mean() < scores["bad"]["morf"].mean() - 0.3)
    assert (scores["good"]["lerf"] >= scores["bad"]["lerf"] - 1e-6).all()
    assert (scores["good"]["lerf"].mean() > scores["bad"]["lerf"].mean() + 0.3)
    combined = {name: road_combined(s["morf"], s["lerf"]) for name, s in scores.items()}
    assert (combined["good"] > 0.3).all() and (combined["bad"] < -0.3).all()


@GRAD_CAM_NUMPY_WARNING
def test_road_equals_pytorch_grad_cam_without_noise():
    # 10 x 10 images: np.percentile's interpolated threshold then removes exactly level % of the 100 pixels, as
    # floor(HW * level / 100) here. Maps spaced 1/99 apart: the 1e-4 jitter cannot reorder them. pytorch-grad-cam
    # imputes the normalised tensor, we impute [0, 1] and normalise: without noise the same up to float32 rounding
    # of the inputs (~1e-7), so the probabilities agree to ~1e-6; 1e-5 leaves margin.
    net = tiny_net(seed=1)
    images01, inputs, maps, targets = random_batch(seed=13, size=10)
    ours = road(net, images01, normalize, maps, targets, noise_std=0.0)
    cams = maps.numpy()
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    for key, metric_class in (("morf", ROADMostRelevantFirst), ("lerf", ROADLeastRelevantFirst)):
        for column, level in enumerate(ROAD_LEVELS):
            metric = metric_class(percentile=100 - level)
            metric.perturbation.imputer.noise = 0.0
            theirs = metric(inputs, cams, wanted, net, return_diff=False)
            np.testing.assert_allclose(ours[key][:, column], theirs, rtol=0, atol=1e-5, err_msg=f"{key} {level}")


def test_batch_size_does_not_change_the_results():
    # The same inputs and noise draws whatever the chunking; CPU convolutions of a batch of 1 and of 64 differ in the
    # last float32 bits (6e-8 seen), hence 1e-6 and not bit equality.
    net = tiny_net(seed=2)
    images01, inputs, maps, targets = random_batch(seed=14)
    one = deletion_insertion(net, inputs, maps, targets, step=16, batch_size=1)
    many = deletion_insertion(net, inputs, maps, targets, step=16, batch_size=64)
    for game in ("deletion", "insertion"):
        np.testing.assert_allclose(one[game], many[game], rtol=0, atol=1e-6)
    one = road(net, images01, normalize, maps, targets, seed=3, batch_size=1)
    many = road(net, images01, normalize, maps, targets, seed=3, batch_size=64)
    other_seed = road(net, images01, normalize, maps, targets, seed=4, batch_size=64)
    for order in ("morf", "lerf"):
        np.testing.assert_allclose(one[order], many[order], rtol=0, atol=1e-6)
        assert not np.array_equal(many[order], other_seed[order])  # the seed draws the noise


def test_road_combined_and_bad_arguments():
    morf, lerf = np.array([[0.2, 0.1], [0.5, 0.5]]), np.array([[0.8, 0.9], [0.4, 0.6]])
    np.testing.assert_allclose(road_combined(morf, lerf), [0.35, 0.0])
    assert road_combined(morf.mean(axis=0), lerf.mean(axis=0)) == pytest.approx(0.175)
    with pytest.raises(ValueError):
        road_combined(morf, lerf[:, :1])
    images01, inputs, maps, targets = random_batch(seed=15, count=1, size=8)
    with pytest.raises(ValueError):
        road(tiny_net(), images01, normalize, maps, targets, levels=(10, 100))
    with pytest.raises(ValueError):
        deletion_insertion(tiny_net(), inputs, maps[:, :4], targets, step=4)
