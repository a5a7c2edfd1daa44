"""`graph`: the model drawn twice, as a readable module graph and as torchviz's autograd graph.

Both come from one probe forward of one image in `begin`, with gradients enabled (parameters temporarily set to
require grad, so torchviz can name them) and hooks recording each module call's output shape; the hooks, the
parameters' `requires_grad` and the model's mode are restored afterwards. The module graph's edges come from
`torch.fx` (see reportgen/modulegraph.py), which is symbolic and costs no second forward.

The DOT sources go to `results/graph_modules.dot` and `results/graph_autograd.dot` as soon as they exist; graphviz
`dot` draws them in `finalize`. Without `dot`, the section says how to install it and links the sources; nothing
else in the report depends on it.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from reportgen.analyses._dot import (INSTALL_HINT, GraphvizMissing, RenderFailed, find_dot, module_graph_dot,
                                     render_svg, svg_size)
from reportgen.analyses._modulegraph import ModuleCall, build_module_graph, record_calls
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.engine.capture import primary_tensor, shape_text
from reportgen.errors import ConfigError
from reportgen.report.elements import Alert, Graph, KeyValues, Section, Text

MODULES_DOT = "graph_modules.dot"
AUTOGRAD_DOT = "graph_autograd.dot"
# Autograd graphs with more edges per node than this (DenseNet: 1.46; ResNet, ViT, Swin, ConvNeXt: about 1.05)
# make graphviz's positioning and curved routing take minutes: bounded iterations and straight edges keep densenet121
# at about 4 s (measured: graphviz 2.43, 2 CPU cores) instead of over 5 minutes.
DENSE_EDGES_PER_NODE = 1.2
DENSE_MIN_NODES = 300  # below this graphviz is quick whatever the density
FAST_LAYOUT = {"nslimit": "0.2", "mclimit": "0.1", "splines": "line"}


@dataclass
class GraphConfig:
    depth: int = 2  # module tree depth drawn as nodes (layer1 is depth 1, layer1.0 depth 2)
    collapse_repeats: bool = True  # draw identical consecutive sibling blocks as one node (BasicBlock ×2)
    max_nodes: int = 400  # module graph node cap: above it the depth is lowered, so the drawing stays readable
    autograd: bool = True  # also draw torchviz's autograd graph of one image
    max_autograd_nodes: int = 3000  # larger autograd graphs are not drawn (dot would take minutes, browsers choke)
    dot_timeout_s: float = 120.0  # seconds graphviz may spend laying out one graph before it is given up


@register("graph")
class GraphAnalysis(Analysis):
    Config = GraphConfig
    title = "Model graphs"

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        for key in ("depth", "max_nodes", "max_autograd_nodes"):
            if int(getattr(cfg, key)) < 1:
                raise ConfigError(f"analysis.graph.{key}", getattr(cfg, key), "an integer >= 1")
        if float(cfg.dot_timeout_s) <= 0:
            raise ConfigError("analysis.graph.dot_timeout_s", cfg.dot_timeout_s, "a positive number of seconds")
        self.modules_dot: Optional[str] = None
        self.autograd_dot: Optional[str] = None
        self.facts: Dict[str, Any] = {}
        self.module_notes: List[str] = []
        self.autograd_note = ""

    def begin(self, example: Batch) -> None:
        model = self.ctx.model
        image = example.inputs[:1].clone()  # (1, 3, H, W); a clone is never an inference tensor
        output, calls, probe_error = probe_with_calls(model, image, with_grad=bool(self.cfg.autograd))
        if probe_error:
            self.autograd_note = f"Not drawn: the forward with gradients enabled failed ({probe_error})."
            output, calls, probe_error = probe_with_calls(model, image, with_grad=False)
        if probe_error:
            self.module_notes.append(f"Nothing drawn: the probe forward of one image failed ({probe_error}).")
            return
        with eval_mode(model):  # fx follows the same `if self.training` branches as the probe did
            graph = build_module_graph(model, calls, shape_text(image), shape_text(output),
                                       depth=int(self.cfg.depth), collapse_repeats=bool(self.cfg.collapse_repeats),
                                       max_nodes=int(self.cfg.max_nodes))
        self.modules_dot = module_graph_dot(graph)
        self.module_notes.extend(graph.notes)
        self.facts.update(method=graph.method, depth=graph.depth, nodes=len(graph.nodes), edges=len(graph.edges),
                          collapsed=[(n.members[0], n.members[-1], n.type, n.count) for n in graph.nodes
                                     if n.count > 1])
        self._write(MODULES_DOT, self.modules_dot)
        if self.cfg.autograd and not self.autograd_note:
            self.autograd_dot, count, self.autograd_note = autograd_graph_dot(
                model, output, int(self.cfg.max_autograd_nodes))
            self.facts["autograd_nodes"] = count
            if self.autograd_dot is not None:
                self._write(AUTOGRAD_DOT, self.autograd_dot)

    def _write(self, name: str, source: str) -> None:
        (self.ctx.results_dir / name).write_text(source, encoding="utf-8", errors="replace")

    def state_dict(self) -> Dict[str, Any]:
        return {"modules_dot": self.modules_dot, "autograd_dot": self.autograd_dot, "facts": self.facts,
                "module_notes": self.module_notes, "autograd_note": self.autograd_note}

    def merge(self, state: Dict[str, Any]) -> None:
        if self.modules_dot is None and not self.module_notes:  # every shard draws the same model; keep the first
            self.modules_dot, self.autograd_dot = state["modules_dot"], state["autograd_dot"]
            self.facts, self.module_notes = state["facts"], state["module_notes"]
            self.autograd_note = state["autograd_note"]

    def finalize(self) -> Optional[Section]:
        section = Section(id="graph", title="Model graphs")
        if self.modules_dot is None and not self.module_notes:
            section.elements.append(Text("No image was processed, so the model was not drawn."))
            return section
        facts = self.facts
        method = "torch.fx" if facts.get("method") == "fx" else "call order"
        if facts:
            section.summary = (f"module graph: {facts['nodes']} nodes ({method}, depth {facts['depth']})"
                               + (f"; autograd graph: {facts['autograd_nodes']:,} nodes"
                                  if facts.get("autograd_nodes") else ""))
        if find_dot() is None and (self.modules_dot or self.autograd_dot):
            section.elements.append(Alert("warning", "Graphviz's dot program was not found, so the graphs are "
                                                     "not drawn. " + INSTALL_HINT))
            section.alerts.append(Alert("info", "graphviz dot not found: graphs not drawn (install hint in the "
                                                "section)."))
        if facts.get("collapsed"):
            section.elements.append(Text("Identical consecutive blocks drawn as one node:"))
            section.elements.append(KeyValues([(f"{first} … {last}", f"{kind} ×{count}")
                                               for first, last, kind, count in facts["collapsed"]]))
        for note in self.module_notes:
            section.elements.append(Text(note))
        if self.modules_dot is not None:
            section.elements.append(self._graph(
                "Module graph", self.modules_dot, "modules", MODULES_DOT,
                f"Module calls to depth {facts['depth']} with their output shape for one image; arrows follow the "
                f"data ({method}). Double frame: identical "
                f"consecutive blocks drawn once (analysis.graph.collapse_repeats=false draws each). Small ellipses: "
                f"operations that join paths (add, cat). Framed groups: the module the nodes belong to."))
        if self.cfg.autograd:
            section.elements.append(self._graph(
                "Autograd graph", self.autograd_dot, "autograd", AUTOGRAD_DOT if self.autograd_dot else "",
                "torchviz's drawing of the backward graph of one image: gray boxes are backward functions, blue "
                "boxes the parameters (name and shape), green the output.", self.autograd_note))
        return section

    def _graph(self, title: str, source: Optional[str], name: str, dot_file: str, caption: str,
               note: str = "") -> Graph:
        """Draw one DOT source; a failure becomes the element's note, never an exception."""
        svg = None
        if source is not None:
            try:
                svg = render_svg(source, float(self.cfg.dot_timeout_s))
            except GraphvizMissing:
                note = "Not drawn: graphviz dot is not installed (see above)."
            except RenderFailed as exc:
                note = f"Not drawn: {exc}."
        width, height = svg_size(svg) if svg else (0, 0)
        return Graph(title=title, svg=svg, name=name, dot_file=dot_file, caption=caption, note=note, width=width,
                     height=height)


