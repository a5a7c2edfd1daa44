"""Graphviz: DOT source for the module graph, `dot -Tsvg` as a subprocess, and SVG made safe to open.

Module names and class names are arbitrary strings chosen by whoever wrote the model, so every label is a DOT
double-quoted string with `\\` and `"` escaped (graphviz then escapes `<`, `>` and `&` in its SVG text), node ids
are generated (`n0`, `n1`, ...), and HTML-like labels are never used. The SVG is still cleaned afterwards
(`sanitize_svg`: only drawing elements kept, no event handlers or links), because the report links it for opening
on its own, where a script in it would run.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

from reportgen.analyses._modulegraph import GraphNode, ModuleGraph, parent_of

INSTALL_HINT = ("Install Graphviz so that its dot program is on PATH (Debian/Ubuntu: apt-get install graphviz; "
                "macOS: brew install graphviz; conda: conda install graphviz) and run again, or draw the saved DOT "
                "files yourself: dot -Tsvg results/graph_modules.dot -o graph_modules.svg")
SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
# What graphviz's SVG uses to draw; anything else (script, foreignObject, a, image, use, ...) is dropped.
SVG_DRAWING_TAGS = {"svg", "g", "title", "desc", "polygon", "polyline", "path", "ellipse", "circle", "rect", "line",
                    "text", "tspan", "defs", "linearGradient", "radialGradient", "stop"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class GraphvizMissing(RuntimeError):
    """The `dot` program is not on PATH."""


class RenderFailed(RuntimeError):
    """`dot` ran but produced no SVG (bad source, timeout); the message says why."""


def escape_label_line(text: str) -> str:
    """One line of a DOT double-quoted label shown literally: backslash and quote escaped, control characters
    (newlines included) made spaces."""
    return _CONTROL.sub(" ", text).replace("\\", "\\\\").replace('"', '\\"')


def quoted_label(lines: List[str]) -> str:
    """A DOT double-quoted string of several literal lines (centred)."""
    return '"' + "\\n".join(escape_label_line(line) for line in lines if line) + '"'


def module_graph_dot(graph: ModuleGraph) -> str:
    """DOT source of a module graph: modules as rounded boxes (a collapsed run doubly framed), merging ops as
    small ellipses, input and output green, nodes boxed by the module they run in (where it holds two or more)."""
    node_ids = {node.key: f"n{i}" for i, node in enumerate(graph.nodes)}
    tree = _group_tree(graph)
    cluster_ids = {name: f"cluster_{i}" for i, name in enumerate(sorted(tree))}
    lines = [
        "digraph modules {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.25, ranksep=0.3, labeljust=l, '
        'color="#b8c4d6", style=rounded];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#3b6fb6", fontname="Helvetica", '
        'fontsize=10, margin="0.12,0.04"];',
        '  edge [color="#66707a", arrowsize=0.6];',
    ]
    members = {name: [] for name in tree}
    for node in graph.nodes:
        members[_nearest_group(node.owner, tree)].append(node)

    def emit(group: str, pad: str) -> None:
        lines.extend(pad + _node_statement(node, node_ids[node.key]) for node in members[group])
        for child in tree[group]:
            title = f"{child} · {graph.groups.get(child, '')}"
            lines.append(f"{pad}subgraph {cluster_ids[child]} {{")
            lines.append(f"{pad}  label={quoted_label([title])};")
            emit(child, pad + "  ")
            lines.append(pad + "}")

    emit("", "  ")
    lines.extend(f"  {node_ids[a]} -> {node_ids[b]};" for a, b in graph.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_statement(node: GraphNode, node_id: str) -> str:
    if node.kind in ("input", "output"):
        return (f'{node_id} [label={quoted_label([node.kind, node.shape])}, shape=oval, fillcolor="#e3f4e6", '
                f'color="#2e8b57"];')
    if node.kind == "op":
        return (f'{node_id} [label={quoted_label([node.type])}, shape=ellipse, fillcolor="#f4f4f4", '
                f'color="#999999", fontsize=9, height=0.3];')
    if node.count > 1:
        lines = [f"{node.members[0]} … {node.members[-1]}", f"{node.type} ×{node.count}", node.shape]
        return f"{node_id} [label={quoted_label(lines)}, peripheries=2];"
    return f"{node_id} [label={quoted_label([node.key, node.type, node.shape])}];"


def _group_tree(graph: ModuleGraph) -> Dict[str, List[str]]:
    """Group name -> its child groups, for the modules holding at least two drawn nodes ("" is the whole page).
    A group's parent is its nearest kept ancestor."""
    counts: Dict[str, int] = {}
    for node in graph.nodes:
        name = node.owner
        while name:
            counts[name] = counts.get(name, 0) + 1
            name = parent_of(name)
    tree: Dict[str, List[str]] = {"": []}
    tree.update({name: [] for name, count in counts.items() if count >= 2})
    for name in sorted(tree, key=lambda n: (n.count("."), n)):
        if name:
            tree[_nearest_group(parent_of(name), tree)].append(name)
    return tree


