"""`summary`: the architecture as a per-module-call table with shapes, parameters and true FLOPs.

One probe forward of a single image runs under `torch.utils.flop_counter.FlopCounterMode`, so matmuls inside
attention count (torchinfo's module-based MACs miss them). Counted: matrix multiplies, convolutions and attention,
1 multiply-add = 2 FLOPs; not counted: element-wise ops, norms, softmax, pooling, bias adds. The probe runs with
nn.MultiheadAttention's fused fast path off and formulas for the CPU attention kernels (see `_flops`), and with
frozen parameters (FlopCounterMode's module tracker fails on no_grad views of parameters, timm PiT / CaiT); an
attention- or matmul-like op it still has no formula for is named in an alert. Each module call gets its own row: a
pre-hook reads the running FLOP total, the post-hook takes the difference, so a reused module's calls are counted
separately and exactly. Parameters are counted once per tensor, so tied weights are not double counted.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reportgen.analyses._flops import COUNTED, counting, flop_counter
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.engine.capture import ModuleProbe, shape_text
from reportgen.report.elements import Alert, KeyValues, Section, Table, Text
from reportgen.state.files import human_bytes, write_json


@dataclass
class SummaryConfig:
    depth: int = 3  # module tree depth shown in the report table (the CSV has every module)
    max_rows: int = 400  # rows shown in the page; the CSV has all


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts of a module and its children, each shared tensor counted once."""
    seen: Dict[int, nn.Parameter] = {}
    for param in module.parameters():  # parameters() already yields a tied tensor once
        seen[id(param)] = param
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return total, trainable


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _flops_so_far(counter: FlopCounterMode) -> int:
    return int(sum(counter.flop_counts["Global"].values()))


def profile_modules(model: nn.Module, example: torch.Tensor) -> tuple[List[Dict[str, Any]], int, Dict[str, int]]:
    """Rows (one per module call, in call order), the total FLOPs of one forward of `example`, and {op: calls} of
    the attention- or matmul-like ops that ran without a FLOP formula (empty when the total is complete)."""
    rows: List[Dict[str, Any]] = []
    started: Dict[str, tuple] = {}  # call key -> (its row, FLOPs counted when it started)
    counter = flop_counter()
    params = {id(m): count_parameters(m) for m in model.modules()}

    def start(key: str, name: str, module: nn.Module, args: Any) -> None:
        row = {"name": key, "type": type(module).__name__, "depth": name.count(".") + 1,
               "input_shape": shape_text(args), "params": params[id(module)][0],
               "trainable_params": params[id(module)][1]}
        rows.append(row)
        started[key] = (row, _flops_so_far(counter))

    def end(key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        row, flops_before = started.pop(key)
        row["output_shape"] = shape_text(output)
        row["flops"] = _flops_so_far(counter) - flops_before
        row["output_bytes"] = _bytes(output)

    with ModuleProbe(model, start, end, freeze=True), torch.no_grad(), counting(counter) as uncounted:
        model(example)
    return rows, _flops_so_far(counter), dict(sorted(uncounted.items()))


@register("summary")
class Summary(Analysis):
    Config = SummaryConfig
    title = "Architecture summary"

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.rows: List[Dict[str, Any]] = []
        self.totals: Dict[str, Any] = {}
        self.error: Optional[str] = None

    def begin(self, example: Batch) -> None:
        model = self.ctx.model
        total, trainable = count_parameters(model)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        self.totals = {
            "model": type(model).__name__, "input_shape": list(example.inputs.shape[1:]),
            "params": total, "trainable_params": trainable, "param_bytes": param_bytes, "buffer_bytes": buffers,
        }
        try:
            self.rows, flops, uncounted = profile_modules(model, example.inputs[:1])
            self.totals["flops_per_image"] = flops
            if uncounted:
                self.totals["flops_uncounted_ops"] = uncounted
        except Exception as exc:  # a model FlopCounterMode cannot trace still gets its parameter counts
            self.error = f"{type(exc).__name__}: {exc}"
        self._write_results()

    def _write_results(self) -> None:
        columns = ["name", "type", "depth", "input_shape", "output_shape", "params", "trainable_params", "flops",
                   "output_bytes"]
        with open(self.ctx.results_dir / "summary.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        write_json(self.ctx.results_dir / "summary.json", self.totals)

    def state_dict(self) -> Dict[str, Any]:
        return {"rows": self.rows, "totals": self.totals, "error": self.error}

    def merge(self, state: Dict[str, Any]) -> None:
        if not self.totals:  # every shard profiles the same model; keep the first
            self.rows, self.totals, self.error = state["rows"], state["totals"], state["error"]

    def finalize(self) -> Optional[Section]:
        t = self.totals
        section = Section(id="summary", title="Architecture summary")
        if not t:
            section.elements.append(Text("No image was processed, so the model was not profiled."))
            return section
        flops = t.get("flops_per_image")
        section.summary = (f"{t['params']:,} parameters"
                           + (f", {flops / 1e9:.3g} GFLOPs per image" if flops is not None else ""))
        facts = [("model class", t["model"]), ("input", "×".join(str(d) for d in t["input_shape"])),
                 ("parameters", f"{t['params']:,}"), ("trainable", f"{t['trainable_params']:,}"),
                 ("parameter memory", human_bytes(t["param_bytes"])),
                 ("buffer memory", human_bytes(t["buffer_bytes"]))]
        if flops is not None:
            facts.append(("FLOPs per image", f"{flops:,} ({flops / 1e9:.3g} G; 1 multiply-add = 2 FLOPs)"))
        section.elements.append(KeyValues(facts))
        if flops is not None:
            section.elements.append(Text(f"FLOPs counted (torch.utils.flop_counter, one image): {COUNTED}."))
        uncounted = t.get("flops_uncounted_ops") or {}
        if uncounted:
            ops = ", ".join(f"{op} ({calls} calls)" for op, calls in uncounted.items())
            section.alerts.append(Alert("warning", f"The FLOP count is low: {ops} ran without a FLOP formula, so "
                                                   f"their multiply-adds are not in it"))
        if self.error:
            section.alerts.append(Alert("warning", f"Per-module profiling failed, only totals are shown: "
                                                   f"{self.error}"))
        shown = [r for r in self.rows if r["depth"] <= int(self.cfg.depth)]
        rows = [[r["name"], r["type"], r["input_shape"], r.get("output_shape", ""), r["params"],
                 r["trainable_params"], r.get("flops", 0), r.get("output_bytes", 0), r["depth"]] for r in shown]
        section.elements.append(Table(
            ["module", "type", "input", "output", "params", "trainable", "FLOPs", "output bytes", "depth"], rows,
            caption=f"Module calls to depth {self.cfg.depth} ({len(shown)} of {len(self.rows)} rows; a reused "
                    f"module has one row per call, e.g. name#2)",
            max_rows=int(self.cfg.max_rows), csv="summary.csv", indent=8))
        return section


