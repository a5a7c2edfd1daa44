"""`graph`: module graph nodes and edges (fx and the call-order fallback), repeated-block collapse, node caps,
graphviz rendering, escaping of hostile names, the report without graphviz, and the analysis end to end."""
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from reportgen.analyses._dot import escape_label_line, find_dot, module_graph_dot, render_svg, sanitize_svg, svg_size
from reportgen.analyses._modulegraph import ModuleGraph, build_module_graph, shape_text
from reportgen.analyses.graph import (AUTOGRAD_DOT, MODULES_DOT, GraphAnalysis, GraphConfig, autograd_graph_dot,
                                      probe_with_calls)
from reportgen.engine.capture import count_hooks
from reportgen.inputs.demo.models import demo_vit
from reportgen.report.elements import Alert, Graph
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config
from tests.tiny_models import TinyNet

needs_dot = pytest.mark.skipif(find_dot() is None, reason="graphviz `dot` is not installed")
EVIL_NAME = 'evil"<script>alert(1)</script>\\N'


class Residual(nn.Module):
    """x + conv_b(act(conv_a(x))): one skip connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_b(self.act(self.conv_a(x)))


class ResidualNet(nn.Module):
    """(B, 3, H, W) -> (B, 3): stem, one residual block, pool, flatten (folded into an edge), head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = Residual(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.class_names = ["red", "green", "blue"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))  # (B, 4, H, W)
        return self.fc(self.pool(x).flatten(1))  # (B, 3)


class DataDependent(nn.Module):
    """Branches on a tensor value: torch.fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else -self.conv(x)


class BranchingNet(ResidualNet):
    """The model's own forward branches on a value: the whole graph falls back to call order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.abs().sum() >= 0:  # always true, but a tensor value: fx cannot know
            x = self.block(x)
        return self.fc(self.pool(x).flatten(1))


class InnerBranchNet(ResidualNet):
    """Only `inner` cannot be traced: it becomes one node, the rest keeps fx edges."""

    def __init__(self):
        super().__init__()
        self.inner = DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x) + self.inner(x)
        return self.fc(self.pool(x).flatten(1))


