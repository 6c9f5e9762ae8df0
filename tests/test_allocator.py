"""The host allocator setting of the `gere` command (gere.allocator): freed memory kept for reuse on CPU-only
machines, measured by page faults in a real subprocess (mallopt changes the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gere import allocator
from gere.errors import GeReError

# Allocates and frees a 64 MiB tensor, writing every page, 30 times; prints the page faults of the last ten (glibc
# grows its heap for the first few before it reuses a freed block for an aligned one).
PROBE = """
import json, resource, sys
import torch
from gere import allocator
took = allocator.for_cpu_training() if sys.argv[1] == "command" else False
def touch():
    torch.ones(16 << 20)  # 64 MiB, every page written, freed at once
for _ in range(20):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str, **env) -> dict:
    import os

    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_faulting_pages_in_again():
    # 10 x 64 MiB freshly mapped is ~164,000 faults of 4 KiB pages; reused, almost none.
    default = _faults("library", GERE_CPU_MALLOC="keep")  # the library alone leaves malloc as it is
    kept = _faults("command", GERE_CPU_MALLOC="keep")
    system = _faults("command", GERE_CPU_MALLOC="system")
    assert default["took"] is False and system["took"] is False and kept["took"] is True
    assert default["faults"] > 100_000 and system["faults"] > 100_000
    assert kept["faults"] < 2_000


def test_the_choice_is_read_from_the_environment_and_checked():
    assert allocator.choice({}) == "keep"
    assert allocator.choice({"GERE_CPU_MALLOC": " System "}) == "system"
    assert allocator.for_cpu_training({"GERE_CPU_MALLOC": "system"}) is False
    with pytest.raises(GeReError, match="GERE_CPU_MALLOC.*keep.*system"):
        allocator.choice({"GERE_CPU_MALLOC": "jemalloc"})
