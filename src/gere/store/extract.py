"""Building the activation store: one forward pass of the frozen base model over the replay set.

Extraction is one batched, no-grad pass (samples sorted by length, right padding) that writes each
batch's real-token rows into float32 memory maps under ``partial/`` and records finished batches in
``partial/progress.json``; an interrupted run resumes at the first unfinished batch. A second, CPU-only
pass computes the statistics in float64 (per batch, then a Chan merge in batch order), the label codes and
the final files (`gere.store.format`), each written to a temporary name and renamed; the manifest is
written last.

Several processes (torchrun / accelerate launch): process r runs the forward pass on the length-sorted
batches b with ``b % processes == r`` and writes their real-token rows, batch after batch, into its own
part: ``partial/hidden.L<layer>.rank<r>.npy`` and ``partial/progress.rank<r>.json`` (a single process's
part has no rank suffix). Statistics are reduced per batch, in float64, by the process that owns the
batch, then merged in batch order on every process, so they are bit-for-bit the ones of a single process,
and so are the label codes derived from them. Process 0 assembles the final files in sample order and
writes the manifest last. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy_file

from gere import distributed
from gere.batching import check_context_length, forward_batches, length_sorted_batches, pad_token_id
from gere.errors import GeReError
from gere.faults import maybe_fail
from gere.io_utils import atomic_path, atomic_write_json, sha256_file
from gere.locks import hold_lock
from gere.reading import read_json
from gere.replay.replay_set import ReplaySet, tokenize_replay_set
from gere.stats import RunningStats, batch_statistics, thresholds
from gere.store.fingerprint import shared_manifest
from gere.store.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ActivationStore,
    StoreSpec,
    label_codes,
    open_store,
    pack_codes,
    read_manifest,
    store_file_names,
    write_npy,
)

if TYPE_CHECKING:
    from gere.config import GeReConfig

logger = logging.getLogger(__name__)


class ExtractionStopped(RuntimeError):
    """Raised by ``extract_store(..., stop_after_batches=n)``: the forward pass ended early on purpose."""


@dataclass
class _Layout:
    """Where every replay token's row goes: samples, their length-sorted batches, each process's share."""

    token_lists: list[list[int]]
    offsets: np.ndarray  # int64 [samples + 1]: sample i owns rows offsets[i]:offsets[i+1]
    batches: list[list[int]]  # sample indices of each length-sorted batch
    spans: list[dict[int, tuple[int, int]]]  # per process: {batch: (first row, end row) in its part}
    layers: tuple[int, ...]  # resolved hidden-state indices
    hidden: int

    @classmethod
    def plan(cls, token_lists, layers, hidden: int, batch_size: int, world: int) -> _Layout:
        lengths = [len(t) for t in token_lists]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        batches = length_sorted_batches(lengths, batch_size)
        spans: list[dict[int, tuple[int, int]]] = [{} for _ in range(world)]
        filled = [0] * world
        for batch_no, members in enumerate(batches):
            owner = batch_no % world
            n = sum(lengths[i] for i in members)
            spans[owner][batch_no] = (filled[owner], filled[owner] + n)
            filled[owner] += n
        return cls(token_lists, offsets, batches, spans, tuple(layers), hidden)

    @property
    def world(self) -> int:
        return len(self.spans)

    def part_rows(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.spans[rank].values())


def reserved_memmap(path: Path, dtype, shape: tuple[int, int]) -> np.ndarray:
    """A new ``.npy`` memory map whose blocks are allocated now. Writing into a sparse memory map on a full
    disk kills the process with SIGBUS and no message; reserving the space first fails here instead, with
    an ENOSPC error that names the disk being full."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise  # a file system without fallocate keeps the sparse file
    return array


def _part_name(name: str, rank: int, world: int) -> str:
    if world == 1:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.rank{rank}.{suffix}"


#: The store's folder under a run's (or a trainer's) output folder, where ``store_dir`` does not point elsewhere.
OWN_STORE = "gere_store"


def store_dir(config: GeReConfig, output_dir: str | Path) -> Path:
    """Where ``config``'s store lives: ``config.store_dir``, or `OWN_STORE` under ``output_dir``."""
    return Path(config.store_dir) if config.store_dir else Path(output_dir) / OWN_STORE


