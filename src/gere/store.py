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
pass computes the statistics in float64 (per batch, then a Chan merge in batch order), the label codes and
the final files, each written to a temporary name and renamed; the manifest is written last, so a store
without one is never trusted. Under ``torch.distributed`` the forward pass is split across processes and
the result is byte-identical (see "processes" below and docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from tqdm.auto import tqdm

from gere import __version__, distributed
from gere.distributed import is_zero3_partitioned
from gere.errors import GeReError
from gere.faults import maybe_fail
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


def shared_manifest(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec) -> dict:
    """`expected_manifest`, the same on every process. Where each process holds the full weights, process
    0 alone reads them (the others may hold none yet, e.g. FSDP's ``cpu_ram_efficient_loading``); ZeRO-3
    partitions are gathered by all processes together."""
    if is_zero3_partitioned(model):
        return expected_manifest(model, tokenizer, replay_set, spec)
    return distributed.run_on_main(
        lambda: expected_manifest(model, tokenizer, replay_set, spec), "fingerprinting the model"
    )


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
    extra = {}
    if not want_logits and _accepts(model, "logits_to_keep"):
        # The hidden states are all we need: skip the vocabulary projection at every position but one.
        extra["logits_to_keep"] = 1
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **extra)
    states = {layer: outputs.hidden_states[layer] for layer in layers}
    return states, (outputs.logits if want_logits else None)


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- processes
#
# With several processes (torchrun / accelerate launch), process r runs the forward pass on the
# length-sorted batches b with b % processes == r and writes their real-token rows, batch after batch, into
# its own part: ``partial/hidden.L<layer>.rank<r>.npy`` and ``partial/progress.rank<r>.json`` (a single
# process's part has no rank suffix). Statistics are reduced per batch, in float64, by the process that
# owns the batch, then merged in batch order on every process, so they are bit-for-bit the ones of a single
# process, and so are the label codes derived from them. Process 0 assembles the final files in sample
# order and writes the manifest last.


def _part_name(name: str, rank: int, world: int) -> str:
    if world == 1:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.rank{rank}.{suffix}"


def _part_layout(
    batches: list[list[int]], lengths: list[int], world: int
) -> list[dict[int, tuple[int, int]]]:
    """For each process, ``{batch: (first row, end row)}`` of that batch inside the process's part."""
    spans: list[dict[int, tuple[int, int]]] = [{} for _ in range(world)]
    filled = [0] * world
    for batch_no, members in enumerate(batches):
        owner = batch_no % world
        n = sum(lengths[i] for i in members)
        spans[owner][batch_no] = (filled[owner], filled[owner] + n)
        filled[owner] += n
    return spans


def _batch_stats(rows: np.ndarray, dim: int) -> RunningStats:
    """float64 (count, mean, M2) of one batch's rows, reduced in fixed chunks (same on any process)."""
    stats = RunningStats(dim)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        stats.update(rows[start : start + _ROWS_PER_CHUNK])
    return stats


