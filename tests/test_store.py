import json

import numpy as np
import pytest
import torch

from gere.batching import length_sorted_batches
from gere.errors import GeReError
from gere.losses import coded_margin_loss, threshold_codes
from gere.reference import replay_statistics
from gere.replay.replay_set import ReplaySet, tokenize_replay_set
from gere.store import ExtractionStopped, StoreSpec, extract_store, open_store
from gere.store.format import pack_codes, unpack_codes

from tiny import replay_texts, tiny_llama, tiny_tokenizer


def make_set(n=10, seed=0):
    return ReplaySet(tuple(f"r{i}" for i in range(n)), tuple(replay_texts(n, seed)))


@pytest.fixture
def parts():
    return tiny_llama(), tiny_tokenizer(), make_set()


def one_by_one_states(model, tokenizer, replay_set, max_length, layer=-1):
    model.eval()
    out = []
    with torch.no_grad():
        for ids in tokenize_replay_set(replay_set, tokenizer, max_length):
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
            out.append(hs[0])
    return out


def test_store_matches_unbatched_forward(parts, tmp_path):
    model, tok, rs = parts
    store = extract_store(
        model, tok, rs, tmp_path / "s", StoreSpec(max_length=16, batch_size=4), progress=False
    )
    layer = store.layers[0]
    assert layer == model.config.num_hidden_layers
    states = one_by_one_states(model, tok, rs, 16)
    flat = torch.cat(states).double().numpy()
    mean, std = store.mean_std(layer)
    np.testing.assert_allclose(mean, flat.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), atol=1e-6)
    low, high = (torch.from_numpy(t) for t in store.thresholds(layer))
    mismatches = 0
    for i, s in enumerate(states):
        assert store.tokens(i) == tokenize_replay_set(rs, tok, 16)[i]
        mismatches += int((torch.from_numpy(store.codes(i, layer)) != threshold_codes(s, low, high)).sum())
    # Batched and one-by-one forwards may differ in the last float bit right at a threshold.
    assert mismatches <= 2
    assert store.bits_per_element(layer) == 2.0


def test_unchanged_model_has_zero_margin_on_replay_set(parts, tmp_path):
    model, tok, rs = parts
    store = extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=16), progress=False)
    layer = store.layers[0]
    low, high = (torch.from_numpy(t) for t in store.thresholds(layer))
    for i, h in enumerate(one_by_one_states(model, tok, rs, 16)):
        loss = coded_margin_loss(h[None], torch.from_numpy(store.codes(i, layer))[None], low, high)
        assert float(loss) < 1e-5


def test_reuse_and_refusals(parts, tmp_path):
    model, tok, rs = parts
    spec = StoreSpec(max_length=16)
    first = extract_store(model, tok, rs, tmp_path / "s", spec, progress=False)
    again = extract_store(model, tok, rs, tmp_path / "s", spec, progress=False)
    assert again.manifest == first.manifest
    other_model = tiny_llama(seed=1)
    with pytest.raises(GeReError, match="different model.*set reuse_store to false"):
        extract_store(other_model, tok, rs, tmp_path / "s", spec, progress=False)
    with pytest.raises(GeReError, match="different replay set"):
        extract_store(model, tok, make_set(seed=3), tmp_path / "s", spec, progress=False)
    with pytest.raises(GeReError, match="different replay max length"):
        extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=12), progress=False)
    tok2 = tiny_tokenizer()
    tok2.add_tokens(["zebra"])
    with pytest.raises(GeReError, match="different tokenizer"):
        extract_store(model, tok2, rs, tmp_path / "s", spec, progress=False)
    rebuilt = extract_store(other_model, tok, rs, tmp_path / "s", spec, regenerate=True, progress=False)
    assert rebuilt.manifest["model"] != first.manifest["model"]


def test_interrupted_extraction_resumes_to_identical_files(parts, tmp_path):
    model, tok, rs = parts
    spec = StoreSpec(max_length=16, batch_size=3, features=True, topk=4)
    extract_store(model, tok, rs, tmp_path / "whole", spec, progress=False)
    with pytest.raises(ExtractionStopped):
        extract_store(model, tok, rs, tmp_path / "cut", spec, progress=False, stop_after_batches=2)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    assert len(json.loads((tmp_path / "cut" / "partial" / "progress.json").read_text())["done"]) == 2
    extract_store(model, tok, rs, tmp_path / "cut", spec, progress=False)
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert whole["files"] == cut["files"]
    for name in whole["files"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()
    assert not (tmp_path / "cut" / "partial").exists()


def test_corrupted_file_is_refused(parts, tmp_path):
    model, tok, rs = parts
    extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=16), progress=False)
    codes = next((tmp_path / "s").glob("tm_codes.*.npy"))
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0xFF
    codes.write_bytes(bytes(data))
    with pytest.raises(GeReError, match="corrupted"):
        open_store(tmp_path / "s")
    codes.write_bytes(bytes(data[:-10]))
    with pytest.raises(GeReError, match="truncated"):
        open_store(tmp_path / "s")


