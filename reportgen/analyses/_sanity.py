"""The model-parameter randomisation test of Adebayo et al. 2018 ("Sanity checks for saliency maps"), as pure
functions: the model's blocks, the cascade of cumulative randomisations over them, a randomised copy of the model,
and the similarity of each explanation map to the original one.

An explanation that explains the model must change when the model's learned weights are destroyed. Re-initialising
the blocks one after another from the logits down (top-down; bottom-up as Hedström et al. 2023 recommend as well)
and comparing each step's maps with the original ones shows how far down a method still depends on the weights:
Gradient and Grad-CAM change, Guided Backprop barely does. A control that does not read the model (an edge map of
the input) must not change at any step.

A block is a string: one module's qualified name (`layer4`), or several joined by `GROUP` (`conv1+bn1`, a ResNet
stem that has no module of its own).
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from reportgen.engine.layers import named_modules, probe_calls, stage_outputs, transformer_blocks

GROUP = "+"  # joins the modules of one block; torch allows it in a module name, no model in practice uses it


@dataclass(frozen=True)
class RandomizationStep:
    """One step of a cascade: what is random at this step, everything randomised so far included."""

    label: str  # "fc" for the first step, then "<first block> … <this step's block>" ("fc … layer3")
    modules: Tuple[str, ...]  # qualified names re-initialised so far, in the order the cascade reached them


def randomization_blocks(model: nn.Module, example: torch.Tensor) -> List[str]:
    """The model's blocks in forward order (stem first, head last), found from one probe forward of `example`
    (B, C, H, W):

    - head: the last module with parameters to finish in the forward (ResNet `fc`, ViT `head`), with everything
      under it;
    - stages: transformer encoder blocks, every one (`transformer_blocks(model, every=1)`), or else the CNN stage
      outputs of `stage_outputs` (ResNet `layer1` .. `layer4`); each stage is the block of the parameters under it;
    - the parameters that finish before a stage without being under it form a block of their own just before it
      (before the first stage, the stem: ResNet `conv1+bn1`, ViT `patch_embed`; VGG's convolutions before each
      pooling stage output); those after the last stage and before the head another one (ViT's final `norm`).
      A model with neither kind of stage has its top-level modules as stages.

    A block names the largest modules whose called parameters all fall in it, joined by GROUP. Every parameter
    belongs to exactly one block, or to none where no module can name it alone: parameters held directly by a
    module whose children fall in other blocks (a ViT's `cls_token` and `pos_embed` on the root), and parameters
    of modules the forward never calls unless a block's module holds them. A model with fewer than 2 blocks
    returns what it has (none when all its parameters are the root's own)."""
    modules = named_modules(model)
    finished: Dict[str, int] = {}  # name -> position of its first call in completion order
    for position, call in enumerate(probe_calls(model, example)):
        finished.setdefault(call.name, position)
    owners = [n for n, m in modules.items() if n in finished and next(m.parameters(recurse=False), None) is not None]
    if not owners:
        return []
    head = max(owners, key=finished.__getitem__)
    stages = (transformer_blocks(model, every=1) or stage_outputs(model, example)
              or [n for n in modules if "." not in n])
    stages = sorted((s for s in stages if s in finished), key=finished.__getitem__)
    # segment keys in forward order: (stage index, 0 before / 1 under the stage), then after the stages, then head
    after, top = (len(stages), 0), (len(stages) + 1, 0)
    segment: Dict[str, Tuple[int, int]] = {}
    for owner in owners:
        if _under(owner, head):
            segment[owner] = top
            continue
        segment[owner] = after
        for index, stage in enumerate(stages):
            if finished[owner] <= finished[stage]:
                segment[owner] = (index, 1 if _under(owner, stage) else 0)
                break
    return [GROUP.join(_cover(modules, segment, key)) for key in sorted(set(segment.values()))]


def _under(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _cover(modules: Dict[str, nn.Module], segment: Dict[str, Tuple[int, int]], key: Tuple[int, int]) -> List[str]:
    """The largest modules (definition order) whose called parameter owners are all in segment `key`."""
    below: Dict[str, Set[Tuple[int, int]]] = {}  # module -> segments of the called owners under it
    for owner, owner_key in segment.items():
        parts = owner.split(".")
        for depth in range(1, len(parts) + 1):
            below.setdefault(".".join(parts[:depth]), set()).add(owner_key)
    whole = {n for n, keys in below.items() if keys == {key}}
    return [n for n in modules if n in whole and n.rpartition(".")[0] not in whole]


def cascade(blocks: Sequence[str], order: str) -> List[RandomizationStep]:
    """The cumulative steps over `blocks` (forward order, as `randomization_blocks` gives them): "top_down" from the
    head down to the stem (Adebayo's cascade), "bottom_up" from the stem up to the head; ValueError otherwise."""
    if order == "top_down":
        sequence = list(reversed(blocks))
    elif order == "bottom_up":
        sequence = list(blocks)
    else:
        raise ValueError(f"order must be 'top_down' or 'bottom_up', got {order!r}")
    steps: List[RandomizationStep] = []
    reached: List[str] = []
    for index, block in enumerate(sequence):
        reached.extend(block.split(GROUP))
        label = block if index == 0 else f"{sequence[0]} … {block}"
        steps.append(RandomizationStep(label, tuple(reached)))
    return steps


def randomized_copy(model: nn.Module, modules: Sequence[str], seed: int) -> nn.Module:
    """A deep copy of `model` (same device, eval mode) in which every parameter under the listed modules is
    re-initialised; `model` itself (weights, buffers, mode) and the global random state are left unchanged.

    Each module owning parameters is re-initialised by its own `reset_parameters()` where it defines one (Linear,
    Conv, norms: their usual init), otherwise each of its floating parameters is drawn from N(0, std) with the
    tensor's own std (its scale kept, its values gone; a constant tensor uses its absolute value as the std, so an
    all-zero tensor stays zero: there is no learned scale to keep and none to invent).

    The draws run on a CPU twin of each module, seeded from `seed` and the module's name, and are copied back: the
    same seed gives the same weights on any device, and a module gets the same values whichever other modules are
    randomised with it, so a cascade's later steps keep the random weights of its earlier ones (randomisation
    accumulates, as in the paper).

    Buffers are left as they are, a batch norm's running mean and variance included (its `reset_parameters` would
    set them to 0 and 1): they are statistics of the data, not learned weights, and normalising with them keeps the
    random blocks' activations at a usable scale, so a changed map means changed weights, not saturated units."""
    randomized = copy.deepcopy(model).eval()
    names = named_modules(randomized)
    unknown = [n for n in modules if n not in names]
    if unknown:
        raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model")
    for name, module in names.items():
        if any(_under(name, wanted) for wanted in modules) and next(module.parameters(recurse=False), None) is not None:
            _reinitialise(module, _module_seed(seed, name))
    return randomized


def _module_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{int(seed)}:{name}".encode())


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise the module's own parameters in place from a seeded CPU twin (its buffers are not touched)."""
    twin = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)
        reset = getattr(twin, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            for tensor in twin.parameters(recurse=False):
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn_like(tensor) * _spread(tensor))
        fresh = dict(twin.named_parameters(recurse=False))
        for name, tensor in module.named_parameters(recurse=False):
            tensor.copy_(fresh[name])


def _spread(tensor: torch.Tensor) -> float:
    """The tensor's std, or its mean absolute value when it is constant (0 for zeros)."""
    values = tensor.detach().double()
    std = float(values.std(unbiased=False))
    return std if std > 0 else float(values.abs().mean())


def spearman_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, H, W), (B, H, W) -> (B,) Spearman rank correlation of |a| and |b| per image (scipy.stats.spearmanr;
    ties get average ranks). An image where either map is constant gives 0, without scipy's warning: a constant
    map ranks no pixel above another, so it shares no ordering with the other map, and a NaN would spoil the mean
    over images (a constant map compared with itself gives 0 as well)."""
    a, b = _maps(a, b)
    scores = np.zeros(len(a))  # (B,)
    for index, (x, y) in enumerate(zip(np.abs(a), np.abs(b))):
        x, y = x.ravel(), y.ravel()  # (H * W,) each
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            scores[index] = stats.spearmanr(x, y).statistic
    return scores


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, H, W), (B, H, W) -> (B,) SSIM (skimage.metrics.structural_similarity, data_range=1, its default 7 x 7
    window, so maps need H, W >= 7) of |map| / max |map|, each map scaled by its own maximum into [0, 1] (a zero map
    stays zero)."""
    a, b = _maps(a, b)
    return np.array([structural_similarity(_unit(x), _unit(y), data_range=1.0) for x, y in zip(a, b)])


def _maps(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"maps must be two (B, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def _unit(x: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) |x| / max |x|, zeros where x is all zero."""
    magnitude = np.abs(x)
    peak = magnitude.max()
    return magnitude / peak if peak > 0 else magnitude


def compare_to_original(original: np.ndarray, randomized: np.ndarray) -> Dict[str, Any]:
    """Similarity of one step's maps (B, H, W) to the original maps (B, H, W): {"spearman": mean over images of
    `spearman_abs`, "ssim": mean of `ssim`, "spearman_per_image": [B floats], "ssim_per_image": [B floats]}."""
    rank = spearman_abs(original, randomized)
    structure = ssim(original, randomized)
    return {"spearman": float(rank.mean()), "ssim": float(structure.mean()),
            "spearman_per_image": [float(v) for v in rank], "ssim_per_image": [float(v) for v in structure]}
