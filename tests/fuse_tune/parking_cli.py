"""``fuse-tune`` whose trials stop after their first epoch, for the tests in test_study_services.py that must
catch worker processes at a known point however slowly the machine runs them.

Run as a script, ``python parking_cli.py run STUDY ...``. Every trial first reports its first epoch to Optuna
(the report is in the storage before the trial stops), then:

* ``FUSE_TEST_PARK_ABOVE=N``: a trial numbered above ``N`` parks: it waits to be killed. A test that sees every
  worker parked in the storage can SIGKILL the process group knowing that nothing moved between what it saw and
  the kill. Trials numbered ``N`` or below run to the end.
* ``FUSE_TEST_GATE=DIR``: the trial creates ``DIR/waiting-<pid>-<trial number>`` and waits until ``DIR/open``
  exists, so a test can hold every process's first trial until all of them have one.

Without either variable this is plain ``fuse-tune``. Worker processes (``--n-jobs``, multiprocessing's spawn)
re-import this file as ``__mp_main__`` and stop too. A trial gives up waiting after ``HOLD_LIMIT`` seconds and
runs on, so that a worker whose test died without killing it does not wait forever.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import optuna

PARK_ABOVE = "FUSE_TEST_PARK_ABOVE"
GATE = "FUSE_TEST_GATE"
HOLD_LIMIT = 900.0


def _hold_trials(park_above: int | None, gate: Path | None) -> None:
    report = optuna.trial.Trial.report

    def report_then_hold(self: optuna.trial.Trial, value: float, step: int) -> None:
        report(self, value, step)
        if park_above is not None and self.number > park_above:
            threading.Event().wait(HOLD_LIMIT)
        if gate is not None and not (gate / "open").exists():
            (gate / f"waiting-{os.getpid()}-{self.number}").touch()
            deadline = time.monotonic() + HOLD_LIMIT
            while not (gate / "open").exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # polls the test's signal, a file

    optuna.trial.Trial.report = report_then_hold


if os.environ.get(PARK_ABOVE) or os.environ.get(GATE):
    _hold_trials(int(os.environ[PARK_ABOVE]) if os.environ.get(PARK_ABOVE) else None,
                 Path(os.environ[GATE]) if os.environ.get(GATE) else None)

if __name__ == "__main__":
    from fuse_tune.cli import main

    sys.exit(main())
