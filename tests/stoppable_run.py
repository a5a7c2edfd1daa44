"""`python -m tests.stoppable_run [--launcher=refuse|exit] OVERRIDES...`: run.py (reportgen/runs/cli.py) with what
the exit-path tests (tests/test_worker_exit.py) need around it.

- A decoder that hangs where no signal reaches it: a file starting with HANGHANG blocks SIGALRM (as a native codec
  in a C loop does, so the per-file time limit cannot stop it) and sleeps for an hour, after writing its process's
  pid as `hang.<pid>` into the folder named by $REPORTGEN_TEST_MARKERS.
- `paced_net`: WideNet taking `pause_s` per forward of two noisy images (the pass's batches; the probes use other
  sizes or blank images, so they stay fast), and raising on the `fail_at`-th of those forwards (0: never).
- `--launcher=...`: a SIGUSR2 handler installed before the run, as submitit installs its own, that the run hands
  the signal over to after its checkpoint (runs/signals.py): `refuse` is submitit after the last allowed requeue
  (it raises, and the job's result keeps that exception, with the frames of the run, until the interpreter exits);
  `exit` is submitit after a requeue (sys.exit(-1)).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, List

from PIL import Image, ImageFile

from tests.tiny_models import WideNet

HANG_PREFIX = b"HANGHANG"
KEPT: List[BaseException] = []  # what submitit keeps as a failed job's result, alive until the interpreter exits


class HangingImage(ImageFile.ImageFile):
    """A test-only format whose decoder never returns and cannot be interrupted by the per-file time limit."""

    format = "HANGING"
    format_description = "test decoder that hangs"

    def _open(self) -> None:
        self._size = (8, 8)
        self._mode = "RGB"

    def load(self) -> Any:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        (Path(os.environ["REPORTGEN_TEST_MARKERS"]) / f"hang.{os.getpid()}").touch()
        time.sleep(3600)
        return super().load()


class PacedNet(WideNet):
    def __init__(self, pause_s: float, fail_at: int):
        super().__init__()
        self.pause_s, self.fail_at, self.forwards = pause_s, fail_at, 0

    def forward(self, x):
        if x.shape[0] == 2 and x.flatten(2).std(dim=2).min() > 0:
            self.forwards += 1
            if self.forwards == self.fail_at:
                raise ValueError(f"failing on purpose at pass forward {self.forwards}")
            time.sleep(self.pause_s)
        return super().forward(x)


def paced_net(pause_s: float = 0.25, fail_at: int = 0) -> PacedNet:
    return PacedNet(float(pause_s), int(fail_at)).eval()


class LauncherExit(Exception):
    """What submitit raises when it does not requeue a job (its UncompletedJobError)."""


def refuse_requeue(signum: int, frame: Any) -> None:
    raise LauncherExit("Job not requeued because: timed-out too many times.")


def requeued_exit(signum: int, frame: Any) -> None:
    sys.exit(-1)


def main(argv: List[str]) -> None:
    launcher = {"--launcher=refuse": refuse_requeue, "--launcher=exit": requeued_exit}
    handlers = [launcher[a] for a in argv if a in launcher]
    if handlers:
        signal.signal(signal.SIGUSR2, handlers[0])
    Image.register_open(HangingImage.format, HangingImage, lambda prefix: prefix[:8] == HANG_PREFIX)
    sys.argv = [sys.argv[0]] + [a for a in argv if a not in launcher]
    from reportgen.runs.cli import main as run_main

    try:
        run_main()
    except BaseException as exc:  # noqa: B036 - kept, not handled: it still ends the process
        if refuse_requeue in handlers:
            KEPT.append(exc)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