@contextlib.contextmanager
def _placed(model, device):
    """Yield the device to run ``model`` on; a model elsewhere is moved there and back afterwards. A model
    spread over several devices (``hf_device_map``) stays where it is."""
    home = model_device(model)
    target = home if device is None else torch.device(device)
    if target == home or getattr(model, "hf_device_map", None):
        yield home
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)


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
    device: torch.device | str | None = None,
) -> ActivationStore:
    """Build (or reuse) the store for ``model`` over ``replay_set`` in ``store_dir``.

    A finished store with the same identity is reused; one with another identity is refused unless
    ``regenerate``. ``stop_after_batches`` ends the forward pass early (as an interruption would), for tests;
    with several processes it counts each process's batches. ``device``: where to run the forward pass
    (default: where the model is); the model is moved there for the pass only, and only when a store is built.

    Under ``torch.distributed`` every process must call this with the same arguments and a ``store_dir`` on
    a file system they all share; the forward pass is split across them (see the note above) and the files
    are byte-identical to a single process's. Started by ``torchrun`` without a process group, one is
    created (`gere.distributed.init_from_env`).
    """
    spec = spec or StoreSpec()
    store_dir = Path(store_dir)
    distributed.init_from_env()
    rank, world = distributed.rank(), distributed.world_size()
    check_context_length(model, spec.max_length)
    expected = shared_manifest(model, tokenizer, replay_set, spec)
    if distributed.broadcast_object((store_dir / "manifest.json").exists()):
        if not regenerate:
            return open_store(store_dir, expected=expected)
        distributed.require_full_parameters(model, "re-extracting the activation store")
        if rank == 0:
            for child in store_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        distributed.barrier()
    distributed.require_full_parameters(model, "extracting the activation store")

    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    lengths = [len(t) for t in token_lists]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    layers = tuple(expected["layers"])
    hidden = int(model.config.hidden_size)
    batches = length_sorted_batches(lengths, spec.batch_size)
    spans = _part_layout(batches, lengths, world)

    partial = store_dir / "partial"
    plan = {**expected, "batches": len(batches), "rows": int(offsets[-1]), "processes": world}
    plan_path = partial / "plan.json"
    if rank == 0:
        if partial.exists() and (not plan_path.exists() or json.loads(plan_path.read_text()) != plan):
            shutil.rmtree(partial)  # left by another model, settings or number of processes: not trusted
        partial.mkdir(parents=True, exist_ok=True)
        if not plan_path.exists():
            atomic_write_json(plan_path, plan)
    distributed.barrier()
    if not all(distributed.all_gather_object(plan_path.exists())):
        raise GeReError(
            f"{store_dir} is not one folder shared by all {world} processes (process 0 created "
            f"{plan_path}, others cannot see it); put the store on a shared file system"
        )

    own = spans[rank]
    part_rows = sum(stop - start for start, stop in own.values())

    def open_part(name: str, dtype, width: int) -> np.ndarray:
        file = partial / _part_name(name, rank, world)
        if file.exists():
            return np.load(file, mmap_mode="r+")
        return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(part_rows, width))

    maps: dict[str, np.ndarray] = {}
    if own:  # a process without batches (more processes than batches) writes no part
        for layer in layers:
            maps[f"hidden.L{layer}.npy"] = open_part(f"hidden.L{layer}.npy", np.float32, hidden)
        if spec.topk:
            maps["topk_values.npy"] = open_part("topk_values.npy", np.float16, spec.topk)
            maps["topk_indices.npy"] = open_part("topk_indices.npy", np.int32, spec.topk)
    progress_path = partial / _part_name("progress.json", rank, world)
    done = set(json.loads(progress_path.read_text())["done"]) if progress_path.exists() else set()

    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    todo = [b for b in own if b not in done]
    ran, error = 0, None
    try:
        with torch.no_grad(), _placed(model, device) as run_device:
            for batch_no in tqdm(todo, desc="extract", disable=not progress or rank != 0, unit="batch"):
                if stop_after_batches is not None and ran >= stop_after_batches:
                    raise ExtractionStopped(f"stopped after {ran} batch(es) as asked")
                ids, mask = pad_right([token_lists[i] for i in batches[batch_no]], pad_id, run_device)
                states, logits = _forward_states(model, ids, mask, layers, want_logits=spec.topk > 0)
                # Right padding: the real tokens of a row come first, so the masked rows are the batch's
                # samples' tokens, one sample after another.
                real = mask.bool()
                start, stop = own[batch_no]
                for layer in layers:
                    maps[f"hidden.L{layer}.npy"][start:stop] = states[layer][real].float().cpu().numpy()
                if spec.topk:
                    values, indices = logits[real].float().topk(spec.topk, dim=-1)
                    maps["topk_values.npy"][start:stop] = values.cpu().numpy().astype(np.float16)
                    maps["topk_indices.npy"][start:stop] = indices.cpu().numpy().astype(np.int32)
                for array in maps.values():
                    array.flush()
                done.add(batch_no)
                atomic_write_json(progress_path, {"done": sorted(done)})
                maybe_fail("extract_batch")  # crash tests (gere.faults); a no-op unless GERE_FAULT is set
                ran += 1
    except Exception as err:  # reported to the other processes below, then raised
        error = err
    finally:
        model.train(was_training)
    maps.clear()
    distributed.raise_if_any_failed(error, "extraction", passthrough=(ExtractionStopped,))
    return _finish_store(store_dir, partial, expected, spec, token_lists, offsets, hidden, batches, spans)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _assemble(target, partial, name, batches, spans, offsets, dtype, width, convert) -> None:
    """Write ``target`` ``[tokens, width]`` in sample order from every process's part of ``name``."""
    world = len(spans)
    with atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(int(offsets[-1]), width))
        for owner, owned in enumerate(spans):
            if not owned:
                continue
            part = np.load(partial / _part_name(name, owner, world), mmap_mode="r")
            for batch_no, (start, stop) in owned.items():
                block = convert(part[start:stop])
                row = 0
                for sample in batches[batch_no]:
                    lo, hi = offsets[sample], offsets[sample + 1]
                    out[lo:hi] = block[row : row + hi - lo]
                    row += hi - lo
            del part
        out.flush()
        del out