def probe_with_calls(model: nn.Module, image: torch.Tensor,
                  with_grad: bool) -> Tuple[Any, List[ModuleCall], str]:
    """(output, module calls, error text or "") of one eval-mode forward of `image`. With grad, every floating
    parameter requires grad during the call so the autograd graph reaches (and names) all of them."""
    try:
        with record_calls(model, requires_grad=with_grad) as calls, torch.inference_mode(False), \
                torch.set_grad_enabled(with_grad):
            output = model(image)
        return output, calls, ""
    except Exception as exc:  # a model that cannot run its probe still gets a report, with the reason
        return None, [], f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no batch-norm statistics updated, no dropout), the previous mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autograd_graph_dot(model: nn.Module, output: Any, max_nodes: int) -> Tuple[Optional[str], int, str]:
    """(torchviz DOT source or None, autograd node count, note). Not built past `max_nodes` nodes."""
    tensor = primary_tensor(output)
    if tensor is None or tensor.grad_fn is None:
        return None, 0, "Not drawn: the model's output has no autograd history (is its forward under no_grad?)."
    count = count_autograd_nodes(tensor)
    if count > max_nodes:
        return None, count, (f"Not drawn: the autograd graph has {count:,} nodes, more than "
                             f"analysis.graph.max_autograd_nodes={max_nodes:,}; graphviz would take minutes and a "
                             f"browser could not pan it. Raise the limit to draw it anyway.")
    try:
        with warnings.catch_warnings(), _recursion_limit(count + 1000):  # make_dot recurses once per node
            warnings.simplefilter("ignore", DeprecationWarning)  # torchviz compares versions with distutils
            from torchviz import make_dot

            dot = make_dot(tensor, params=dict(model.named_parameters()))
    except Exception as exc:
        return None, count, f"Not drawn: torchviz failed ({type(exc).__name__}: {exc})."
    dot.graph_attr.pop("size", None)  # torchviz shrinks big graphs to 12 inches; the viewer zooms instead
    edges = sum("->" in line for line in dot.body)
    if count >= DENSE_MIN_NODES and edges > DENSE_EDGES_PER_NODE * count:
        dot.graph_attr.update(FAST_LAYOUT)
        return dot.source, count, ("Edges are drawn straight: this graph is densely connected (e.g. DenseNet's "
                                   "concatenations), where graphviz's curved routing takes minutes.")
    return dot.source, count, ""


def count_autograd_nodes(tensor: torch.Tensor) -> int:
    """Nodes torchviz would draw: the output, every backward function and every parameter (AccumulateGrad)."""
    seen = set()
    stack = [tensor.grad_fn]
    parameters = 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        parameters += hasattr(fn, "variable")
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return 1 + len(seen) + parameters


@contextlib.contextmanager
def _recursion_limit(at_least: int) -> Iterator[None]:
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, at_least))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)