def store_for(config: GeReConfig, model, tokenizer, replay_set: ReplaySet, output_dir: str | Path, *,
              progress: bool = True, device: torch.device | str | None = None,
              rebuild_own: bool = False, check_model: bool = True) -> ActivationStore:  # fmt: skip
    """The activation store ``config`` asks for, built from ``model`` over ``replay_set`` in `store_dir`, or
    reused when ``config.reuse_store`` and it matches. With ``rebuild_own``, the own store (no ``store_dir``
    set) is rebuilt when it belongs to another model or texts (a continual run's, left by the run it replaces).
    ``check_model=False``: a store reused from ``store_dir`` may come from another model (a later task trained
    from the store's model); everything else about it must still match."""
    folder, spec = store_dir(config, output_dir), StoreSpec.for_config(config)
    try:
        return extract_store(model, tokenizer, replay_set, folder, spec, regenerate=not config.reuse_store,
                             progress=progress, device=device, check_model=check_model)  # fmt: skip
    except GeReError as err:
        if not (rebuild_own and not config.store_dir and err.setting == "reuse_store"):
            raise
        logger.warning("rebuilding %s for this run: %s", folder, err)
        return extract_store(model, tokenizer, replay_set, folder, spec, regenerate=True, progress=progress,
                             device=device)  # fmt: skip


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
    check_model: bool = True,
) -> ActivationStore:
    """Build (or reuse) the store for ``model`` over ``replay_set`` in ``store_dir``.

    A finished store with the same identity is reused; one with another identity is refused unless
    ``regenerate``. ``stop_after_batches`` ends the forward pass early (as an interruption would), for tests;
    with several processes it counts each process's batches. ``device``: where to run the forward pass
    (default: where the model is); the model is moved there for the pass only, and only when a store is built.
    ``check_model=False`` reuses a finished store made by another model (logged), as a later task of a
    sequence does with the base model's store; the tokenizer, texts and settings must still match.

    Under ``torch.distributed`` every process must call this with the same arguments and a ``store_dir`` on
    a file system they all share; the forward pass is split across them and the files are byte-identical
    to a single process's. Started by ``torchrun`` without a process group, one is created
    (`gere.distributed.init_from_env`).
    """
    spec = spec or StoreSpec()
    store_dir = Path(store_dir)
    distributed.init_from_env()
    check_context_length(model, spec.max_length)
    expected = shared_manifest(model, tokenizer, replay_set, spec)
    if distributed.broadcast_object((store_dir / MANIFEST).exists()) and not regenerate:
        return _open_finished(store_dir, expected, check_model)
    lock = contextlib.ExitStack()  # process 0 holds the store's lock while it is built
    distributed.run_on_main(lambda: lock.enter_context(hold_lock(store_dir, "extracting an activation store")),
                            f"locking {store_dir}")  # fmt: skip
    with lock:
        if distributed.broadcast_object((store_dir / MANIFEST).exists()):
            if not regenerate:  # another process finished it while this one waited for the lock
                return _open_finished(store_dir, expected, check_model)
            _clear_store(model, store_dir)
        return _build(model, tokenizer, replay_set, store_dir, spec, expected, progress, stop_after_batches, device)


def _open_finished(store_dir: Path, expected: dict, check_model: bool) -> ActivationStore:
    """The finished store in ``store_dir``, refused unless its identity is ``expected`` (its model aside
    without ``check_model``: then a store of another model is reused, and the log says so)."""
    if not check_model:
        found = read_manifest(store_dir).get("model")
        if found != expected["model"]:
            logger.warning("reusing the activation store %s, made with another model (%.16s..., this model is "
                           "%.16s...): check_store_model is off, so the replay targets stay the store's model's",
                           store_dir, found, expected["model"])  # fmt: skip
        expected = {**expected, "model": found}
    return open_store(store_dir, expected=expected)


def _build(model, tokenizer, replay_set, store_dir, spec, expected, progress, stop_after_batches, device):
    distributed.require_full_parameters(model, "extracting the activation store")
    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    layout = _Layout.plan(
        token_lists, expected["layers"], int(model.config.hidden_size), spec.batch_size, distributed.world_size()
    )
    partial = _prepare_partial(store_dir, expected, layout)
    error = None
    try:
        _forward_pass(model, pad_token_id(tokenizer), layout, partial, spec, progress, stop_after_batches, device)
    except Exception as err:  # reported to the other processes below, then raised
        error = err
    distributed.raise_if_any_failed(error, "extraction", passthrough=(ExtractionStopped,))
    return _finish_store(store_dir, partial, expected, spec, layout)


def _clear_store(model, store_dir: Path) -> None:
    distributed.require_full_parameters(model, "re-extracting the activation store")
    distributed.run_on_main(lambda: _delete_store_files(store_dir), f"clearing the activation store {store_dir}")


