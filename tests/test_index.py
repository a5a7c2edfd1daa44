"""The sweep index: a real Hydra multirun of two demo-sized models and a failing job, one page linking all."""
import subprocess
import sys
from pathlib import Path

from reportgen.report.sweep import collect_jobs, main

ROOT = Path(__file__).resolve().parent.parent


def test_multirun_builds_an_index_with_a_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "model=demo_cnn,demo_vit,checkpoint", f"model.path={tmp_path}/missing.pt",
         "dataset.limit=12", "runtime.num_workers=0", "runtime.progress=false",
         "analysis=[summary,predictions,activations]", "analysis.activations.n_images=2",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (sweep / "index.html").read_text(encoding="utf-8")
    rows = {r.name: r for r in collect_jobs(sweep)}
    assert [rows[k].status for k in ("0", "1", "2")] == ["ok", "ok", "failed"]
    assert "missing.pt" in rows["2"].error and rows["2"].report is None
    assert rows["0"].params == 209174 and rows["0"].images == 12 and rows["0"].top1 is not None
    for job in ("0", "1"):
        assert f'href="{job}/report/index.html"' in html
        assert (sweep / job / "report" / "index.html").is_file()
    assert "model=checkpoint" in html and "failed" in html
    assert "Per-class top-1 accuracy by job" in html and "Dead channels" in html
    from tests.browser import CHROMIUM, open_page

    if Path(CHROMIUM).exists():  # the index in a real browser: clean, every image and report link resolves
        check = open_page(sweep / "index.html")
        assert check.console_errors == [] and check.page_errors == [] and check.broken_images == []
        assert check.outside_requests == [] and check.images == 2


def test_index_cli_on_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_job_that_never_finished_is_listed_as_incomplete(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- model=resnet18\n")
    assert main([str(tmp_path)]) == 0
    rows = collect_jobs(tmp_path)
    assert rows[0].status == "incomplete" and rows[0].overrides == "model=resnet18"
    assert "incomplete" in (tmp_path / "index.html").read_text(encoding="utf-8")
