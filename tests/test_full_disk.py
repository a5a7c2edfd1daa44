"""A run folder on a full disk, for real: a 1 MiB tmpfs (root only). The run stops with one error line naming what
was being written and where, exit status 1, no traceback, nothing already written damaged (no half file, no left-over
temporary, a loadable checkpoint); once the tmpfs is grown, the same command finishes with a clean run's results."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reportgen.config.store import conf_dir
from reportgen.runs.pipeline import run
from reportgen.state.files import DiskFullError
from reportgen.state.run_state import RunState, load_state, save_state
from tests.helpers import WIDE, compose_config, make_colour_folder
from tests.run_compare import assert_same_results

REPO = conf_dir().parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                                reason="mounting a tmpfs needs root and mount(8)")


@pytest.fixture(scope="module")
def folder_and_clean_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("full-disk")
    root = make_colour_folder(base / "data", per_class=8, noise=60, seed=2)
    overrides = WIDE + [f"dataset.root={root}", "runtime.checkpoint_every=1"]
    run(compose_config(overrides), out_dir=base / "clean")
    return overrides, base / "clean"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, unmounted afterwards whatever happens."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def run_cli(overrides, out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *overrides, f"hydra.run.dir={out_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ballast_kib, writing", [
    (960, ("the checkpoint", "the per-image")),  # little room: the pass's checkpoint or streams fill the disk
    (600, ("the report", "the results of analysis")),  # the pass fits; its results files or the report do not
], ids=["in-the-pass", "after-the-pass"])
def test_a_full_disk_stops_cleanly_and_the_same_command_finishes_once_there_is_room(
        folder_and_clean_run, small_disk, ballast_kib, writing):
    overrides, clean = folder_and_clean_run
    (small_disk / "ballast").write_bytes(b"\0" * ballast_kib * 1024)  # what else fills the user's disk
    out = small_disk / "run"

    first = run_cli(overrides, out)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log
    assert "Traceback" not in log and "Logging error" not in log, log
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, log
    assert "no space left on device while writing" in errors[0] and str(out) in errors[0], errors[0]
    assert any(f"writing {what}" in errors[0] for what in writing), errors[0]
    assert "run the same command again" in errors[0]

    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    for manifest in out.rglob("*.json"):  # every JSON file there is whole
        json.loads(manifest.read_text())
    assert not (out / "results" / "manifest.json").exists() or \
        json.loads((out / "results" / "manifest.json").read_text())["status"] == "failed"
    state_file = out / "results" / "state.pt"
    saved = load_state(state_file).done if state_file.exists() else 0  # the last checkpoint is intact

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # space freed
    again = run_cli(overrides, out)
    assert again.returncode == 0, again.stdout + again.stderr
    if saved:
        assert f"{saved} of 24 images were done" in again.stdout + again.stderr
    assert json.loads((out / "results" / "manifest.json").read_text())["status"] == "ok"
    assert_same_results(clean, out)


def test_a_checkpoint_larger_than_the_free_space_names_the_checkpoint_and_keeps_the_last_one(small_disk):
    """save_state streams torch.save into the file: on a full disk the file's own ENOSPC is what is raised (not
    torch's "unexpected pos"), as one DiskFullError naming the checkpoint; the previous state.pt stays loadable and
    no temporary file is left."""
    path = small_disk / "state.pt"
    small = RunState(config={}, start=0, end=10, done=4, shard=None, found=10,
                     analyses={"a": {"values": np.arange(1000, dtype=np.float32)}})
    save_state(path, small)
    large = RunState(config={}, start=0, end=10, done=8, shard=None, found=10,
                     analyses={"a": {"values": np.ones(512 * 1024, dtype=np.float32)}})  # 2 MiB: more than the disk
    with pytest.raises(DiskFullError, match=r"no space left on device while writing the checkpoint"):
        save_state(path, large)
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.pt"]
    assert load_state(path).done == 4
