"""The hook engine, the only module that registers hooks: `CaptureEngine` for the pass (one set of forward hooks
for the union of what all analyses asked for) and `ModuleProbe` for one-off probe forwards (layer shapes, FLOPs,
module graphs, which call feeds the head).

Used as a context manager around the whole pass. On entry it checks every requested layer name, puts the model in
eval mode and (when gradients are wanted) freezes the parameters; on exit, on every path including exceptions, it
removes every hook and restores the mode and each parameter's `requires_grad`.

Attention weights, per kind of attention module (`attention_kind`), for the requested modules only:
- `mha`, nn.MultiheadAttention: torchvision's ViT calls it with need_weights=False, so a forward hook sees
  (out, None). A forward pre-hook with kwargs sets need_weights=True and average_attn_weights=False; the forward
  hook stores the (B, heads, N, N) weights and hands the caller back what it asked for ((out, None), or
  head-averaged weights by default), so the model's own code sees what it expects.
- `timm`, timm's attention modules (ViT/DeiT/EVA `Attention`, Swin `WindowAttention`, ...): with `fused_attn` on
  (the default) they call scaled_dot_product_attention and the softmax never exists. `fused_attn` is turned off for
  the pass, so the module takes its own non-fused path, and the input of its `attn_drop` (the softmax, exactly as
  the module computes it; dropout is the identity in eval mode) is stored, (B, heads, N, N) or, for windowed
  attention, (B * windows, heads, T, T).
- `hf`, transformers attention modules (ViTAttention, SwinAttention, ...) return (output, weights); the weights
  exist only with the eager implementation, which the module's config is switched to for the pass (a copy of the
  config, so nothing else sees the change). The forward hook stores them.
Every switch (`fused_attn`, the config) is put back on exit, on every path.

Streamed layers: a layer's consumers (`streamed`) are called inside its forward hook, as each call returns, with
(batch, call key, output): they reduce the output there and then, so the pass keeps no copy of it (the largest
stage output of a CNN is several times the input batch) and a later in-place op cannot change what they saw.

Gradients cheaply: a hooked layer whose gradient is wanted captures the leaf `output.detach().requires_grad_()`
and returns a copy of it (`leaf.clone()`), so autograd records only the part of the network after it, and
`torch.autograd.grad(score, captures[layer])` differentiates just that head. The copy, not the leaf, goes on into
the model: autograd forbids in-place ops on a leaf (torchvision densenet's `F.relu(features, inplace=True)`,
squeezenet's ReLU(inplace=True), timm twins' `x += ...`), and the captured values stay the layer's output.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from reportgen.errors import ConfigError


@dataclass
class Captures:
    """Tensors captured during one batch, keyed by call: `layer4` for the first call, `layer4#2` for the second."""

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)  # key -> why the capture is partial (tuple output, ...)
    attention: Dict[str, torch.Tensor] = field(default_factory=dict)  # key -> (B, heads, N, N) attention weights

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def calls(self, layer: str) -> List[str]:
        """Every key captured for `layer`, in call order."""
        return [k for k in self.tensors if k == layer or k.startswith(layer + "#")]


def call_key(layer: str, call: int) -> str:
    """Key of the n-th (1-based) call of a layer within a batch."""
    return layer if call == 1 else f"{layer}#{call}"


def primary_tensor(output: Any) -> Optional[torch.Tensor]:
    """The tensor an analysis means by "the output": the output itself, or the first tensor inside a
    tuple/list/dict/dataclass output (e.g. nn.MultiheadAttention returns (out, weights))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        items: Iterable[Any] = output
    elif isinstance(output, dict):
        items = output.values()
    elif is_dataclass(output):
        items = (getattr(output, f.name) for f in fields(output))
    else:
        return None
    for item in items:
        tensor = primary_tensor(item)
        if tensor is not None:
            return tensor
    return None


def shape_text(value: Any) -> str:
    """`1×64×8×8` for the primary tensor of a module's output (or inputs), "" when it holds none."""
    tensor = primary_tensor(value)
    return "" if tensor is None else "×".join(str(d) for d in tensor.shape)


def resolve_layer_names(model: nn.Module, names: Iterable[str], key: str = "analysis layers") -> List[str]:
    """Check that every name is a qualified module name of `model`; ConfigError with close matches otherwise."""
    modules = dict(model.named_modules())
    resolved = []
    for name in names:
        if name not in modules:
            raise ConfigError(key, name, "a module name of the model", sorted(n for n in modules if n))
        resolved.append(name)
    return resolved


