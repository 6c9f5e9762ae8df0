"""The activation store on disk: what it holds, how labels are packed, and reading it back.

GeRe (arXiv 2508.04676, Sec. 3.2) runs the frozen base model over the replay set once and keeps its
last-layer hidden states ("activation states") and per-dimension statistics; thresholds are
``mean -/+ k*std``. A store folder holds only what each replay objective needs:

- ``tm``: each element's label (negative / neutral / positive) packed 4 to a byte (2 bits per element),
  memory-mapped at training time: ``tm_codes.L<layer>.npy`` ``uint8 [tokens, ceil(hidden/4)]``;
- ``l1`` / ``l2``: hidden states in float16 or bfloat16 (stored as int16 bits):
  ``features.L<layer>.npy`` ``[tokens, hidden]``;
- ``kl``: the base model's top-k logits per token: ``topk_values.npy`` (float16) and ``topk_indices.npy``
  (int32), ``[tokens, k]``.

Always present: ``tokens.npy`` (int32, the replay token ids, concatenated), ``offsets.npy`` (int64,
``[samples + 1]``), ``stats.safetensors`` (float64 count / mean / M2 / std per layer) and ``manifest.json``
(fingerprints, settings, sha256 of every file), written last: a folder without a manifest is never
trusted. Nothing is pickled. The manifest key ``k`` is the threshold multiplier (``threshold_k``).

This module needs numpy and safetensors only; `gere.store.extract` writes stores, `gere.reference` turns
what is read here into tensors for the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file as load_numpy_file

from gere.errors import GeReError
from gere.io_utils import atomic_path, sha256_file
from gere.parts import CODES, FEATURES, TOPK, reference_targets
from gere.reading import read_json
from gere.replay.replay_set import PAPER_MAX_LENGTH
from gere.stats import thresholds
from gere.store import FEATURE_DTYPES

if TYPE_CHECKING:
    from gere.config import GeReConfig

# Label codes stored per element (2 bits each).
CODE_NEGATIVE = 0
CODE_NEUTRAL = 1
CODE_POSITIVE = 2

MANIFEST = "manifest.json"
#: Written into every manifest, so a folder is recognised as a store before anything in it is touched.
FORMAT = "gere-activation-store"
FORMAT_VERSION = 1
# Manifests written before the marker existed (gere 0.1) hold these keys.
_LEGACY_KEYS = {"files", "tokens", "hidden_size", "contents", "version"}


@dataclass
class StoreSpec:
    """What to record. ``layers`` index ``hidden_states`` (0 = embeddings, -1 = last layer after the norm)."""

    max_length: int = PAPER_MAX_LENGTH
    layers: tuple[int, ...] = (-1,)
    threshold_k: float = 1.0
    tm: bool = True
    features: bool = False
    feature_dtype: str = "float16"
    topk: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise GeReError("no layers to record; set layers to at least one, e.g. [-1]", setting="layers")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise GeReError(f"feature dtype {self.feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        if not self.threshold_k > 0:
            raise GeReError(f"threshold k = {self.threshold_k}; set threshold_k above 0", setting="threshold_k")
        if self.topk < 0 or self.batch_size < 1:
            raise GeReError("top-k must be >= 0 and the extraction batch size >= 1")

    @classmethod
    def for_config(cls, config: GeReConfig) -> StoreSpec:
        """What the activation store must hold for ``config``'s replay objective."""
        targets = reference_targets(config.parts)
        return cls(
            max_length=config.replay_max_length,
            layers=tuple(config.layers),
            threshold_k=config.threshold_k,
            tm=CODES in targets,
            features=FEATURES in targets,
            feature_dtype=config.feature_dtype,
            topk=config.kl_topk if TOPK in targets else 0,
            batch_size=config.extract_batch_size,
        )

    def contents(self) -> dict:
        """The manifest's ``contents``: which arrays the store holds."""
        return {"tm": self.tm, "features": self.features, "feature_dtype": self.feature_dtype, "topk": self.topk}

    def file_names(self, layers) -> list[str]:
        """Every file a finished store holds but the manifest, for recorded ``layers``."""
        names = ["tokens.npy", "offsets.npy", "stats.safetensors"]
        names += [f"tm_codes.L{layer}.npy" for layer in layers if self.tm]
        names += [f"features.L{layer}.npy" for layer in layers if self.features]
        names += ["topk_values.npy", "topk_indices.npy"] if self.topk else []
        return names


