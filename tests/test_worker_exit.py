"""No decode worker outlives its run, whatever way the run ends: a normal end, an error, a stop signal with its
checkpoint, a second Ctrl-C, submitit's own exit after its last requeue or after a requeue (the handler the run
hands the signal over to), and the run's process killed outright (the workers die with it). Each run is a real
`run.py` process (tests/stoppable_run.py) with two decode workers; with `hang`, the pass's folder holds a file whose
decoder never returns and ignores every signal but SIGKILL, so one worker is blocked in that decode and the other
on its queue (its batches fetched ahead) when the run is stopped. A stopped run must also end within seconds.

The children start with the stop signals at their defaults (tests/processes.py), so these tests pass from any
shell, also one that ignores SIGINT (a background job)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Set

import pytest

from reportgen.config.store import conf_dir
from tests.helpers import make_colour_folder
from tests.processes import Process, alive, default_stop_signals, describe, descendants, kill_all, left_after
from tests.stoppable_run import HANG_PREFIX

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in Linux's /proc")
REPO = conf_dir().parent
STARTED_S = 120  # the run's start and probes, on a loaded machine
EXIT_S = 15  # a stopped run: the batch in hand + the checkpoint + a few seconds + the interpreter's exit
GONE_S = 5  # after the run's process ended, its workers are gone within this


def overrides(root: Path, pause_s: float = 0.25, fail_at: int = 0) -> List[str]:
    return ["model=target", "model.target._target_=tests.stoppable_run.paced_net", f"+model.target.pause_s={pause_s}",
            f"+model.target.fail_at={fail_at}", "model.preprocess.resize=16", "model.preprocess.crop=16",
            "analysis=[predictions]", "runtime.batch_size=2", "runtime.num_workers=2", "runtime.checkpoint_every=1",
            "runtime.progress=false", f"dataset.root={root}"]


class Run:
    """One `run.py` process in its own session (so a signal can go to its whole group, as a terminal sends it),
    and every process seen below it while it ran."""

    def __init__(self, tmp_path: Path, hang: bool, *args: str, **model: float):
        self.root = make_colour_folder(tmp_path / "data", per_class=8, noise=60, seed=2)
        if hang:  # sorts after the 16 images the probes use: a pass worker meets it at once, in its 9th batch
            (self.root / "red" / "red_0x.png").write_bytes(HANG_PREFIX + b"\0" * 16)
        self.out = tmp_path / "run"
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.log = tmp_path / "run.log"
        env = {**os.environ, "REPORTGEN_TEST_MARKERS": str(self.markers),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.stoppable_run", *args, *overrides(self.root, **model),
                 f"hydra.run.dir={self.out}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=default_stop_signals)
        self.seen: Set[Process] = set()

    def look(self) -> None:
        if self.process.poll() is None:
            self.seen |= descendants(self.process.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition, what: str, seconds: float = STARTED_S) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            self.look()
            if self.process.poll() is not None:
                pytest.fail(f"the run ended (exit {self.process.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.abandon()
                pytest.fail(f"no {what} within {seconds} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def in_pass(self, hang: bool) -> None:
        """Wait for the pass's first checkpoint and, with `hang`, a live worker blocked in the hanging decode."""
        self.wait_until(lambda: (self.out / "results" / "state.pt").exists(), "first checkpoint")
        if hang:
            self.wait_until(lambda: any(alive(p) for p in self.seen if (self.markers / f"hang.{p[0]}").exists()),
                            "worker blocked in a decode")
        self.look()
        assert len(self.seen) >= 2, describe(self.seen)  # the pass's two decode workers

    def signal(self, signum: int) -> float:
        """Send `signum` to the run's whole process group; returns when it was sent."""
        self.look()
        os.killpg(self.process.pid, signum)
        return time.monotonic()

    def ended_within(self, seconds: float) -> int:
        """The run's exit status, once it has ended within `seconds` (else the test fails)."""
        deadline = time.monotonic() + seconds
        while self.process.poll() is None:
            self.look()
            if time.monotonic() > deadline:
                self.abandon()
                pytest.fail(f"the run did not end within {seconds} s; below it:\n{describe(self.seen)}\n"
                            f"{self.text()[-3000:]}")
            time.sleep(0.05)
        return self.process.returncode

    def assert_nothing_left(self) -> None:
        left = left_after(self.seen, GONE_S)
        kill_all(left)
        assert not left, f"still running {GONE_S} s after the run ended:\n{describe(left)}\n{self.text()[-3000:]}"

    def abandon(self) -> None:
        """End what this test started: its run's process group, and anything of it that left the group."""
        self.look()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        kill_all(self.seen)


@pytest.fixture
def runs():
    started: List[Run] = []
    yield started
    for run in started:
        run.abandon()


def start(runs: List[Run], tmp_path: Path, hang: bool, *args: str, **model: float) -> Run:
    run = Run(tmp_path, hang, *args, **model)
    runs.append(run)
    return run


