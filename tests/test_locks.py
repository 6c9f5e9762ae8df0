"""One writer per data folder: `gere data cl15` holds the folder's lock while it converts, so a second
conversion into the same --out is refused by name (two at once used to leave a manifest that disagreed with
the files), and the lock is gone once the conversion ends."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gere.cli import main
from gere.locks import LOCK_NAME, hold_lock

OLORA = Path(__file__).parent / "fixtures" / "olora" / "CL_Benchmark"


def test_a_second_conversion_into_a_held_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "cl15"
    assert main(["data", "cl15", "--from-olora", str(OLORA), "--out", str(out), "--tasks", "sst2"]) == 0
    assert not (out / LOCK_NAME).exists(), "the lock goes with the conversion"
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with hold_lock(out, "gere data cl15: a conversion"):  # a conversion running in this process
        assert main(["data", "cl15", "--from-olora", str(OLORA), "--out", str(out), "--tasks", "copa"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {os.getpid()}" in err and "gere data cl15: a conversion" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(json.loads((out / "manifest.json").read_text())["tasks"]) == ["sst2"]
