"""The module graph: modules as nodes (name, type, output shape) and data flow as edges, to a depth limit.

Edges come from `torch.fx` where the model traces: modules at the depth limit are fx leaves, so the graph holds
the true data flow between them, residual connections included. Of the plain tensor operations between modules
only those that merge two or more data paths (`add`, `cat`, `mul`, ...) stay as small op nodes; the rest
(`flatten`, `reshape`, shape arithmetic, parameters) are folded into the edges. A module inside which fx cannot
trace (control flow on tensor values) is made an fx leaf and named in a note; when the model's own `forward` cannot
be traced, the graph falls back to the order in which the modules were called (a chain: branches and skip
connections are lost), also with a note.

Output shapes come from hooks on one probe forward (`record_calls`), keyed by call (`shared#2` is the second call
of `shared`), so fx tracing itself is symbolic and costs no extra forward. Runs of identical consecutive sibling
blocks (same type, same parameter shapes and submodule structure) can be drawn as one node (`BasicBlock ×2`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from reportgen.engine.capture import ModuleProbe, call_key, shape_text

MAX_TRACE_ATTEMPTS = 20  # fx retries, each making one more untraceable module a leaf
# Tensor attributes and methods whose results describe a tensor rather than carry its data: a value computed only
# from these (e.g. `x.shape[0]` passed to `reshape`) is not a data-flow edge.
METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
METADATA_METHODS = {"size", "dim", "numel", "nelement", "get_device", "stride", "element_size", "is_contiguous",
                    "is_floating_point", "is_complex"}


@dataclass
class ModuleCall:
    """One module call seen by the probe forward, in call (pre-hook) order."""

    key: str  # call key: `layer1.0`, `shared#2`
    name: str  # qualified module name
    shape: str  # output shape, e.g. "1×64×56×56" ("" when the output holds no tensor)


@dataclass
class GraphNode:
    """One drawn node: a module call (or a run of identical blocks), a merging op, the input or the output."""

    key: str  # unique and readable: a call key (`layer1.0`, `shared#2`), an fx op name (`add_1`), input, output
    kind: str  # input | module | op | output
    type: str  # module class (`BasicBlock`, `Sequential (BasicBlock ×2)`), op name (`add`), or ""
    shape: str  # output shape, "" when unknown
    owner: str = ""  # module in whose forward the node runs (its parent for a module), for grouping
    members: List[str] = field(default_factory=list)  # module names a collapsed run stands for (else one)

    @property
    def count(self) -> int:
        return max(1, len(self.members))


@dataclass
class ModuleGraph:
    """Nodes in data-flow order and the edges between them, with how they were found."""

    nodes: List[GraphNode]
    edges: List[Tuple[str, str]]  # (from key, to key), in data-flow order
    method: str  # fx | hooks
    depth: int  # depth drawn (lower than asked when the node cap forced it)
    groups: Dict[str, str] = field(default_factory=dict)  # module name -> type, for every owner and its ancestors
    notes: List[str] = field(default_factory=list)  # what a reader should know: fallback, leaves, cap

    def node(self, key: str) -> GraphNode:
        for node in self.nodes:
            if node.key == key:
                return node
        raise KeyError(key)


def depth_of(name: str) -> int:
    return name.count(".") + 1


def parent_of(name: str) -> str:
    return name.rpartition(".")[0]


@contextlib.contextmanager
def record_calls(model: nn.Module, requires_grad: bool = False) -> Iterator[List[ModuleCall]]:
    """Every submodule call made while the block runs (a ModuleProbe: eval mode, hooks removed on every path);
    yields the list it fills. TorchScript modules take no Python hooks, so nothing is recorded for them."""
    calls: List[ModuleCall] = []
    by_key: Dict[str, ModuleCall] = {}

    def before(key: str, name: str, module: nn.Module, args: Any) -> None:
        call = by_key[key] = ModuleCall(key, name, "")
        calls.append(call)

    def after(key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        by_key[key].shape = shape_text(output)

    with ModuleProbe(model, before, after, requires_grad=requires_grad):
        yield calls


def build_module_graph(model: nn.Module, calls: List[ModuleCall], input_shape: str, output_shape: str,
                       depth: int = 2, collapse_repeats: bool = True, max_nodes: int = 400) -> ModuleGraph:
    """The module graph to `depth`, lowered one level at a time while it has more than `max_nodes` nodes (then cut
    to the first `max_nodes` nodes if even depth 1 is too large). `calls` come from `record_calls`."""
    asked = depth
    while True:
        graph = _graph_at_depth(model, calls, input_shape, output_shape, depth)
        if collapse_repeats:
            collapse_repeated_blocks(graph, model)
        if len(graph.nodes) <= max_nodes or depth <= 1:
            break
        depth -= 1
    if depth < asked:
        graph.notes.append(f"Drawn at depth {depth} instead of {asked}: deeper graphs have more than {max_nodes} "
                           f"nodes (analysis.graph.max_nodes).")
    if len(graph.nodes) > max_nodes:
        cut = len(graph.nodes) - max_nodes
        graph.nodes = graph.nodes[:max_nodes]
        kept = {n.key for n in graph.nodes}
        graph.edges = [(a, b) for a, b in graph.edges if a in kept and b in kept]
        graph.notes.append(f"Only the first {max_nodes} nodes in data-flow order are drawn; {cut} more are not "
                           f"(analysis.graph.max_nodes).")
    return graph


def _graph_at_depth(model: nn.Module, calls: List[ModuleCall], input_shape: str, output_shape: str,
                    depth: int) -> ModuleGraph:
    shapes = {c.key: c.shape for c in calls}
    if isinstance(model, torch.jit.ScriptModule):
        graph = ModuleGraph([GraphNode("input", "input", "", input_shape), GraphNode("output", "output", "",
                            output_shape)], [("input", "output")], "hooks", depth)
        graph.notes.append("TorchScript model: its modules can be neither traced by torch.fx nor hooked, so only "
                           "the input and output are drawn.")
        return graph
    traced, leaves, error = trace_to_depth(model, depth)
    if traced is None:
        graph = _chain_graph(model, calls, input_shape, output_shape, depth)
        graph.notes.append(f"torch.fx could not trace the model's forward ({error}), so modules are drawn in the "
                           f"order they were called: a chain, without branches or skip connections.")
    else:
        graph = _fx_graph(model, traced, shapes, input_shape, output_shape, depth)
        if leaves:
            graph.notes.append("torch.fx could not trace inside these modules, so each is drawn as one node: "
                               + ", ".join(sorted(leaves)) + ".")
    graph.groups = _groups(model, graph.nodes)
    return graph


class _DepthTracer(fx.Tracer):
    """fx tracer whose leaves are the modules at the depth limit (plus torch.nn's own layers and any module fx
    could not trace inside); remembers the innermost traced-through module in which tracing failed."""

    def __init__(self, depth: int, extra_leaves: Set[str]):
        super().__init__()
        self.depth = depth
        self.extra_leaves = extra_leaves
        self.failed_in: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (depth_of(module_qualified_name) >= self.depth or module_qualified_name in self.extra_leaves
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                name = self.path_of_module(m)
                if not self.is_leaf_module(m, name):
                    self.failed_in = name
            raise


def trace_to_depth(model: nn.Module, depth: int) -> Tuple[Optional[fx.Graph], Set[str], str]:
    """(fx graph or None, modules made leaves because fx failed inside them, the last error as text)."""
    leaves: Set[str] = set()
    error = ""
    for _ in range(MAX_TRACE_ATTEMPTS):
        tracer = _DepthTracer(depth, leaves)
        try:
            return tracer.trace(model), leaves, ""
        except Exception as exc:  # fx raises many types (TraceError, TypeError, unsupported-op errors, ...)
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            if tracer.failed_in is None or tracer.failed_in in leaves:
                return None, leaves, error
            leaves.add(tracer.failed_in)
    return None, leaves, error


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fx_graph(model: nn.Module, traced: fx.Graph, shapes: Dict[str, str], input_shape: str, output_shape: str,
              depth: int) -> ModuleGraph:
    """Keep the input, module calls, merging ops and the output; fold every other fx node into the edges."""
    modules = dict(model.named_modules())
    nodes: List[GraphNode] = []
    edges: Dict[Tuple[str, str], None] = {}  # ordered set
    sources: Dict[fx.Node, Tuple[str, ...]] = {}  # fx node -> drawn nodes its value derives from
    calls: Dict[str, int] = {}
    seen_input = False

    def inputs_of(node: fx.Node) -> Tuple[str, ...]:
        found: Dict[str, None] = {}
        for arg in node.all_input_nodes:
            for key in sources.get(arg, ()):
                found[key] = None
        return tuple(found)

    def draw(node: GraphNode, fed_by: Tuple[str, ...]) -> Tuple[str, ...]:
        nodes.append(node)
        for key in fed_by:
            edges[(key, node.key)] = None
        return (node.key,)

    for node in traced.nodes:
        if node.op == "placeholder":
            if not seen_input:  # the image; further arguments (optional flags) carry no data
                seen_input = True
                sources[node] = draw(GraphNode("input", "input", "", input_shape), ())
        elif node.op == "call_module":
            name = str(node.target)
            calls[name] = calls.get(name, 0) + 1
            key = call_key(name, calls[name])
            sources[node] = draw(GraphNode(key, "module", type_label(modules[name]), shapes.get(key, ""),
                                           owner=parent_of(name), members=[name]), inputs_of(node))
        elif node.op == "output":
            draw(GraphNode("output", "output", "", output_shape), inputs_of(node))
        elif node.op in ("call_function", "call_method") and not _is_metadata(node):
            fed_by = inputs_of(node)
            if len(fed_by) >= 2 and node.users:
                sources[node] = draw(GraphNode(node.name, "op", _op_name(node), "", owner=_enclosing(node)),
                                     fed_by)
            else:
                sources[node] = fed_by
        # get_attr (parameters, buffers) and metadata queries carry no data from the image
    return ModuleGraph(nodes, list(edges), "fx", depth)


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in METADATA_ATTRIBUTES
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return node.op == "call_function" and node.target is len


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _enclosing(node: fx.Node) -> str:
    """Qualified name of the module whose forward produced an fx op ("" for the model's own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    innermost = list(stack.values())[-1]
    return str(innermost[0] if isinstance(innermost, tuple) else innermost)


def _chain_graph(model: nn.Module, calls: List[ModuleCall], input_shape: str, output_shape: str,
                 depth: int) -> ModuleGraph:
    """Modules at the depth limit (and childless modules above it) in call order, each feeding the next."""
    modules = dict(model.named_modules())
    nodes = [GraphNode("input", "input", "", input_shape)]
    for call in calls:
        module = modules[call.name]
        if depth_of(call.name) == depth or (depth_of(call.name) < depth and not any(module.children())):
            nodes.append(GraphNode(call.key, "module", type_label(module), call.shape, owner=parent_of(call.name),
                                   members=[call.name]))
    nodes.append(GraphNode("output", "output", "", output_shape))
    edges = [(a.key, b.key) for a, b in zip(nodes, nodes[1:])]
    return ModuleGraph(nodes, edges, "hooks", depth)


def type_label(module: nn.Module) -> str:
    """The class name; a Sequential or ModuleList drawn as one node also says what it holds."""
    name = type(module).__name__
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module):
        return f"{name} ({runs_text([type(c).__name__ for c in module.children()])})"
    return name


