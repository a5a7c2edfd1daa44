"""Resume: a run killed mid-pass and started again with the same command ends with the report of an uninterrupted
run; checkpoints are atomic; a different config in the same folder is refused; out-of-memory halves the batch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reportgen.config.store import conf_dir
from reportgen.errors import RunError
from reportgen.runs.pipeline import run
from reportgen.state.run_state import load_state, save_state
from tests.helpers import WIDE, WIDE_MODEL, compose_config, make_colour_folder
from tests.run_compare import assert_same_results

REPO = conf_dir().parent
SLOW = [o.replace("wide_net", "slow_net") for o in WIDE] + ["runtime.batch_size=2", "runtime.checkpoint_every=2"]


@pytest.fixture
def folder(tmp_path):
    root = make_colour_folder(tmp_path / "data", per_class=8, noise=60, seed=2)
    (root / "green" / "green_bad.jpg").write_bytes(b"broken")
    return root


def start_run(overrides, out_dir: Path) -> subprocess.Popen:
    """run.py as a user starts it, in its own process group (so the kill takes its workers too)."""
    return subprocess.Popen([sys.executable, "run.py", *overrides, f"hydra.run.dir={out_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(folder, tmp_path):
    overrides = SLOW + [f"dataset.root={folder}"]
    out = tmp_path / "killed"
    process = start_run(overrides, out)
    state_file = out / "results" / "state.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state_file.exists() and load_state(state_file).done >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed:\n" + process.stdout.read()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = load_state(state_file).done
    assert 8 <= done_at_kill < 25
    assert not (out / "report").exists() and not (out / "results" / "manifest.json").exists()

    again = start_run(overrides, out)  # the same command into the same folder
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    assert "resuming" in log and f"{done_at_kill} of 25 images were done" in log
    assert not state_file.exists()  # finished: the checkpoint is gone, the report is there
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["counts"]["processed"] == 24

    uninterrupted = tmp_path / "whole"
    run(compose_config(overrides + ["runtime.checkpoint_every=0"]), out_dir=uninterrupted)
    assert_same_results(uninterrupted, out)


def test_resume_refuses_another_config_and_resume_false_starts_over(folder, tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(WIDE + [f"dataset.root={folder}", "runtime.shard=0/2"])
    run(cfg, out_dir=out)
    state = load_state(out / "results" / "state.pt")
    assert state.complete and state.processed == 12
    assert run(cfg, out_dir=out) == out / "results" / "state.pt"  # a requeued finished shard: nothing to do
    (out / "results" / "manifest.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(RunError, match=r"different config.*top_k: 5 -> 3"):
        run(compose_config(WIDE + [f"dataset.root={folder}", "runtime.shard=0/2", "analysis.predictions.top_k=3"]),
            out_dir=out)
    # the same config resumes with nothing left to do: the state is kept as it was
    run(cfg, out_dir=out)
    assert load_state(out / "results" / "state.pt").processed == 12
    (out / "results" / "manifest.json").unlink()
    fresh = compose_config(WIDE + [f"dataset.root={folder}", "runtime.shard=0/2", "runtime.resume=false",
                                   "analysis.predictions.top_k=3"])
    run(fresh, out_dir=out)
    assert load_state(out / "results" / "state.pt").processed == 12
    # a checkpoint of an older state layout (no format field: format 1) is refused by name, not half read
    old = load_state(out / "results" / "state.pt")
    del old.__dict__["format"]
    save_state(out / "results" / "state.pt", old)
    (out / "results" / "manifest.json").unlink()
    with pytest.raises(RunError, match=r"state\.pt was written by another reportgen version \(state format 1; "
                                       r"this one reads 2\): set runtime\.resume=false"):
        run(compose_config(WIDE + [f"dataset.root={folder}", "runtime.shard=0/2", "analysis.predictions.top_k=3"]),
            out_dir=out)
    run(compose_config(WIDE + [f"dataset.root={folder}", "runtime.shard=0/2", "runtime.resume=false"]), out_dir=out)
    assert load_state(out / "results" / "state.pt").format == 2


def test_out_of_memory_halves_the_batch_and_loses_nothing(folder, tmp_path):
    oom = [o.replace("wide_net", "out_of_memory_net") for o in WIDE]
    index = run(compose_config(oom + [f"dataset.root={folder}", "runtime.batch_size=8"]), out_dir=tmp_path / "oom")
    reference = [o.replace("wide_net", "out_of_memory_net") for o in WIDE]
    run(compose_config(reference + [f"dataset.root={folder}", "runtime.batch_size=2"]), out_dir=tmp_path / "small")
    assert_same_results(tmp_path / "small", tmp_path / "oom")
    manifest = json.loads((tmp_path / "oom" / "results" / "manifest.json").read_text())
    assert manifest["warnings"] == ["out of memory at 8 images per forward: continued with 4 (set "
                                    "runtime.batch_size=4 to avoid the retry)",
                                    "out of memory at 4 images per forward: continued with 2 (set "
                                    "runtime.batch_size=2 to avoid the retry)"]
    assert "out of memory at 8 images per forward" in index.read_text(encoding="utf-8")


def test_a_folder_in_use_is_refused_and_freed_when_its_process_dies(folder, tmp_path):
    """Two runs in one folder would corrupt each other; the lock goes away with the process that held it."""
    from reportgen.errors import FolderBusy
    from reportgen.runs.folder_lock import folder_lock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from reportgen.runs.folder_lock import folder_lock\n"
                               f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=rf"in use by pid {holder.pid} on"):
        run(compose_config(WIDE_MODEL + [f"dataset.root={folder}", "analysis=[predictions]"]), out_dir=out)
    assert not (out / "results" / "manifest.json").exists()
    holder.kill()
    holder.wait()
    with folder_lock(out):  # free again: a killed holder leaves no stale lock
        pass


def test_a_run_killed_while_rendering_resumes_from_its_final_checkpoint(folder, tmp_path, monkeypatch):
    """Everything was processed, then the report failed half-way (a time limit): the rerun finalizes again from the
    complete checkpoint, with the per-image stores still there, and equals an uninterrupted run."""
    import reportgen.runs.pipeline as pipeline

    cfg = compose_config(WIDE + [f"dataset.root={folder}"])
    real_render = pipeline.render_report

    def render_then_die(*args, **kwargs):
        raise KeyboardInterrupt("killed while rendering")

    monkeypatch.setattr(pipeline, "render_report", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out_dir=tmp_path / "run")
    state = load_state(tmp_path / "run" / "results" / "state.pt")
    assert state.complete and state.processed == 24
    monkeypatch.setattr(pipeline, "render_report", real_render)
    run(cfg, out_dir=tmp_path / "run")
    run(cfg, out_dir=tmp_path / "whole")
    assert_same_results(tmp_path / "whole", tmp_path / "run")
    assert not [p for p in (tmp_path / "run" / "results").iterdir() if p.name.startswith(".")]


def test_out_of_memory_inside_an_update_that_already_counted_stops_instead_of_counting_twice(folder, tmp_path,
                                                                                             monkeypatch):
    from reportgen.analyses.activations import Activations

    real_update = Activations.update

    def update_then_out_of_memory(self, batch, logits, captures):
        real_update(self, batch, logits, captures)  # its statistics already hold this batch
        raise torch.OutOfMemoryError("simulated inside activations")

    monkeypatch.setattr(Activations, "update", update_then_out_of_memory)
    cfg = compose_config(WIDE + [f"dataset.root={folder}"])
    with pytest.raises(RunError, match="out of memory after some analyses had updated"):
        run(cfg, out_dir=tmp_path / "run")


def test_resume_refuses_a_folder_whose_files_changed(folder, tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(WIDE_MODEL + [f"dataset.root={folder}", "analysis=[predictions]", "runtime.shard=0/2"])
    run(cfg, out_dir=out)
    (out / "results" / "manifest.json").unlink()  # as if killed after its last checkpoint
    (folder / "blue" / "blue_0.png").rename(folder / "blue" / "blue_00.png")  # as many files, not the same ones
    with pytest.raises(RunError, match="the folder changed"):
        run(cfg, out_dir=out)


def test_out_of_memory_in_the_forward_after_a_streamed_layer_was_consumed_stops_instead_of_counting_twice(
        folder, tmp_path, monkeypatch):
    """Activations reduce their layers inside the forward: an out-of-memory error later in that forward finds part
    of the batch already counted, so halving and retrying would count it twice."""
    from reportgen.analyses.activations import Activations

    real_consume = Activations.consume

    def consume_then_out_of_memory(self, batch, key, output):
        real_consume(self, batch, key, output)
        raise torch.OutOfMemoryError("simulated in the forward, after a streamed layer")

    monkeypatch.setattr(Activations, "consume", consume_then_out_of_memory)
    with pytest.raises(RunError, match="out of memory after some analyses had updated"):
        run(compose_config(WIDE + [f"dataset.root={folder}"]), out_dir=tmp_path / "run")