class _ModelHooks(ABC):
    """What every hook owner shares: inside the block the model is in eval mode with the hooks `_setup` registers;
    on exit, and when setting up fails, every hook is removed and the model's mode and each parameter's
    `requires_grad` are put back as they were on entry."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: List[Any] = []
        self._was_training = model.training
        self._flags: List[tuple] = []  # (parameter, requires_grad on entry)
        self._switched: List[tuple] = []  # (object, attribute, value on entry) set for the block, put back on exit

    @abstractmethod
    def _setup(self) -> None:
        """Register this owner's hooks (and switches) on `self.model`; called by __enter__ in eval mode."""

    def __enter__(self):
        self._was_training = self.model.training
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.model.eval()
            self._setup()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _switch(self, owner: Any, attribute: str, value: Any) -> None:
        """Set `owner.attribute = value` for the block; `_restore` puts the entry value back."""
        self._switched.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._switched:
            owner, attribute, value = self._switched.pop()
            setattr(owner, attribute, value)
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self.model.train(self._was_training)


Consumer = Callable[[Any, str, torch.Tensor], None]  # (the batch given to start_batch, call key, detached output)


class CaptureEngine(_ModelHooks):
    """Context manager owning every hook of the pass; `captures` holds the current batch's stored tensors, and
    `streamed` layers' outputs go to their consumers during the forward instead (see the module docstring)."""

    def __init__(self, model: nn.Module, activations: Iterable[str] = (), gradients: Iterable[str] = (),
                 attention: Iterable[str] = (), streamed: Optional[Mapping[str, Sequence[Consumer]]] = None):
        super().__init__(model)
        self.activations = sorted(set(activations))
        self.gradients = sorted(set(gradients))
        self.attention = sorted(set(attention))
        self.streamed: Dict[str, List[Consumer]] = {k: list(v) for k, v in (streamed or {}).items() if v}
        self.captures = Captures()
        self.batch: Any = None  # what start_batch was given: handed to the consumers
        self.consumed = False  # whether a consumer has seen part of the current batch (a retry would count it twice)
        self._calls: Dict[str, int] = defaultdict(int)
        self._grad_from_leaf = False  # inside forward_mode with leaves: a leaf's hook turns grad mode on

    @property
    def needs_grad(self) -> bool:
        return bool(self.gradients)

    @contextmanager
    def forward_mode(self) -> Iterator[None]:
        """The autograd mode of one batch's forward and updates. Without gradient leaves: inference mode. With them:
        no_grad until the first leaf, grad from there on (the leaf's hook switches it on), so autograd records only
        the head after the leaf; a grad-enabled forward with frozen parameters costs about a third more on the CPU
        (resnet18, batch 32: 1.04 s against 0.78 s) for layers that are never differentiated."""
        if not self.needs_grad:
            with torch.inference_mode():
                yield
            return
        with torch.no_grad():  # restores the caller's mode on exit, whatever the leaf hook switched on
            self._grad_from_leaf = True
            try:
                yield
            finally:
                self._grad_from_leaf = False

    def __enter__(self) -> "CaptureEngine":
        return super().__enter__()

    def _setup(self) -> None:
        leaf_calls: Dict[str, set] = defaultdict(set)  # layer -> call numbers made leaves ("layer#2" -> 2)
        for key in self.gradients:
            layer, _, call = key.partition("#")
            leaf_calls[layer].add(int(call) if call else 1)
        wanted = resolve_layer_names(self.model, self.activations + list(leaf_calls) + sorted(self.streamed))
        resolve_layer_names(self.model, self.attention, key="attention layers")
        modules = dict(self.model.named_modules())
        for name in self.attention:
            if attention_kind(modules[name]) is None:
                raise ConfigError("attention layers", name, "an attention module (nn.MultiheadAttention, timm or "
                                                            "transformers attention)",
                                  sorted(n for n, m in modules.items() if attention_kind(m) is not None))
        if self.needs_grad:  # only the head after each leaf is differentiated; no parameter gradients
            for param, _ in self._flags:
                param.requires_grad_(False)
        for name in sorted(set(wanted)):
            hook = self._make_hook(name, leaf_calls.get(name, set()), stored=name in self.activations or name in
                                   leaf_calls, consumers=self.streamed.get(name, []))
            self._handles.append(modules[name].register_forward_hook(hook))
        for name in self.attention:
            module = modules[name]
            kind = attention_kind(module)
            if kind == "mha":
                pre_hook, hook = self._make_attention_hooks(name)
                self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif kind == "timm":
                self._switch(module, "fused_attn", False)  # the non-fused path, which materialises the softmax
                self._handles.append(module.attn_drop.register_forward_hook(self._make_softmax_hook(name)))
            else:
                if getattr(module.config, "_attn_implementation", None) != "eager":
                    eager = copy.copy(module.config)  # this module's own copy: nothing else changes
                    eager._attn_implementation = "eager"
                    self._switch(module, "config", eager)
                self._handles.append(module.register_forward_hook(self._make_returned_weights_hook(name)))

    def start_batch(self, batch: Any = None) -> Captures:
        """Forget the previous batch's tensors (so memory stays bounded), reset call counters, and remember `batch`
        for the streamed layers' consumers."""
        self.captures = Captures()
        self.batch = batch
        self.consumed = False
        self._calls.clear()
        return self.captures

    def _make_hook(self, name: str, leaf_calls: set, stored: bool, consumers: List[Consumer]):
        """Hand every call's output to the consumers, then (when `stored`) capture it; the calls in `leaf_calls`
        (1-based) become autograd leaves. Only those: a reused module whose every call were a leaf would cut the
        graph between its own calls."""
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            self._calls[name] += 1
            key = call_key(name, self._calls[name])
            tensor = primary_tensor(output)
            if tensor is None:
                self.captures.notes[key] = f"output of type {type(output).__name__} holds no tensor"
                return None
            if not isinstance(output, torch.Tensor):
                self.captures.notes[key] = f"first tensor of a {type(output).__name__} output"
            if consumers:
                self.consumed = True
                with torch.no_grad():  # a consumer after a gradient leaf must not extend the graph
                    for consume in consumers:
                        consume(self.batch, key, tensor.detach())
            if not stored:
                return None
            if self._calls[name] in leaf_calls and isinstance(output, torch.Tensor) and (
                    torch.is_grad_enabled() or self._grad_from_leaf):
                torch.set_grad_enabled(True)  # the rest of the forward is recorded (forward_mode restores the mode)
                leaf = output.detach().requires_grad_()  # gradients flow from here to the score only
                self.captures.tensors[key] = leaf
                # the model goes on with a differentiable copy: an in-place op after the layer (densenet's
                # F.relu(features, inplace=True), twins' `x += ...`) may not touch a leaf, and must not change
                # the captured values; the copy's gradient reaches the leaf unchanged
                return leaf.clone()
            # clone: a later in-place op (e.g. ReLU(inplace=True)) must not overwrite what was captured
            self.captures.tensors[key] = tensor.detach().clone()
            return None

        return hook

    def _make_attention_hooks(self, name: str):
        asked: List[tuple] = []  # (need_weights, average_attn_weights) the caller asked for, per pending call

        def pre_hook(module: nn.Module, args: Any, kwargs: Dict[str, Any]):
            # arguments after (query, key, value) given by position become keywords, so forcing them cannot clash
            kwargs = dict(kwargs, **dict(zip(_MHA_OPTIONAL_ARGS, args[3:])))
            asked.append((bool(kwargs.get("need_weights", True)), bool(kwargs.get("average_attn_weights", True))))
            kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
            return args[:3], kwargs

        def hook(module: nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> Any:
            caller_wanted, caller_averaged = asked.pop() if asked else (True, False)
            out, weights = output
            self._store_attention(name, weights)  # (B, heads, N, N)
            if not caller_wanted:
                return out, None
            # the caller gets what it asked for: head-averaged weights by default, as nn.MultiheadAttention does
            return (out, weights.mean(dim=-3)) if caller_averaged else output

        return pre_hook, hook

    def _store_attention(self, name: str, weights: torch.Tensor) -> None:
        self._calls[f"attention:{name}"] += 1
        self.captures.attention[call_key(name, self._calls[f"attention:{name}"])] = weights.detach()

    def _make_softmax_hook(self, name: str):
        """timm: the input of the attention module's `attn_drop` is its softmax (B, heads, N, N)."""
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store_attention(name, args[0])

        return hook

    def _make_returned_weights_hook(self, name: str):
        """transformers: the module returns (output, weights (B, heads, N, N)) under eager attention."""
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if isinstance(weights, torch.Tensor):
                self._store_attention(name, weights)
            else:
                self.captures.notes[f"attention:{name}"] = (f"{type(module).__name__} returned no attention weights "
                                                            f"(transformers >= 5 with eager attention returns them)")

        return hook


def attention_kind(module: nn.Module) -> Optional[str]:
    """How the engine captures a module's attention weights: `mha` (nn.MultiheadAttention), `timm` (a timm attention
    module with a `fused_attn` switch and an `attn_drop` applied to its softmax), `hf` (a transformers attention
    module: class name ending in Attention, a config with an attention implementation, no such module inside), or
    None for anything else."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
        return "timm"
    if _is_hf_attention(module) and not any(_is_hf_attention(m) for m in module.modules() if m is not module):
        return "hf"
    return None


def _is_hf_attention(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("transformers.") and type(module).__name__.endswith("Attention")
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


# nn.MultiheadAttention.forward's parameters after (query, key, value), in order
_MHA_OPTIONAL_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def count_hooks(model: nn.Module) -> int:
    """Hooks currently registered on any module of `model` (tests assert this returns to zero)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total


StartCallback = Callable[[str, str, nn.Module, Any], None]  # (call key, module name, module, args)
EndCallback = Callable[[str, str, nn.Module, Any, Any], None]  # (call key, module name, module, args, output)


class ModuleProbe(_ModelHooks):
    """Hooks for a one-off probe forward (not the pass): `on_start` runs as each call of a submodule starts and
    `on_end` as it returns, both with the call's key (`layer`, `layer#2`, numbered as the pass numbers them).

    Every submodule is hooked once, under its first name (as named_modules and torch.fx name it); `modules`
    narrows that to some names. Inside the block the model is in eval mode (a probe must not update batch-norm
    statistics); with `requires_grad=True` every floating parameter requires grad, so an autograd graph reaches all
    of them; with `freeze=True` none does, so nothing in the forward requires grad (FlopCounterMode's module tracker
    fails on a parameter's view made under no_grad, e.g. timm PiT's and CaiT's expanded class token). On exit, on
    every path, the hooks are removed and the mode and each `requires_grad` restored.
    TorchScript modules take no Python hooks: nothing is reported for them."""

    def __init__(self, model: nn.Module, on_start: Optional[StartCallback] = None,
                 on_end: Optional[EndCallback] = None, modules: Optional[Iterable[str]] = None,
                 requires_grad: bool = False, freeze: bool = False):
        super().__init__(model)
        if requires_grad and freeze:
            raise ValueError("ModuleProbe: requires_grad=True and freeze=True exclude each other")
        self.on_start, self.on_end = on_start, on_end
        self.wanted = None if modules is None else set(modules)
        self.requires_grad = requires_grad
        self.freeze = freeze

    def __enter__(self) -> "ModuleProbe":
        return super().__enter__()

    def _setup(self) -> None:
        for param, _ in self._flags:
            if self.freeze:
                param.requires_grad_(False)
            elif self.requires_grad and (param.is_floating_point() or param.is_complex()):
                param.requires_grad_(True)
        if not isinstance(self.model, torch.jit.ScriptModule):
            for name, module in self.model.named_modules():
                if name and (self.wanted is None or name in self.wanted):
                    self._hook(name, module)

    def _hook(self, name: str, module: nn.Module) -> None:
        calls = [0]
        pending: List[str] = []  # keys of this module's calls that started and have not returned (re-entrant calls)

        def start(mod: nn.Module, args: Any) -> None:
            calls[0] += 1
            key = call_key(name, calls[0])
            pending.append(key)
            if self.on_start is not None:
                self.on_start(key, name, mod, args)

        def end(mod: nn.Module, args: Any, output: Any) -> None:
            key = pending.pop()
            if self.on_end is not None:
                self.on_end(key, name, mod, args, output)

        self._handles.append(module.register_forward_pre_hook(start))
        self._handles.append(module.register_forward_hook(end))


def probe_forward(model: nn.Module, example: torch.Tensor, on_start: Optional[StartCallback] = None,
                  on_end: Optional[EndCallback] = None, modules: Optional[Iterable[str]] = None) -> Any:
    """One probe forward of `example` without gradients (see ModuleProbe); returns the model's output."""
    with ModuleProbe(model, on_start, on_end, modules), torch.no_grad():
        return model(example)

