"""Several processes, one result: rank helpers, exact statistics across ranks, sharded-parameter checks.

Everything here works without ``torch.distributed``: a single process is rank 0 of a world of one, a
barrier returns at once and a merge across ranks returns its input. Under ``torchrun`` or
``accelerate launch`` the helpers use the default process group (gloo on CPU, NCCL on GPUs).

Statistics cross process boundaries as float64 (count, mean, M2) triples merged with Chan's parallel
update (`gere.stats`). Floating-point merges are not associative, so the merge order is fixed: by rank in
`merge_stats_across_ranks`, and by a key that does not depend on the number of processes in
`fold_stats_in_key_order`, which the activation store uses so that its thresholds (and therefore its
label codes) are bit-for-bit the same with 1 or N processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from gere.config import launched_world_size
from gere.errors import GeReError
from gere.stats import RunningStats

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without DTensor support
    _DTensor = None

T = TypeVar("T")

# Per-key statistics are gathered this many keys at a time, so memory stays bounded for large replay sets.
_KEYS_PER_GATHER = 256


def is_distributed() -> bool:
    """True when a default process group exists with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any_failed(
    error: BaseException | None, what: str, passthrough: tuple[type[Exception], ...] = ()
) -> None:
    """Collective: every process learns whether any process failed, so none waits forever for the others.

    Raises this process's own ``error``, else a `GeReError` naming the first process that failed (of the
    same type when that error's type is in ``passthrough``).
    """
    reports = all_gather_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    for owner, report in enumerate(reports):
        if report is not None:
            kind = next((k for k in passthrough if k.__name__ == report[0]), GeReError)
            raise kind(f"process {owner} stopped the {what}: {report[0]}: {report[1]}")


def run_on_main(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its failure, to every rank (a collective)."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # handed to the other ranks below, then raised
            error = err
    result, failure = broadcast_object(
        (result, None if error is None else f"{type(error).__name__}: {error}")
    )
    if error is not None:
        raise error
    if failure is not None:
        raise GeReError(f"process 0 failed while {what}: {failure}")
    return result


def init_from_env(backend: str | None = None) -> bool:
    """Create the default process group when started by ``torchrun`` / ``accelerate launch`` and none
    exists yet (NCCL when CUDA is available, else gloo). Returns whether a group exists afterwards.

    `GeReTrainer` needs none of this (``TrainingArguments`` creates the group); it is for scripts that
    build an activation store before any ``TrainingArguments`` exist, such as ``gere extract``.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if launched_world_size() <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


# ---------------------------------------------------------------------------------------------- statistics


def _as_triple(stats: RunningStats) -> tuple[int, object, object]:
    return int(stats.count), stats.mean, stats.m2


def merge_stats_across_ranks(stats: RunningStats) -> RunningStats:
    """Merge every rank's statistics of its own rows, in rank order 0, 1, ..., on every rank.

    Each rank passes the (count, mean, M2) of the rows it saw; all ranks return the same merged
    statistics (equal to one process's over all rows to float64 rounding). Without a process group the
    input is returned unchanged.
    """
    if not is_distributed():
        return stats
    merged = RunningStats(stats.dim)
    for count, mean, m2 in all_gather_object(_as_triple(stats)):
        merged.merge(RunningStats(stats.dim, count, mean, m2))
    return merged


def fold_stats_in_key_order(
    keys: Sequence[int], local: Callable[[int], RunningStats | None], dim: int
) -> RunningStats:
    """Merge per-key statistics in key order, whichever rank computed each key.

    ``local(key)`` returns this rank's statistics for ``key``, or None when another rank owns it; every
    key must be owned by exactly one rank. All ranks return identical statistics, and since the merge
    order depends only on ``keys``, the result is bit-for-bit the one a single process gets from the same
    per-key statistics. Keys are gathered a window at a time, so memory stays bounded.
    """
    total = RunningStats(dim)
    for start in range(0, len(keys), _KEYS_PER_GATHER):
        window = keys[start : start + _KEYS_PER_GATHER]
        mine = {}
        for key in window:
            stats = local(key)
            if stats is not None:
                mine[key] = _as_triple(stats)
        found: dict[int, tuple] = {}
        for owner, part in enumerate(all_gather_object(mine)):
            for key, triple in part.items():
                if key in found:
                    raise RuntimeError(f"statistics for key {key} came from two processes (one was {owner})")
                found[key] = triple
        for key in window:
            if key not in found:
                raise RuntimeError(f"no process computed the statistics for key {key}")
            count, mean, m2 = found[key]
            total.merge(RunningStats(dim, count, mean, m2))
    return total


# ---------------------------------------------------------------------------------------------- parameters


def is_zero3_partitioned(model) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned ``model``'s parameters (they carry ``ds_numel``)."""
    return any(hasattr(param, "ds_numel") for param in model.parameters())


def sharded_parameters(model) -> str | None:
    """Why ``model``'s parameters are not all present in this process, or None when they are.

    Recognises DeepSpeed ZeRO-3 partitioned parameters (a ``ds_numel`` attribute; the local tensor is
    empty), FSDP flat parameters (FSDP1), DTensors (FSDP2 / tensor parallel) and parameters on the meta
    device (loaded lazily, e.g. FSDP's ``cpu_ram_efficient_loading`` on ranks other than 0).
    """
    for name, param in model.named_parameters():
        if hasattr(param, "ds_numel"):
            return f"DeepSpeed ZeRO-3 partitions the parameters (e.g. {name})"
        if getattr(param, "_is_flat_param", False) or "_fsdp_wrapped_module" in name:
            return f"FSDP flattens and shards the parameters (e.g. {name})"
        if _DTensor is not None and isinstance(param, _DTensor):
            return f"the parameters are DTensors sharded across processes (FSDP2 or tensor parallel; e.g. {name})"
        if param.is_meta:
            return f"the parameters are on the meta device, not loaded in this process (e.g. {name})"
    return None


def require_full_parameters(model, what: str) -> None:
    """Refuse, naming the fix, to run ``what`` (a forward pass of the base model) on sharded parameters."""
    reason = sharded_parameters(model)
    if reason is not None:
        raise GeReError(
            f"{what} needs the full model's forward pass, but {reason}. Extract the activation store once "
            "without sharding (`gere extract --store-dir DIR` on one process, or under DDP / ZeRO-2), then "
            "train with that store (store_dir=DIR, reference='store'): it is reused when its fingerprint "
            "matches. See docs/distributed.md"
        )


def check_interpolation_across_processes(trainer) -> None:
    """Refuse, for a GeRe trainer whose replay rows sit inside the task batches, set-ups where the processes'
    unequal forward counts would hang (FSDP, ZeRO-3, or DDP broadcasting buffers at every forward)."""
    if trainer.args.world_size <= 1:
        return
    sharded = None
    if trainer.is_fsdp_enabled:
        sharded = "FSDP"
    elif (
        trainer.is_deepspeed_enabled
        and getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
    ):
        sharded = "DeepSpeed ZeRO-3"
    if sharded is None and not trainer.args.ddp_broadcast_buffers:
        return
    why = (
        f"under {sharded} every forward pass"
        if sharded
        else "with ddp_broadcast_buffers=True every forward pass"
    )
    raise GeReError(
        f"replay_mixing {trainer.gere.mixing!r} runs one or two forward passes per process and micro-batch, "
        f"but {why} is a collective that all processes must run equally often. Use a separate replay "
        "batch (replay_mixing='batch', num_interpolate_per_batch=0, replay_batch_size=N)"
        + ("" if sharded else " or leave ddp_broadcast_buffers unset")
        + "; see docs/distributed.md"
    )
