"""Stop signals (runs/signals.py): Ctrl-C, SIGTERM and SLURM's time-limit USR2 save the checkpoint at a batch
boundary and stop with one line; nothing runs inside the model's forward (a handler installed before the run, like
submitit's requeue, is called afterwards); the same command then ends with an uninterrupted run's results.

These tests set the stop signals to their defaults first (in this process for the test, or in the child), so they
pass from any shell: a background job of a non-interactive shell inherits SIGINT ignored, which a run respects."""
import os
import signal
import subprocess
import sys
import time

import pytest

from reportgen.config.store import conf_dir
from reportgen.runs.launch import launch
from reportgen.runs.pipeline import run
from reportgen.runs.signals import RunInterrupted
from reportgen.state.run_state import load_state
from tests.helpers import WIDE, compose_config, make_colour_folder
from tests.processes import STOP_SIGNALS, default_stop_signals
from tests.run_compare import assert_same_results
from tests.tiny_models import WideNet

REPO = conf_dir().parent
SIGNALLED = {"sent": False}  # once per process: a resumed run in the same process is not signalled again


class SelfSignallingNet(WideNet):
    """Sends SIGUSR2 to its own process inside its third forward of a pass batch (two noisy images; the task probe's
    two blank images and the other probes' sizes are not counted, however many probes there are), as SLURM does at
    any moment."""

    forwards = 0

    def forward(self, x):
        if x.shape[0] == 2 and x.flatten(2).std(dim=2).min() > 0:
            SelfSignallingNet.forwards += 1
            if SelfSignallingNet.forwards == 3 and not SIGNALLED["sent"]:
                SIGNALLED["sent"] = True
                os.kill(os.getpid(), signal.SIGUSR2)
        return super().forward(x)


def self_signalling_net() -> SelfSignallingNet:
    return SelfSignallingNet().eval()


@pytest.fixture
def default_signals():
    """The stop signals at Python's defaults for the test (Ctrl-C raises KeyboardInterrupt), restored after."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@pytest.fixture
def folder(tmp_path):
    return make_colour_folder(tmp_path / "data", per_class=8, noise=60, seed=2)


def with_batches_of_two(overrides):
    return [o for o in overrides if not o.startswith("runtime.batch_size")] + ["runtime.batch_size=2"]


def test_a_signal_inside_the_forward_stops_at_the_batch_boundary_then_hands_over(folder, tmp_path, default_signals):
    overrides = with_batches_of_two([o.replace("tests.tiny_models.wide_net", "tests.test_signals.self_signalling_net")
                                     for o in WIDE]) + [f"dataset.root={folder}", "runtime.checkpoint_every=0"]
    cfg = compose_config(overrides)
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # as submitit's would be
    try:
        with pytest.raises(RunInterrupted) as stopped:
            launch(cfg, out_dir=tmp_path / "run")
        assert calls == []  # nothing ran inside the forward
        stop = stopped.value
        assert str(stop).startswith("stopped by SIGUSR2: checkpoint saved at 6 of 24 images"), str(stop)
        assert stop.exit_code == 128 + signal.SIGUSR2
        state = load_state(tmp_path / "run" / "results" / "state.pt")  # saved although checkpoint_every=0
        assert state.done == state.processed == 6  # the signalled batch finished; nothing after it counted
        stop.hand_over()  # run.py does this after logging: the previous handler (submitit: requeue) runs now
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handlers are gone
    run(cfg, out_dir=tmp_path / "run")  # the same config again: resumes
    run(cfg, out_dir=tmp_path / "whole")
    assert_same_results(tmp_path / "whole", tmp_path / "run")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_to_the_whole_process_group_saves_and_exits_with_one_line(folder, tmp_path, signum):
    """As a terminal's Ctrl-C or a scheduler does: the signal reaches the DataLoader workers too."""
    overrides = with_batches_of_two([o.replace("wide_net", "slow_net") for o in WIDE]) + [
        f"dataset.root={folder}", "runtime.checkpoint_every=3", "runtime.num_workers=2"]
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "run.py", *overrides, f"hydra.run.dir={out}"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=default_stop_signals)
    state_file = out / "results" / "state.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not state_file.exists():
        time.sleep(0.05)  # the first periodic checkpoint: the pass is under way
    assert process.poll() is None, "the run ended before it could be signalled:\n" + process.stdout.read()
    os.killpg(process.pid, signum)
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, log
    assert "Traceback" not in log and "forward raised" not in log, log
    (error,) = [line for line in log.splitlines() if "[ERROR]" in line]
    done = load_state(state_file).done
    assert f"stopped by {signal.Signals(signum).name}: checkpoint saved at {done} of 24 images" in error, error
    assert 6 <= done < 24
    if signum != signal.SIGINT:
        return  # the resume is the same for both signals
    run(compose_config(overrides), out_dir=out)  # the same command again
    run(compose_config(overrides), out_dir=tmp_path / "whole")
    assert_same_results(tmp_path / "whole", out)
