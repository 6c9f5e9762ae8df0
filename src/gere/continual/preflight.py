"""Checks a run makes before any work: nothing is extracted, trained or written until all of them pass.

`check_run` is what can be known from a config alone, cheaply: the model (a local path exists, a folder is a
model), the task list, and the output folders (a name or path the system would refuse, a file in the way,
a folder that cannot be written). A sweep runs it for every cell and seed before the first run
(`gere.continual.sweep.plan_sweep`); `gere.continual.runner.run_continual` runs it before taking the output
folder's lock. The inputs themselves (task rows, probe, held-out and replay texts) are read and checked by
the runner next, still before the model loads.
"""

from __future__ import annotations

from gere.continual.run_config import RunConfig
from gere.errors import GeReError, shown
from gere.io_utils import check_output_dir

#: Bytes below the output folder that a run writes at most, beyond its task names: the deepest files are
#: in checkpoints/.stage-<i>.tmp/, gere_store/partial/, stages/<i>-<task>/ and the trackers' folders, with
#: the temporary names of atomic writes (".<name>.<random>.tmp").
RUN_DEPTH = 160
STORE_DEPTH = 80


def check_run(cfg: RunConfig) -> None:
    """Refuse, before any work, a run whose model, tasks or output folders cannot work (see the module)."""
    from gere.modeling import check_model_spec  # imports torch: only when a run is about to start

    check_model_spec(cfg.model, cache_dir=cfg.cache_dir)
    specs = cfg.task_specs()
    check_task_names_readable([s.name for s in specs])
    deepest = max((len(s.name.encode()) for s in specs), default=0) + len(str(len(specs)))
    check_output_dir(cfg.output_dir, inside=RUN_DEPTH + deepest, what="output_dir")
    if cfg.gere.store_dir:
        check_output_dir(cfg.gere.store_dir, inside=STORE_DEPTH, what="gere.store_dir")


def check_task_names_readable(names: list[str]) -> None:
    """Refuse two tasks of one name (the report's columns, checkpoints and per-task settings would mix them)
    and a name that breaks the report's tables or lines (a line break, a tab or other control character,
    ``|``)."""
    for i, name in enumerate(names):
        bad = sorted({repr(c)[1:-1] for c in name if c == "|" or not c.isprintable()})
        if bad:
            raise GeReError(f"task {i + 1}'s name {shown(name, 60)} holds {', '.join(bad)}, which break report.md's "
                            "tables; give the task a name without them (its 'name' in the run config)")  # fmt: skip
        if name in names[:i]:
            raise GeReError(f"tasks {names.index(name) + 1} and {i + 1} are both named {shown(name, 60)}: their "
                            "report columns, checkpoints and per_task settings would mix; give each task its own "
                            "'name' in the run config")  # fmt: skip
