"""The activation store: what the frozen base model computes on the replay set, stored once.

GeRe (arXiv 2508.04676, Sec. 3.2) runs the base model over the replay set once, keeps its last-layer
hidden states ("activation states") and per-dimension statistics, and derives thresholds
``mean -/+ k*std``. This module stores only what each replay objective needs:

- ``tm``: each element's label (negative / neutral / positive) packed 4 to a byte (2 bits per element),
  memory-mapped at training time: ``tm_codes.L<layer>.npy`` ``uint8 [tokens, ceil(hidden/4)]``;
- ``l1`` / ``l2``: hidden states in float16 or bfloat16: ``features.L<layer>.npy`` ``[tokens, hidden]``;
- ``kl``: the base model's top-k logits per token: ``topk_values.npy`` (float16) and ``topk_indices.npy``
  (int32), ``[tokens, k]``.

Always present: ``tokens.npy`` (int32, the replay token ids, concatenated), ``offsets.npy`` (int64,
``[samples + 1]``), ``stats.safetensors`` (float64 count / mean / M2 / std per layer) and ``manifest.json``
(fingerprints, settings, sha256 of every file). Nothing is pickled.

Extraction is one batched, no-grad pass (samples sorted by length, right padding) that writes each
batch's real-token rows into float32 memory maps under ``partial/`` and records finished batches in
``partial/progress.json``; an interrupted run resumes at the first unfinished batch. A second, CPU-only
pass computes the statistics in float64 (Chan merge), the label codes and the final files, each written
to a temporary name and renamed; the manifest is written last, so a store without one is never trusted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from tqdm.auto import tqdm

from gere import __version__
from gere.errors import GeReError
from gere.fingerprint import model_fingerprint, tokenizer_fingerprint
from gere.io_utils import atomic_path, atomic_write_json, sha256_file
from gere.losses import CODE_NEGATIVE, CODE_NEUTRAL, CODE_POSITIVE
from gere.replay_set import ReplaySet, tokenize_replay_set
from gere.stats import RunningStats

FEATURE_DTYPES = ("float16", "bfloat16")


class ExtractionStopped(RuntimeError):
    """Raised by ``extract_store(..., stop_after_batches=n)``: the forward pass ended early on purpose."""


_ROWS_PER_CHUNK = 16384


@dataclass
class StoreSpec:
    """What to record. ``layers`` index ``hidden_states`` (0 = embeddings, -1 = last layer after the norm)."""

    max_length: int = 563
    layers: tuple[int, ...] = (-1,)
    k: float = 1.0
    tm: bool = True
    features: bool = False
    feature_dtype: str = "float16"
    topk: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise GeReError("no layers to record; pass at least one, e.g. --layers -1")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise GeReError(f"feature dtype {self.feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        if not self.k > 0:
            raise GeReError(f"threshold k = {self.k} must be > 0 (--threshold-k)")
        if self.topk < 0 or self.batch_size < 1:
            raise GeReError("top-k must be >= 0 and the extraction batch size >= 1")


# ---------------------------------------------------------------------------------------------- packing


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """``uint8 [rows, hidden]`` codes in 0..2 -> ``uint8 [rows, ceil(hidden/4)]``, 2 bits each."""
    rows, hidden = codes.shape
    width = -(-hidden // 4)
    padded = np.zeros((rows, width * 4), dtype=np.uint8)
    padded[:, :hidden] = codes
    quads = padded.reshape(rows, width, 4)
    return (quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)).astype(
        np.uint8
    )


def unpack_codes(packed: torch.Tensor | np.ndarray, hidden: int) -> torch.Tensor:
    """Inverse of `pack_codes`, as a ``uint8 [rows, hidden]`` tensor (on ``packed``'s device)."""
    packed_t = (
        torch.from_numpy(np.array(packed, dtype=np.uint8)) if isinstance(packed, np.ndarray) else packed
    )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed_t.device)
    codes = (packed_t.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(packed_t.shape[0], -1)[:, :hidden]


def label_codes(rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Numpy twin of `gere.losses.threshold_codes` (negative wins a tie)."""
    codes = np.full(rows.shape, CODE_NEUTRAL, dtype=np.uint8)
    codes[rows >= high] = CODE_POSITIVE
    codes[rows <= low] = CODE_NEGATIVE
    return codes


# ---------------------------------------------------------------------------------------------- forward


def _num_hidden_states(model) -> int:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        raise GeReError("the model config has no num_hidden_layers; cannot resolve which layers to record")
    return int(layers) + 1


def resolve_layers(model, layers: tuple[int, ...]) -> tuple[int, ...]:
    n = _num_hidden_states(model)
    resolved = []
    for layer in layers:
        index = layer + n if layer < 0 else layer
        if not 0 <= index < n:
            raise GeReError(
                f"layer {layer} is out of range: the model has hidden states 0..{n - 1} (or -1..-{n})"
            )
        resolved.append(index)
    return tuple(sorted(set(resolved)))


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length (longest first, ties in index order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    # Right padding behind a causal mask never reaches the real tokens; any id will do.
    return 0


def check_context_length(model, max_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > int(limit):
        raise GeReError(
            f"replay max length {max_length} is longer than the model's context ({limit} positions); "
            f"pass --replay-max-length {limit} or less"
        )


# ---------------------------------------------------------------------------------------------- the store


@dataclass
class ActivationStore:
    """A finished store, memory-mapped. Use `open_store` or `extract_store` to get one."""

    path: Path
    manifest: dict
    tokens_flat: np.ndarray
    offsets: np.ndarray
    stats: dict[str, np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def tokens(self, index: int) -> list[int]:
        return self.tokens_flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def mean_std(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.stats[f"L{layer}.mean"]), torch.from_numpy(self.stats[f"L{layer}.std"])

    def thresholds(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean_std(layer)
        k = float(self.manifest["k"])
        return (mean - k * std).float(), (mean + k * std).float()

    def _memmap(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_maps", {})
        if name not in cache:
            if name not in self.manifest["files"]:
                raise GeReError(
                    f"activation store {self.path} has no {name}; it was extracted for "
                    f"{self.manifest['contents']}; re-extract with the objective you train with"
                )
            cache[name] = np.load(self.path / name, mmap_mode="r")
        return cache[name]

    def codes(self, index: int, layer: int) -> torch.Tensor:
        """Label codes ``uint8 [length, hidden]`` of one sample."""
        packed = self._memmap(f"tm_codes.L{layer}.npy")[self.offsets[index] : self.offsets[index + 1]]
        return unpack_codes(packed, self.hidden_size)

    def features(self, index: int, layer: int) -> torch.Tensor:
        rows = np.array(self._memmap(f"features.L{layer}.npy")[self.offsets[index] : self.offsets[index + 1]])
        if self.manifest["contents"]["feature_dtype"] == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)

    def topk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        values = np.array(self._memmap("topk_values.npy")[lo:hi])
        indices = np.array(self._memmap("topk_indices.npy")[lo:hi])
        return torch.from_numpy(values), torch.from_numpy(indices)

    def bits_per_element(self, layer: int) -> float:
        """Payload bits per stored element (the .npy header of 128 bytes aside)."""
        size = self._memmap(f"tm_codes.L{layer}.npy").nbytes
        return 8.0 * size / (int(self.offsets[-1]) * self.hidden_size)

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest; a mismatch is an error."""
        for name, info in self.manifest["files"].items():
            path = self.path / name
            if not path.exists():
                raise GeReError(
                    f"activation store file {path} is missing; re-extract with --regenerate-store"
                )
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise GeReError(
                    f"activation store file {path} is truncated or corrupted (checksum mismatch); "
                    "re-extract with --regenerate-store"
                )


def expected_manifest(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec) -> dict:
    """The identity of a store: what produced it and with which settings."""
    return {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "replay_set": replay_set.content_hash(),
        "max_length": spec.max_length,
        "k": spec.k,
        "layers": list(resolve_layers(model, spec.layers)),
        "contents": {
            "tm": spec.tm,
            "features": spec.features,
            "feature_dtype": spec.feature_dtype,
            "topk": spec.topk,
        },
        "version": __version__,
    }


IDENTITY_KEYS = ("model", "tokenizer", "replay_set", "max_length", "k", "layers", "contents", "version")
_WHAT = {
    "model": "model (config or weights)",
    "tokenizer": "tokenizer",
    "replay_set": "replay set (texts or selection)",
    "max_length": "replay max length",
    "k": "threshold k",
    "layers": "recorded layers",
    "contents": "stored contents (objective, dtype or top-k)",
    "version": "gere version",
}


def check_identity(found: dict, expected: dict, path: Path) -> None:
    for key in IDENTITY_KEYS:
        if found.get(key) != expected.get(key):
            old, new = found.get(key), expected.get(key)
            raise GeReError(
                f"activation store {path} was made with a different {_WHAT[key]}: stored {str(old)[:40]!r}, "
                f"now {str(new)[:40]!r}. Rebuild it with `gere extract --regenerate-store` (or "
                "reuse_gere_hidden_state=False in GeReTrainer), or point --store-dir at a new folder"
            )


def open_store(path: str | Path, *, expected: dict | None = None, verify: bool = True) -> ActivationStore:
    """Open a finished store; with ``expected`` (see `expected_manifest`) refuse one made otherwise."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise GeReError(
            f"{path} holds no finished activation store (no manifest.json); run `gere extract` first"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GeReError(f"{manifest_path} is corrupted; rebuild the store with --regenerate-store") from None
    if expected is not None:
        check_identity(manifest, expected, path)
    store = ActivationStore(path, manifest, np.zeros(0, np.int32), np.zeros(1, np.int64), {})
    if verify:
        store.verify()
    store.tokens_flat = np.load(path / "tokens.npy", mmap_mode="r")
    store.offsets = np.load(path / "offsets.npy")
    store.stats = load_numpy_file(str(path / "stats.safetensors"))
    return store


def _forward_states(model, ids, mask, layers, want_logits: bool):
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    states = {layer: outputs.hidden_states[layer] for layer in layers}
    return states, (outputs.logits if want_logits else None)


def extract_store(
    model,
    tokenizer,
    replay_set: ReplaySet,
    store_dir: str | Path,
    spec: StoreSpec | None = None,
    *,
    regenerate: bool = False,
    progress: bool = True,
    stop_after_batches: int | None = None,
) -> ActivationStore:
    """Build (or reuse) the store for ``model`` over ``replay_set`` in ``store_dir``.

    A finished store with the same identity is reused; one with another identity is refused unless
    ``regenerate``. ``stop_after_batches`` ends the forward pass early (as an interruption would), for tests.
    """
    spec = spec or StoreSpec()
    store_dir = Path(store_dir)
    check_context_length(model, spec.max_length)
    expected = expected_manifest(model, tokenizer, replay_set, spec)
    if (store_dir / "manifest.json").exists():
        if not regenerate:
            return open_store(store_dir, expected=expected)
        for child in store_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    lengths = [len(t) for t in token_lists]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = int(offsets[-1])
    layers = tuple(expected["layers"])
    hidden = int(model.config.hidden_size)
    batches = length_sorted_batches(lengths, spec.batch_size)

    partial = store_dir / "partial"
    plan = {**expected, "batches": len(batches), "rows": rows}
    plan_path = partial / "plan.json"
    if partial.exists() and (not plan_path.exists() or json.loads(plan_path.read_text()) != plan):
        shutil.rmtree(partial)  # left by another model or settings: not trusted
    partial.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        atomic_write_json(plan_path, plan)

    def open_partial(name: str, dtype, width: int) -> np.ndarray:
        file = partial / name
        if file.exists():
            return np.load(file, mmap_mode="r+")
        return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(rows, width))

    hidden_maps = {layer: open_partial(f"hidden.L{layer}.npy", np.float32, hidden) for layer in layers}
    if spec.topk:
        topk_values = open_partial("topk_values.npy", np.float16, spec.topk)
        topk_indices = open_partial("topk_indices.npy", np.int32, spec.topk)
    progress_path = partial / "progress.json"
    done = set(json.loads(progress_path.read_text())["done"]) if progress_path.exists() else set()

    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    todo = [b for b in range(len(batches)) if b not in done]
    ran = 0
    try:
        with torch.no_grad():
            for batch_no in tqdm(todo, desc="extract", disable=not progress, unit="batch"):
                if stop_after_batches is not None and ran >= stop_after_batches:
                    raise ExtractionStopped(f"stopped after {ran} batch(es) as asked")
                members = batches[batch_no]
                ids, mask = pad_right([token_lists[i] for i in members], pad_id, device)
                states, logits = _forward_states(model, ids, mask, layers, want_logits=spec.topk > 0)
                for row, sample in enumerate(members):
                    lo, hi, n = offsets[sample], offsets[sample + 1], lengths[sample]
                    for layer in layers:
                        hidden_maps[layer][lo:hi] = states[layer][row, :n].float().cpu().numpy()
                    if spec.topk:
                        values, indices = logits[row, :n].float().topk(spec.topk, dim=-1)
                        topk_values[lo:hi] = values.cpu().numpy().astype(np.float16)
                        topk_indices[lo:hi] = indices.cpu().numpy().astype(np.int32)
                for array in (*hidden_maps.values(), *((topk_values, topk_indices) if spec.topk else ())):
                    array.flush()
                done.add(batch_no)
                atomic_write_json(progress_path, {"done": sorted(done)})
                ran += 1
    finally:
        model.train(was_training)
    del hidden_maps
    if spec.topk:
        del topk_values, topk_indices
    return _finish_store(store_dir, partial, expected, spec, token_lists, offsets, hidden)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _finish_store(store_dir, partial, expected, spec, token_lists, offsets, hidden) -> ActivationStore:
    """CPU pass over the partial float32 states: statistics, codes, final files, manifest last."""
    layers = tuple(expected["layers"])
    rows = int(offsets[-1])
    stats_arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        states = np.load(partial / f"hidden.L{layer}.npy", mmap_mode="r")
        running = RunningStats(hidden)
        for start in range(0, rows, _ROWS_PER_CHUNK):
            running.update(states[start : start + _ROWS_PER_CHUNK])
        std = running.std
        stats_arrays.update(
            {
                f"L{layer}.count": np.array([running.count], dtype=np.int64),
                f"L{layer}.mean": running.mean,
                f"L{layer}.m2": running.m2,
                f"L{layer}.std": std,
            }
        )
        low, high = running.mean - spec.k * std, running.mean + spec.k * std
        if spec.tm:
            target = store_dir / f"tm_codes.L{layer}.npy"
            with atomic_path(target) as tmp:
                packed = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.uint8, shape=(rows, -(-hidden // 4))
                )
                for start in range(0, rows, _ROWS_PER_CHUNK):
                    block = np.asarray(states[start : start + _ROWS_PER_CHUNK], dtype=np.float64)
                    packed[start : start + len(block)] = pack_codes(label_codes(block, low, high))
                packed.flush()
                del packed
        if spec.features:
            target = store_dir / f"features.L{layer}.npy"
            with atomic_path(target) as tmp:
                dtype = np.float16 if spec.feature_dtype == "float16" else np.int16
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, hidden))
                for start in range(0, rows, _ROWS_PER_CHUNK):
                    block = torch.from_numpy(np.array(states[start : start + _ROWS_PER_CHUNK]))
                    if spec.feature_dtype == "float16":
                        out[start : start + len(block)] = block.half().numpy()
                    else:
                        out[start : start + len(block)] = block.bfloat16().view(torch.int16).numpy()
                out.flush()
                del out
        del states
    with atomic_path(store_dir / "stats.safetensors") as tmp:
        save_numpy_file(stats_arrays, str(tmp))
    _write_npy(store_dir / "tokens.npy", np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists]))
    _write_npy(store_dir / "offsets.npy", offsets)
    if spec.topk:
        for name in ("topk_values.npy", "topk_indices.npy"):
            (partial / name).replace(store_dir / name)

    names = ["tokens.npy", "offsets.npy", "stats.safetensors"]
    names += [f"tm_codes.L{layer}.npy" for layer in layers if spec.tm]
    names += [f"features.L{layer}.npy" for layer in layers if spec.features]
    names += ["topk_values.npy", "topk_indices.npy"] if spec.topk else []
    files = {
        n: {"bytes": (store_dir / n).stat().st_size, "sha256": sha256_file(store_dir / n)} for n in names
    }
    manifest = {
        **expected,
        "samples": len(token_lists),
        "tokens": rows,
        "hidden_size": hidden,
        "spec": asdict(spec),
        "files": files,
    }
    atomic_write_json(store_dir / "manifest.json", manifest)
    shutil.rmtree(partial, ignore_errors=True)
    return open_store(store_dir, verify=False)


def replay_statistics(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec, *, progress: bool = True):
    """Statistics only, in memory (the online reference mode needs no store): ``{layer: RunningStats}``.

    The base model's states on each batch are merged in the same float64 Chan update as extraction uses.
    """
    check_context_length(model, spec.max_length)
    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    layers = resolve_layers(model, spec.layers)
    running = {layer: RunningStats(int(model.config.hidden_size)) for layer in layers}
    device, pad_id = model_device(model), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for members in tqdm(
                length_sorted_batches([len(t) for t in token_lists], spec.batch_size),
                desc="replay statistics",
                disable=not progress,
            ):
                ids, mask = pad_right([token_lists[i] for i in members], pad_id, device)
                states, _ = _forward_states(model, ids, mask, layers, want_logits=False)
                real = mask.bool()
                for layer in layers:
                    running[layer].update(states[layer][real].float().cpu().numpy())
    finally:
        model.train(was_training)
    return running
