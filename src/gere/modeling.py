"""Load a causal LM and its tokenizer from a hub id, a local folder or a GGUF file.

GGUF files (e.g. the demo's SmolLM2-135M-Instruct Q4_1) are dequantised to fp32 by transformers + gguf,
but the resulting model still carries a `quantization_config` and `save_pretrained` refuses it, and
parsing the GGUF metadata takes ~25 s on a small CPU. We therefore rebuild a plain model from the config
(without `quantization_config`), copy the weights in, and cache it as safetensors under
`<cache>/models/<sha256 of the GGUF, first 16 hex>/`; later loads read that folder in well under a second.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gere.errors import GeReError
from gere.io_utils import atomic_write_json, default_cache_dir, sha256_file
from gere.reading import read_json

logger = logging.getLogger(__name__)

#: Written last into a converted-model folder; its presence (and matching contents) marks the folder complete.
MODEL_MARKER = "gere_model.json"


def load_model_and_tokenizer(
    spec: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    torch_dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for `spec`, with a pad token set on the tokenizer.

    Args:
        spec: a Hugging Face hub id (`org/name`), a local model folder, a path to a `.gguf` file, or a
            folder holding `gguf_file`.
        cache_dir: root of the gere cache (converted GGUF models go to `<cache_dir>/models/`, hub
            downloads to `<cache_dir>/hub/`). Default: `$GERE_CACHE` or `~/.cache/gere` for GGUF,
            the normal Hugging Face cache for hub ids.
        torch_dtype: dtype of the returned model's weights (fp32 by default: bf16 autocast is several times
            slower than fp32 on common CPUs).
        trust_remote_code: passed to `from_pretrained`; off unless asked for.
        gguf_file: name of a GGUF file inside the folder `spec`.
    """
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    check_model_spec(spec_str, cache_dir=cache_dir, gguf_file=gguf_file)
    if gguf_file is not None or spec_str.lower().endswith(".gguf"):
        gguf_path = path / gguf_file if gguf_file is not None else path
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        model, tokenizer = _load_gguf_cached(gguf_path, root, torch_dtype)
        _ensure_pad_token(tokenizer, str(gguf_path))
        return model, tokenizer

    source, extra = _pretrained_source(spec_str, path, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as err:
        raise GeReError(
            f"could not load model {spec_str!r}: {err}; check the hub id and your network, "
            "or pass a local model folder or .gguf file"
        ) from err
    logger.info("loaded %s in %.1f s", spec_str, time.perf_counter() - t0)
    _ensure_pad_token(tokenizer, spec_str)
    model.eval()
    return model, tokenizer


def lora_config(lora):
    """A `peft.LoraConfig` for a causal LM from LoRA settings (``r``, ``alpha``, ``dropout``, ``target_modules``:
    a run config's ``lora:`` section)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip


def check_model_spec(spec: str, *, cache_dir=None, gguf_file: str | None = None) -> None:
    """What can be known of a model without loading it, checked before any work: a name is given, a local
    path or GGUF file exists, a local folder holds ``config.json``. A hub id is checked when it loads."""
    spec = str(spec)
    if not spec.strip():
        raise GeReError("no model: set model to a Hugging Face hub id, a local model folder or a .gguf file")
    path = Path(spec).expanduser()
    if gguf_file is not None or spec.lower().endswith(".gguf"):
        gguf_path = path / gguf_file if gguf_file is not None else path
        if not gguf_path.is_file():
            raise GeReError(
                f"GGUF file {gguf_path} does not exist; pass the path to an existing .gguf file "
                "(or a folder plus gguf_file= naming a file inside it)"
            )
        return
    _pretrained_source(spec, path, cache_dir)


def _pretrained_source(spec_str: str, path: Path, cache_dir) -> tuple[str, dict]:
    """What to hand `from_pretrained`: a model folder, or a hub id (with its download cache)."""
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise GeReError(
                f"{path} is not a model folder (no config.json in it); pass a folder written by "
                "save_pretrained, a .gguf file, or a Hugging Face hub id"
            )
        source, extra = str(path), {}
    elif _looks_like_local_path(spec_str):
        raise GeReError(
            f"model path {path} does not exist; check the path, or pass a Hugging Face hub id like "
            "'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    else:
        source = spec_str
        extra = {"cache_dir": str(Path(cache_dir).expanduser() / "hub")} if cache_dir is not None else {}
    return source, extra


def _looks_like_local_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path."""
    return (
        spec.startswith((".", "/", "~"))
        or os.sep != "/"
        and os.sep in spec
        or spec.count("/") > 1
        or spec == ""
    )


def _ensure_pad_token(tokenizer: Any, name: str) -> None:
    """Batched training needs a pad token; fall back to eos (a common, harmless choice: pads are masked)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise GeReError(
            f"tokenizer of {name} has neither a pad token nor an eos token; add one before training "
            "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings), "
            "or use a model whose tokenizer defines eos"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer of %s has no pad token; using eos %r as pad", name, tokenizer.eos_token)


def gguf_cache_folder(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike, digest: str | None = None
) -> Path:
    """`<cache_dir>/models/<first 16 hex of the GGUF file's sha256>`."""
    digest = digest or sha256_file(gguf_path)
    return Path(cache_dir) / "models" / digest[:16]


def converted_model_is_complete(folder: str | os.PathLike, gguf_sha256: str | None = None) -> bool:
    """True if `folder` has a marker whose listed files all exist with the recorded sizes.

    The marker is written last, so a folder left by an interrupted conversion fails this check.
    """
    folder = Path(folder)
    marker = folder / MODEL_MARKER
    try:
        meta = read_json(marker, what="converted-model marker")
        if gguf_sha256 is not None and meta.get("source_sha256") != gguf_sha256:
            return False
        files = meta["files"]
        return bool(files) and all(
            (folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items()
        )
    except (GeReError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Convert a GGUF file to a plain safetensors model folder in the cache (reusing a complete one).

    Returns the folder. Written to a temporary folder next to it and renamed into place, so readers never
    see a half-written model.
    """
    gguf_path = Path(gguf_path)
    digest = sha256_file(gguf_path)
    target = gguf_cache_folder(gguf_path, cache_dir, digest)
    if converted_model_is_complete(target, digest):
        logger.info("reusing converted model %s", target)
        return target
    _convert_gguf_to_folder(gguf_path, target, digest)
    return target


def _load_gguf_cached(gguf_path: Path, cache_root: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf_path)
    target = gguf_cache_folder(gguf_path, cache_root, digest)
    if converted_model_is_complete(target, digest):
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        model.eval()
        logger.info("loaded converted %s from %s in %.1f s", gguf_path.name, target, time.perf_counter() - t0)
        return model, tokenizer
    model, tokenizer = _convert_gguf_to_folder(gguf_path, target, digest)
    return model.to(dtype), tokenizer


def _convert_gguf_to_folder(gguf_path: Path, target: Path, digest: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("converting %s (one-off, ~30 s on a small CPU) into %s", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # The GGUF-loaded model is flagged as quantised; a model built from a config without
    # quantization_config holds the same (dequantised) weights and can be saved normally.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise GeReError(
            f"converting {gguf_path} left weights unmatched (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "this architecture is not supported by the GGUF conversion, pass a safetensors model folder instead"
        )
    del gguf_model
    model.eval()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary shared cache entry
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(
            tmp / MODEL_MARKER,
            {
                "source_file": gguf_path.name,
                "source_sha256": digest,
                "source_size": gguf_path.stat().st_size,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "files": files,
            },
        )
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover: it failed the completeness check
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)
    return model, tokenizer


def _is_tied(model: Any, key: str) -> bool:
    """lm_head.weight is absent from a tied model's source state dict in some versions; it shares storage."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
