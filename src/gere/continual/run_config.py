"""The configuration of a continual run (`gere run CONFIG.yaml`), as nested dataclasses.

A YAML file maps onto `RunConfig`; unknown keys and values of the wrong type are refused with the key's
dotted name. Flags override the file with ``--set section.key=value`` (the value is read as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gere.baselines.settings import (
    BASELINE_SETTINGS,
    EwcSettings,
    LwfSettings,
    OLoraSettings,
    TaskReplaySettings,
)
from gere.config import GeReConfig, global_batch_size
from gere.config_reading import coerce, from_dict, parse_override, read_yaml_mapping, set_dotted, to_plain
from gere.continual.general_benchmarks import BENCHMARKS, DEFAULT_SUITE_DIR, SUITE, benchmark
from gere.continual.lm_eval_general import lm_eval_tasks
from gere.continual.schedule import SCHEDULES
from gere.continual.tasks import MC_FORMATS, PROMPTS, TaskSpec
from gere.continual.training_settings import TrainingSettings
from gere.errors import GeReError, check_settings, check_task_names

FINETUNING = ("full", "lora", "olora")
EVAL_METHODS = ("label", "generate")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names that get adapters."},
    )

    def __post_init__(self) -> None:
        check_settings([
            (self.r >= 1, "r", "1 or more"),
            (0 < self.alpha < math.inf, "alpha", "a finite number above 0"),
            (0 <= self.dropout < 1, "dropout", "at least 0 and below 1"),
            (bool(self.target_modules), "target_modules", "a non-empty list of module names"),
        ], self)  # fmt: skip


@dataclass
class EvalSettings:
    method: str = field(default="label", metadata={"help": "'label' (log-likelihood of label words) or 'generate'."})
    batch_size: int = field(default=16, metadata={"help": "Evaluation batch size."})
    max_length: int = field(default=512, metadata={"help": "Prompts are cut to this many tokens."})
    test_limit: int | None = field(default=None, metadata={"help": "Evaluate at most this many test samples per task."})
    general_mc: str | None = field(
        default=None, metadata={"help": "Multiple-choice general-ability set: local JSONL/JSON or hf:cais/mmlu:all."}
    )
    mc_format: str = field(
        default="letter",
        metadata={
            "help": "'letter' (the answer's letter after lettered options, MMLU-style; for large models) or "
            "'cloze' (each option's text after the question's stem, per-character log-likelihood)."
        },
    )
    mc_shots: int = field(default=0, metadata={"help": "Few-shot examples per MC question (0 or 5 for MMLU)."})
    mc_dev: str | None = field(default=None, metadata={"help": "Where the few-shot examples come from."})
    mc_limit: int | None = field(default=None, metadata={"help": "Use at most this many MC questions."})
    general: str = field(
        default="mc",
        metadata={
            "help": "General score of the run (and F1 Avg): 'mc' (the general_mc set), 'suite' (the mean of the "
            "general_suite benchmarks, read from general_suite_dir) or 'lm_eval:<task,...>' "
            "(lm-evaluation-harness tasks on the in-memory model; pip install 'gere[eval]')."
        },
    )
    general_suite: list[str] | None = field(
        default=None,
        metadata={
            "help": "With general: suite, the benchmarks scored (null: all of arc_easy, piqa, openbookqa, "
            "commonsenseqa, mmlu, lambada), each as lm-eval 0.4.13 scores it (docs/general_suite.md)."
        },
    )
    general_suite_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the benchmarks' released files (docs/general_suite.md names them); a relative "
                  "path is read from the config's folder; null: data/general in the working directory."},
    )
    general_suite_limit: int | None = field(
        default=None, metadata={"help": "At most this many questions per benchmark, a seeded sample (null: all)."}
    )
    general_suite_limits: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-benchmark question counts that replace general_suite_limit."}
    )
    general_suite_seed: int = field(default=0, metadata={"help": "Seed of the suite's sample (the same every stage)."})
    general_suite_max_length: int = field(
        default=2048, metadata={"help": "Suite prompts with their answer are cut to this many tokens, from the left."}
    )
    lm_eval_include_path: str | None = field(
        default=None,
        metadata={"help": "Folder of your own lm-eval task YAMLs; a relative path is read from the config file's folder."},
    )
    lm_eval_batch_size: int | str | None = field(
        default=None,
        metadata={
            "help": "lm-eval's batch size: a number, 'auto' (lm-eval finds the largest that fits) or 'auto:N' "
            "(re-found N times); null: evaluation.batch_size."
        },
    )
    lm_eval_metric: str = field(default="acc", metadata={"help": "The lm-eval metric that scores each task."})
    lm_eval_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (null: the task's own)."})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many examples per lm-eval task."})
    perplexity_sets: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Held-out general texts for perplexity: {name: JSONL with 'text'}."}
    )
    perplexity_max_length: int = field(default=256, metadata={"help": "Perplexity texts are cut to this length."})
    perplexity_limit: int | None = field(default=None, metadata={"help": "At most this many texts per set."})
    schedule: str = field(
        default="full",
        metadata={
            "help": "Which evaluations a run makes (gere.continual.schedule): 'full' (every task and the general "
            "score after every stage) or 'needed' (each task before and after its own training and at the end, "
            "the general score at the base model, after the middle task and at the end; 4T-2 task evaluations "
            "instead of T(T+1); forgetting is then over the stages evaluated, i.e. -BWT)."
        },
    )

    def __post_init__(self) -> None:
        check_settings([
            (self.method in EVAL_METHODS, "method", f"one of {EVAL_METHODS}"),
            (self.mc_format in MC_FORMATS, "mc_format", f"one of {MC_FORMATS}"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (self.batch_size >= 1, "batch_size", "1 or more"),
            (self.max_length >= 2, "max_length", "2 or more"),
            (self.perplexity_max_length >= 2, "perplexity_max_length", "2 or more"),
            (self.mc_shots >= 0, "mc_shots", "0 or more"),
            *[(getattr(self, n) is None or getattr(self, n) >= 1, n, "1 or more, or null for all")
              for n in ("test_limit", "mc_limit", "perplexity_limit", "lm_eval_limit")],
            (self.lm_eval_num_fewshot is None or self.lm_eval_num_fewshot >= 0, "lm_eval_num_fewshot",
             "0 or more, or null for the task's own"),
            (_lm_eval_batch_size_ok(self.lm_eval_batch_size), "lm_eval_batch_size",
             "a number of 1 or more, 'auto', 'auto:N' (N of 1 or more) or null"),
            (self.general_suite_limit is None or self.general_suite_limit >= 1, "general_suite_limit",
             "1 or more, or null for all"),
            (self.general_suite_max_length >= 2, "general_suite_max_length", "2 or more"),
        ], self)  # fmt: skip
        self._check_suite()
        # 'mc' or 'lm_eval:<task,...>' (an error says so), parsed once: None for the built-in set.
        self.lm_eval_task_names: list[str] | None = lm_eval_tasks(self.general)


    def _check_suite(self) -> None:
        """The suite's names and counts, refused before any work: an unknown benchmark, a count for a benchmark
        not in the suite, or suite settings given while the general score comes from elsewhere."""
        self.general_suite_names: list[str] = []
        if self.general != SUITE:
            if self.general_suite is not None or self.general_suite_limits:
                raise GeReError(f"evaluation.general_suite{'' if self.general_suite is not None else '_limits'} "
                                f"is read only with general: suite (general is {self.general!r}); set "
                                "evaluation.general: suite, or remove it")  # fmt: skip
            return
        names = list(BENCHMARKS) if self.general_suite is None else list(self.general_suite)
        for name in names:
            benchmark(name)  # an unknown name: an error listing the suite
        if not names or len(set(names)) != len(names):
            raise GeReError(f"evaluation.general_suite: {names} must name each benchmark once (some of "
                            f"{list(BENCHMARKS)}, or null for all)")  # fmt: skip
        for name, count in self.general_suite_limits.items():
            if name not in names or not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise GeReError(f"evaluation.general_suite_limits.{name}: {count!r} must be a count of 1 or more "
                                f"for a benchmark of the suite ({names})")  # fmt: skip
        self.general_suite_names = names

    def suite_dir(self) -> str:
        """Where the suite's files are read: general_suite_dir, or data/general in the working directory."""
        return self.general_suite_dir or DEFAULT_SUITE_DIR

    def suite_limits(self) -> dict[str, int | None]:
        """Each suite benchmark's question count: its general_suite_limits entry, else general_suite_limit."""
        return {n: self.general_suite_limits.get(n, self.general_suite_limit) for n in self.general_suite_names}


