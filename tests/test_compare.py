"""The comparison of runs: a real multirun of the two demo models (plus a job that fails) ends with the comparison;
its numbers equal a recount from the runs' predictions.csv by plain code here; the command gives the same numbers;
Wilson intervals match a published example; runs over different image sets are compared on what they share;
checkpoints of one architecture get the exact relative weight change; the pages pass Chromium and axe-core."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

from reportgen.report.compare_stats import holm_adjusted, mcnemar_exact, pareto_front, wilson_interval
from reportgen.runs.compare import compare_runs, main
from reportgen.runs.pipeline import run
from tests.browser import AXE, CHROMIUM, open_page
from tests.helpers import WIDE_MODEL, compose_config
from tests.tiny_models import WideNet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One real Hydra multirun, shared by the tests below: demo_cnn and demo_vit on the whole demo folder with
    predictions and Grad-CAM, and a checkpoint job that fails (its file does not exist)."""
    folder = tmp_path_factory.mktemp("compare") / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "model=demo_cnn,demo_vit,checkpoint", "model.path=missing.pt",
         "analysis=[predictions,gradcam]", "runtime.num_workers=0", "runtime.progress=false",
         f"hydra.sweep.dir={folder}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "comparison:" in result.stdout
    return folder


def read_predictions(run_dir: Path):
    with open(run_dir / "results" / "predictions.csv", newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def recount(a: dict, b: dict) -> dict:
    """Agreement, the 2×2 table and the exact McNemar p of two runs, by plain counting over shared paths."""
    shared = sorted(set(a) & set(b))
    same = sum(a[p]["top1_name"] == b[p]["top1_name"] for p in shared)
    labelled = [p for p in shared if a[p]["label"]]
    right_a = {p: a[p]["top1_name"] == a[p]["label"] for p in labelled}  # demo classes are named as the folders
    right_b = {p: b[p]["top1_name"] == b[p]["label"] for p in labelled}
    table = {"both_right": sum(right_a[p] and right_b[p] for p in labelled),
             "a_only": sum(right_a[p] and not right_b[p] for p in labelled),
             "b_only": sum(right_b[p] and not right_a[p] for p in labelled),
             "both_wrong": sum(not right_a[p] and not right_b[p] for p in labelled)}
    n, k = table["a_only"] + table["b_only"], min(table["a_only"], table["b_only"])
    p_value = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"images": len(shared), "agreement": same / len(shared), "mcnemar_p": p_value, **table}