def _finish_store(
    store_dir, partial, expected, spec, token_lists, offsets, hidden, batches, spans
) -> ActivationStore:
    """CPU pass over the partial float32 states: statistics, codes, final files, manifest last.

    Every process reduces the batches it extracted; the statistics are merged in batch order on all of
    them. Process 0 then writes the files while the others wait for it.
    """
    rank, world = distributed.rank(), distributed.world_size()
    layers = tuple(expected["layers"])
    stats: dict[int, RunningStats] = {}
    for layer in layers:
        own = spans[rank]
        part = None
        if own:
            part = np.load(partial / _part_name(f"hidden.L{layer}.npy", rank, world), mmap_mode="r")

        def local(batch_no: int, part=part, own=own) -> RunningStats | None:
            if batch_no not in own:
                return None
            start, stop = own[batch_no]
            return _batch_stats(part[start:stop], hidden)

        stats[layer] = distributed.fold_stats_in_key_order(range(len(batches)), local, hidden)
        del part

    distributed.run_on_main(
        lambda: _write_final_files(
            store_dir, partial, expected, spec, token_lists, offsets, hidden, batches, spans, stats
        ),
        f"writing the activation store {store_dir}",
    )
    return open_store(store_dir, verify=False)


def _write_final_files(
    store_dir, partial, expected, spec, token_lists, offsets, hidden, batches, spans, stats
) -> None:
    layers = tuple(expected["layers"])
    width = -(-hidden // 4)
    stats_arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        running = stats[layer]
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
        source = f"hidden.L{layer}.npy"
        if spec.tm:

            def to_codes(block, low=low, high=high):
                return pack_codes(label_codes(np.asarray(block, dtype=np.float64), low, high))

            _assemble(
                store_dir / f"tm_codes.L{layer}.npy", partial, source, batches, spans, offsets, np.uint8, width,
                to_codes,
            )  # fmt: skip
        if spec.features:
            if spec.feature_dtype == "float16":
                dtype, convert = np.float16, lambda block: np.asarray(block).astype(np.float16)
            else:
                dtype = np.int16
                convert = lambda block: torch.from_numpy(np.array(block)).bfloat16().view(torch.int16).numpy()  # noqa: E731
            _assemble(
                store_dir / f"features.L{layer}.npy", partial, source, batches, spans, offsets, dtype, hidden,
                convert,
            )  # fmt: skip
    with atomic_path(store_dir / "stats.safetensors") as tmp:
        save_numpy_file(stats_arrays, str(tmp))
    _write_npy(store_dir / "tokens.npy", np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists]))
    _write_npy(store_dir / "offsets.npy", offsets)
    if spec.topk:
        for name, dtype in (("topk_values.npy", np.float16), ("topk_indices.npy", np.int32)):
            _assemble(store_dir / name, partial, name, batches, spans, offsets, dtype, spec.topk, np.asarray)

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
        "tokens": int(offsets[-1]),
        "hidden_size": hidden,
        "spec": asdict(spec),
        "files": files,
    }
    atomic_write_json(store_dir / "manifest.json", manifest)
    shutil.rmtree(partial, ignore_errors=True)


def replay_statistics(
    model, tokenizer, replay_set: ReplaySet, spec: StoreSpec, *, progress: bool = True, device=None
):
    """Statistics only, in memory (the online reference mode needs no store): ``{layer: RunningStats}``.

    Reduced per length-sorted batch and merged in batch order exactly as extraction does, so they equal the
    store's statistics bit for bit. Under ``torch.distributed`` each process runs its share of the batches
    (as in `extract_store`) and every process returns the same merged statistics. ``device`` as there.
    """
    check_context_length(model, spec.max_length)
    distributed.require_full_parameters(model, "the replay statistics")
    rank, world = distributed.rank(), distributed.world_size()
    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    layers = resolve_layers(model, spec.layers)
    hidden = int(model.config.hidden_size)
    batches = length_sorted_batches([len(t) for t in token_lists], spec.batch_size)
    per_batch: dict[int, dict[int, RunningStats]] = {layer: {} for layer in layers}
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    error = None
    try:
        with torch.no_grad(), _placed(model, device) as run_device:
            own = range(rank, len(batches), world)
            for batch_no in tqdm(own, desc="replay statistics", disable=not progress or rank != 0):
                ids, mask = pad_right([token_lists[i] for i in batches[batch_no]], pad_id, run_device)
                states, _ = _forward_states(model, ids, mask, layers, want_logits=False)
                real = mask.bool()
                for layer in layers:
                    rows = states[layer][real].float().cpu().numpy()
                    per_batch[layer][batch_no] = _batch_stats(rows, hidden)
    except Exception as err:  # reported to the other processes, then raised
        error = err
    finally:
        model.train(was_training)
    distributed.raise_if_any_failed(error, "replay statistics")
    return {
        layer: distributed.fold_stats_in_key_order(range(len(batches)), per_batch[layer].get, hidden)
        for layer in layers
    }