def _lm_eval_batch_size_ok(value: int | str | None) -> bool:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value is None or value >= 1
    text = str(value)
    if text == "auto":
        return True
    head, _, times = text.partition(":")
    return head == "auto" and times.isdigit() and int(times) >= 1


@dataclass
class BenchmarkSettings:
    name: str = field(default="cl15", metadata={"help": "Shipped benchmark definition."})
    order: int = field(default=4, metadata={"help": "Task order (4, 5 or 6 for cl15)."})
    data_dir: str = field(default="data/cl15", metadata={"help": "Folder with <task>/{train,test}.json."})
    train_size: int | None = field(default=None, metadata={"help": "Training samples per task."})
    test_size: int | None = field(default=None, metadata={"help": "Test samples per task."})
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Only these of the benchmark's tasks (e.g. [sst2, boolq]), in the order's sequence."},
    )
    prompts: str = field(
        default="gere",
        metadata={"help": "'gere' (the benchmark's own instructions) or 'olora' (O-LoRA's prompts, recorded with the "
                  "data by gere data cl15 --from-olora with O-LoRA's instruction file; docs/benchmark_cl15.md)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_settings([(self.prompts in PROMPTS, "prompts", f"one of {list(PROMPTS)}")], self)
        if self.tasks is not None:
            from gere.continual.tasks import load_benchmark_definition

            known = list(load_benchmark_definition(self.name)["tasks"])
            if not self.tasks:
                raise GeReError("tasks: an empty list trains nothing; name some tasks, or leave tasks out for all")
            check_task_names(self.tasks, known, self.name, flag="tasks")


@dataclass
class RunConfig:
    name: str = field(default="run", metadata={"help": "Run name, used in reports."})
    output_dir: str = field(default="runs/run", metadata={"help": "Where checkpoints, results and reports go."})
    model: str = field(default="", metadata={"help": "Hugging Face id, local folder, or .gguf file."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for converted models (default ~/.cache/gere)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    seed: int = field(default=0, metadata={"help": "Seed of everything."})
    finetuning: str = field(
        default="full", metadata={"help": "'full', 'lora', or 'olora' (a new LoRA adapter per task, O-LoRA's penalties)."}
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    gere: GeReConfig = field(default_factory=GeReConfig)
    tasks: list[TaskSpec] = field(default_factory=list, metadata={"help": "Tasks in training order."})
    benchmark: BenchmarkSettings | None = field(default=None, metadata={"help": "A shipped task sequence instead."})
    training: TrainingSettings = field(default_factory=TrainingSettings)
    per_task: dict[str, dict] = field(
        default_factory=dict, metadata={"help": "Training overrides per task name, e.g. {sst2: {max_steps: 50}}."}
    )
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    ewc: EwcSettings = field(default_factory=EwcSettings)
    task_replay: TaskReplaySettings = field(default_factory=TaskReplaySettings)
    lwf: LwfSettings = field(default_factory=LwfSettings)
    olora: OLoraSettings = field(default_factory=OLoraSettings)
    keep_checkpoints: int = field(
        default=0,
        metadata={"help": "Stage checkpoints kept, the newest (gere export --stage needs its stage's); 0 keeps all."},
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "Experiment trackers: tensorboard, mlflow, wandb, 'all' (installed ones) or none."},
    )

    def __post_init__(self) -> None:
        check_settings([
            (self.finetuning in FINETUNING, "finetuning", f"one of {FINETUNING}"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "0 (keep all) or more"),
        ], self)  # fmt: skip
        if self.olora.on(self) and self.ewc.on(self):
            raise GeReError(
                "ewc.strength > 0 with finetuning: olora: every task trains a new adapter, so EWC's anchor (the "
                "weights that trained before) has nothing left to hold; use one of the two"
            )
        from gere.continual.tracking import check_report_to

        check_report_to(self.report_to, self.output_dir)  # MLflow's default store is beside the run
        for task, overrides in self.per_task.items():
            self.per_task[task] = TrainingSettings.route_keys(dict(overrides), f"per_task.{task}")
        # Every setting is checked now, before any model is loaded or any file written.
        for task in [None, *self.per_task]:
            self._check_interpolation(self.training_for(task) if task else self.training, task)

    def method_name(self) -> str:
        """The method a run trains with, as reports name it: the replay objective (``none`` without
        replay), with ``+ewc`` / ``+lwf`` / ``+olora`` / ``+task-replay`` when those baselines are on (alone: ``ewc``, ...)."""
        parts = [self.gere.objective] if self.gere.parts else []
        parts += [s.label for s in BASELINE_SETTINGS if getattr(self, s.section).on(self)]
        return "+".join(parts) or "none"

    def _check_interpolation(self, t: TrainingSettings, task: str | None) -> None:
        k = self.gere.num_interpolate_per_batch
        global_batch = global_batch_size(t.per_device_train_batch_size, t.gradient_accumulation_steps)
        tr = self.task_replay
        if tr.on(self) and tr.mixing == "interpolate":
            if self.gere.parts and self.gere.mixing in ("interpolate", "concat"):
                raise GeReError(
                    f"task_replay.mixing: interpolate and gere replay_mixing {self.gere.mixing!r} both place rows "
                    "inside the task batches; give the general replay set a separate batch (gere.replay_mixing: "
                    "batch, gere.num_interpolate_per_batch: 0) or the task buffer another mixing"
                )
            if tr.per_batch >= global_batch:
                where = f" for task {task!r}" if task else ""
                raise GeReError(
                    f"task_replay.per_batch = {tr.per_batch} leaves no task sample in a global batch of {global_batch}"
                    f"{where}; lower it or raise the batch"
                )
        if self.gere.parts and k and k >= global_batch:
            where = f" for task {task!r}" if task else ""
            raise GeReError(
                f"gere.num_interpolate_per_batch = {k} leaves no task sample in a global batch of {global_batch}"
                f"{where} (per_device_train_batch_size x gradient_accumulation_steps x processes); lower it or "
                "raise the batch"
            )

    def task_specs(self) -> list[TaskSpec]:
        if self.tasks and self.benchmark:
            raise GeReError("give either tasks or benchmark in the run config, not both")
        if self.benchmark:
            from gere.continual.tasks import load_benchmark

            b = self.benchmark
            return load_benchmark(b.name, order=b.order, data_dir=b.data_dir, train_size=b.train_size,
                                  test_size=b.test_size, seed=self.seed, tasks=b.tasks, prompts=b.prompts)  # fmt: skip
        if not self.tasks:
            raise GeReError("the run config has no tasks: add a 'tasks' list or a 'benchmark' section")
        return list(self.tasks)

    def training_for(self, task: str) -> TrainingSettings:
        hints = typing.get_type_hints(TrainingSettings)
        try:
            # Typed as the training section is (a YAML 1e-3 is text until read as a float).
            overrides = {k: coerce(v, hints[k], k) for k, v in self.per_task.get(task, {}).items()}
            if "trainer_args" in overrides:  # a task's TrainingArguments fields add to (and win over) the section's
                overrides["trainer_args"] = {**self.training.trainer_args, **overrides["trainer_args"]}
            return dataclasses.replace(self.training, **overrides)
        except GeReError as err:
            raise GeReError(f"per_task.{task}: {err}") from None

    def to_dict(self) -> dict:
        return to_plain(self)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Read a YAML run config (or start from ``base``), apply ``key.path=value`` overrides, validate. Relative
    paths of files the run reads are read from the config file's folder (`gere.continual.config_paths`);
    overrides are taken as typed."""
    from gere.continual.config_paths import resolve_config_paths

    data: dict = dict(base or {})
    written: dict = {}
    if path is not None:
        data.update(read_yaml_mapping(path))
        written = resolve_config_paths(data, path)
    for item in overrides or []:
        set_dotted(data, *parse_override(item, "--set"))
    cfg = from_dict(RunConfig, data)
    cfg.paths_as_written = written  # a run started when these were read from the working directory resumes
    return cfg
