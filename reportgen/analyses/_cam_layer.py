"""Which layer a classifier's Grad-CAM reads: the last layer whose output is a grid of the image that the class score
depends on, found on one probe of one image, forward and backward.

A module call is a candidate when
- its output is a plain tensor on a grid of the image (`reportgen.engine.grids.output_grid`: channels first or last
  decided by the image, tokens only on the model's own grid, the images on the first axis);
- it does not run inside an attention module, as `find_attention` finds them by what they compute (CaiT's
  talking-heads weights, ConViT's positional scores, CoaT's relative-position term are tensors of token pairs or
  heads, not of the image);
- it is not one of the calls that end the forward without adding to the grid: an identity, a re-layout (a
  parameter-free permute), a LayerNorm of another layer's output (timm Swin's final `norm` after `layers`), a pooling or
  upsampling module that does not shrink the grid (VGG's and AlexNet's adaptive average pool, which upsamples 5 x 5
  to 7 x 7 at 160 px).

The default is the last candidate on which the predicted class's score has a nonzero gradient (on the patch tokens
for a token grid) and that is not a residual branch (an output added to a tensor of its shape: an MLP's or an
attention's output before the sum, which holds only part of the features; the sum itself is no module's output, so
the norm that reads the stream next is the grid). That one rule gives a CNN's last stage, a ViT's last block's first
norm (its block outputs reach a class-token head only through the class token: zero on the patches), a Mixer's or
LeViT's last stage of tokens rather than the stem, MobileViT's last convolution rather than its patch-folded
transformer, a Hiera's last block (past every unroll). When no candidate has a gradient (a zero-initialised head
with random weights), the same rule without it: a transformer's last block's first norm, else the last candidate
(the maps are then all zero, and the section says why).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from reportgen.engine.capture import ModuleProbe, attention_kind, find_attention, primary_tensor
from reportgen.engine.grids import GridLayout, output_grid
from reportgen.engine.layers import named_modules, transformer_blocks
from reportgen.inputs.tasks import adapt_outputs

# modules that only resample their input: at the end of the forward, a copy of the grid before them
_RESAMPLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Upsample)


@dataclass(frozen=True)
class GridCall:
    """One module call of the probe whose output lies on a grid of the image."""

    key: str  # call key, as the pass numbers calls (`layer`, `layer#2`)
    name: str
    layout: GridLayout
    reaches: bool  # the predicted class's score has a nonzero gradient on the grid
    branch: bool  # added to a tensor of its shape (a residual branch: an MLP's output, not the whole stream), or
    # computed inside such a branch
    ends_forward: bool  # an identity / same-shape LayerNorm / non-shrinking resampling (see the module docstring)


_PROBES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, List[GridCall]]]" = weakref.WeakKeyDictionary()


def grid_calls(model: nn.Module, example: torch.Tensor) -> List[GridCall]:
    """Every candidate call of a probe of `example`'s first image, in the order the calls returned (remembered per
    model and input shape, so the probe runs once)."""
    image = example[:1]
    key = (tuple(image.shape), image.dtype, str(image.device))
    cached = _PROBES.get(model, {}).get(key)
    if cached is None:
        cached = _probe(model, image)
        _PROBES.setdefault(model, {})[key] = cached
    return list(cached)


def default_cam_layer(model: nn.Module, example: torch.Tensor) -> Optional[str]:
    """The call key of the default Grad-CAM layer (see the module docstring); None when no layer is a grid."""
    calls = grid_calls(model, example)
    while calls and calls[-1].ends_forward:
        calls.pop()
    reaching = [call for call in calls if call.reaches]
    whole = [call for call in reaching if not call.branch]
    if whole or reaching:
        return (whole or reaching)[-1].key
    blocks = transformer_blocks(model)
    if blocks:
        modules = named_modules(model)
        norms = [c for c in calls if c.name.startswith(blocks[-1] + ".") and isinstance(modules[c.name], nn.LayerNorm)]
        if norms and norms[0].layout.kind == "tokens":
            return norms[0].key
    return calls[-1].key if calls else None


def _probe(model: nn.Module, image: torch.Tensor) -> List[GridCall]:
    height, width = image.shape[-2:]
    attention = set(find_attention(model, image))  # modules computing attention, found by what they compute
    running: List[Tuple[str, nn.Module]] = []  # calls that have started and not returned
    enclosing: Dict[str, Tuple[str, ...]] = {}  # call key -> keys of the calls it ran inside
    in_attention: Dict[str, bool] = {}
    versions: Dict[str, Optional[int]] = {}  # call key -> its input's version counter when the call started
    outputs: Dict[str, torch.Tensor] = {}  # every call's tensor output, kept alive so that ids stay unique
    found: List[Tuple[str, str, GridLayout, bool]] = []  # (key, name, layout, ends_forward) of the grid calls
    seen: List[Tuple[int, int]] = []  # 4-D grids made so far, latest first

    def start(key: str, name: str, module: nn.Module, args: Any) -> None:
        first = primary_tensor(args)
        versions[key] = None if first is None else first._version  # an in-place op bumps it
        enclosing[key] = tuple(k for k, _ in running)
        in_attention[key] = any(k.split("#")[0] in attention or attention_kind(m) is not None for k, m in running)
        running.append((key, module))

    def end(key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        running.pop()
        if not isinstance(output, torch.Tensor):
            return
        first = primary_tensor(args)
        input_is_a_layer_output = first is not None and any(first is earlier for earlier in outputs.values())
        outputs[key] = output
        unchanged = first is output and first._version == versions[key]  # Identity, Dropout in eval: a repeat
        if output.grad_fn is None or in_attention[key] or unchanged:
            return
        layout = output_grid(tuple(output.shape), module, model, 1, height, width, seen)
        if layout is None:
            return
        if layout.kind != "tokens":
            seen.insert(0, layout.size)
        found.append((key, name, layout, _ends_forward(module, first, output, input_is_a_layer_output)))

    adds = _ResidualAdds()
    with ModuleProbe(model, on_start=start, on_end=end, freeze=True), torch.enable_grad(), adds:
        source = image.detach().float().requires_grad_()  # so every module's output is on the graph
        logits = adapt_outputs("classification", model(source), 1).logits  # (1, K)
        score = logits[0, logits[0].detach().argmax()]
        grads = torch.autograd.grad(score, [outputs[key] for key, *_ in found], allow_unused=True) if found else []
    branches = {key for key, output in outputs.items() if id(output) in adds.operands}
    calls = []
    for (key, name, layout, ends), grad in zip(found, grads):
        reaches = grad is not None and bool(_grid_part(grad, layout).abs().sum() > 0)
        branch = key in branches or any(k in branches for k in enclosing[key])  # a branch, or inside one
        calls.append(GridCall(key, name, layout, reaches, branch, ends))
    return calls


class _ResidualAdds(TorchFunctionMode):
    """Remembers the tensors added to another tensor of their shape (`x + branch(x)`, `out += identity`), by id;
    it holds each operand until the probe ends, so no later tensor can take a recorded id."""

    _ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
             torch.Tensor.__iadd__}
    _IN_PLACE = {torch.Tensor.add_, torch.Tensor.__iadd__}

    def __init__(self):
        super().__init__()
        self.operands: Set[int] = set()
        self._held: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]) \
                and args[0].shape == args[1].shape:
            # an in-place add's first operand becomes the sum: only the second one was added to it
            added = args[1:2] if func in self._IN_PLACE else args[:2]
            self._held.extend(added)
            self.operands.update(id(a) for a in added)
        return func(*args, **(kwargs or {}))


def _grid_part(tensor: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """The part of an output on the grid: the patch tokens of a token sequence, all of a map."""
    return tensor[:, layout.tokens.prefix:] if layout.kind == "tokens" else tensor


def _ends_forward(module: nn.Module, first_input: Optional[torch.Tensor], output: torch.Tensor,
                  input_is_a_layer_output: bool) -> bool:
    """Whether the call only repeats the grid of a layer before it (see the module docstring). A LayerNorm counts
    only when its input is another layer's output (timm Swin's `layers` before its final `norm`); transformers'
    Swin final `layernorm` normalises a residual sum no module returns, so it is the grid to read."""
    if first_input is output or isinstance(module, nn.Identity):
        return True
    same_shape = first_input is not None and tuple(first_input.shape) == tuple(output.shape)
    if isinstance(module, nn.LayerNorm) and same_shape and input_is_a_layer_output:
        return True
    no_parameters = next(module.parameters(), None) is None
    if no_parameters and first_input is not None and first_input.numel() == output.numel() \
            and sorted(first_input.shape) == sorted(output.shape):
        return True  # a re-layout (torchvision Swin's closing Permute to channels-first)
    if isinstance(module, _RESAMPLING) and first_input is not None and first_input.dim() == 4:
        return output.shape[-2] * output.shape[-1] >= first_input.shape[-2] * first_input.shape[-1]
    return False