def test_features_and_topk_round_trip(parts, tmp_path):
    model, tok, rs = parts
    store = extract_store(
        model,
        tok,
        rs,
        tmp_path / "s",
        StoreSpec(max_length=16, features=True, topk=3, feature_dtype="bfloat16"),
        progress=False,
    )
    layer = store.layers[0]
    states = one_by_one_states(model, tok, rs, 16)
    stored = torch.from_numpy(store.features(0, layer)).view(torch.bfloat16)  # bfloat16 kept as int16 bits
    torch.testing.assert_close(stored.float(), states[0].bfloat16().float(), atol=0.05, rtol=0.02)
    values, indices = store.topk(0)
    assert values.shape == (len(store.tokens(0)), 3) and indices.dtype == np.int32


def test_pack_round_trip_odd_width():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(7, 13), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (7, 4)
    assert np.array_equal(unpack_codes(packed, 13), codes)


def test_length_sorted_batches_cover_everything():
    batches = length_sorted_batches([3, 9, 1, 9, 4], 2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert batches[0] == [1, 3]


def test_online_statistics_equal_store_statistics(parts, tmp_path):
    model, tok, rs = parts
    spec = StoreSpec(max_length=16, batch_size=4)
    store = extract_store(model, tok, rs, tmp_path / "s", spec, progress=False)
    layer = store.layers[0]
    tokens = tokenize_replay_set(rs, tok, spec.max_length)
    running = replay_statistics(model, tok, tokens, (layer,), batch_size=spec.batch_size, progress=False)
    np.testing.assert_array_equal(running[layer].mean, store.mean_std(layer)[0])  # bit for bit
    np.testing.assert_array_equal(running[layer].std, store.mean_std(layer)[1])


def test_context_too_short_is_refused(parts, tmp_path):
    model, tok, rs = parts
    with pytest.raises(GeReError, match="context"):
        extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=100000), progress=False)


def test_a_folder_that_is_not_a_store_is_never_cleared(parts, tmp_path):
    model, tok, rs = parts
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my app", "version": 3}))
    (app / "keep.txt").write_text("user data")
    (app / "sub").mkdir()
    for regenerate in (False, True):
        with pytest.raises(GeReError, match="not the manifest of a gere activation store.*nothing in it was changed"):
            extract_store(model, tok, rs, app, StoreSpec(max_length=16), regenerate=regenerate, progress=False)
    assert sorted(p.name for p in app.iterdir()) == ["keep.txt", "manifest.json", "sub"]


def test_regenerating_removes_only_the_stores_own_files(parts, tmp_path):
    model, tok, rs = parts
    store = extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=16), progress=False)
    assert store.manifest["format"] == "gere-activation-store"
    (tmp_path / "s" / "notes.txt").write_text("mine")
    again = extract_store(tiny_llama(seed=1), tok, rs, tmp_path / "s", StoreSpec(max_length=16), regenerate=True,
                          progress=False)  # fmt: skip
    assert again.manifest["model"] != store.manifest["model"]
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_a_manifest_edited_by_hand_is_refused_on_open(parts, tmp_path):
    model, tok, rs = parts
    extract_store(model, tok, rs, tmp_path / "s", StoreSpec(max_length=16), progress=False)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["hidden_size"] = 48
    path.write_text(json.dumps(manifest))
    with pytest.raises(GeReError, match="does not agree with its manifest.*tm_codes"):
        open_store(tmp_path / "s")


def test_one_owner_says_where_a_store_lives(tmp_path):
    import ast
    from pathlib import Path

    from gere.config import GeReConfig
    from gere.store.extract import OWN_STORE, store_dir

    assert store_dir(GeReConfig(), tmp_path) == tmp_path / OWN_STORE
    assert store_dir(GeReConfig(store_dir=str(tmp_path / "elsewhere")), tmp_path) == tmp_path / "elsewhere"
    src = Path(__file__).resolve().parent.parent / "src" / "gere"
    spelled = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py"))
               for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Constant) and node.value == OWN_STORE]  # fmt: skip
    assert spelled == ["store/extract.py"], "the default store folder is named in one place"


