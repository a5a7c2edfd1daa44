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
- `softmax` and `sdpa`, any other module whose own forward computes attention (found by behaviour on a one-image
  probe, `find_attention`, and remembered per module): while such a module runs (and only then; its forward pre-hook
  enters a `TorchFunctionMode` that its forward hook, called on every path, leaves), `softmax` stores the output of
  the softmax over the last axis of its (B, heads, N, M) scores, and `sdpa` computes the weights exactly from the
  query, key, mask, causality, scale and grouping each `scaled_dot_product_attention` call receives
  (`sdpa_weights`), while the fused call itself still computes the output. A call is credited to the innermost
  running intercepted module, so an attention module inside another keeps its own weights. `dropped`: weights
  combined from several softmaxes (ConViT's gated GPSA) are the input of the module's `attn_drop`, stored as `timm`.
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
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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
        self._interceptor = _AttentionInterceptor(self._store_attention)  # `softmax` / `sdpa` modules only

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
            elif kind in ("softmax", "sdpa"):
                self._intercept(name, module, kind)
            elif kind == "dropped":  # the weights, as the module applies them, are its attn_drop's input
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

    def _intercept(self, name: str, module: nn.Module, kind: str) -> None:
        """`softmax` / `sdpa` capture: the interceptor is active only while `module` (or another intercepted module)
        runs; the forward hook is called on every path, so an exception leaves no mode behind."""
        interceptor = self._interceptor

        def enter(mod: nn.Module, args: Any) -> None:
            interceptor.push(name, kind)

        def leave(mod: nn.Module, args: Any, output: Any) -> None:
            interceptor.pop()

        self._handles.append(module.register_forward_pre_hook(enter))
        self._handles.append(module.register_forward_hook(leave, always_call=True))

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
    module: class name ending in Attention, a config with an attention implementation, no such module inside),
    `softmax` / `sdpa` / `dropped` (found by `find_attention` to compute its weights with one softmax over
    (B, heads, N, M), with scaled_dot_product_attention on (B, heads, N, d) queries, or from several softmaxes into
    its `attn_drop`), or None for anything else."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
        return "timm"
    if _is_hf_attention(module) and not any(_is_hf_attention(m) for m in module.modules() if m is not module):
        return "hf"
    return _PROBED_KINDS.get(module)


