"""Two CPU processes (torchrun, gloo) against one: extraction, statistics and GeReTrainer steps.

The two-process run is a real ``torchrun`` subprocess running tests/dist_worker.py; the reference runs the
same functions in this process with gradient accumulation 2, so both see the same global batches.
"""

import sys
import types

import numpy as np
import pytest
import torch
from dist_worker import NUM_TASK, local_rows, replay_set, run_extraction, run_training
from launch import TESTS, torchrun

from gere import distributed
from gere.config import GeReConfig
from gere.errors import GeReError
from gere.replay.batches import EvenLastBlock
from gere.replay.sampler import BatchInterpolationSampler
from gere.stats import RunningStats
from gere.store import StoreSpec, extract_store, open_store
from gere.store.fingerprint import model_fingerprint
from gere.trainer import GeReTrainer

from tiny import tiny_llama, tiny_tokenizer

PARTS = ("loss", "task_ce", "replay_ce", "replay_margin", "margin_weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(rank 0 result, rank 1 result, single-process result, dist folder, single folder)``."""
    dist_dir = tmp_path_factory.mktemp("two")
    ranks = torchrun("dist_worker.py", dist_dir)

    single_dir = tmp_path_factory.mktemp("one")
    # One thread like each worker: float32 matmuls may round differently with more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {"extraction": run_extraction(single_dir / "store")}
        for mode in ("bi", "separate"):
            single[mode] = run_training(single_dir, mode, grad_accum=2)
    finally:
        torch.set_num_threads(threads)
    return ranks[0], ranks[1], single, dist_dir, single_dir


def test_sharded_extraction_is_byte_identical_and_resumes_per_process(runs):
    r0, r1, single, dist_dir, single_dir = runs
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    # Interrupted after one batch each: each process recorded its own batch (b % 2 == rank).
    assert r0["extraction"]["cut"] == r1["extraction"]["cut"] == "ExtractionStopped"
    assert r0["extraction"]["progress_after_cut"] == [0]
    assert r1["extraction"]["progress_after_cut"] == [1]
    files = single["extraction"]["files"]
    assert set(files) >= {"stats.safetensors", "tm_codes.L2.npy", "features.L2.npy", "topk_values.npy"}
    assert r0["extraction"]["files"] == r1["extraction"]["files"] == files
    for name in files:
        assert (dist_dir / "store" / name).read_bytes() == (single_dir / "store" / name).read_bytes(), name
    assert not (dist_dir / "store" / "partial").exists()
    two, one = open_store(dist_dir / "store"), open_store(single_dir / "store")
    for key, value in one.stats.items():
        np.testing.assert_array_equal(two.stats[key], value, err_msg=key)


def test_merge_stats_across_ranks_equals_one_pass(runs):
    r0, r1, _, _, _ = runs
    assert r0["extraction"]["merged"] == r1["extraction"]["merged"]
    rows = np.concatenate([local_rows(0), local_rows(1)])
    merged = r0["extraction"]["merged"]
    assert merged["count"] == len(rows)
    np.testing.assert_allclose(merged["mean"], rows.mean(0), rtol=1e-10)
    np.testing.assert_allclose(merged["m2"], np.square(rows - rows.mean(0)).sum(0), rtol=1e-10)


def per_step(results: list[dict], mode: str) -> dict[int, list[list[int]]]:
    """``{step: [replay indices of each micro-batch, in rank / accumulation order]}``."""
    steps: dict[int, list[list[int]]] = {}
    for result in results:
        for micro in result[mode]["micro"]:
            steps.setdefault(micro["step"], []).append(micro["replay"])
    return steps


def assert_first_step_parts_equal(r0, r1, single, mode):
    first = [r0[mode]["logs"][0], r1[mode]["logs"][0], single[mode]["logs"][0]]
    for name in PARTS:
        assert first[0][name] == first[1][name], name  # averaged across processes: the same on both
        assert first[0][name] == pytest.approx(first[2][name], rel=1e-5, abs=1e-5), name


def test_batch_interpolation_holds_k_replay_samples_in_every_global_batch(runs):
    r0, r1, single, _, _ = runs
    two, one = per_step([r0, r1], "bi"), per_step([single], "bi")
    # One epoch of 10 task samples, 3 per global batch of 4: 4 steps, the last one partial and padded.
    assert sorted(two) == sorted(one) == [0, 1, 2, 3]
    for step in two:
        assert sum(len(m) for m in two[step]) == 1, (step, two[step])  # k = 1
        assert sum(two[step], []) == sum(one[step], [])
    tasks = [m["task"] for r in (r0, r1) for m in r["bi"]["micro"]]
    assert sum(tasks) == NUM_TASK + 2  # the padded last global batch repeats two task samples
    assert_first_step_parts_equal(r0, r1, single, "bi")
    assert r0["bi"]["param_checksum"] == r1["bi"]["param_checksum"]


def test_replay_only_micro_batches_do_not_hang_under_ddp(runs):
    """Per-device batch 1, accumulation 2, k = 1: one process holds a lone replay row while the other holds
    a task row. The run finishing at all is the check (a count of items across processes used to pair
    with the other process's backward and hang); both processes end with the same weights."""
    r0, r1, _, _, _ = runs
    micro = [m for r in (r0, r1) for m in r["bi_batch1"]["micro"]]
    assert any(m["task"] == 0 and m["replay"] for m in micro)  # a replay-only micro-batch happened
    assert r0["bi_batch1"]["param_checksum"] == r1["bi_batch1"]["param_checksum"]
    assert [h["step"] for h in r0["bi_batch1"]["logs"]] == [h["step"] for h in r1["bi_batch1"]["logs"]]


def test_fsdp2_on_cpu_builds_the_store_then_trains_with_a_separate_replay_batch(tmp_path):
    """A real torchrun under FSDP2 (gloo, CPU): the store comes from the full model before sharding."""
    ranks = torchrun("fsdp_worker.py", tmp_path)
    assert ranks[0] == ranks[1] and len(ranks[0]) == 2
    assert ranks[0][0]["replay_margin"] == 0.0 and ranks[0][1]["replay_margin"] > 0  # bands from the base model
    assert (tmp_path / "store" / "manifest.json").exists()


def test_separate_replay_batches_are_disjoint_across_processes(runs):
    r0, r1, single, _, _ = runs
    two, one = per_step([r0, r1], "separate"), per_step([single], "separate")
    assert sorted(two) == [0, 1, 2]
    for step, draws in two.items():
        assert [len(d) for d in draws] == [2, 2]
        assert not set(draws[0]) & set(draws[1])
        assert draws == one[step]  # process p draws what accumulation step p draws in one process
    assert_first_step_parts_equal(r0, r1, single, "separate")
    # Same global batches, gradients averaged over the same micro-batches: the same weights after 3 steps.
    assert r0["separate"]["param_checksum"] == r1["separate"]["param_checksum"]
    assert r0["separate"]["param_checksum"] == pytest.approx(single["separate"]["param_checksum"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- one process


def test_helpers_without_a_process_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    stats = RunningStats(3)
    stats.update(np.arange(12.0).reshape(4, 3))
    assert distributed.merge_stats_across_ranks(stats) is stats
    assert distributed.all_gather_object("x") == ["x"] and distributed.broadcast_object(5) == 5
    blocks = {0: np.ones((2, 3)), 1: np.arange(9.0).reshape(3, 3), 2: np.full((1, 3), -4.0)}

    def local(key):
        s = RunningStats(3)
        s.update(blocks[key])
        return s

    folded = distributed.fold_stats_in_key_order(range(3), local, 3)
    rows = np.concatenate(list(blocks.values()))
    assert folded.count == 6
    np.testing.assert_allclose(folded.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(folded.var, rows.var(0), rtol=1e-12)
    with pytest.raises(RuntimeError, match="key 1"):
        distributed.fold_stats_in_key_order(range(3), lambda k: None if k == 1 else local(k), 3)


@pytest.mark.parametrize("num_task,k,per_device,world", [(10, 1, 2, 2), (23, 3, 2, 4), (7, 2, 1, 3)])
def test_even_last_block_keeps_k_replay_per_global_batch(num_task, k, per_device, world):
    global_batch = per_device * world
    inner = BatchInterpolationSampler(num_task, 5, k, global_batch, seed=1)
    order = list(EvenLastBlock(inner, per_device * world))
    assert len(order) % (per_device * world) == 0 and len(order) == len(EvenLastBlock(inner, global_batch))
    for start in range(0, len(order), global_batch):
        assert sum(i >= num_task for i in order[start : start + global_batch]) == k
    assert set(i for i in order if i < num_task) == set(range(num_task))


class _FakeDeepSpeed(types.ModuleType):
    """Stands in for deepspeed: ``zero.GatheredParameters`` counts the parameters it was asked to gather."""

    def __init__(self):
        super().__init__("deepspeed")
        self.gathered = 0
        fake = self

        class Gathered:
            def __init__(self, params, modifier_rank=None):
                fake.gathered += len(params)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.zero = types.SimpleNamespace(GatheredParameters=Gathered)


def mark_zero3(model):
    for param in model.parameters():
        param.ds_numel = param.numel()  # what ZeRO-3 attaches to each partitioned parameter
    return model


def test_zero3_parameters_are_gathered_for_the_fingerprint_and_extraction_is_refused(tmp_path, monkeypatch):
    tok, spec = tiny_tokenizer(), StoreSpec(max_length=16)
    plain = tiny_llama()
    store = extract_store(plain, tok, replay_set(), tmp_path / "s", spec, progress=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import of deepspeed now fails
    with pytest.raises(GeReError, match="deepspeed"):
        model_fingerprint(mark_zero3(tiny_llama()))
    fake = _FakeDeepSpeed()
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    sharded = mark_zero3(tiny_llama())
    assert model_fingerprint(sharded) == store.manifest["model"]
    assert fake.gathered >= sum(1 for _ in sharded.parameters())
    # An existing store is reused as is; building one needs the full model's forward pass.
    again = extract_store(sharded, tok, replay_set(), tmp_path / "s", spec, progress=False)
    assert again.manifest == store.manifest
    with pytest.raises(GeReError, match="ZeRO-3.*gere extract"):
        extract_store(sharded, tok, replay_set(), tmp_path / "new", spec, progress=False)
    assert not (tmp_path / "new" / "partial").exists()
    with pytest.raises(GeReError, match="ZeRO-3.*gere extract"):
        extract_store(sharded, tok, replay_set(), tmp_path / "s", spec, regenerate=True, progress=False)
    assert (tmp_path / "s" / "manifest.json").exists()  # refused before anything was deleted


def test_fsdp_and_meta_parameters_are_refused_clearly():
    flat = tiny_llama()
    next(flat.parameters())._is_flat_param = True
    assert "FSDP" in distributed.sharded_parameters(flat)
    with pytest.raises(GeReError, match="FSDP.*gere extract"):
        model_fingerprint(flat)
    with torch.device("meta"):
        meta = tiny_llama()
    assert "meta" in distributed.sharded_parameters(meta)
    with pytest.raises(GeReError, match="meta device"):
        model_fingerprint(meta)
    assert distributed.sharded_parameters(tiny_llama()) is None


@pytest.mark.parametrize(
    "setup,message",
    [
        (dict(is_fsdp_enabled=True), "under FSDP"),
        (dict(zero_stage=3), "under DeepSpeed ZeRO-3"),
        (dict(ddp_broadcast_buffers=True), "ddp_broadcast_buffers=True"),
    ],
)
def test_batch_interpolation_is_refused_where_forward_passes_are_collectives(setup, message):
    fake = types.SimpleNamespace(
        gere=GeReConfig(num_interpolate_per_batch=1),
        args=types.SimpleNamespace(world_size=2, ddp_broadcast_buffers=setup.get("ddp_broadcast_buffers")),
        is_fsdp_enabled=setup.get("is_fsdp_enabled", False),
        is_deepspeed_enabled="zero_stage" in setup,
        accelerator=types.SimpleNamespace(
            state=types.SimpleNamespace(
                deepspeed_plugin=types.SimpleNamespace(zero_stage=setup.get("zero_stage"))
            )
        ),
    )
    with pytest.raises(GeReError, match=f"{message}.*num_interpolate_per_batch=0"):
        GeReTrainer._check_interpolation_across_processes(fake)
    fake.args.world_size = 1
    GeReTrainer._check_interpolation_across_processes(fake)  # one process: nothing to refuse
    fake.args.world_size, fake.is_fsdp_enabled, fake.is_deepspeed_enabled = 2, False, False
    fake.args.ddp_broadcast_buffers = None
    GeReTrainer._check_interpolation_across_processes(fake)  # plain DDP: allowed


ACCELERATE_CONFIGS = sorted((TESTS.parent / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_are_read_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert {c.stem for c in ACCELERATE_CONFIGS} == {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
    options = {action.dest for action in launch_command_parser()._actions}
    kinds = {}
    for path in ACCELERATE_CONFIGS:
        config = load_config_from_file(str(path))  # refuses unknown top-level keys
        kinds[path.stem] = config.distributed_type.value
        for key in {**config.deepspeed_config, **config.fsdp_config}:
            assert key in options, f"{path.name}: {key} is not an `accelerate launch` option"
    assert kinds == {
        "ddp": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
        "fsdp": "FSDP",
    }
    zero3 = load_config_from_file(str(TESTS.parent / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_init_flag"] is False
    fsdp = load_config_from_file(str(TESTS.parent / "configs" / "accelerate" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
