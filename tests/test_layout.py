"""The package's shape: cheap settings, bounded modules and functions, no import circle, no old import paths."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SRC = Path(__file__).resolve().parent.parent / "src" / "gere"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def test_reading_settings_does_not_import_torch():
    code = (
        "import sys\n"
        "from gere import GeReConfig\n"
        "from gere.baselines.settings import EwcSettings, LwfSettings, OLoraSettings, TaskReplaySettings\n"
        "from gere.store.format import StoreSpec\n"
        "cfg = GeReConfig(objective='ce+kl+tm', margin_weight='100')\n"
        "spec = StoreSpec.for_config(cfg)\n"
        "assert cfg.margin_weight == 100.0 and spec.topk == cfg.kl_topk\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_reading_a_run_config_does_not_import_torch(tmp_path):
    """`gere run` reads its config with `load_run_config` before anything loads a model: every section,
    the shipped benchmark's task names and the general probe's format are checked without torch."""
    config = {
        "model": "some/model",
        "tasks": [{"name": "mood", "source": str(tmp_path), "labels": ["good", "bad"], "instruction": "pick one"}],
        "benchmark": {"name": "cl15", "tasks": ["sst2", "boolq"]},
        "gere": {"objective": "ce+tm", "margin_weight": "dy", "num_interpolate_per_batch": 1},
        "training": {"per_device_train_batch_size": 4, "bf16": "auto"},
        "evaluation": {"mc_format": "cloze"},
        "ewc": {"strength": 1}, "lwf": {"weight": 0}, "task_replay": {"per_task": 2, "mixing": "batch"},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    code = (
        "import sys\n"
        "from gere.continual.run_config import load_run_config\n"
        f"cfg = load_run_config({str(tmp_path / 'run.yaml')!r}, ['gere.replay_batch_size=2'])\n"
        "assert cfg.benchmark.tasks == ['sst2', 'boolq'] and cfg.evaluation.mc_format == 'cloze'\n"
        "assert cfg.gere.replay_batch_size == 2 and cfg.method_name() == 'ce+tm+ewc+task-replay'\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _long_function_allowed(node: ast.AST, lines: list[str]) -> bool:
    """A long function says why at its top: a comment on the line after its signature."""
    first_body = node.body[0]
    start = first_body.lineno - 1
    if isinstance(first_body, ast.Expr) and isinstance(getattr(first_body, "value", None), ast.Constant):
        start = first_body.end_lineno  # after the docstring
    return lines[start].strip().startswith("# long:")


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        name = path.relative_to(SRC.parent)
        if len(lines) > MAX_MODULE_LINES and not lines[0].startswith("# long:"):
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _long_function_allowed(node, lines):
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_store_package_names_its_modules_names():
    import gere.store
    import gere.store.extract
    import gere.store.format

    assert gere.store.extract_store is gere.store.extract.extract_store
    assert gere.store.open_store is gere.store.format.open_store
    assert gere.store.StoreSpec is gere.store.format.StoreSpec
    with pytest.raises(AttributeError, match="no attribute 'pad_right'"):
        gere.store.pad_right  # noqa: B018 (removed in 0.2.0: gere.batching.pad_batch)


def test_removed_module_paths_are_gone():
    for old in ("gere.gere_trainer", "gere.gere_config", "gere.runner", "gere._moved"):
        assert importlib.util.find_spec(old) is None, f"{old} was removed in 0.2.0 (CHANGELOG.md)"


def _imports(path: Path) -> set[str]:
    """The `gere` modules a module imports, when it loads or inside its functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gere"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gere"))
    return found


def test_modules_import_each_other_without_a_circle():
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: sorted(m for m in _imports(path) if m in modules and m != name)
             for name, path in modules.items()}  # fmt: skip
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                return [*path, name, dep]
            if dep not in state and (cycle := visit(dep, [*path, name])):
                return cycle
        state[name] = 2
        return None

    cycle = next((c for name in sorted(graph) if name not in state and (c := visit(name, []))), None)
    assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


# Test files about the whole package rather than one module, each with what it covers.
CROSS_CUTTING = {
    "config_shapes": "run configs of every shape YAML allows",
    "configs": "the shipped example configs parse",
    "crash_resume": "runs killed at every point and resumed",
    "kills_between_writes": "kills between two file writes",
    "reliability": "docs/reliability.md's failure table",
    "examples": "the examples folder runs",
    "layout": "the package's shape",
    "architecture": "docs/architecture.md's module map against the code",
    "demo_integration": "the demo on its real model (opt-in)",
    "demo_methods": "the demo's methods table",
    "lm_eval": "lm-evaluation-harness as the general score (continual/lm_eval_general.py and the runner)",
    "llamafactory_entry": "gere-lf's entry point without LLaMA-Factory (tests_lf/ runs it with LLaMA-Factory)",
    "device_check": "benchmarks/device_check.py's CPU path (the GPU check a lent machine runs)",
}


def test_test_files_are_named_after_their_modules():
    names = {"_".join(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")}
    names |= {p.name for p in SRC.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in SRC.rglob("*.py")}
    tests = Path(__file__).resolve().parent
    unnamed = [p.name for p in sorted(tests.glob("test_*.py")) if p.stem[5:] not in names | set(CROSS_CUTTING)]
    assert unnamed == [], "name a test file test_<module>.py after the module it tests, or list it in CROSS_CUTTING"
