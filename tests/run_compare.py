"""Comparing two run folders' results: what "a merged (or resumed) report equals a single run" means in numbers.

Identities (paths, labels, predicted classes, top-k image indices, failures) must be equal exactly; floating-point
values may differ by rounding only, since batches are cut at other places when the folder is split."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

ATOL = 1e-6
RTOL = 1e-5


def read_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def assert_same_results(one: Path, other: Path) -> None:
    a, b = one / "results", other / "results"
    assert read_rows(a / "failed.csv") == read_rows(b / "failed.csv")
    rows_a, rows_b = read_rows(a / "predictions.csv"), read_rows(b / "predictions.csv")
    assert len(rows_a) == len(rows_b) > 1
    for ra, rb in zip(rows_a, rows_b):
        assert ra[:4] == rb[:4] and ra[5:7] == rb[5:7], (ra, rb)  # path, label, top-1, top-k indices and names
        if ra[0] != "path":
            np.testing.assert_allclose(float(ra[4]), float(rb[4]), atol=2e-6)  # top-1 probability
            np.testing.assert_allclose([float(v) for v in ra[7].split()], [float(v) for v in rb[7].split()],
                                       atol=2e-6)
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    pa, pb = json.loads((a / "predictions.json").read_text()), json.loads((b / "predictions.json").read_text())
    assert pa == pb
    for name in ("gradcam.npz", "embeddings.npz"):
        za, zb = np.load(a / name), np.load(b / name)
        assert sorted(za.files) == sorted(zb.files)
        for key in za.files:
            if za[key].dtype.kind in "fc":
                np.testing.assert_allclose(za[key], zb[key], rtol=RTOL, atol=ATOL, err_msg=f"{name}:{key}")
            else:
                np.testing.assert_array_equal(za[key], zb[key], err_msg=f"{name}:{key}")
    stats_a, stats_b = read_rows(a / "activation_stats.csv"), read_rows(b / "activation_stats.csv")
    assert stats_a[0] == stats_b[0] and len(stats_a) == len(stats_b)
    for ra, rb in zip(stats_a[1:], stats_b[1:]):
        for va, vb in zip(ra, rb):
            try:
                fa, fb = float(va), float(vb)
            except ValueError:
                assert va == vb
                continue
            np.testing.assert_allclose(fa, fb, rtol=RTOL, atol=ATOL)
    topk_a, topk_b = json.loads((a / "topk.json").read_text()), json.loads((b / "topk.json").read_text())
    assert _identities(topk_a) == _identities(topk_b)
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["counts"] == mb["counts"]


def _identities(value):
    """The same structure with every float replaced by a marker (image indices and paths stay)."""
    if isinstance(value, dict):
        return {k: _identities(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_identities(v) for v in value]
    return "float" if isinstance(value, float) else value