def _is_hf_attention(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("transformers.") and type(module).__name__.endswith("Attention")
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


# `softmax` / `sdpa` kinds found by `find_attention` (weak keys: a module's entry goes with the module)
_PROBED_KINDS: "WeakKeyDictionary[nn.Module, str]" = WeakKeyDictionary()


def sdpa_weights(query: torch.Tensor, key: torch.Tensor, value: Any = None, attn_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    """The (..., N, M) weights F.scaled_dot_product_attention applies for these arguments (no dropout: eval mode):
    softmax(q k^T * scale + mask), in float32; a boolean mask keeps where True, a causal mask the lower triangle."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    logits = (query.float() @ key.float().transpose(-2, -1)) * scale  # (..., N, M)
    if is_causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else logits + attn_mask.float())
    return logits.softmax(dim=-1)


def _softmax_axis(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[torch.Tensor, int]]:
    """(input, non-negative axis) of a softmax call over >= 4 entries of a tensor of >= 3 dims (attention rows, not
    the 2-way softmax of SK / ResNeSt branches nor a classifier's (B, K)), else None."""
    if getattr(func, "__name__", "") not in ("softmax", "_softmax") or not args \
            or not isinstance(args[0], torch.Tensor):
        return None
    tensor, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
    if not isinstance(dim, int) or tensor.dim() < 3 or tensor.shape[dim] < 4:
        return None
    return tensor, dim % tensor.dim()


def _sdpa_query(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The query of a scaled_dot_product_attention call (by position or keyword), None for any other call."""
    if func is not F.scaled_dot_product_attention:
        return None
    return args[0] if args else kwargs.get("query")


class _AttentionInterceptor(TorchFunctionMode):
    """Active while an intercepted module runs (`push` / `pop` keep the running ones, innermost last): a `softmax`
    module's softmax over the last axis of a 4-D tensor, and an `sdpa` module's 4-D scaled_dot_product_attention
    weights, go to `store(name, weights)`; every call itself runs unchanged."""

    def __init__(self, store: Callable[[str, torch.Tensor], None]):
        super().__init__()
        self.store = store
        self.running: List[Tuple[str, str]] = []  # (module name, kind)

    def push(self, name: str, kind: str) -> None:
        if not self.running:
            self.__enter__()
        self.running.append((name, kind))

    def pop(self) -> None:
        self.running.pop()
        if not self.running:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, kind = self.running[-1] if self.running else ("", "")
        query = _sdpa_query(func, args, kwargs) if kind == "sdpa" else None
        if query is not None and query.dim() == 4:
            self.store(name, sdpa_weights(*args, **kwargs))
        out = func(*args, **kwargs)
        if kind == "softmax":
            found = _softmax_axis(func, args, kwargs)
            if found is not None and found[0].dim() == 4 and found[1] == 3:
                self.store(name, out)
        return out


@dataclass
class ProbedAttention:
    """What one module's own forward did on the attention probe (its first call), for `find_attention`."""

    type_name: str
    softmax: List[Tuple[Tuple[int, ...], int]] = field(default_factory=list)  # (input shape, axis) per call
    sdpa: List[Tuple[int, ...]] = field(default_factory=list)  # query shape per call
    input_shape: Tuple[int, ...] = ()  # of the first tensor among its arguments
    sizes: List[Tuple[int, int]] = field(default_factory=list)  # (h, w) int pairs among its arguments (a grid)
    calls: int = 0  # how often it ran
    dropped: List[bool] = field(default_factory=list)  # per call of its `attn_drop`: the input is 4-D and its
    # rows sum to 1 (attention weights combined from several softmaxes, as ConViT's gated GPSA makes them)

    @property
    def kind(self) -> Optional[str]:
        """`sdpa` for 4-D queries, `softmax` for one softmax over the last axis of a 4-D tensor per call, `dropped`
        for weights combined from several softmaxes that go through an `attn_drop` once per call, None when the
        engine cannot capture it (3-D or 5-D scores, softmax over another axis, several softmaxes)."""
        if self.sdpa:
            return "sdpa" if all(len(q) == 4 for q in self.sdpa) and not self.softmax else None
        rows = [s for s, axis in self.softmax if len(s) == 4 and axis == 3]
        if len(rows) == len(self.softmax) == self.calls:
            return "softmax"
        return "dropped" if len(self.dropped) == self.calls and all(self.dropped) else None


class _OpsRecorder(TorchFunctionMode):
    """Hands every torch function call to `record(func, args, kwargs)`, then runs it unchanged."""

    def __init__(self, record: Callable[[Any, Sequence[Any], Mapping[str, Any]], None]):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.record(func, args, kwargs)
        return func(*args, **kwargs)


class _AttentionOpsProbe(_ModelHooks):
    """Hooks every submodule to keep the stack of running modules; `record` (under an `_OpsRecorder`) credits each
    softmax over a token axis and each scaled_dot_product_attention call to the innermost running module (an
    nn.Softmax is its caller's)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.stack: List[str] = []
        self.found: Dict[str, ProbedAttention] = {}
        self.inputs: Dict[str, tuple] = {}  # module name -> (args, kwargs) of its first call

    def _setup(self) -> None:
        for name, module in self.model.named_modules():
            if name and not isinstance(module, (nn.Softmax, nn.Softmax2d)):
                self._handles.append(module.register_forward_pre_hook(self._start(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._end, always_call=True))

    def _start(self, name: str):
        def start(module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
            parent, _, attribute = name.rpartition(".")
            if attribute == "attn_drop" and parent in self.found and args and isinstance(args[0], torch.Tensor):
                rows = args[0].sum(dim=-1)
                self.found[parent].dropped.append(args[0].dim() == 4 and torch.allclose(rows, torch.ones_like(rows),
                                                                                        atol=1e-4))
            self.stack.append(name)
            self.inputs.setdefault(name, (args, kwargs))
            self.found.setdefault(name, ProbedAttention(type(module).__name__)).calls += 1

        return start

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()

    def record(self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        if not self.stack:
            return
        found = self.found[self.stack[-1]]
        softmax, query = _softmax_axis(func, args, kwargs), _sdpa_query(func, args, kwargs)
        if softmax is not None:
            found.softmax.append((tuple(softmax[0].shape), softmax[1]))
        elif query is not None:
            found.sdpa.append(tuple(query.shape))

    def attention(self) -> Dict[str, ProbedAttention]:
        """The modules that called softmax over a token axis or scaled_dot_product_attention, with their inputs."""
        found = {}
        for name, record in self.found.items():
            if record.softmax or record.sdpa:
                args, kwargs = self.inputs[name]
                record.input_shape = tuple(getattr(primary_tensor(args), "shape", ()))
                record.sizes = _int_pairs(list(args) + list(kwargs.values()))
                found[name] = record
        return found


def _int_pairs(values: Sequence[Any]) -> List[Tuple[int, int]]:
    """(h, w) candidates among a call's arguments: tuples of two ints, and consecutive int arguments."""
    pairs = [(int(v[0]), int(v[1])) for v in values if isinstance(v, (tuple, list)) and len(v) == 2
             and all(isinstance(i, int) and not isinstance(i, bool) for i in v)]
    ints = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return pairs + list(zip(ints, ints[1:]))


def find_attention(model: nn.Module, example: torch.Tensor) -> Dict[str, ProbedAttention]:
    """Attention by behaviour, on a one-image probe forward without gradients: every module whose own forward (not
    a child's) calls softmax over an axis of >= 4 entries of a >= 3-D tensor, or scaled_dot_product_attention,
    with what it did. Modules the engine can capture that way get the `softmax` / `sdpa` kind (`attention_kind`)."""
    probe = _AttentionOpsProbe(model)
    with probe, torch.no_grad(), _OpsRecorder(probe.record):
        model(example)
    found = probe.attention()
    modules = dict(model.named_modules())
    for name, record in found.items():
        if record.kind is not None:
            _PROBED_KINDS[modules[name]] = record.kind
    return found


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



@contextmanager
def replace_output(model: nn.Module, layer: str, fn: Callable[[Any], Any]) -> Iterator[None]:
    """Inside the block, every forward of `model` uses `fn(output)` instead of the output of `layer`, a call key
    (`layer4`, or `shared#2` for the second call of a reused module within one forward; Ablation-CAM's zeroed
    channels). On exit, on every path, the hooks are removed."""
    name, _, call = layer.partition("#")
    wanted = int(call) if call else 1
    module = dict(model.named_modules())[resolve_layer_names(model, [name])[0]]
    calls = [0]  # calls of the module in the current forward

    def reset(mod: nn.Module, args: Any) -> None:
        calls[0] = 0

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        calls[0] += 1
        return fn(output) if calls[0] == wanted else None

    handles = [model.register_forward_pre_hook(reset), module.register_forward_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
