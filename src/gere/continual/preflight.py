"""Checks a run makes before any work: nothing is extracted, trained or written until all of them pass.

`check_run` is what can be known from a config alone, cheaply: the model (a local path exists, a folder is a
model), the task list, and the output folders (a name or path the system would refuse, a file in the way,
a folder that cannot be written). A sweep runs it for every cell and seed before the first run
(`gere.continual.sweep.plan_sweep`); `gere.continual.runner.run_continual` runs it before taking the output
folder's lock. The inputs themselves (task rows, probe, held-out and replay texts) are read and checked by
the runner next, still before the model loads; `check_label_words` checks the label words with the
tokenizer, before the activation store is extracted or the base model evaluated.
"""

from __future__ import annotations

from pathlib import Path

from gere.continual.prompts import encode_prompt_and_target, format_prompt, format_target
from gere.continual.run_config import RunConfig
from gere.continual.tasks import TaskSpec
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
    if cfg.gere.store_dir and not reuses_finished_store(cfg):
        check_output_dir(cfg.gere.store_dir, inside=STORE_DEPTH, what="gere.store_dir")


def reuses_finished_store(cfg: RunConfig) -> bool:
    """Whether the run only reads ``gere.store_dir``: a finished store (its manifest written) with
    ``reuse_store`` on is opened and checked against the run, never written, so it may lie on a read-only
    file system (a store of another identity is still refused, when it is opened)."""
    from gere.store.format import MANIFEST

    return cfg.gere.reuse_store and (Path(cfg.gere.store_dir).expanduser() / MANIFEST).is_file()


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


def check_label_words(cfg: RunConfig, specs: list[TaskSpec], tokenizer) -> None:
    """Refuse, once the tokenizer is loaded and before the store is extracted or the base model evaluated,
    label words the run could not train on or the scorer could not tell apart.

    Each label's tokens are those after the task's prompt (`gere.continual.prompts.encode_prompt_and_target`),
    the tokens it trains on and is scored by. Refused: a label whose tokens leave no room for a prompt within
    ``training.max_length`` (with EOS) or ``evaluation.max_length``; two labels with the same tokens (both
    ``<unk>``, say): neither scoring nor generation can tell them apart, the earlier always wins; and under
    ``evaluation.method: label`` a label whose tokens begin another's: the scores are summed log-likelihoods,
    not normalised by length, so the longer one scores the shorter one's score plus the log-probability
    (below 0) of its extra tokens and is never predicted. ``evaluation.method: generate`` compares the
    generated text, where the trained end-of-sequence token tells the two apart.
    """
    ev = cfg.evaluation
    for spec in specs:
        context = format_prompt(spec, "")
        tokens = {w: encode_prompt_and_target(tokenizer, context, format_target(w))[1] for w in spec.labels}
        _check_label_lengths(cfg, spec, tokens)
        for i, a in enumerate(spec.labels):
            for b in spec.labels[i + 1 :]:
                short, long = (a, b) if len(tokens[a]) <= len(tokens[b]) else (b, a)
                if tokens[long][: len(tokens[short])] != tokens[short]:
                    continue
                pair = (f"task {spec.name!r}: the label words {shown(short, 40)} and {shown(long, 40)} give the "
                        f"tokens {_tokens(tokenizer, tokens[short])} and {_tokens(tokenizer, tokens[long])}")  # fmt: skip
                if tokens[long] == tokens[short]:
                    raise GeReError(f"{pair}, the same, so the scorer cannot tell them apart ({shown(a, 40)} always "
                                    "wins); rename one to words the tokenizer knows (in the task's labels, and its "
                                    "label_map and data)")  # fmt: skip
                if ev.method == "label":
                    raise GeReError(f"{pair}: the first's tokens begin the second's, so under evaluation.method: "
                                    f"label (summed log-likelihood) {shown(long, 40)} scores {shown(short, 40)}'s "
                                    "score plus its extra tokens' log-probability and is never predicted; rename a "
                                    "label (in the task's labels, and its label_map and data) or set "
                                    "evaluation.method: generate")  # fmt: skip


def _tokens(tokenizer, ids: list[int]) -> str:
    """A label's tokens as the tokenizer spells them, with their ids: ``['▁good', '!'] (ids [5, 9])``."""
    return f"{shown(tokenizer.convert_ids_to_tokens(ids), 80)} (ids {shown(ids, 60)})"


def _check_label_lengths(cfg: RunConfig, spec: TaskSpec, tokens: dict[str, list[int]]) -> None:
    """Every label, with EOS and one prompt token, fits ``max_length`` in training; with one prompt token (and
    the generation margin under ``method: generate``) in evaluation."""
    word = max(tokens, key=lambda w: len(tokens[w]))
    n = len(tokens[word])
    own = "max_length" in cfg.per_task.get(spec.name, {})
    section = f"per_task.{spec.name}" if own else "training"
    train_max = cfg.training_for(spec.name).max_length
    if n + 2 > train_max:
        raise GeReError(f"task {spec.name!r}: the label {shown(word, 60)} is {n} tokens, and with the end-of-sequence "
                        f"token and at least one prompt token it needs {n + 2}, more than {section}.max_length = "
                        f"{train_max}; raise max_length in the {section} section to {n + 2} or more (the prompt "
                        "is cut to what is left), or shorten the label")  # fmt: skip
    ev = cfg.evaluation
    need = n + 1 + (2 if ev.method == "generate" else 0)  # generation leaves 2 tokens more
    if need > ev.max_length:
        raise GeReError(f"task {spec.name!r}: the label {shown(word, 60)} is {n} tokens and needs {need} with a "
                        f"prompt token, more than evaluation.max_length = {ev.max_length}; raise max_length in the "
                        f"evaluation section to {need} or more, or shorten the label")  # fmt: skip