class Evil(nn.Module):
    """A block whose class name and attribute name (below) are hostile strings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


Evil.__name__ = 'Evil"<img src=x onerror=alert(2)>'


class EvilNet(ResidualNet):
    """ResidualNet behind a hostile-named block."""

    def __init__(self):
        super().__init__()
        self.add_module(EVIL_NAME, Evil())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(getattr(self, EVIL_NAME)(x))


def residual_net() -> ResidualNet:
    """Hydra `_target_` for the end-to-end test."""
    return ResidualNet().eval()


def module_graph(model: nn.Module, size: int = 8, **options) -> ModuleGraph:
    x = torch.rand(1, 3, size, size)
    output, calls, error = probe_with_calls(model.eval(), x, with_grad=False)
    assert not error
    return build_module_graph(model, calls, shape_text(x), shape_text(output), **options)


def keys(graph: ModuleGraph) -> list:
    return [n.key for n in graph.nodes]


def test_residual_model_has_exactly_its_modules_and_data_flow_edges():
    graph = module_graph(ResidualNet(), depth=2)
    assert graph.method == "fx" and not graph.notes
    assert keys(graph) == ["input", "stem", "block.conv_a", "block.act", "block.conv_b", "add", "pool", "fc",
                           "output"]
    assert set(graph.edges) == {("input", "stem"), ("stem", "block.conv_a"), ("block.conv_a", "block.act"),
                                ("block.act", "block.conv_b"), ("block.conv_b", "add"), ("stem", "add"),
                                ("add", "pool"), ("pool", "fc"), ("fc", "output")}
    assert len(graph.edges) == 9
    assert graph.node("stem").shape == "1×4×8×8" and graph.node("fc").shape == "1×3"
    assert graph.node("add").kind == "op" and graph.node("add").owner == "block"
    assert graph.node("block.conv_a").type == "Conv2d" and graph.groups == {"block": "Residual"}


def test_depth_one_draws_the_block_as_one_node():
    graph = module_graph(ResidualNet(), depth=1)
    assert keys(graph) == ["input", "stem", "block", "pool", "fc", "output"]
    assert graph.edges == [("input", "stem"), ("stem", "block"), ("block", "pool"), ("pool", "fc"),
                           ("fc", "output")]


def test_reused_module_has_one_node_per_call_and_is_not_collapsed():
    graph = module_graph(TinyNet(), depth=2)
    assert keys(graph) == ["input", "conv", "act", "shared", "shared#2", "pool", "fc", "output"]
    assert ("shared", "shared#2") in graph.edges and graph.node("shared#2").count == 1


def test_identical_resnet18_blocks_collapse_at_depth_two():
    model = torchvision.models.resnet18(weights=None)
    graph = module_graph(model, size=32, depth=2)
    first = graph.node("layer1.0")
    assert (first.type, first.members, first.shape) == ("BasicBlock", ["layer1.0", "layer1.1"], "1×64×8×8")
    assert "layer1.1" not in keys(graph)
    assert {"layer2.0", "layer2.1", "layer3.0", "layer4.1"} <= set(keys(graph))  # layerN.0 downsamples: differs
    assert ("maxpool", "layer1.0") in graph.edges and ("layer1.0", "layer2.0") in graph.edges
    assert "BasicBlock ×2" in module_graph_dot(graph)
    expanded = module_graph(model, size=32, depth=2, collapse_repeats=False)
    assert ("layer1.0", "layer1.1") in expanded.edges and len(expanded.nodes) == len(graph.nodes) + 1


def test_vit_encoder_blocks_collapse_at_depth_three():
    graph = module_graph(demo_vit(pretrained=False), size=64, depth=3)
    blocks = [n for n in graph.nodes if n.type == "EncoderBlock"]
    assert len(blocks) == 1 and blocks[0].count == 4
    assert blocks[0].members == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert keys(graph) == ["input", "conv_proj", "encoder.dropout", "encoder.layers.encoder_layer_0", "encoder.ln",
                           "heads.head", "output"]
    at_two = module_graph(demo_vit(pretrained=False), size=64, depth=2)
    assert at_two.node("encoder.layers").type == "Sequential (EncoderBlock ×4)"


def test_untraceable_forward_falls_back_to_call_order_with_a_note():
    graph = module_graph(BranchingNet(), depth=2)
    assert graph.method == "hooks"
    assert any("could not trace" in note and "chain" in note for note in graph.notes)
    order = ["input", "stem", "block.conv_a", "block.act", "block.conv_b", "pool", "fc", "output"]
    assert keys(graph) == order and graph.edges == list(zip(order, order[1:]))


def test_untraceable_submodule_becomes_one_node_and_the_rest_keeps_fx_edges():
    graph = module_graph(InnerBranchNet(), depth=2)
    assert graph.method == "fx" and any("inner" in note for note in graph.notes)
    assert graph.node("inner").type == "DataDependent"
    assert {("stem", "inner"), ("inner", "add_1"), ("add", "add_1")} <= set(graph.edges)


def test_node_cap_lowers_the_depth_then_cuts_with_notes():
    model = torchvision.models.resnet18(weights=None)
    graph = module_graph(model, size=32, depth=3, max_nodes=30)
    assert graph.depth == 2 and len(graph.nodes) <= 30
    assert any("depth 2 instead of 3" in note for note in graph.notes)
    tiny = module_graph(model, size=32, depth=1, max_nodes=5)
    assert len(tiny.nodes) == 5 and any("first 5 nodes" in note for note in tiny.notes)
    assert all(a in keys(tiny) and b in keys(tiny) for a, b in tiny.edges)


def test_probe_restores_requires_grad_mode_and_hooks():
    model = ResidualNet().train()
    model.stem.weight.requires_grad_(False)
    output, calls, error = probe_with_calls(model, torch.rand(1, 3, 8, 8), with_grad=True)
    assert not error and output.grad_fn is not None
    assert not model.stem.weight.requires_grad and model.fc.weight.requires_grad
    assert model.training and count_hooks(model) == 0
    assert [c.key for c in calls] == ["stem", "block", "block.conv_a", "block.act", "block.conv_b", "pool", "fc"]


def test_autograd_graph_names_parameters_and_respects_its_cap():
    model = torchvision.models.resnet18(weights=None).eval()
    output, _, _ = probe_with_calls(model, torch.rand(1, 3, 32, 32), with_grad=True)
    source, count, note = autograd_graph_dot(model, output, max_nodes=3000)
    assert "conv1.weight" in source and "layer4.1.bn2.bias" in source and not note
    assert 150 < count < 3000
    omitted, same_count, why = autograd_graph_dot(model, output, max_nodes=100)
    assert omitted is None and same_count == count and "max_autograd_nodes" in why


def test_densely_connected_autograd_graph_gets_the_fast_layout():
    model = torchvision.models.densenet121(weights=None).eval()
    output, _, _ = probe_with_calls(model, torch.rand(1, 3, 32, 32), with_grad=True)
    source, count, note = autograd_graph_dot(model, output, max_nodes=3000)
    assert "splines=line" in source and "nslimit" in source and "straight" in note
    resnet = torchvision.models.resnet18(weights=None).eval()
    output, _, _ = probe_with_calls(resnet, torch.rand(1, 3, 32, 32), with_grad=True)
    source, _, note = autograd_graph_dot(resnet, output, max_nodes=3000)
    assert "splines" not in source and not note


def test_label_escaping():
    assert escape_label_line('a"b\\c\nd') == 'a\\"b\\\\c d'


@needs_dot
def test_resnet18_graphs_render_to_svg():
    model = torchvision.models.resnet18(weights=None).eval()
    svg = render_svg(module_graph_dot(module_graph(model, size=32, depth=2)))
    assert svg.startswith(b"<?xml") and b"<svg" in svg and b"BasicBlock" in svg
    width, height = svg_size(svg)
    assert width > 50 and height > 300
    output, _, _ = probe_with_calls(model, torch.rand(1, 3, 32, 32), with_grad=True)
    autograd_svg = render_svg(autograd_graph_dot(model, output, 3000)[0])
    assert b"conv1.weight" in autograd_svg and b"<svg" in autograd_svg


@needs_dot
def test_hostile_names_neither_break_the_dot_source_nor_inject_markup():
    model = EvilNet().eval()
    graph = module_graph(model, depth=1)
    assert graph.node(EVIL_NAME).shape == "1×3×8×8"
    source = module_graph_dot(graph)
    assert 'evil\\"<script>alert(1)</script>\\\\N' in source
    output, _, _ = probe_with_calls(model, torch.rand(1, 3, 8, 8), with_grad=True)
    autograd_source = autograd_graph_dot(model, output, 3000)[0]
    for dot_source, shown in ((source, [EVIL_NAME, Evil.__name__]), (autograd_source, ['evil"<script>'])):
        root = ET.fromstring(render_svg(dot_source))  # RenderFailed if the source did not parse
        tags = {element.tag.rsplit("}", 1)[-1] for element in root.iter()}
        assert not tags & {"script", "img", "a", "foreignObject"}
        assert not [name for element in root.iter() for name in element.attrib if name.lower().startswith("on")]
        texts = "\n".join(element.text or "" for element in root.iter())
        assert all(text in texts for text in shown)  # shown literally, as text


def test_sanitize_svg_keeps_drawing_and_drops_active_content():
    hostile = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10pt" height="20pt" '
               b'onload="alert(1)"><script>alert(2)</script><g id="a" onclick="alert(3)"><text>hi</text>'
               b'<polygon fill="url(http://x/y)" stroke="url(#ok)" points="0,0"/></g>'
               b'<a href="javascript:alert(4)"><text>link</text></a><foreignObject><div>x</div></foreignObject>'
               b'</svg>')
    clean = sanitize_svg(hostile)
    assert not re.search(rb"script|onload|onclick|javascript|foreignObject|http://x", clean)
    assert b"<text>hi</text>" in clean and b'stroke="url(#ok)"' in clean
    assert svg_size(clean) == (13, 27)


def analysis_section(tmp_path, model: nn.Module, **options):
    """The graph section for `model`, through begin and finalize as the pipeline calls them."""
    cfg = GraphConfig(**options)
    ctx = SimpleNamespace(model=model.eval(), results_dir=tmp_path)
    analysis = GraphAnalysis(cfg, ctx)
    inputs = torch.rand(2, 3, 8, 8)
    analysis.begin(SimpleNamespace(inputs=inputs))
    return analysis.finalize()


def test_without_graphviz_the_section_says_how_to_install_it_and_links_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_dot() is None
    section = analysis_section(tmp_path, ResidualNet())
    hint = [e for e in section.elements if isinstance(e, Alert)]
    assert len(hint) == 1 and "apt-get install graphviz" in hint[0].message and "brew install graphviz" in \
        hint[0].message and "conda install graphviz" in hint[0].message
    graphs = [e for e in section.elements if isinstance(e, Graph)]
    assert [(g.svg, g.dot_file) for g in graphs] == [(None, MODULES_DOT), (None, AUTOGRAD_DOT)]
    assert all("not installed" in g.note for g in graphs)
    assert (tmp_path / MODULES_DOT).is_file() and (tmp_path / AUTOGRAD_DOT).is_file()
    assert section.alerts and section.alerts[0].level == "info"


@needs_dot
def test_end_to_end_report_shows_both_graphs_and_saves_dot_files(colour_folder, tmp_path):
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[graph]",
                                 "model.target._target_=tests.test_graph.residual_net", "analysis.graph.depth=1"])
    index = run(cfg, out_dir=tmp_path / "run")
    html = index.read_text(encoding="utf-8")
    results = tmp_path / "run" / "results"
    modules_dot = (results / MODULES_DOT).read_text(encoding="utf-8")
    assert "stem" in modules_dot and "Residual" in modules_dot and "n1 -> n2;" in modules_dot
    autograd_dot = (results / AUTOGRAD_DOT).read_text(encoding="utf-8")
    assert "stem.weight" in autograd_dot and "block.conv_b.bias" in autograd_dot
    assert "Module graph" in html and "Autograd graph" in html and 'class="graph-view"' in html
    assets = re.findall(r'<img src="(assets/graph-[a-z]+-\d+\.svg)"', html)
    assert len(assets) == 2 and all((index.parent / a).read_bytes().startswith(b"<?xml") for a in assets)
    assert f'href="../results/{MODULES_DOT}"' in html and f'href="../results/{AUTOGRAD_DOT}"' in html


def test_end_to_end_without_graphviz_keeps_the_rest_of_the_report(colour_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = compose_config(TINY + [f"dataset.root={colour_folder}", "analysis=[graph,predictions]"])
    html = run(cfg, out_dir=tmp_path / "run").read_text(encoding="utf-8")
    assert "apt-get install graphviz" in html and "Predictions" in html
    assert f'href="../results/{MODULES_DOT}"' in html and 'class="graph-view"' not in html