def _delete_store_files(store_dir: Path) -> None:
    """Remove the store's own files (those its manifest lists, the manifest, ``partial/``), nothing else."""
    manifest = read_manifest(store_dir)  # refuses a folder that is not a store before deleting anything
    (store_dir / MANIFEST).unlink()  # first: a half-cleared folder is never taken for a finished store
    for name in store_file_names(manifest):
        (store_dir / name).unlink(missing_ok=True)
    shutil.rmtree(store_dir / "partial", ignore_errors=True)


def _read_or_none(path: Path):
    """A ``partial/`` record, or None when it is unreadable (then its batches are redone, nothing trusted)."""
    try:
        return read_json(path, what="extraction record")
    except GeReError:
        return None


def _prepare_partial(store_dir: Path, expected: dict, layout: _Layout) -> Path:
    """The ``partial/`` folder, kept when its plan matches this extraction (a resume), else started over."""
    partial = store_dir / "partial"
    plan = {**expected, "batches": len(layout.batches), "rows": int(layout.offsets[-1]), "processes": layout.world}
    plan_path = partial / "plan.json"
    if distributed.rank() == 0:
        if partial.exists() and (not plan_path.exists() or _read_or_none(plan_path) != plan):
            shutil.rmtree(partial)  # left by another model, settings or number of processes: not trusted
        partial.mkdir(parents=True, exist_ok=True)
        if not plan_path.exists():
            atomic_write_json(plan_path, plan)
    distributed.barrier()
    if not all(distributed.all_gather_object(plan_path.exists())):
        raise GeReError(
            f"{store_dir} is not one folder shared by all {layout.world} processes (process 0 created "
            f"{plan_path}, others cannot see it); put the store on a shared file system"
        )
    return partial


def _open_parts(partial: Path, layout: _Layout, spec: StoreSpec, rank: int) -> dict[str, np.ndarray]:
    """This process's float32 memory maps (created, or reopened to resume)."""
    if not layout.spans[rank]:  # a process without batches (more processes than batches) writes no part
        return {}
    shapes = {f"hidden.L{layer}.npy": (np.float32, layout.hidden) for layer in layout.layers}
    if spec.topk:
        shapes["topk_values.npy"] = (np.float16, spec.topk)
        shapes["topk_indices.npy"] = (np.int32, spec.topk)
    maps = {}
    for name, (dtype, width) in shapes.items():
        file = partial / _part_name(name, rank, layout.world)
        if file.exists():
            maps[name] = np.load(file, mmap_mode="r+")
        else:
            maps[name] = reserved_memmap(file, dtype, (layout.part_rows(rank), width))
    return maps


def _forward_pass(model, pad_id, layout, partial, spec, progress, stop_after_batches, device) -> None:
    """Run this process's unfinished batches, writing real-token rows and recording progress per batch."""
    rank = distributed.rank()
    own = layout.spans[rank]
    maps = _open_parts(partial, layout, spec, rank)
    progress_path = partial / _part_name("progress.json", rank, layout.world)
    progress_record = _read_or_none(progress_path) if progress_path.exists() else None
    done = set(progress_record["done"]) if isinstance(progress_record, dict) else set()
    todo = [b for b in own if b not in done]
    if stop_after_batches is not None:
        todo, stopped = todo[:stop_after_batches], len(todo) > stop_after_batches
    else:
        stopped = False
    passes = forward_batches(model, layout.token_lists, layout.batches, todo, layout.layers, pad_id,
                             want_logits=spec.topk > 0, device=device, desc="extract",
                             progress=progress and rank == 0)  # fmt: skip
    with contextlib.closing(passes):
        for batch_no, rows, logits in passes:
            start, stop = own[batch_no]
            for layer in layout.layers:
                maps[f"hidden.L{layer}.npy"][start:stop] = rows[layer].float().cpu().numpy()
            if spec.topk:
                values, indices = logits.float().topk(spec.topk, dim=-1)
                maps["topk_values.npy"][start:stop] = values.cpu().numpy().astype(np.float16)
                maps["topk_indices.npy"][start:stop] = indices.cpu().numpy().astype(np.int32)
            for array in maps.values():
                array.flush()
            done.add(batch_no)
            atomic_write_json(progress_path, {"done": sorted(done)})
            maybe_fail("extract_batch")  # crash tests (gere.faults); a no-op unless GERE_FAULT is set
    if stopped:
        raise ExtractionStopped(f"stopped after {stop_after_batches} batch(es) as asked")


# ---------------------------------------------------------------------------------------------- finishing