def _nearest_group(name: str, tree: Dict[str, List[str]]) -> str:
    """`name` if it is a group, else its nearest ancestor that is ("" at the top)."""
    while name and name not in tree:
        name = parent_of(name)
    return name


def find_dot() -> Optional[str]:
    """Path of graphviz's `dot` program, None when it is not installed."""
    return shutil.which("dot")


def render_svg(source: str, timeout_s: float = 60.0) -> bytes:
    """Lay out DOT source with `dot -Tsvg` and return the cleaned SVG. GraphvizMissing without `dot`;
    RenderFailed when it errs or runs past `timeout_s` (the process is killed)."""
    dot = find_dot()
    if dot is None:
        raise GraphvizMissing(INSTALL_HINT)
    try:
        done = subprocess.run([dot, "-Tsvg"], input=source.encode("utf-8", errors="replace"), capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderFailed(f"graphviz dot took longer than {timeout_s:g} s (analysis.graph.dot_timeout_s)") \
            from exc
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise RenderFailed(f"graphviz dot failed (exit {done.returncode}): {message[0] if message else ''}")
    return sanitize_svg(done.stdout)


def sanitize_svg(data: bytes) -> bytes:
    """Keep only drawing elements and their presentation attributes: no scripts, event handlers, links or
    external references. Parsed as XML, so the result is well-formed."""
    ET.register_namespace("", SVG_NS)
    ET.register_namespace("xlink", XLINK_NS)
    root = ET.fromstring(_without_doctype(data))
    _clean(root)
    return b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n' + ET.tostring(root, encoding="utf-8",
                                                                                    xml_declaration=False)


def _without_doctype(data: bytes) -> bytes:
    """graphviz writes a public DOCTYPE; without it no entity can be declared or fetched."""
    return re.sub(rb"<!DOCTYPE[^>\[]*(\[[^\]]*\])?\s*>", b"", data, count=1)


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _clean(element: ET.Element) -> None:
    for child in list(element):
        if isinstance(child.tag, str) and _local(child.tag) in SVG_DRAWING_TAGS:
            _clean(child)
        else:
            element.remove(child)
    for attribute in list(element.attrib):
        name = _local(attribute).lower()
        value = re.sub(r"\s+", "", element.attrib[attribute]).lower()
        external = "url(" in value and "url(#" not in value
        if name.startswith("on") or name == "href" or "javascript:" in value or external:
            del element.attrib[attribute]


def svg_size(data: bytes) -> Tuple[int, int]:
    """The drawing's natural (width, height) in CSS pixels, from the root's width/height (graphviz writes points);
    (0, 0) when they are missing."""
    head = data[:4000].decode("utf-8", errors="replace")
    root = re.search(r"<svg\b[^>]*>", head)
    width = re.search(r'\swidth="([\d.]+)(pt|px)?"', root.group(0)) if root else None
    height = re.search(r'\sheight="([\d.]+)(pt|px)?"', root.group(0)) if root else None
    if not (width and height):
        return 0, 0
    to_px = {"pt": 4 / 3, None: 4 / 3, "px": 1.0}
    return (round(float(width.group(1)) * to_px[width.group(2)]),
            round(float(height.group(1)) * to_px[height.group(2)]))