def runs_text(names: List[str]) -> str:
    """`BasicBlock ×2, Conv2d` for [BasicBlock, BasicBlock, Conv2d]."""
    parts: List[Tuple[str, int]] = []
    for name in names:
        if parts and parts[-1][0] == name:
            parts[-1] = (name, parts[-1][1] + 1)
        else:
            parts.append((name, 1))
    return ", ".join(n if k == 1 else f"{n} ×{k}" for n, k in parts)


def block_signature(module: nn.Module) -> Tuple[Any, ...]:
    """What makes two blocks "identical": class, submodule structure and parameter shapes."""
    structure = tuple((n, type(m).__name__) for n, m in module.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return type(module).__name__, structure, params


def collapse_repeated_blocks(graph: ModuleGraph, model: nn.Module) -> None:
    """Replace each run of two or more identical sibling modules that feed only each other, one after the next,
    by the run's first node standing for all (its `members`); the run's last output shape is kept."""
    modules = dict(model.named_modules())
    signatures: Dict[str, Tuple[Any, ...]] = {}

    def signature(node: GraphNode) -> Optional[Tuple[Any, ...]]:
        if node.kind != "module" or len(node.members) != 1 or "#" in node.key:
            return None  # only first calls of single modules: a reused module's calls stay visible
        name = node.members[0]
        if name not in signatures:
            signatures[name] = block_signature(modules[name])
        return signatures[name]

    successors: Dict[str, List[str]] = {n.key: [] for n in graph.nodes}
    predecessors: Dict[str, List[str]] = {n.key: [] for n in graph.nodes}
    for a, b in graph.edges:
        successors[a].append(b)
        predecessors[b].append(a)
    by_key = {n.key: n for n in graph.nodes}
    absorbed: Dict[str, str] = {}  # member key -> key of the run's first node
    for node in graph.nodes:
        wanted = signature(node)
        if wanted is None or node.key in absorbed:
            continue
        current = node
        while len(successors[current.key]) == 1:
            following = by_key[successors[current.key][0]]
            if (predecessors[following.key] != [current.key] or following.owner != node.owner
                    or signature(following) != wanted or following.members[0] in node.members):
                break
            node.members.append(following.members[0])
            node.shape = following.shape
            absorbed[following.key] = node.key
            current = following
    if not absorbed:
        return
    graph.nodes = [n for n in graph.nodes if n.key not in absorbed]
    edges: Dict[Tuple[str, str], None] = {}
    for a, b in graph.edges:
        a, b = absorbed.get(a, a), absorbed.get(b, b)
        if a != b:  # edges inside a run disappear; the run's exit now leaves from its first node
            edges[(a, b)] = None
    graph.edges = list(edges)


def _groups(model: nn.Module, nodes: List[GraphNode]) -> Dict[str, str]:
    """Module name -> type for every owner of a drawn node and its ancestors (the boxes nodes are grouped in)."""
    modules = dict(model.named_modules())
    groups: Dict[str, str] = {}
    for node in nodes:
        name = node.owner
        while name:
            if name in modules:
                groups[name] = type(modules[name]).__name__
            name = parent_of(name)
    return groups
