"""GeRe inside LLaMA-Factory's SFT training, without editing LLaMA-Factory's files: ``gere-lf train CONFIG.yaml``.

The YAML is an ordinary LLaMA-Factory training config plus a ``gere:`` block (any `GeReConfig` setting,
e.g. ``replay_source``, ``objective``, ``margin_weight``; and ``check_store_model: false`` when a later
task of a sequence starts from an earlier task's weights but reuses the base model's activation store
through ``store_dir`` and ``reuse_store: true``).
``gere-lf`` takes the block out, puts GeRe's mixin in front of LLaMA-Factory's SFT trainer class (its SFT
workflow looks the class up when it runs) and calls LLaMA-Factory's own training entry with the rest.

Several processes: ``llamafactory-cli train`` re-launches itself under torchrun, and a patch made in the
launching process would be lost in the workers. ``gere-lf`` does the launching itself, the same way
(``FORCE_TORCHRUN=1`` or more than one accelerator; ``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), with this module as the workers' program, so every worker applies the
patch; under ``torchrun`` / ``accelerate launch`` started by the user it simply runs in each process.

With replay on, gradient checkpointing is made non-reentrant (``use_reentrant_gc: false``) unless the
config says otherwise: the replay batch is a second forward pass before each backward, which reentrant
checkpointing under DDP refuses.

The loss parts (``task_ce``, ``replay_ce``, ``replay_margin``, ``margin_weight``, ...) reach LLaMA-Factory's
``trainer_state.json`` through the Trainer's log, and its ``trainer_log.jsonl`` (what LlamaBoard reads)
through a subclass of its ``LogCallback`` that adds them, and the Trainer's ``grad_norm``, to each line. When LLaMA-Factory is installed but
does not import (a module it needs is missing, e.g. torchaudio on a CPU machine), the error names the
missing module and the fix rather than saying LLaMA-Factory is missing.

Needs LLaMA-Factory (tested with 0.9.5 and its pins: transformers 5.6, peft 0.18, trl 0.24, datasets 4.0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from gere.config import GeReConfig
from gere.config_reading import from_dict, parse_override, read_yaml_mapping, set_dotted
from gere.errors import GeReError

USAGE = "usage: gere-lf train CONFIG.yaml [key=value ...]   (a LLaMA-Factory SFT config with a gere: block)"
# Keys of the gere: block that are trainer arguments rather than GeReConfig settings.
TRAINER_KEYS = ("check_store_model",)


def read_config(path: str, overrides: list[str]) -> tuple[dict[str, Any], GeReConfig, dict[str, Any]]:
    """``(LLaMA-Factory args, GeReConfig, trainer kwargs)`` from the YAML and ``key=value`` overrides
    (``gere.margin_weight=100`` reaches the gere block)."""
    args = read_yaml_mapping(path)
    for item in overrides:
        if "=" not in item:
            raise GeReError(f"override {item!r} is not key=value; {USAGE}")
        # LLaMA-Factory's settings are handed on untyped: 2e-5 must arrive as a number.
        set_dotted(args, *parse_override(item, "override", numbers=True))
    block = args.pop("gere", None)
    if not isinstance(block, dict):
        raise GeReError(f"{path} has no gere: block; add one, e.g. gere: {{replay_source: general.jsonl}}")
    stage = args.get("stage", "sft")
    if stage != "sft":
        raise GeReError(f"gere-lf supports stage: sft (got {stage!r}); GeRe replays into supervised fine-tuning")
    trainer_kwargs = {k: block.pop(k) for k in TRAINER_KEYS if k in block}
    # The same reader as `gere run`'s: unknown keys and values of the wrong type named by their dotted key.
    config = from_dict(GeReConfig, block, "gere")
    if config.parts and "use_reentrant_gc" not in args:
        # A replay batch is a second forward pass before the step's backward; with LLaMA-Factory's default
        # reentrant gradient checkpointing, DDP would mark the checkpointed parameters ready twice and stop.
        args["use_reentrant_gc"] = False
    return args, config, trainer_kwargs


def gere_trainer_class(base: type, gere_config: GeReConfig, trainer_kwargs: dict[str, Any]) -> type:
    """``base`` (LLaMA-Factory's SFT trainer) with GeRe's mixin in front, configured by ``gere_config``."""
    from gere.trainer import GeReMixin

    class GeReLlamaFactoryTrainer(GeReMixin, base):
        # LLaMA-Factory's trainer turns ``tokenizer=`` into ``processing_class`` itself.
        _gere_converts_tokenizer = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, gere_config=gere_config, **trainer_kwargs, **kwargs)

    return GeReLlamaFactoryTrainer


#: Fixes for modules LLaMA-Factory imports when it loads, beyond ``pip install <module>``.
IMPORT_FIXES = {
    "torchaudio": "pip install the torchaudio built for your torch ({torch}), e.g. pip install torchaudio=={torch}; "
    "where PyPI has none for it (CPU builds of recent torch), LLaMA-Factory needs torchaudio only for audio "
    "inputs and an empty stand-in module named torchaudio on PYTHONPATH lets it load (docs/llamafactory.md, "
    "tests_lf/stubs)",
    "torchvision": "pip install the torchvision built for your torch ({torch})",
}
#: Import names whose pip package has another name.
PIP_NAMES = {"cv2": "opencv-python", "PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def import_failure(err: ImportError) -> str:
    """What to tell a user whose ``import llamafactory...`` failed: LLaMA-Factory missing, one of the modules it
    imports missing (named, with its fix), or a version it does not fit."""
    import importlib.util

    missing = (getattr(err, "name", None) or "").split(".")[0]
    if missing == "llamafactory" or importlib.util.find_spec("llamafactory") is None:
        return (f"gere-lf needs LLaMA-Factory ({err}); pip install llamafactory==0.9.5 in this environment "
                "(see docs/llamafactory.md)")  # fmt: skip
    if isinstance(err, ModuleNotFoundError) and missing:
        try:
            import torch

            version = torch.__version__.split("+")[0]
        except ImportError:
            version = "your torch version"
        fix = IMPORT_FIXES.get(missing, "pip install {pip} in this environment").format(
            torch=version, pip=PIP_NAMES.get(missing, missing))
        return (f"LLaMA-Factory is installed but does not import: it needs the module {missing!r}, which is "
                f"missing ({err}); {fix}")  # fmt: skip
    return (f"LLaMA-Factory is installed but does not import ({type(err).__name__}: {err}); gere-lf is tested with "
            "llamafactory 0.9.5 and its pins (transformers <= 5.6, peft 0.18, trl <= 0.24, datasets <= 4.0): "
            "pip install llamafactory==0.9.5 with its requirements (see docs/llamafactory.md)")  # fmt: skip


def log_callback_with_loss_parts(base: type) -> type:
    """``base`` (LLaMA-Factory's ``LogCallback``), whose ``trainer_log.jsonl`` lines (LlamaBoard's source) also
    carry GeRe's loss parts of their step, and the Trainer's ``grad_norm``, right after ``loss``."""
    from gere.parts import LOSS_PARTS, WEIGHTS

    class GeReLogCallback(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._gere_parts: dict[int, dict[str, float]] = {}  # step -> parts, until its line is written

        def on_log(self, args, state, control, **kwargs):
            entry = kwargs.get("logs") or (state.log_history[-1] if state.log_history else {})
            # The Trainer's gradient norm too: LLaMA-Factory's line leaves it out, and LlamaBoard reads only this file.
            parts = {k: entry[k] for k in (*LOSS_PARTS, *WEIGHTS, "grad_norm") if entry.get(k) is not None}
            if parts:
                self._gere_parts[state.global_step] = parts
            return super().on_log(args, state, control, **kwargs)

        def _write_log(self, output_dir, logs):
            parts = self._gere_parts.pop(logs.get("current_steps"), None)
            if parts and "loss" in logs:  # the parts beside the loss; the rest in LLaMA-Factory's order
                keys = list(logs)
                at = keys.index("loss") + 1
                logs = {**{k: logs[k] for k in keys[:at]}, **parts, **{k: logs[k] for k in keys[at:]}}
            return super()._write_log(output_dir, logs)

    return GeReLogCallback


def install(gere_config: GeReConfig, trainer_kwargs: dict[str, Any]) -> type:
    """Make LLaMA-Factory's SFT workflow build GeRe's trainer, and its trainer log carry GeRe's loss parts, in
    this process; returns the trainer class."""
    try:
        from llamafactory.train import tuner
        from llamafactory.train.sft import workflow
    except ImportError as err:
        raise GeReError(import_failure(err)) from err
    if not getattr(tuner.LogCallback, "_gere_installed", False):
        tuner.LogCallback = log_callback_with_loss_parts(tuner.LogCallback)
        tuner.LogCallback._gere_installed = True
    base = workflow.CustomSeq2SeqTrainer
    if getattr(base, "_gere_installed", False):
        return base
    cls = gere_trainer_class(base, gere_config, trainer_kwargs)
    cls._gere_installed = True
    workflow.CustomSeq2SeqTrainer = cls
    return cls


def _device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _launch_workers(argv: list[str]) -> int:
    """Run this module under torchrun, as ``llamafactory-cli train`` would run itself."""
    env = os.environ
    nproc = env.get("NPROC_PER_NODE", str(max(_device_count(), 1)))
    port = env.get("MASTER_PORT") or str(_free_port())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", env.get("NNODES", "1"),
        "--node_rank", env.get("NODE_RANK", "0"), "--nproc_per_node", nproc,
        "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", port,
        "-m", "gere.integrations.llamafactory", *argv,
    ]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        args, gere_config, trainer_kwargs = read_config(argv[1], argv[2:])
        launched = "LOCAL_RANK" in os.environ
        wants_workers = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true", "y") or _device_count() > 1
        if wants_workers and not launched:
            return _launch_workers(argv)
        install(gere_config, trainer_kwargs)
        print(f"gere-lf: GeRe ({gere_config.objective}) in LLaMA-Factory's SFT trainer, rank "
              f"{os.environ.get('RANK', '0')}", file=sys.stderr, flush=True)  # fmt: skip
        from llamafactory.train.tuner import run_exp

        run_exp(args=args)
    except GeReError as err:
        print(f"gere-lf: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