def test_a_normal_end_leaves_no_worker(runs, tmp_path):
    """The pass's workers are persistent (kept for the whole pass): at its end they wait on their queues."""
    run = start(runs, tmp_path, False, pause_s=0.05)
    assert run.ended_within(STARTED_S) == 0, run.text()[-3000:]
    assert len(run.seen) >= 2, describe(run.seen)
    run.assert_nothing_left()


@pytest.mark.parametrize("hang", [False, True], ids=["on-queue", "in-decode"])
def test_an_error_in_the_pass_leaves_no_worker(runs, tmp_path, hang):
    run = start(runs, tmp_path, hang, fail_at=4)
    assert run.ended_within(STARTED_S) == 1, run.text()[-3000:]
    assert "failing on purpose at pass forward 4" in run.text()
    run.assert_nothing_left()


@pytest.mark.parametrize("hang", [False, True], ids=["on-queue", "in-decode"])
def test_a_stop_signal_saves_exits_within_seconds_and_leaves_no_worker(runs, tmp_path, hang):
    run = start(runs, tmp_path, hang)
    run.in_pass(hang)
    sent = run.signal(signal.SIGTERM)
    assert run.ended_within(EXIT_S) == 128 + signal.SIGTERM, run.text()[-3000:]
    print(f"stopped run ({'a worker blocked in a decode' if hang else 'workers on their queues'}) exited "
          f"{time.monotonic() - sent:.2f} s after SIGTERM")
    assert "stopped by SIGTERM: checkpoint saved at" in run.text()
    run.assert_nothing_left()


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_worker(runs, tmp_path):
    """Each batch's forward takes 3 s: both Ctrl-Cs come inside one, the second stops it there."""
    run = start(runs, tmp_path, True, pause_s=3.0)
    run.in_pass(hang=True)
    run.signal(signal.SIGINT)
    run.wait_until(lambda: "SIGINT received" in run.text(), "warning after the first Ctrl-C", EXIT_S)
    sent = run.signal(signal.SIGINT)
    assert run.ended_within(EXIT_S) == 128 + signal.SIGINT, run.text()[-3000:]
    print(f"second Ctrl-C: exited {time.monotonic() - sent:.2f} s after it")
    assert "interrupted again (SIGINT)" in run.text()
    run.assert_nothing_left()


@pytest.mark.parametrize("hang", [False, True], ids=["on-queue", "in-decode"])
def test_submitit_refusing_a_requeue_after_the_last_one_leaves_no_worker(runs, tmp_path, hang):
    """SLURM's time-limit USR2 after `max_num_timeout` requeues: the run saves its checkpoint and hands over to
    submitit's handler, which raises; the job's result keeps that exception (and the frames of the pass) until the
    interpreter exits."""
    run = start(runs, tmp_path, hang, "--launcher=refuse")
    run.in_pass(hang)
    sent = run.signal(signal.SIGUSR2)
    code = run.ended_within(EXIT_S)
    print(f"USR2 without requeue ({'in-decode' if hang else 'on-queue'}): exited {time.monotonic() - sent:.2f} s "
          f"after it")
    assert code == 1 and "timed-out too many times" in run.text(), run.text()[-3000:]
    assert "stopped by SIGUSR2: checkpoint saved at" in run.text()
    run.assert_nothing_left()


def test_submitit_exiting_after_a_requeue_leaves_no_worker(runs, tmp_path):
    """submitit's handler after `scontrol requeue`: sys.exit(-1) from inside the run's exception handler."""
    run = start(runs, tmp_path, True, "--launcher=exit")
    run.in_pass(hang=True)
    run.signal(signal.SIGUSR2)
    assert run.ended_within(EXIT_S) == 255, run.text()[-3000:]
    assert "stopped by SIGUSR2: checkpoint saved at" in run.text()
    run.assert_nothing_left()


def test_workers_die_with_a_killed_run(runs, tmp_path):
    """SIGKILL (the OOM killer, a scheduler's last resort) runs no Python: the kernel ends the workers."""
    run = start(runs, tmp_path, True)
    run.in_pass(hang=True)
    run.look()
    os.kill(run.process.pid, signal.SIGKILL)
    assert run.ended_within(EXIT_S) == -signal.SIGKILL
    run.assert_nothing_left()


def test_the_children_of_these_tests_see_the_default_stop_signals(tmp_path):
    """What makes the tests above independent of the shell: a child started like them, from a process that ignores
    SIGINT (as a background job does), has SIGINT, SIGTERM and SIGUSR2 at their defaults."""
    code = ("import signal; print([signal.getsignal(s) is d for s, d in ((signal.SIGINT, signal.default_int_handler),"
            " (signal.SIGTERM, signal.SIG_DFL), (signal.SIGUSR2, signal.SIG_DFL))])")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               preexec_fn=default_stop_signals).stdout
    finally:
        signal.signal(signal.SIGINT, previous)
    assert shown.strip() == "[True, True, True]"
