"""Run configs of every shape YAML allows: alias bombs under every typed key, deep nesting, merge keys,
odd top levels, keys and tags, random documents and random ``--set`` overrides, each family generated.

Whatever the file holds, reading it ends in a `RunConfig` or a `GeReError` whose message is short (no
value is printed whole), quickly; never another exception. A config gere writes reads back as the same
config, for every field type (`test_a_written_config_reads_back_as_the_same_config`).
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
from pathlib import Path

import pytest
import yaml

from gere.continual.run_config import RunConfig, from_dict, load_run_config
from gere.continual.run_folder import config_differences, config_digest
from gere.errors import MAX_MESSAGE, GeReError

#: A message may name a file, a key and what it must be; a value in it is cut to a few hundred characters.
SHORT = 700


def leaf_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted setting of ``cls``: nested sections (dataclasses, optional ones too) are walked."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
        section = next((t for t in options if dataclasses.is_dataclass(t)), None)
        name = f"{prefix}{f.name}"
        keys += leaf_keys(section, name + ".") if section is not None else [name]
    return keys


KEYS = leaf_keys()


def nested_yaml(key: str, value: str) -> str:
    """A YAML document setting the dotted ``key`` to the YAML text ``value``."""
    parts = key.split(".")
    lines = [f"{'  ' * depth}{part}:" for depth, part in enumerate(parts[:-1])]
    return "\n".join([*lines, f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}"]) + "\n"


def bomb(levels: int = 9, width: int = 9, mapping: bool = False) -> str:
    """An alias bomb in one flow value: ``width ** levels`` leaves from a few hundred bytes."""
    names = [f"b{i}" for i in range(levels)]
    if mapping:
        first = "{" + ", ".join(f"k{j}: lol" for j in range(width)) + "}"
        rows = [f"&{names[0]} {first}"]
        rows += ["&" + names[i] + " {" + ", ".join(f"k{j}: *{names[i - 1]}" for j in range(width)) + "}"
                 for i in range(1, levels)]  # fmt: skip
        return "{" + ", ".join(f"r{i}: {row}" for i, row in enumerate(rows)) + "}"
    rows = [f"&{names[0]} [" + ", ".join(["lol"] * width) + "]"]
    rows += [f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(rows) + "]"


def read(tmp_path: Path, text: str, overrides=()) -> RunConfig | GeReError:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    started = time.perf_counter()
    try:
        result = load_run_config(path, list(overrides))
    except GeReError as err:
        result = err
    assert time.perf_counter() - started < 10, "reading a config took too long"
    if isinstance(result, GeReError):
        assert len(str(result)) <= SHORT, f"{len(str(result))} characters: {str(result)[:300]}"
    return result


@pytest.mark.parametrize("key, mapping", [(k, False) for k in KEYS] + [(k, True) for k in KEYS[::3]])
def test_an_alias_bomb_under_any_typed_key_is_a_short_quick_error(tmp_path, key, mapping):
    result = read(tmp_path, nested_yaml(key, bomb(mapping=mapping)))
    assert isinstance(result, GeReError), key
    assert key.split(".")[-1] in str(result)


@pytest.mark.parametrize("depth", [10, 200, 2_000, 20_000])
@pytest.mark.parametrize("shape", ["[{}]", "{{a: {}}}", "[[{}], 1]"])
@pytest.mark.parametrize("key", ["training.learning_rate", "tasks", "per_task", "name"])
def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path, depth, shape, key):
    value = "1"
    opening, closing = shape.split("{}")
    value = opening.replace("{{", "{") * depth + value + closing.replace("}}", "}") * depth
    result = read(tmp_path, nested_yaml(key, value))
    assert isinstance(result, GeReError)


def test_deep_block_nesting_is_an_error_not_a_recursion_error(tmp_path):
    text = "".join(f"{'  ' * d}k{d}:\n" for d in range(1500)) + f"{'  ' * 1500}v: 1\n"
    result = read(tmp_path, text)
    assert isinstance(result, GeReError) and ("nested too deeply" in str(result) or "unknown config" in str(result))


def test_merge_keys_work_as_safe_load_reads_them(tmp_path):
    text = """
model: x
training: &t {max_steps: 3, learning_rate: 0.5}
per_task:
  b:
    <<: *t
    max_steps: 7
tasks:
  - &base {name: a, instruction: pick one, labels: ['yes', 'no'], source: data.jsonl}
  - <<: *base
    name: b
evaluation:
  <<: [{batch_size: 4}, {max_length: 64, batch_size: 8}]
