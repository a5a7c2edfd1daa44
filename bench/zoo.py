"""Model zoo: the default report on every torchvision classifier, one small model of each timm architecture family
and transformers classifiers built offline from small configs, each report checked against independent numbers.

    python bench/zoo.py                                   # all three lists (bench/zoo_models.py), random weights
    python bench/zoo.py --only torchvision                # one library (torchvision | timm | hf, or a comma list)
    python bench/zoo.py --only timm --models resnet18,vit_tiny_patch16_224 --timeout 300
    python bench/zoo.py --keep outputs/zoo                # keep every run folder (report, results, log)

Each model runs in its own process (`--jobs` at a time, default 1), so a crash, a hang or a memory blow-up costs
that model only: the report (`reportgen.runs.pipeline.run`, the config's default analyses plus `attention`, on 4
generated photo-like images, batch 4, no workers) and then, in the same process, the oracles on the model as its
library builds it: parameters (`sum(p.numel())`), FLOPs (`FlopCounterMode` on one image at the report's input
size, a plain grad-enabled forward under the math attention kernel, so every matmul of the attention is an op it
has a formula for), the deepest spatial grid any module outputs (forward hooks) and the attention ops the forward
calls (scaled_dot_product_attention, softmax over a token axis, nn.MultiheadAttention). What the report says is
read back from its files: results/summary.json, gradcam.npz, attention.npz, manifest.json and the section subtitles
and alerts of report/index.html.

Writes bench/zoo_results.csv (every field, the error's first line included) and bench/zoo_results.md (totals per
library, then one row per model and the list of failed or flagged models). Rows of models not run this time are
kept from the previous CSV (`--fresh` drops them), so the lists can be run one at a time.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo_models import HF_SIZE, ZooModel, all_models, build_hf_folder  # noqa: E402

LIBRARIES = ("torchvision", "timm", "hf")
FLOPS_TOLERANCE = 0.02  # |report / oracle - 1| above this is flagged
BENIGN_ALERTS = ("random (untrained) weights", "No folder name matches", "top-1 probability under")
FIELDS = ["library", "model", "family", "status", "error", "seconds", "task", "input", "params_report",
          "params_library", "gflops_report", "gflops_library", "flops_diff_pct", "gradcam_layer", "cam_shape",
          "deepest_grid",
          "cams", "cams_zero", "cams_nonfinite", "attention_report", "attention_layers", "attention_ops",
          "timings", "slowest_finalize", "alerts", "flags"]


# ------------------------------------------------------------------------------------------------ the image folder


def make_images(root: Path) -> Path:
    """4 photo-like images in 2 class folders: a sky-to-ground gradient, overlapping shapes, blur and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    sizes = [(320, 240), (256, 256), (240, 320), (400, 300)]
    for i, (width, height) in enumerate(sizes):
        folder = root / ("ball" if i % 2 == 0 else "kite")
        folder.mkdir(parents=True, exist_ok=True)
        top, bottom = rng.integers(40, 230, 3), rng.integers(20, 200, 3)
        ramp = np.linspace(0, 1, height)[:, None, None]  # (H, 1, 1)
        pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))  # (H, W, 3)
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            w, h = int(rng.integers(30, width // 2)), int(rng.integers(30, height // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if i % 2 == 0:
                draw.ellipse([x, y, x + w, y + h], fill=colour)
            else:
                draw.polygon([(x, y + h), (x + w // 2, y), (x + w, y + h)], fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(1.2))
        noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{folder.name}_{i}.jpg", quality=90)
    return root


# -------------------------------------------------------------------------------------------- the child: one model


def overrides_for(model: ZooModel, images: Path, model_dir: Path) -> List[str]:
    """The command-line overrides of this model's report."""
    if model.library == "torchvision":
        args = [f"model={model.name}", "model.weights=null"]
    elif model.library == "timm":
        args = ["model=timm", f"model.name={model.name}", "model.weights=null"]
    else:
        args = ["model=hf", f"model.path={model_dir}"]
    args += [f"+model.kwargs.{key}={json.dumps(value)}" for key, value in model.kwargs.items()]
    if model.size:
        args += [f"model.preprocess.resize={round(model.size / 0.875)}", f"model.preprocess.crop={model.size}"]
    return args + [f"dataset.root={images}", "runtime.num_workers=0", "runtime.progress=false",
                   "runtime.batch_size=4"]


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from reportgen.config.store import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def error_line(exc: BaseException) -> str:
    """`Type: first line` and the innermost reportgen frame (where to look), or the innermost frame at all."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/reportgen/" in f.filename] or frames
    if ours:
        frame = ours[-1]
        where = Path(frame.filename)
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else Path(*where.parts[-2:])
        text += f" [{where}:{frame.lineno}]"
    return text[:400]


def library_model(model: ZooModel, model_dir: Path):
    """The model as its library builds it (the oracle's copy), in eval mode."""
    if model.library == "torchvision":
        import torchvision
        module = torchvision.models.get_model(model.name, weights=None, **model.kwargs)
    elif model.library == "timm":
        import timm
        module = timm.create_model(model.name, pretrained=False, **model.kwargs)
    else:
        import transformers
        module = transformers.AutoModelForImageClassification.from_pretrained(str(model_dir))
    return module.eval()


def _grid_of(value: Any) -> Optional[int]:
    """The side of the square spatial grid an output holds: (B, C, k, k), (B, k, k, C), or (B, N, C) tokens with
    N = k*k (+ up to 8 prefix tokens); None otherwise."""
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    shape = tuple(value.shape)
    if len(shape) == 4:
        if shape[2] == shape[3]:
            return shape[2]
        if shape[1] == shape[2]:
            return shape[1]
    if len(shape) == 3:
        for prefix in range(9):
            k = math.isqrt(max(shape[1] - prefix, 0))
            if k >= 2 and k * k == shape[1] - prefix:
                return k
    return None


def oracle(model: ZooModel, model_dir: Path, input_shape: List[int]) -> Dict[str, Any]:
    """Parameters, FLOPs of one image, the deepest grid >= 2x2 of any module output, and the attention ops."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = library_model(model, model_dir)
    out: Dict[str, Any] = {"params_library": sum(p.numel() for p in module.parameters())}
    x = torch.rand(1, *input_shape)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x)
    out["gflops_library"] = counter.get_total_flops() / 1e9

    grids: List[int] = []
    ops = {"sdpa": 0, "softmax": 0}

    class AttentionOps(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "scaled_dot_product_attention":
                ops["sdpa"] += 1
            elif name in ("softmax", "_softmax") and args and isinstance(args[0], torch.Tensor):
                tensor = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if isinstance(dim, int) and tensor.dim() >= 3 and tensor.shape[dim] >= 4:  # over tokens, not
                    ops["softmax"] += 1  # over 2 SK / ResNeSt branches
            return func(*args, **kwargs)

    def hook(_module, _inputs, output):
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        k = _grid_of(first)
        if k is not None and k >= 2:
            grids.append(k)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad(), AttentionOps():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    mha = sum(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules())
    out["deepest_grid"] = f"{min(grids)}x{min(grids)}" if grids else ""
    parts = [f"{n} {kind}" for kind, n in (("MHA", mha), ("sdpa", ops["sdpa"]), ("softmax", ops["softmax"])) if n]
    out["attention_ops"] = ", ".join(parts)
    return out


def read_report(run_dir: Path) -> Dict[str, Any]:
    """What the report says: summary.json, gradcam.npz, attention.npz, the page's subtitles and alerts."""
    results = run_dir / "results"
    row: Dict[str, Any] = {}
    summary = json.loads((results / "summary.json").read_text()) if (results / "summary.json").exists() else {}
    if summary:
        row["params_report"] = summary.get("params")
        flops = summary.get("flops_per_image")
        row["gflops_report"] = flops / 1e9 if flops is not None else None
        row["input"] = "x".join(str(v) for v in summary.get("input_shape", []))
        row["input_shape"] = summary.get("input_shape")
    manifest = results / "manifest.json"
    if manifest.exists():
        facts = json.loads(manifest.read_text())
        row["task"] = facts.get("model", {}).get("task", "")
        timings = facts.get("timings_s", {})
        row["timings"] = ", ".join(f"{k} {timings[k]:.1f}" for k in ("model", "probes", "pass", "finalize")
                                   if k in timings)
    if (results / "gradcam.npz").exists():
        with np.load(results / "gradcam.npz", allow_pickle=False) as cams:
            maps = cams["cams"]  # (N, h, w)
            row["gradcam_layer"] = str(cams["layer"]) if "layer" in cams.files else ""
        row["cam_shape"] = "x".join(str(v) for v in maps.shape[1:])
        row["cams"] = int(maps.shape[0])
        finite = np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
        row["cams_nonfinite"] = int((~finite).sum())
        row["cams_zero"] = int((finite & (maps == 0).reshape(len(maps), -1).all(axis=1)).sum())
    if (results / "attention.npz").exists():
        with np.load(results / "attention.npz", allow_pickle=False) as attention:
            row["attention_layers"] = int(len(attention["layers"])) if "layers" in attention.files else 0
            if "rollout" in attention.files:
                row["attention_layers"] = f"{row['attention_layers']} + rollout"
    page = run_dir / "report" / "index.html"
    if page.exists():
        text = page.read_text(errors="replace")
        subtitles = dict(re.findall(r'<section id="(\w+)">\s*<h2>[^<]*</h2>\s*<p class="subtitle">(.*?)</p>', text,
                                    re.S))
        row["attention_report"] = html.unescape(subtitles.get("attention", "(no section)"))
        row["gradcam_report"] = html.unescape(subtitles.get("gradcam", ""))
        alerts = text[text.find('<section id="alerts">'):]
        alerts = alerts[:alerts.find("</section>")]
        found = []
        for level, message in re.findall(r'<div class="alert (\w+)"><span class="level">\w+</span>([^<]*)', alerts):
            message = html.unescape(message).strip()
            if level in ("warning", "error") and not any(b in message for b in BENIGN_ALERTS):
                found.append(f"{level}: {message}")
        row["alerts"] = " | ".join(found)
    return row


def run_child(spec: Dict[str, Any]) -> None:
    """One model: its report, then the oracles; writes <run>/row.json whatever happens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    model = ZooModel(**spec["model"])
    run_dir, images = Path(spec["run_dir"]), Path(spec["images"])
    model_dir = run_dir / "hf_model"
    row: Dict[str, Any] = {"status": "ok", "error": ""}
    row_file = run_dir / "row.json"

    def save() -> None:
        row_file.write_text(json.dumps(row, default=str))

    torch.manual_seed(0)
    try:
        if model.library == "hf":
            build_hf_folder(model.name, model_dir)
        default = list(compose([]).analysis.keys())
        cfg = compose(overrides_for(model, images, model_dir)
                      + [f"analysis=[{','.join(default + (['attention'] if 'attention' not in default else []))}]"])
        from reportgen.runs import pipeline

        finalize_s: Dict[str, float] = {}
        finalize = pipeline._finalize

        def timed_finalize(job, analysis):  # which analysis the finalize time goes to
            started = time.perf_counter()
            try:
                return finalize(job, analysis)
            finally:
                finalize_s[analysis.name] = time.perf_counter() - started

        pipeline._finalize = timed_finalize
        start = time.perf_counter()
        try:
            pipeline.run(cfg, out_dir=run_dir / "run")
        finally:
            row["seconds"] = round(time.perf_counter() - start, 1)
            if finalize_s:
                name = max(finalize_s, key=finalize_s.get)
                row["slowest_finalize"] = f"{name} {finalize_s[name]:.1f}"
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        row.update(status="failed", error=error_line(exc))
    try:
        row.update(read_report(run_dir / "run"))
    except Exception as exc:  # noqa: BLE001
        row["error"] = (row["error"] + " | " if row["error"] else "") + f"reading the report: {error_line(exc)}"
    save()  # the report's side is kept even if the oracle dies
    shape = row.pop("input_shape", None) or [3, *(2 * [model.size or default_size(model)])]
    if not row.get("input"):
        row["input"] = "x".join(map(str, shape))
    try:
        row.update(oracle(model, model_dir, shape))
    except Exception as exc:  # noqa: BLE001
        row["oracle_error"] = error_line(exc)
    save()


def default_size(model: ZooModel) -> int:
    """The input side the library would use (for the oracle when the report wrote no summary)."""
    if model.library == "hf":
        return HF_SIZE
    if model.library == "timm":
        import timm
        return int(model.kwargs.get("img_size") or timm.get_pretrained_cfg(model.name).input_size[-1])
    return 224


# ------------------------------------------------------------------------------------------- the parent: the table


def flags_of(row: Dict[str, Any]) -> List[str]:
    """What looks wrong in an ok row (an empty list: nothing)."""
    if row.get("status") != "ok":
        return []
    flags = []
    if row.get("oracle_error"):
        flags.append(f"oracle failed: {row['oracle_error']}")
    params_r, params_l = _num(row.get("params_report")), _num(row.get("params_library"))
    if params_r is None:
        flags.append("no parameter count in the report")
    elif params_l is not None and params_r != params_l:
        flags.append(f"params {int(params_r):,} vs library {int(params_l):,}")
    flops_r, flops_l = _num(row.get("gflops_report")), _num(row.get("gflops_library"))
    if flops_r is None:
        flags.append("no FLOPs in the report")
    elif flops_l:
        diff = flops_r / flops_l - 1
        row["flops_diff_pct"] = round(100 * diff, 2)
        if abs(diff) > FLOPS_TOLERANCE:
            flags.append(f"FLOPs {100 * diff:+.1f}%")
    elif flops_l == 0 and flops_r:
        flags.append("library counts 0 FLOPs")
    shape = row.get("cam_shape") or ""
    if not shape:
        if row.get("task", "classification") == "classification":  # Grad-CAM applies to classifiers only
            flags.append("no Grad-CAM maps")
    else:
        sides = [int(v) for v in shape.split("x")]
        if len(sides) != 2:
            flags.append(f"Grad-CAM map {shape} is not 2-D")
        elif sides[0] != sides[1]:
            flags.append(f"Grad-CAM map {shape} not square (square input)")
        elif sides[0] < 2:
            flags.append(f"Grad-CAM map {shape}")
        elif row.get("deepest_grid") and shape != row["deepest_grid"]:
            flags.append(f"Grad-CAM map {shape}, deepest grid {row['deepest_grid']}")
        if _num(row.get("cams_zero")):
            alerts = str(row.get("alerts") or "")
            why = [reason for reason, words in (("zero gradient", "is zero everywhere"),
                                                ("negative everywhere", "negative at every location"))
                   if words in alerts]
            flags.append(f"all-zero maps {row['cams_zero']}/{row.get('cams')}"
                         + (f" ({', '.join(why)})" if why else ""))
        if _num(row.get("cams_nonfinite")):
            flags.append(f"non-finite maps {row['cams_nonfinite']}/{row.get('cams')}")
    report = str(row.get("attention_report") or "")
    shown = re.match(r"(\d+) attention layers", report)
    calls = sum(int(n) for n in re.findall(r"(\d+) ", str(row.get("attention_ops") or "") + " "))
    if row.get("attention_ops") and not shown:
        flags.append(f"attention: '{report}' but the forward calls {row['attention_ops']}")
    elif shown and int(shown.group(1)) < calls:
        flags.append(f"attention: {shown.group(1)} layers shown, the forward calls {row['attention_ops']}")
    return flags


def _num(value: Any) -> Optional[float]:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_one(model: ZooModel, images: Path, work: Path, timeout: float) -> Dict[str, Any]:
    """The model's process with its time limit; the row it wrote, or why there is none."""
    run_dir = work / model.library / re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run left by an earlier, interrupted benchmark is not resumed
    run_dir.mkdir(parents=True)
    spec = {"model": model.__dict__, "run_dir": str(run_dir), "images": str(images)}
    base = {"library": model.library, "model": model.name, "family": model.family}
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    wall = round(time.perf_counter() - start, 1)
    row = json.loads((run_dir / "row.json").read_text()) if (run_dir / "row.json").exists() else {}
    row = {**base, **row}
    if code is None:
        row.update(status="timeout", error=f"no result within {timeout:.0f} s")
    elif code != 0 and row.get("status") == "ok" and "gflops_library" in row:
        pass  # finished its work, then failed on exit: the row stands
    elif code != 0:
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            reason += " (out of memory?)"
        last = [line for line in (run_dir / "log.txt").read_text(errors="replace").splitlines() if line.strip()]
        row.update(status="failed", error=row.get("error") or f"process {reason}: {last[-1][:200] if last else ''}")
        if row.get("status") == "ok":
            row["status"] = "failed"
    row.setdefault("seconds", wall)
    row["flags"] = "; ".join(flags_of(row))
    return row


def load_rows(path: Path) -> Dict[tuple, Dict[str, Any]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {(r["library"], r["model"]): r for r in csv.DictReader(f)}


def _fmt(value: Any, digits: int = 2) -> str:
    number = _num(value)
    if number is None:
        return str(value or "")
    return f"{number:.{digits}f}" if isinstance(value, float) or "." in str(value) else f"{int(number):,}"


def write_tables(rows: Dict[tuple, Dict[str, Any]], csv_path: Path, md_path: Path, zoo: List[ZooModel]) -> None:
    rank = {(m.library, m.name): i for i, m in enumerate(zoo)}
    family = {(m.library, m.name): m.family for m in zoo}
    for key, row in rows.items():
        row["family"] = family.get(key, row.get("family", ""))
    ordered = sorted(rows.values(), key=lambda r: (LIBRARIES.index(r["library"]),
                                                   rank.get((r["library"], r["model"]), 10 ** 6), r["model"]))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)
    lines = [f"# Model zoo: the default report on every model ({time.strftime('%Y-%m-%d %H:%M')})", "",
             "Made by `python bench/zoo.py` (bench/README.md: *Model zoo* says what each column means). Random "
             "weights; 4 generated images, batch 4.", "",
             "| library | models | ok | failed | timeout | ok but flagged |", "| --- | --- | --- | --- | --- | --- |"]
    for library in LIBRARIES:
        mine = [r for r in ordered if r["library"] == library]
        if mine:
            count = {s: sum(r["status"] == s for r in mine) for s in ("ok", "failed", "timeout")}
            flagged = sum(r["status"] == "ok" and bool(r.get("flags")) for r in mine)
            lines.append(f"| {library} | {len(mine)} | {count['ok']} | {count['failed']} | {count['timeout']} | "
                         f"{flagged} |")
    lines += ["", "| library | model | family | status | s | task | input | params (report) | params = library | "
                  "GFLOPs report | GFLOPs library | diff % | Grad-CAM layer | map | deepest grid | all-zero maps | "
                  "attention (report) | attention ops (library) | flags / error |",
              "| " + " | ".join(["---"] * 19) + " |"]
    for r in ordered:
        same = ""
        if _num(r.get("params_report")) is not None and _num(r.get("params_library")) is not None:
            same = "yes" if _num(r["params_report"]) == _num(r["params_library"]) else "**no**"
        zero = f"{r.get('cams_zero')}/{r.get('cams')}" if r.get("cams") not in (None, "") else ""
        note = r.get("error") if r["status"] != "ok" else r.get("flags", "")
        layer = f"`{r['gradcam_layer']}`" if r.get("gradcam_layer") else ""
        cells = [r["library"], f"`{r['model']}`", r.get("family", ""), r["status"], _fmt(r.get("seconds"), 1),
                 r.get("task", ""), r.get("input", ""), _fmt(r.get("params_report")), same,
                 _fmt(r.get("gflops_report"), 3), _fmt(r.get("gflops_library"), 3), _fmt(r.get("flops_diff_pct"), 2),
                 layer, r.get("cam_shape", ""), r.get("deepest_grid", ""), zero, r.get("attention_report", ""),
                 r.get("attention_ops", ""), note or ""]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    bad = [r for r in ordered if r["status"] != "ok" or r.get("flags")]
    lines += ["", f"## Failed or flagged ({len(bad)})", ""]
    lines += [f"- {r['library']} `{r['model']}`: {r['status']}: {r.get('error') or r.get('flags')}"
              + (f" (alerts: {r['alerts']})" if r.get("alerts") else "") for r in bad]
    md_path.write_text("\n".join(lines) + "\n")


def refresh(kept: Path, out: Path) -> None:
    """Re-read each row's kept report (the oracle's numbers stay) and recompute the flags, then the tables."""
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    rows = load_rows(csv_path)
    for (library, name), row in rows.items():
        run_dir = kept / library / re.sub(r"[^A-Za-z0-9_.-]+", "_", name) / "run"
        if row["status"] == "ok" and run_dir.exists():
            fresh = read_report(run_dir)
            fresh.pop("input_shape", None)
            row.update(fresh)
        row["flags"] = "; ".join(flags_of(row))
    write_tables(rows, csv_path, md_path, all_models())
    print(f"refreshed {len(rows)} rows from {kept}: {md_path}, {csv_path}")


def main(argv: List[str]) -> None:
    if argv[:1] == ["--child"]:
        run_child(json.loads(argv[1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="torchvision, timm, hf, or a comma list of them (default: all)")
    parser.add_argument("--models", default="", help="comma list of model names (in the chosen libraries)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model, its process then killed")
    parser.add_argument("--jobs", type=int, default=1, help="models run at the same time (1 on a 2-core machine)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "zoo_results"),
                        help="the tables' path without extension (.csv and .md are written)")
    parser.add_argument("--keep", default="", help="a folder to keep every run (report, results, log) in")
    parser.add_argument("--fresh", action="store_true", help="drop rows of models not run this time")
    parser.add_argument("--refresh", default="", help="run nothing: re-read the reports kept in this --keep folder "
                                                      "for the rows of the CSV and recompute their flags")
    args = parser.parse_args(argv)
    if args.refresh:
        refresh(Path(args.refresh), Path(args.out))
        return

    libraries = [s.strip() for s in args.only.split(",") if s.strip()] or list(LIBRARIES)
    unknown = [s for s in libraries if s not in LIBRARIES]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {list(LIBRARIES)}")
    zoo = all_models()
    chosen = [m for m in zoo if m.library in libraries]
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    if names:
        missing = sorted(set(names) - {m.name for m in chosen})
        if missing:
            parser.error(f"--models: not in the chosen lists: {missing}")
        chosen = [m for m in chosen if m.name in names]
    out = Path(args.out)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    rows = {} if args.fresh else load_rows(csv_path)
    lock = threading.Lock()

    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        images = make_images(Path(tmp) / "images")
        print(f"{len(chosen)} models ({', '.join(libraries)}), timeout {args.timeout:.0f} s, {args.jobs} at a "
              f"time; runs in {work}", flush=True)

        def one(model: ZooModel) -> None:
            row = run_one(model, images, work, args.timeout)
            with lock:
                rows[(model.library, model.name)] = row
                write_tables(rows, csv_path, md_path, zoo)
                print(f"[{time.strftime('%H:%M:%S')}] {model.library:11s} {model.name:36s} {row['status']:7s} "
                      f"{_fmt(row.get('seconds'), 1):>6s} s  {row.get('error') or row.get('flags') or ''}"[:300],
                      flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, chosen))
    total = {lib: sum(1 for r in rows.values() if r["library"] == lib and r["status"] == "ok") for lib in libraries}
    print(f"ok per library: {total}; tables: {md_path}, {csv_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