def _finish_store(store_dir: Path, partial: Path, expected: dict, spec: StoreSpec, layout: _Layout):
    """CPU pass over the partial float32 states: statistics, codes, final files, manifest last.

    Every process reduces the batches it extracted; the statistics are merged in batch order on all of
    them. Process 0 then writes the files while the others wait for it.
    """
    rank = distributed.rank()
    own = layout.spans[rank]
    stats: dict[int, RunningStats] = {}
    for layer in layout.layers:
        part = None
        if own:
            part = np.load(partial / _part_name(f"hidden.L{layer}.npy", rank, layout.world), mmap_mode="r")

        def local(batch_no: int, part=part) -> RunningStats | None:
            if batch_no not in own:
                return None
            start, stop = own[batch_no]
            return batch_statistics(part[start:stop], layout.hidden)

        stats[layer] = distributed.fold_stats_in_key_order(range(len(layout.batches)), local, layout.hidden)
        del part
    distributed.run_on_main(
        lambda: _write_final_files(store_dir, partial, expected, spec, layout, stats),
        f"writing the activation store {store_dir}",
    )
    return open_store(store_dir, verify=False)


def _assemble(target: Path, partial: Path, name: str, layout: _Layout, dtype, width: int, convert) -> None:
    """Write ``target`` ``[tokens, width]`` in sample order from every process's part of ``name``."""
    offsets = layout.offsets
    with atomic_path(target) as tmp:
        out = reserved_memmap(tmp, dtype, (int(offsets[-1]), width))
        for owner, owned in enumerate(layout.spans):
            if not owned:
                continue
            part = np.load(partial / _part_name(name, owner, layout.world), mmap_mode="r")
            for batch_no, (start, stop) in owned.items():
                block = convert(part[start:stop])
                row = 0
                for sample in layout.batches[batch_no]:
                    lo, hi = offsets[sample], offsets[sample + 1]
                    out[lo:hi] = block[row : row + hi - lo]
                    row += hi - lo
            del part
        out.flush()
        del out


def _to_bfloat16_bits(block) -> np.ndarray:
    return torch.from_numpy(np.array(block)).bfloat16().view(torch.int16).numpy()


def _write_final_files(store_dir, partial, expected, spec: StoreSpec, layout: _Layout, stats) -> None:
    stats_arrays: dict[str, np.ndarray] = {}
    for layer in layout.layers:
        running = stats[layer]
        std = running.std
        stats_arrays.update(
            {f"L{layer}.count": np.array([running.count], dtype=np.int64), f"L{layer}.mean": running.mean,
             f"L{layer}.m2": running.m2, f"L{layer}.std": std}
        )  # fmt: skip
        low, high = thresholds(running.mean, std, spec.threshold_k)
        source = f"hidden.L{layer}.npy"
        if spec.tm:

            def to_codes(block, low=low, high=high):
                return pack_codes(label_codes(np.asarray(block, dtype=np.float64), low, high))

            width = -(-layout.hidden // 4)
            _assemble(store_dir / f"tm_codes.L{layer}.npy", partial, source, layout, np.uint8, width, to_codes)
        if spec.features:
            if spec.feature_dtype == "float16":
                dtype, convert = np.float16, lambda block: np.asarray(block).astype(np.float16)
            else:
                dtype, convert = np.int16, _to_bfloat16_bits
            _assemble(store_dir / f"features.L{layer}.npy", partial, source, layout, dtype, layout.hidden, convert)
    with atomic_path(store_dir / "stats.safetensors") as tmp:
        save_numpy_file(stats_arrays, str(tmp))
    write_npy(store_dir / "tokens.npy", np.concatenate([np.asarray(t, dtype=np.int32) for t in layout.token_lists]))
    write_npy(store_dir / "offsets.npy", layout.offsets)
    if spec.topk:
        for name, dtype in (("topk_values.npy", np.float16), ("topk_indices.npy", np.int32)):
            _assemble(store_dir / name, partial, name, layout, dtype, spec.topk, np.asarray)

    names = spec.file_names(layout.layers)
    files = {n: {"bytes": (store_dir / n).stat().st_size, "sha256": sha256_file(store_dir / n)} for n in names}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **expected,
        "samples": len(layout.token_lists),
        "tokens": int(layout.offsets[-1]),
        "hidden_size": layout.hidden,
        "spec": asdict(spec),
        "files": files,
    }
    atomic_write_json(store_dir / MANIFEST, manifest)
    shutil.rmtree(partial, ignore_errors=True)