"""
    cfg = read(tmp_path, text)
    assert isinstance(cfg, RunConfig), cfg
    assert cfg.training_for("b").max_steps == 7 and cfg.training_for("b").learning_rate == 0.5
    assert [t.name for t in cfg.tasks] == ["a", "b"] and cfg.tasks[1].instruction == "pick one"
    assert cfg.evaluation.max_length == 64 and cfg.evaluation.batch_size == yaml.safe_load(text)["evaluation"]["batch_size"]
    expected = yaml.safe_load(text)  # as yaml.safe_load reads it, the task sources beside the config file
    for task in expected["tasks"]:
        task["source"] = str(tmp_path / task["source"])
    assert cfg.to_dict() == from_dict(RunConfig, expected).to_dict()
    unquoted = read(tmp_path, "tasks: [{name: a, instruction: i, labels: [yes, no], source: s}]\n")
    assert "tasks[0].labels[0]: expected str, got bool (True); YAML reads yes, no" in str(unquoted)
    repeated = read(tmp_path, "training:\n  <<: {max_steps: 3}\n  max_steps: 4\n  max_steps: 5\n")
    assert isinstance(repeated, GeReError) and "appears twice, on lines 3 and 4" in str(repeated)


@pytest.mark.parametrize("top", ["0", "[]", "text", "1.5", "true", "- a\n- b", "!!set {a}", "''", "[1, [2]]"])
def test_a_top_level_that_is_not_a_mapping_says_so(tmp_path, top):
    result = read(tmp_path, top + "\n")
    assert isinstance(result, GeReError) and "the top level must be a mapping" in str(result)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "~\n", "---\n"])
def test_an_empty_config_is_read_as_no_settings(tmp_path, text):
    cfg = read(tmp_path, text)
    assert isinstance(cfg, RunConfig) and cfg.tasks == []
    with pytest.raises(GeReError, match="has no tasks"):
        cfg.task_specs()


@pytest.mark.parametrize(
    "text",
    [
        "? [a]\n: 1\n",
        "? {a: 1}\n: 2\n",
        "1: x\n",
        "null: x\n",
        "true: x\n",
        "training: {1: 2}\n",
        "training:\n  ? [max_steps]\n  : 3\n",
        "name: !!python/object:os.system echo\n",
        "name: !!python/name:os.system\n",
        "name: !!binary aGVsbG8=\n",
        "gere: {layers: !!set {1, 2}}\n",
        "name: 2024-01-01\n",
        "training: !!omap [{max_steps: 3}]\n",
        "training:\n  max_steps: " + "9" * 5000 + "\n",
        "a: 1\n---\nb: 2\n",
        "name: [unclosed\n",
        "name: *undefined\n",
        "%TAG !x! tag:x,2000:\n---\nname: !x!y z\n",
        "\tname: tab\n",
    ],
)
def test_odd_keys_tags_and_documents_are_errors_naming_the_file(tmp_path, text):
    result = read(tmp_path, text)
    assert isinstance(result, GeReError), text


@pytest.mark.parametrize("key", ["name", "finetuning", "gere.objective", "gere.margin_weight", "training.optim",
                                 "evaluation.general", "training.bf16", "report_to"])  # fmt: skip
def test_a_huge_value_is_cut_in_the_message(tmp_path, key):
    result = read(tmp_path, nested_yaml(key, "'" + "v" * 200_000 + "'"))
    if isinstance(result, GeReError):
        assert len(str(result)) <= MAX_MESSAGE
    else:  # a name or an optimizer name is any text
        assert key in ("name", "training.optim")


# ------------------------------------------------------------------------------------ random documents

_SCALARS = [0, 1, -1, 3, 0.5, 1e-4, 1e30, float("inf"), float("nan"), True, False, None, "", "x", "ce+tm", "dy",
            "auto", "1e-3", "none", "lora", "full", [], {}, [1, 2], ["q_proj"], {"a": "b"}]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and roll < 0.3:
        keys = rng.sample(KEYS, 2) + ["x", "1", "name"]
        return {rng.choice(keys).split(".")[-1]: _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(_SCALARS)


def _random_document(rng: random.Random) -> dict:
    data: dict = {}
    for key in rng.sample(KEYS, rng.randint(1, 8)) + (["unknown.key"] if rng.random() < 0.1 else []):
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = _random_value(rng)
    return data


@pytest.mark.parametrize("seed", range(8))
def test_random_documents_end_in_a_config_or_a_short_error(tmp_path, seed):
    rng = random.Random(seed)
    outcomes = {"config": 0, "error": 0}
    for _ in range(60):
        result = read(tmp_path, yaml.safe_dump(_random_document(rng)))
        outcomes["config" if isinstance(result, RunConfig) else "error"] += 1
    assert outcomes["error"] > 0


_KEY_PIECES = ["", ".", "a..b", "training.", ".training", "training.max_steps", "training.max_steps.x", "tasks.0",
               "name", "per_task.t", "gere", "x" * 5000]  # fmt: skip
_VALUE_PIECES = ["", "[", "]", "{", "*a", "&a x", "!!python/object:os.system x", "1e-3", "'unterminated", "a: b: c",
                 "- x", "\t", "%YAML 1.1", "[" * 5000, "9" * 5000, "{a: 1, a: 2}", "? [a]\n: 1", "=", "3"]  # fmt: skip


@pytest.mark.parametrize("key", _KEY_PIECES, ids=lambda k: k[:20] or "empty")
def test_random_set_overrides_end_in_a_config_or_a_short_error(tmp_path, key):
    for value in _VALUE_PIECES:
        result = read(tmp_path, "model: x\n", [f"{key}={value}"])
        assert isinstance(result, RunConfig | GeReError)
    assert isinstance(read(tmp_path, "model: x\n", [key]), GeReError)  # no '='


# ------------------------------------------------------------------------------------------- round trip

#: Valid values per setting, by name, for configs built at random; a setting not listed keeps its default.
VALID = {
    "seed": [0, 7, 123456789], "finetuning": ["full", "lora", "olora"], "keep_checkpoints": [0, 1, 3],
    "report_to": [[], ["none"]], "trust_remote_code": [True, False], "cache_dir": [None, "/tmp/c"],
    "lora.r": [1, 8], "lora.alpha": [16, 32], "lora.dropout": [0.0, 0.1], "lora.target_modules": [["q_proj"]],
    "gere.objective": ["none", "ce", "ce+tm", "kl+tm"], "gere.margin_weight": ["dy", 1, 100.0, "1e-3"],
    "gere.threshold_k": [1, 0.5, "2e0"], "gere.layers": [[-1], [0, 1]], "gere.replay_source": [None, "r.jsonl"],
    "gere.store_dir": [None, "s"], "training.learning_rate": [1, 0.01, "1e-4"], "training.max_steps": [-1, 5],
    "training.warmup_steps": [0, 0.1, 3], "training.num_train_epochs": [1, 2.5], "training.bf16": ["auto", True, False],
    "training.weight_decay": [0, 0.01], "evaluation.test_limit": [None, 5], "evaluation.method": ["label", "generate"],
    "evaluation.perplexity_sets": [{}, {"wiki": "w.jsonl", "1": "n.jsonl"}], "evaluation.general_mc": [None, "mc.jsonl"],
    "evaluation.lm_eval_num_fewshot": [None, 0, 5], "per_task": [{}, {"t": {"max_steps": 3, "learning_rate": "1e-3"}},
                                                                 {"t": {"num_train_epochs": 2, "bf16": True}}],
    "ewc.strength": [0, 10.0], "lwf.weight": [0, 1], "task_replay.per_task": [0, 4], "olora.l2": [0, 0.5],
    "tasks": [[], [{"name": "t", "instruction": "pick", "labels": ["a", "b"], "source": "t.jsonl"},
                   {"name": "u", "instruction": "pick", "labels": ["x", "y"], "source": "hf:u", "input_field": ["p", "h"],
                    "label_map": {"0": "x", "1": "y"}, "train_size": 8, "stratify": False}]],
    "benchmark": [None, {"order": 5, "data_dir": "d", "test_size": 10}],
}  # fmt: skip


def _valid_random_config(rng: random.Random) -> RunConfig | None:
    data: dict = {"model": "x"}
    for key in rng.sample(sorted(VALID), rng.randint(3, len(VALID))):
        node = data
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = rng.choice(VALID[key])
    if data.get("tasks") and data.get("benchmark"):
        data.pop("benchmark")
    try:
        return from_dict(RunConfig, data)
    except GeReError:
        return None  # a combination the checks refuse (e.g. EWC under O-LoRA)


def test_a_written_config_reads_back_as_the_same_config():
    rng = random.Random(0)
    configs = [c for c in (_valid_random_config(rng) for _ in range(150)) if c is not None]
    assert len(configs) > 75
    covered = set()
    for cfg in configs:
        written = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # what claim() writes as config.yaml
        again = from_dict(RunConfig, yaml.safe_load(written))
        assert again == cfg
        assert config_digest(again) == config_digest(cfg)  # a run resumes from its own config.yaml
        assert config_differences(yaml.safe_load(written), cfg) == []
        rewritten = yaml.safe_dump(again.to_dict(), sort_keys=False)  # written again after a resume: stable
        assert yaml.safe_dump(from_dict(RunConfig, yaml.safe_load(rewritten)).to_dict(), sort_keys=False) == rewritten
        covered |= {type(v).__name__ for v in _leaves(cfg.to_dict())}
    assert {"bool", "int", "float", "str", "NoneType", "list", "dict"} <= covered


def _leaves(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        yield value
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_the_digest_compares_numbers_by_value_and_accepts_digests_written_before():
    from gere.continual.run_folder import _legacy_digest, same_config

    cfg = load_run_config(None, ["model=x"])
    assert cfg.training.warmup_steps == 0 and isinstance(cfg.training.warmup_steps, int)  # the default
    reread = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert isinstance(reread.training.warmup_steps, float)  # read back typed: 0.0
    assert _legacy_digest(reread) != _legacy_digest(cfg)  # why a run could not resume from its config.yaml
    assert config_digest(reread) == config_digest(cfg)
    assert same_config({"config_digest": _legacy_digest(cfg)}, cfg)  # run states written before still match
    assert not same_config({"config_digest": config_digest(cfg)}, load_run_config(None, ["model=y"]))