def test_sweep_comparison_equals_a_recount_and_shows_the_failed_job(sweep):
    data = json.loads((sweep / "comparison" / "comparison.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["model=demo_cnn", "model=demo_vit"]
    [pair] = data["pairs"]
    expected = recount(read_predictions(sweep / "0"), read_predictions(sweep / "1"))
    assert expected["images"] == 240 and expected["a_only"] + expected["b_only"] > 0
    for key, value in expected.items():
        assert pair[key] == pytest.approx(value, rel=1e-12, abs=0), key
    from scipy.stats import binomtest  # a second, independent oracle for the exact test

    n = pair["a_only"] + pair["b_only"]
    assert pair["mcnemar_p"] == pytest.approx(binomtest(pair["a_only"], n, 0.5).pvalue, rel=1e-9)
    for entry in data["runs"]:  # top-1 on the shared images = the run's own (every run saw the same images)
        own = json.loads((Path(entry["run_dir"]) / "results" / "predictions.json").read_text())
        assert entry["top1"] == pytest.approx(own["top1_accuracy"]) and entry["images"] == 240
        low, high = entry["top1_ci"]
        assert low < entry["top1"] < high
    [failed] = data["not_compared"]
    assert failed["status"] == "failed" and "missing.pt" in failed["reason"]
    html = (sweep / "comparison" / "index.html").read_text(encoding="utf-8")
    assert "missing.pt" in html and "is not compared" in html
    sentence = (f"model=demo_cnn is right on {pair['a_only']} images where model=demo_vit is wrong, model=demo_vit "
                f"on {pair['b_only']} where model=demo_cnn is wrong")
    assert sentence in html
    # the disagreement strips: the image and both runs' Grad-CAM maps, as files inside the comparison folder
    assert html.count('class="strip"') == 24
    assert "No run computed Grad-CAM" not in html
    first_strip = html.split('class="strip"')[1].split('class="strip"')[0]
    assert first_strip.count("<img ") == 3
    rows = list(csv.DictReader(open(sweep / "comparison" / "comparison.csv", encoding="utf-8")))
    assert len(rows) == 240 and set(rows[0]) == {"path", "label", "model=demo_cnn: top1", "model=demo_cnn: right",
                                                 "model=demo_vit: top1", "model=demo_vit: right"}
    index = (sweep / "index.html").read_text(encoding="utf-8")
    assert 'href="comparison/index.html"' in index


def test_a_comparison_that_fails_is_logged_and_the_sweep_goes_on(sweep, tmp_path, caplog):
    from reportgen.runs.hydra_callback import SweepIndexCallback

    for job in ("0", "1"):
        shutil.copytree(sweep / job / "results", tmp_path / job / "results")
    (tmp_path / "1" / "results" / "predictions.csv").unlink()  # cannot be compared image by image
    SweepIndexCallback._compare(tmp_path)
    assert "could not compare the runs" in caplog.text and "predictions.csv" in caplog.text
    assert not (tmp_path / "comparison").exists()


def test_compare_command_gives_the_same_numbers(sweep, tmp_path, capsys):
    assert main([str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path / "cmp")]) == 0
    assert "comparison:" in capsys.readouterr().out
    again = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    first = json.loads((sweep / "comparison" / "comparison.json").read_text())
    assert again["pairs"] == first["pairs"] and again["runs"] == first["runs"]
    assert again["not_compared"] == []


def test_runs_over_different_image_sets_are_compared_on_the_intersection(sweep, tmp_path):
    runs = {}
    for job, keep in (("0", lambda i: i % 3 != 0), ("1", lambda i: i < 200)):
        copy = tmp_path / f"run{job}"
        shutil.copytree(sweep / job / "results", copy / "results")
        path = copy / "results" / "predictions.csv"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text(lines[0] + "".join(l for i, l in enumerate(lines[1:]) if keep(i)), encoding="utf-8")
        runs[job] = copy
    page = compare_runs([runs["0"], runs["1"]], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    a, b = read_predictions(runs["0"]), read_predictions(runs["1"])
    assert data["shared_images"] == len(set(a) & set(b)) == sum(1 for i in range(200) if i % 3 != 0)
    assert [r["images"] for r in data["runs"]] == [len(a), len(b)] == [160, 200]
    expected = recount(a, b)
    for key, value in expected.items():
        assert data["pairs"][0][key] == pytest.approx(value, rel=1e-12, abs=0), key
    shared = set(a) & set(b)
    own_top1 = sum(a[p]["top1_name"] == a[p]["label"] for p in shared) / len(shared)
    assert data["runs"][0]["top1"] == pytest.approx(own_top1)
    html = page.read_text(encoding="utf-8")
    assert "processed different image sets" in html and "160 images" in html and "200 images" in html


def test_three_runs_get_every_pair_a_matrix_and_distinct_names(sweep, tmp_path):
    rerun = tmp_path / "<img src=x onerror=alert(1)>"  # job 0's config "another day": named by its folder
    shutil.copytree(sweep / "0" / "results", rerun / "results")
    page = compare_runs([sweep / "0", sweep / "1", rerun], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    names = [r["name"] for r in data["runs"]]
    assert len(set(names)) == 3 and names[2].endswith("(<img src=x onerror=alert(1)>)")
    assert [(p["a"], p["b"]) for p in data["pairs"]] == list(combinations(names, 2))
    same = data["pairs"][1]  # job 0 against its copy
    assert same["agreement"] == 1.0 and same["a_only"] == same["b_only"] == 0 and same["mcnemar_p"] == 1.0
    assert data["pairs"][0]["mcnemar_p_holm"] == pytest.approx(min(1.0, 3 * data["pairs"][0]["mcnemar_p"]))
    assert data["notes"] == []
    html = page.read_text(encoding="utf-8")
    assert 'aria-label="pairwise matrix"' in html and "Holm-adjusted" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # names are text, not markup


def test_wilson_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263, Wilson score interval 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    from scipy.stats import binomtest

    ci = binomtest(81, 263).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_mcnemar_holm_and_pareto_by_hand():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 0) == pytest.approx(2 / 8)  # 2·C(3,0)/2^3
    assert mcnemar_exact(41, 3) == pytest.approx(2 * sum(math.comb(44, i) for i in range(4)) / 2 ** 44, rel=1e-15)
    assert mcnemar_exact(3000, 2900) == mcnemar_exact(2900, 3000) < 1.0  # large n: exact integers, no overflow
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # costs (lower better) and accuracies: the 2nd is dominated by the 1st, the last has no cost
    assert pareto_front([1.0, 2.0, 3.0, float("nan")], [0.8, 0.7, 0.9, 0.99]) == [True, False, True, False]


def wide_from_file(path: str) -> WideNet:
    """WideNet with the weights of a saved state_dict: one architecture, several checkpoints."""
    model = WideNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def test_checkpoints_of_one_architecture_get_the_exact_weight_change(colour_folder, tmp_path):
    first = WideNet().state_dict()
    generator = torch.Generator().manual_seed(3)
    second = {k: v + (0.1 * torch.randn(v.shape, generator=generator) if k.startswith("features.2") else 0)
              for k, v in first.items()}
    runs = []
    for name, state in (("ep1", first), ("ep2", second)):
        torch.save(state, tmp_path / f"{name}.pt")
        cfg = compose_config(WIDE_MODEL + [f"dataset.root={colour_folder}", "analysis=[predictions,activations,weights]",
                                           "model.target._target_=tests.test_compare.wide_from_file",
                                           f"+model.target.path={tmp_path / name}.pt", "analysis.activations.n_images=2"])
        run(cfg, out_dir=tmp_path / name)
        runs.append(tmp_path / name)
    page = compare_runs(runs, tmp_path / "cmp")
    html = page.read_text(encoding="utf-8")
    assert "Weights: path=ep1.pt → path=ep2.pt" in html
    assert "Relative change of every parameter tensor (6)" in html and "Activations: " in html
    from reportgen.report.compare_data import load_run, relative_weight_change
    from reportgen.runs.compare import weight_changes

    loaded = [load_run(r) for r in runs]
    for r, name in zip(loaded, ("ep1", "ep2")):
        r.name = name
    [change] = weight_changes(loaded)  # rebuilt from each run's manifest, compared with the saved files here
    got = {name: value for name, value, _ in change.rows}
    expected = {k: float((second[k].double() - first[k].double()).norm() / first[k].double().norm()) for k in first}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert got["features.0.weight"] == 0.0 and got["features.2.weight"] > 0.01
    assert relative_weight_change({"w": [3.0, 4.0]}, {"w": [3.0, 5.0]}) == [("w", 0.2, 5.0)]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make system-deps)")
def test_comparison_index_and_report_pages_in_chromium_with_axe(sweep):
    if AXE is None:
        pytest.skip("axe-core is not installed (make system-deps runs npm install; node/npm missing?)")
    for page, root in ((sweep / "comparison" / "index.html", sweep), (sweep / "index.html", sweep),
                       (sweep / "0" / "report" / "index.html", sweep / "0")):
        check = open_page(page, allowed_root=root)
        assert check.console_errors == [] and check.page_errors == [] and check.dialogs == [], page
        assert check.outside_requests == [] and check.broken_images == [] and check.pending_images == [], page
        assert check.missing_anchors == [] and check.images > 0, page
        assert check.accessibility == [], (page, check.accessibility)
