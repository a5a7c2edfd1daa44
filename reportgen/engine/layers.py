"""Choosing layers by name, shared by every analysis that looks inside the model (weights, activations, Grad-CAM,
attention), so `layers=[...]` means the same everywhere.

A pattern is one of:
- a qualified module name or a glob over names: `layer4`, `layer4.*`, `features.?`, `encoder.layers.*`
- `re:<regex>` matched against the full name: `re:^layer\\d$`
- `type:<ClassName>` (the class or any base class): `type:Conv2d`, `type:MultiheadAttention`
- `depth:<n>`: every module at that depth of the tree (`layer1` is depth 1, `layer1.0` depth 2)
A pattern that matches nothing is an error listing close names, so a typo never silently selects nothing.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from reportgen.engine.capture import primary_tensor, probe_forward
from reportgen.engine.grids import spatial_layout
from reportgen.errors import ConfigError


def named_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> module, the root excluded, in definition order."""
    return {name: module for name, module in model.named_modules() if name}


def depth_of(name: str) -> int:
    return name.count(".") + 1


def _type_names(module: nn.Module) -> List[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def match_pattern(model: nn.Module, pattern: str) -> List[str]:
    """Names matching one pattern, in definition order (empty when nothing matches)."""
    modules = named_modules(model)
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return [n for n in modules if regex.search(n)]
    if pattern.startswith("type:"):
        wanted = pattern[5:]
        return [n for n, m in modules.items() if wanted in _type_names(m)]
    if pattern.startswith("depth:"):
        depth = int(pattern[6:])
        return [n for n in modules if depth_of(n) == depth]
    if pattern in modules:
        return [pattern]
    return [n for n in modules if fnmatch.fnmatchcase(n, pattern)]


def select_layers(model: nn.Module, patterns: Sequence[str], key: str,
                  where: Optional[Callable[[str, nn.Module], bool]] = None) -> List[str]:
    """Union of every pattern's matches (definition order), optionally filtered by `where`; ConfigError naming
    `key` and close matches for a pattern that selects nothing."""
    modules = named_modules(model)
    selected: List[str] = []
    for pattern in patterns:
        try:
            matches = match_pattern(model, str(pattern))
        except (re.error, ValueError) as exc:
            raise ConfigError(key, pattern, f"a valid layer pattern ({exc})") from exc
        if where is not None:
            matches = [n for n in matches if where(n, modules[n])]
        if not matches:
            raise ConfigError(key, pattern, "a pattern matching at least one suitable layer "
                                            "(name, glob, re:<regex>, type:<Class> or depth:<n>)",
                              _choices(model, str(pattern)))
        selected.extend(n for n in matches if n not in selected)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)


def _choices(model: nn.Module, pattern: str) -> List[str]:
    """Names (or type names) worth suggesting for a failed pattern: close ones first, then the top level."""
    modules = named_modules(model)
    if pattern.startswith("type:"):
        return sorted({type(m).__name__ for m in modules.values()})
    stem = pattern.split(":", 1)[-1]
    close = difflib.get_close_matches(stem, list(modules), n=8, cutoff=0.5)
    top = [n for n in modules if depth_of(n) <= 2]
    return close + [n for n in top if n not in close]


@dataclass(frozen=True)
class ProbedCall:
    """One module call of a probe forward, as layer defaults need it."""

    name: str
    shape: Tuple[int, ...]  # of the output's primary tensor
    plain: bool  # the output is a tensor itself (only such an output can become a gradient leaf)
    passthrough: bool  # the output is the module's input object (nn.Identity): nothing new to look at
    input_shape: Optional[Tuple[int, ...]]  # of the first input's primary tensor


_PROBES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, List[ProbedCall]]]" = weakref.WeakKeyDictionary()


def probe_calls(model: nn.Module, example: torch.Tensor) -> List[ProbedCall]:
    """Every module call of one forward, in completion order (hooks removed afterwards).

    Several analyses ask for this on the same model and example shape; the answer is remembered per model (weakly,
    so it goes with the model), so a run pays for one probe forward, not one per analysis."""
    key = (tuple(example.shape), example.dtype, str(example.device))
    cached = _PROBES.get(model, {}).get(key)
    if cached is not None:
        return list(cached)
    calls = _probe(model, example)
    _PROBES.setdefault(model, {})[key] = calls
    return list(calls)


def probe_output_shapes(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, output shape) of every module call of one forward, in call order (see `probe_calls`)."""
    return [(call.name, call.shape) for call in probe_calls(model, example)]


def _probe(model: nn.Module, example: torch.Tensor) -> List[ProbedCall]:
    calls: List[ProbedCall] = []

    def record(key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        tensor = primary_tensor(output)
        if tensor is not None:
            first = primary_tensor(args)
            calls.append(ProbedCall(name, tuple(tensor.shape), isinstance(output, torch.Tensor),
                                    bool(args) and output is args[0],
                                    None if first is None else tuple(first.shape)))

    probe_forward(model, example, on_end=record)
    return calls


def stage_outputs(model: nn.Module, example: torch.Tensor, max_depth: int = 2) -> List[str]:
    """Default "each stage's output" of a CNN: walking module calls of depth <= max_depth in order, the last
    shallowest module before the spatial size changes (e.g. layer1..layer4 of a ResNet, features.N of VGG).
    Transformers (ViT, Swin) get `transformer_blocks` instead."""
    blocks = transformer_blocks(model)
    if blocks:
        return blocks
    modules = named_modules(model)
    height, width = example.shape[-2:]
    stages: List[str] = []
    groups: Dict[Tuple[int, int], List[str]] = {}
    order: List[Tuple[int, int]] = []
    for name, shape in probe_output_shapes(model, example):
        # one row per image (a detector's per-proposal features (R, C, 7, 7) are no stage of the image), on a grid
        # read channels first or last as the image says (timm MambaOut's and Sequencer's stages are channels-last)
        layout = (spatial_layout(shape, modules[name], height, width)
                  if depth_of(name) <= max_depth and shape[0] == example.shape[0] else None)
        if layout is None:
            continue
        size = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
        if size not in groups:
            groups[size] = []
            order.append(size)
        groups[size].append(name)
    for size in order:
        names = groups[size]
        shallowest = min(depth_of(n) for n in names)
        stages.append([n for n in names if depth_of(n) == shallowest][-1])
    return [n for i, n in enumerate(stages) if n not in stages[:i]]


def transformer_blocks(model: nn.Module, every: int = 0) -> List[str]:
    """Encoder blocks of a vision transformer (modules whose class name ends in Block or Layer and that hold an
    attention module), every `every`-th (0: about four spread over the depth, always including the last)."""
    blocks = [n for n, m in named_modules(model).items()
              if re.search(r"(Block|Layer)$", type(m).__name__)
              and any(isinstance(c, nn.MultiheadAttention) or "Attention" in type(c).__name__ for c in m.modules())
              and not any(n.startswith(other + ".") for other in _block_names(model) if other != n)]
    if not blocks:
        return []
    step = every or max(1, len(blocks) // 4)
    chosen = blocks[step - 1 :: step]
    if blocks[-1] not in chosen:
        chosen.append(blocks[-1])
    return chosen


def _block_names(model: nn.Module) -> Iterable[str]:
    return [n for n, m in named_modules(model).items() if re.search(r"(Block|Layer)$", type(m).__name__)]
