"""Figure 4 of the engine benchmarks: the peak extra memory of the TM loss (forward + backward) against a naive
elementwise implementation, each measured in a fresh process (``bench_memory.py --worker IMPL SHAPE``), and
their agreement on a small case. Run through `bench_engine.py` (``--figures 4``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import Sizes, median

from gere.losses import CODE_NEGATIVE, CODE_NEUTRAL, CODE_POSITIVE, coded_margin_loss, margin_loss
from gere.stats import thresholds as make_thresholds


def naive_margin_loss(hidden, codes, low, high, mask):
    """The TM loss written elementwise, as the reference implementation does: float masks per label and
    relu terms over the whole ``[batch, length, hidden]`` tensor, sum / number of non-zero elements."""
    h = hidden.float()
    negative = (codes == CODE_NEGATIVE).float()
    neutral = (codes == CODE_NEUTRAL).float()
    positive = (codes == CODE_POSITIVE).float()
    real = mask.unsqueeze(-1).float()
    loss_negative = F.relu(h - low) * negative
    loss_positive = F.relu(high - h) * positive
    loss_neutral = (F.relu(h - high) + F.relu(low - h)) * neutral
    total = (loss_negative + loss_positive + loss_neutral) * real
    nonzero = (total != 0).sum().clamp_min(1)
    return total.sum() / nonzero


def make_inputs(shape, seed: int = 0):
    """Hidden states ``[b, l, h]`` (leaf, requires grad), codes from a perturbed reference, thresholds
    mean -/+ std, a padding mask. Built in row blocks so no full-size temporaries raise the RSS peak."""
    g = torch.Generator().manual_seed(seed)
    b, length, hidden_size = shape
    mean, std = 0.1 * torch.randn(hidden_size, generator=g), 0.5 + torch.rand(hidden_size, generator=g)
    low, high = make_thresholds(mean, std)
    hidden = torch.empty(shape)
    codes = torch.empty(shape, dtype=torch.uint8)
    for row in range(b):
        hidden[row] = mean + std * torch.randn(length, hidden_size, generator=g)
        reference = hidden[row] + 0.5 * std * torch.randn(length, hidden_size, generator=g)
        codes[row] = CODE_NEUTRAL
        codes[row][reference >= high] = CODE_POSITIVE
        codes[row][reference <= low] = CODE_NEGATIVE
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1::2, length - length // 8 :] = False  # right padding on every other row
    return hidden.requires_grad_(), codes, low, high, mask


def _status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ``ru_maxrss`` cannot be used for this: it keeps the
    parent's peak across fork + exec, and it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_worker(impl: str, shape: tuple[int, int, int]) -> dict:
    """Run in a fresh process: peak RSS of one forward + backward beyond the inputs."""
    fn = naive_margin_loss if impl == "naive" else coded_margin_loss
    if impl == "coded-elements":
        # What-if, patched in this worker only: chunks of ~2**20 elements instead of 1024 rows.
        import gere.losses

        gere.losses.CHUNK_ROWS = max(1, 2**20 // shape[-1])
    small = make_inputs((2, 16, 64))
    fn(small[0], *small[1:]).backward()  # load kernels and thread pools before measuring
    del small
    inputs = make_inputs(shape)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    reset = _reset_peak_rss()
    base = _status_bytes("VmRSS")
    peak_before = _status_bytes("VmHWM")
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    return {
        "impl": impl,
        "shape": list(shape),
        "input_bytes": input_bytes,
        "extra_peak_bytes": peak - base,
        "new_peak": reset and peak > peak_before,
        "saved_bytes": sum(saved.values()),
        "grad_bytes": inputs[0].grad.numel() * inputs[0].grad.element_size(),
        "seconds": seconds,
        "loss": float(loss.detach()),
    }


def agreement_check() -> dict:
    """Coded vs naive TM loss (and the raw-reference `margin_loss`): same value and gradient on a small case."""
    hidden, codes, low, high, mask = make_inputs((3, 41, 96), seed=1)
    out = {}
    results = {}
    for name, fn in (("coded", coded_margin_loss), ("naive", naive_margin_loss)):
        h = hidden.detach().clone().requires_grad_()
        loss = fn(h, codes, low, high, mask)
        loss.backward()
        results[name] = (loss.detach(), h.grad)
    # The raw-reference path: states that produce exactly these codes under mean -/+ 1*std.
    mean, std = (low + high) / 2, (high - low) / 2
    reference = torch.where(
        codes == CODE_POSITIVE, high + 1, torch.where(codes == CODE_NEGATIVE, low - 1, mean)
    )
    h = hidden.detach().clone().requires_grad_()
    loss = margin_loss(h, reference, mean, std, mask)
    loss.backward()
    results["margin_loss"] = (loss.detach(), h.grad)
    naive_loss, naive_grad = results["naive"]
    for name in ("coded", "margin_loss"):
        loss, grad = results[name]
        out[name] = {
            "loss": float(loss),
            "loss_abs_diff": float((loss - naive_loss).abs()),
            "grad_max_abs_diff": float((grad - naive_grad).abs().max()),
            "allclose": bool(
                torch.allclose(loss, naive_loss, rtol=1e-5, atol=1e-7)
                and torch.allclose(grad, naive_grad, rtol=1e-5, atol=1e-9)
            ),
        }
    out["naive_loss"] = float(naive_loss)
    out["active_elements"] = int((naive_grad != 0).sum())
    out["elements"] = naive_grad.numel()
    return out


MEMORY_IMPLS = {
    "coded": "`coded_margin_loss`",
    "coded-elements": "`coded_margin_loss` with `CHUNK_ROWS = 2**20 // hidden` (patched in the worker; what-if)",
    "naive": "naive elementwise (`bench_memory.naive_margin_loss`)",
}


def memory_figure(sizes: Sizes) -> dict:
    """Figure 4: each (implementation, shape) in a fresh subprocess, median over repeats."""
    env = dict(os.environ)
    # Every allocation above 64 KiB becomes its own mmap, so freed tensors leave the RSS at once and
    # the peak RSS follows live tensors (glibc's default raises that threshold to 32 MiB as it goes).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    for shape in sizes.memory_shapes:
        for impl in MEMORY_IMPLS:
            runs, default_runs = [], []
            cmd = [sys.executable, __file__, "--worker", impl, ",".join(map(str, shape))]
            for _ in range(sizes.memory_repeats):
                for environ, out in ((env, runs), (os.environ, default_runs)):
                    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, check=True)
                    out.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = dict(runs[0])
            row["extra_peak_bytes"] = median([r["extra_peak_bytes"] for r in runs])
            row["default_malloc_bytes"] = median([r["extra_peak_bytes"] for r in default_runs])
            row["seconds"] = median([r["seconds"] for r in runs])
            row["new_peak"] = all(r["new_peak"] for r in runs)
            rows.append(row)
            print(f"  memory {impl:14s} {shape}: extra peak {row['extra_peak_bytes'] / 2**20:.0f} MiB",
                  flush=True)  # fmt: skip
    return {"rows": rows, "agreement": agreement_check()}


if __name__ == "__main__":
    impl, shape = sys.argv[sys.argv.index("--worker") + 1 :][:2]
    print(json.dumps(memory_worker(impl, tuple(int(x) for x in shape.split(",")))))