# ---------------------------------------------------------------------------------------------- labels


def label_codes(rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Label of each element: 0 negative (``<= low``), 1 neutral, 2 positive (``>= high``), as ``uint8``.
    Negative wins a tie (``low == high``, a zero-variance dimension); `gere.losses.threshold_codes` is the
    torch twin."""
    codes = np.full(rows.shape, CODE_NEUTRAL, dtype=np.uint8)
    codes[rows >= high] = CODE_POSITIVE
    codes[rows <= low] = CODE_NEGATIVE
    return codes


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


def unpack_codes(packed: np.ndarray, hidden: int) -> np.ndarray:
    """Inverse of `pack_codes`: ``uint8 [rows, hidden]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & 3
    return codes.reshape(packed.shape[0], -1)[:, :hidden]


def write_npy(path: Path, array: np.ndarray) -> None:
    """One ``.npy`` file, atomically, never pickled."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class ActivationStore:
    """A finished store, memory-mapped; arrays come back as numpy. Use `open_store` or `extract_store`."""

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

    @property
    def contents(self) -> dict:
        return self.manifest["contents"]

    def tokens(self, index: int) -> list[int]:
        return self.tokens_flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def mean_std(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``[hidden]`` mean and standard deviation of the base model's states."""
        return self.stats[f"L{layer}.mean"], self.stats[f"L{layer}.std"]

    def thresholds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[hidden]`` (low, high), computed in float64 from the stored statistics."""
        low, high = thresholds(*self.mean_std(layer), float(self.manifest["k"]))
        return low.astype(np.float32), high.astype(np.float32)

    def _memmap(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_maps", {})
        if name not in cache:
            if name not in self.manifest["files"]:
                raise GeReError(
                    f"activation store {self.path} has no {name}; it was extracted for "
                    f"{self.contents}; re-extract with the objective you train with"
                )
            cache[name] = np.load(self.path / name, mmap_mode="r")
        return cache[name]

    def _rows(self, name: str, index: int) -> np.ndarray:
        return np.array(self._memmap(name)[self.offsets[index] : self.offsets[index + 1]])

    def codes(self, index: int, layer: int) -> np.ndarray:
        """Label codes ``uint8 [length, hidden]`` of one sample."""
        return unpack_codes(self._rows(f"tm_codes.L{layer}.npy", index), self.hidden_size)

    def features(self, index: int, layer: int) -> np.ndarray:
        """Stored hidden states ``[length, hidden]``: float16, or bfloat16 bits as int16 (see ``contents``)."""
        return self._rows(f"features.L{layer}.npy", index)

    def topk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The base model's top-k logits ``float16 [length, k]`` and their vocabulary ids ``int32``."""
        return self._rows("topk_values.npy", index), self._rows("topk_indices.npy", index)

    def bits_per_element(self, layer: int) -> float:
        """Payload bits per stored element (the .npy header of 128 bytes aside)."""
        size = self._memmap(f"tm_codes.L{layer}.npy").nbytes
        return 8.0 * size / (int(self.offsets[-1]) * self.hidden_size)

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest; a mismatch is an error."""
        for name, info in self.manifest["files"].items():
            path = self.path / name
            if not path.exists():
                raise GeReError(f"activation store file {path} is missing; re-extract it (set reuse_store to false)",
                                setting="reuse_store")  # fmt: skip
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise GeReError(
                    f"activation store file {path} is truncated or corrupted (checksum mismatch); "
                    "re-extract it (set reuse_store to false)",
                    setting="reuse_store",
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
    """Refuse a store whose identity (see `gere.store.fingerprint.expected_manifest`) differs, naming what."""
    for key in IDENTITY_KEYS:
        if found.get(key) != expected.get(key):
            old, new = found.get(key), expected.get(key)
            raise GeReError(
                f"activation store {path} was made with a different {_WHAT[key]}: stored {str(old)[:40]!r}, "
                f"now {str(new)[:40]!r}. Rebuild it (set reuse_store to false, reuse_gere_hidden_state=False "
                "in a reference-style script), or point store_dir at a new folder",
                setting="reuse_store",
            )


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store folder ``path``; an error when it is unreadable or not a store's."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = read_json(manifest_path, what="store manifest")
    except GeReError as err:
        raise GeReError(f"{manifest_path} is corrupted ({err}); rebuild the store (set reuse_store to false)",
                        setting="reuse_store") from None  # fmt: skip
    if not isinstance(manifest, dict) or not (manifest.get("format") == FORMAT or _LEGACY_KEYS <= set(manifest)):
        raise GeReError(
            f"{manifest_path} is not the manifest of a gere activation store, so {path} is some other folder; "
            "point store_dir at an empty folder or at a store (nothing in it was changed)",
            setting="store_dir",
        )
    return manifest


def store_file_names(manifest: dict) -> list[str]:
    """Every file a store wrote: what its manifest lists, and the manifest itself."""
    return [*manifest.get("files", {}), MANIFEST]


def open_store(path: str | Path, *, expected: dict | None = None, verify: bool = True) -> ActivationStore:
    """Open a finished store; with ``expected`` (see `expected_manifest`) refuse one made otherwise."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise GeReError(f"{path} holds no finished activation store (no {MANIFEST}); run `gere extract` first")
    manifest = read_manifest(path)
    if expected is not None:
        check_identity(manifest, expected, path)
    store = ActivationStore(path, manifest, np.zeros(0, np.int32), np.zeros(1, np.int64), {})
    if verify:
        store.verify()
    store.tokens_flat = np.load(path / "tokens.npy", mmap_mode="r")
    store.offsets = np.load(path / "offsets.npy")
    store.stats = load_numpy_file(str(path / "stats.safetensors"))
    _check_shapes(store)
    return store


def _check_shapes(store: ActivationStore) -> None:
    """The arrays agree with the manifest (a hand-edited manifest would otherwise fail deep in training)."""
    m, tokens = store.manifest, int(store.offsets[-1])
    hidden, samples = int(m["hidden_size"]), int(m["samples"])
    expected = {"tokens.npy": (tokens,), "offsets.npy": (samples + 1,)}
    for layer in store.layers:
        if m["contents"]["tm"]:
            expected[f"tm_codes.L{layer}.npy"] = (tokens, -(-hidden // 4))
        if m["contents"]["features"]:
            expected[f"features.L{layer}.npy"] = (tokens, hidden)
        if store.stats[f"L{layer}.mean"].shape != (hidden,):
            expected[f"stats L{layer}.mean"] = (hidden,)
    if m["contents"]["topk"]:
        expected["topk_values.npy"] = expected["topk_indices.npy"] = (tokens, int(m["contents"]["topk"]))
    for name, shape in expected.items():
        found = store.stats[name.split()[1]].shape if name.startswith("stats ") else _npy_shape(store.path / name)
        if tuple(found) != shape or int(m["tokens"]) != tokens:
            raise GeReError(
                f"activation store {store.path} does not agree with its manifest ({name} has shape "
                f"{tuple(found)}, the manifest says {shape}); rebuild it (set reuse_store to false)",
                setting="reuse_store",
            )


def _npy_shape(path: Path) -> tuple[int, ...]:
    return np.load(path, mmap_mode="r").shape
