"""The package layout, read from the source: imports point one way between layers, there is no import cycle, and
exactly one module registers hooks. Imports inside functions and under TYPE_CHECKING count too."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parent.parent / "reportgen"
HOOK_CALLS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
              "register_backward_hook", "register_full_backward_pre_hook", "register_hook"}
PRESENTATION = ("reportgen.report.elements", "reportgen.report.plots", "reportgen.report.overlays",
                "reportgen.report.thumbnails", "reportgen.report.segmentation_overlays",
                "reportgen.report.detection_drawing")
LOWER = ("reportgen.errors", "reportgen.config.schema")
# module prefix -> the reportgen modules (prefixes) it may import; the first matching prefix decides
ALLOWED = [
    ("reportgen.errors", ()),
    ("reportgen.config.schema", ()),
    ("reportgen.inputs", LOWER + ("reportgen.inputs",)),
    ("reportgen.engine", LOWER + ("reportgen.engine",)),
    ("reportgen.state", LOWER + ("reportgen.state",)),
    ("reportgen.report.manifest", LOWER + ("reportgen.state.files",)),
    (PRESENTATION, LOWER + PRESENTATION),
    ("reportgen.analyses", LOWER + ("reportgen.inputs", "reportgen.engine", "reportgen.state", "reportgen.analyses")
     + PRESENTATION),
    ("reportgen.report", LOWER + ("reportgen.inputs", "reportgen.state", "reportgen.report")),
    ("reportgen.config", LOWER + ("reportgen.config", "reportgen.inputs", "reportgen.engine", "reportgen.analyses")),
    ("reportgen.runs", ("reportgen",)),
    ("reportgen.merge", ("reportgen.runs.merge",)),
    ("reportgen.index", ("reportgen.report.sweep",)),
    ("reportgen.compare", ("reportgen.runs.compare",)),
    ("reportgen.__main__", ("reportgen.runs.cli",)),
    ("reportgen", ()),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: Set[str]) -> Set[str]:
    """The reportgen modules `name` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith("reportgen") and t != name)
    return found


def allowed_for(name: str):
    for prefix, allowed in ALLOWED:
        prefixes = prefix if isinstance(prefix, tuple) else (prefix,)
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return allowed
    raise AssertionError(f"{name} belongs to no layer of the table")


def matches(target: str, prefixes) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_imports_point_one_way_between_layers():
    trees = modules()
    wrong = []
    for name, tree in trees.items():
        allowed = allowed_for(name)
        for target in sorted(imported(name, tree, set(trees))):
            if not matches(target, allowed):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    trees = modules()
    edges = {name: imported(name, tree, set(trees)) & set(trees) for name, tree in trees.items()}
    state: Dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_only_the_engine_registers_hooks():
    owners = {name for name, tree in modules().items()
              if any(isinstance(n, ast.Attribute) and n.attr in HOOK_CALLS for n in ast.walk(tree))}
    assert owners == {"reportgen.engine.capture"}


def test_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    assert len([p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]) >= 4
