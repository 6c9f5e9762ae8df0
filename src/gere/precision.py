"""Training precision: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere.

``training.bf16`` takes ``auto`` (the default), ``true`` or ``false``. ``auto`` turns bf16 autocast on for
a CUDA device with bf16 support, and for a CPU whose flags show native bf16 instructions (``avx512_bf16``
or ``amx_bf16``); on other CPUs bf16 is emulated and several times slower than fp32, so ``auto`` stays in
fp32 there. Weights, optimizer state and evaluation stay in fp32 either way: only the training forward and
backward passes run under autocast (the Trainer's ``bf16=True``).

The choice is made once per run, printed once, and recorded in the run's state and provenance; a resumed
run keeps the precision it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Accepted values of ``training.bf16``.
BF16_CHOICES = ("auto", True, False)
#: CPU flags (Linux /proc/cpuinfo) that mean bf16 matrix products run natively.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run: ``bf16`` on or off, and why (one line, for the console and logs)."""

    bf16: bool
    reason: str
    fp16: bool = False  # fp16 mixed precision, asked for with the TrainingArguments field ``training.fp16``

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def describe(self) -> str:
        kind = {"bf16": "bf16 autocast", "fp16": "fp16 mixed precision", "fp32": "fp32"}[self.name]
        return f"training precision: {kind} ({self.reason})"


def parse_bf16(value) -> bool | str:
    """``auto`` / ``true`` / ``false`` (YAML booleans or strings) -> ``"auto"``, True or False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    from gere.errors import GeReError, shown

    raise GeReError(f"training.bf16 = {shown(value)} is not valid: use auto, true or false")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from Linux's ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: str | None = None, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` (default: CUDA when available, else the CPU) computes bf16 natively, and why."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(0)} supports bf16"
        return False, f"{torch.cuda.get_device_name(0)} has no bf16 support"
    if device != "cpu":
        return False, f"bf16 is not chosen automatically on {device}"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has no avx512_bf16 or amx_bf16, so bf16 would be emulated and slower"


def resolve_bf16(setting: bool | str, device: str | None = None, flags: set[str] | None = None,
                 fp16: bool = False) -> Precision:  # fmt: skip
    """The precision ``training.bf16`` (and ``training.fp16``, which ``auto`` gives way to) asks for here."""
    if fp16 and setting is not True:
        return Precision(False, "training.fp16: true", fp16=True)
    if setting is True:
        return Precision(True, "training.bf16: true")
    if setting is False:
        return Precision(False, "training.bf16: false")
    on, why = native_bf16(device, flags)
    return Precision(on, f"auto: {why}")