# ---------------------------------------------------------------------------------------------- on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The forward pass on another device sums in another order: fp32 states differ by rounding (~1e-6 here). What
# the store keeps from them must then agree within these bounds.
STATS_ATOL = 1e-4  # mean and std per dimension (float64, of states of order 1)
BOUNDARY = 1e-3  # a label code may differ only where the state lies this close to a threshold, in stds ...
CODE_SHARE = 1e-3  # ... and on at most this share of the elements
HALF_ULP = dict(rtol=2e-3, atol=1e-3)  # float16 features and top-k logits: one float16 step apart at most


def assert_stores_agree(first, second, states: list[torch.Tensor]) -> dict:
    """``second`` holds what ``first`` does up to rounding at the bounds above; ``states`` are the fp32 states
    one by one on the CPU, to tell where a differing label code lies. Returns the counts it compared."""
    assert [second.tokens(i) for i in range(len(second))] == [first.tokens(i) for i in range(len(first))]
    for key in ("model", "tokens", "samples", "layers"):
        assert first.manifest[key] == second.manifest[key], key
    layer = first.layers[0]
    for a, b in zip(first.mean_std(layer), second.mean_std(layer)):
        np.testing.assert_allclose(b, a, rtol=0, atol=STATS_ATOL)
    low, high = first.thresholds(layer)
    std = first.mean_std(layer)[1]
    differing = elements = topk_rows = 0
    for i, state in enumerate(states):
        codes_a, codes_b = (s.codes(i, layer) for s in (first, second))
        off = codes_a != codes_b
        h = state.double().numpy()
        gap = np.minimum(np.abs(h - low), np.abs(h - high)) / std  # [tokens, hidden], in stds
        assert (gap[off] <= BOUNDARY).all(), (i, gap[off])
        differing, elements = differing + int(off.sum()), elements + off.size
        np.testing.assert_allclose(second.features(i, layer), first.features(i, layer), **HALF_ULP)
        (values_a, ids_a), (values_b, ids_b) = first.topk(i), second.topk(i)
        np.testing.assert_allclose(values_b, values_a, **HALF_ULP)
        # Near-ties at the k-th place may swap in another id; the values, sorted, stay within HALF_ULP.
        topk_rows += sum(set(a) != set(b) for a, b in zip(ids_a.tolist(), ids_b.tolist()))
    assert differing <= CODE_SHARE * elements, (differing, elements)
    tokens = first.manifest["tokens"]
    assert topk_rows <= max(1, 0.01 * tokens), (topk_rows, tokens)
    return {"differing_codes": differing, "elements": elements, "topk_rows_differing": topk_rows}


@pytest.mark.gpu
@needs_cuda
def test_a_store_extracted_on_cuda_equals_the_cpu_extraction(tmp_path):
    model, tok, rs = tiny_llama(), tiny_tokenizer(), make_set(n=40)
    spec = StoreSpec(max_length=16, batch_size=4, features=True, topk=8)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; TF32 would round to 10 bits
    try:
        on_cpu = extract_store(model, tok, rs, tmp_path / "cpu", spec, progress=False, device="cpu")
        on_cuda = extract_store(model, tok, rs, tmp_path / "cuda", spec, progress=False, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert next(model.parameters()).device.type == "cpu"  # moved to the GPU for the pass only
    counts = assert_stores_agree(on_cpu, on_cuda, one_by_one_states(model, tok, rs, 16))
    assert counts["elements"] == on_cpu.manifest["tokens"] * model.config.hidden_size


@pytest.mark.gpu
@needs_cuda
def test_a_models_fingerprint_is_the_same_on_cuda_as_on_the_cpu():
    """A store made on one device is used by a trainer on another (`gere extract` on a CPU, training on a GPU;
    GeReTrainer checks the store against the model it has placed): the identity must not depend on the device.
    The embedding here is large enough (16.8M weights) for the order of a float64 sum to show in its digits."""
    from gere.store.fingerprint import model_fingerprint

    model = tiny_llama(vocab_size=32768, hidden=512)
    on_cpu = model_fingerprint(model)
    assert model_fingerprint(model.to("cuda")) == on_cpu
