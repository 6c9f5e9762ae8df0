"""Fault injection for crash tests: kill the process at a named point, as a power cut or OOM kill would.

Set the environment variable ``GERE_FAULT=<point>:<n>`` and the n-th time (counting from 1, per process)
the code reaches ``maybe_fail(<point>)``, the process sends itself SIGKILL: no exception, no ``finally``,
no flush, exactly what a crash leaves behind. Unset, `maybe_fail` costs one environment lookup.

Points (see docs/reliability.md and tests/test_reliability.py):

- ``extract_batch``: in `gere.store.extract_store`, after a batch's rows and ``partial/progress.json``
  are written;
- ``train_step``: after an optimisation step of any task of a continual run (`train_step_callback`);
- ``evaluate_task``: in `gere.continual.evaluator.Evaluator`, after each task's evaluation;
- ``write``: in `gere.io_utils.atomic_path`, after each file is renamed into place: ``write:<n>`` kills
  between the n-th and the next write of any file (config, state, report, plot, manifest, ...).

Example: ``GERE_FAULT=train_step:3 gere run run.yaml`` dies during the third optimisation step of the
run; ``gere run run.yaml --resume`` then finishes it.

``GERE_FAULT_SIGNAL=TERM`` (or ``INT``) sends that signal instead of SIGKILL: what a scheduler's stop or a
Ctrl-C does, which the ``gere`` command turns into a clean stop.

``GERE_FAULT_LOG=<file>`` appends one line per point passed (``write /run/report.md``), in order: which n
to pick for a point, e.g. the write of a given file.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "GERE_FAULT"
LOG_ENV = "GERE_FAULT_LOG"
SIGNAL_ENV = "GERE_FAULT_SIGNAL"
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
POINTS = ("extract_batch", "train_step", "evaluate_task", "write")

_calls: dict[str, int] = {}


def parse_fault(spec: str) -> tuple[str, int]:
    """``"extract_batch:2"`` -> ``("extract_batch", 2)``; anything else is a `ValueError` naming the fix."""
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{ENV}={spec!r} is not <point>:<n> with point one of {', '.join(POINTS)} and n >= 1, "
            f"e.g. {ENV}=train_step:3; unset {ENV} to run normally"
        )
    return point, int(count)


def maybe_fail(point: str, detail: str = "") -> None:
    """Kill this process with SIGKILL on the n-th call at ``point`` if ``GERE_FAULT=<point>:<n>``. ``detail``
    (the file just written, ...) is named in the kill message and in ``GERE_FAULT_LOG``."""
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{point} {detail}\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, count = parse_fault(spec)
    if target != point:
        return
    _calls[point] = _calls.get(point, 0) + 1
    if _calls[point] == count:
        after = f" (after {detail})" if detail else ""
        name = os.environ.get(SIGNAL_ENV, "KILL")
        if name not in SIGNALS:
            raise ValueError(f"{SIGNAL_ENV}={name!r} is not one of {', '.join(SIGNALS)}; unset it for SIGKILL")
        print(f"gere: {ENV}={spec}: SIG{name} to process {os.getpid()} at {point} #{count}{after}", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), SIGNALS[name])


def train_step_callback():
    """A `transformers.TrainerCallback` that calls ``maybe_fail("train_step")`` after every step."""
    from transformers import TrainerCallback

    class TrainStepFault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            maybe_fail("train_step")

    return TrainStepFault()
