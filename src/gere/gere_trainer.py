"""`GeReTrainer`: a drop-in `transformers.Trainer` that replays general samples while training a task.

Switch an existing script by changing the class; the reference implementation's argument names work::

    trainer = GeReTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                          processing_class=tokenizer, gere_hidden_state_saving_dir="gere_store",
                          num_interpolate_per_batch=4, w_strategy="dy", gere_data_file="general.jsonl")

Replay is mixed in one of two ways (GeRe, arXiv 2508.04676, Sec. 4):

- batch interpolation (``num_interpolate_per_batch = k``): exactly k replay samples inside every global
  batch, see `gere.sampler`;
- a separate replay batch (``replay_batch_size`` per device) drawn with every micro-batch.

The loss is ``CE + w * (replay regularisers)``, where CE is the task cross-entropy, averaged with the replay
cross-entropy when the objective has ``ce`` (as the reference does), and w is a number or ``dy``
(CE / regulariser, detached). Each part is logged separately: ``task_ce``, ``replay_ce``,
``replay_margin``, ``replay_kl``, ``replay_l1``, ``replay_l2`` and the weights used.

Several processes (torchrun / accelerate launch): every process takes part in building the activation
store (`gere.store.extract_store` splits the forward pass), batch interpolation keeps exactly k replay
samples in every global batch across processes, separate replay batches are disjoint across processes,
and the logged loss parts are averaged over processes. See docs/distributed.md for DDP, ZeRO and FSDP.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from functools import partial

import torch
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import seed_worker

from gere.errors import GeReError
from gere.gere_config import GeReConfig
from gere.losses import (
    CODE_NEUTRAL,
    causal_lm_ce,
    coded_margin_loss,
    feature_loss,
    resolve_margin_weight,
    threshold_codes,
    topk_kl_loss,
)
from gere.replay_set import ReplaySet, tokenize_replay_set
from gere.sampler import BatchInterpolationSampler
from gere.store import ActivationStore, extract_store, pad_right, replay_statistics, resolve_layers

LOSS_PARTS = (
    "task_ce",
    "replay_ce",
    "replay_margin",
    "replay_kl",
    "replay_l1",
    "replay_l2",
    "margin_weight",
    "kl_weight",
    "l1_weight",
    "l2_weight",
)
_REGULARISERS = {"tm": ("replay_margin", "margin_weight"), "kl": ("replay_kl", "kl_weight"),
                 "l1": ("replay_l1", "l1_weight"), "l2": ("replay_l2", "l2_weight")}  # fmt: skip


class _InterpolatedDataset(Dataset):
    """Task samples followed by replay placeholders (``{"gere_replay_index": i}``)."""

    def __init__(self, task_dataset, num_replay: int):
        self.task_dataset, self.num_task, self.num_replay = task_dataset, len(task_dataset), num_replay

    def __len__(self) -> int:
        return self.num_task + self.num_replay

    def __getitem__(self, index: int):
        if index < self.num_task:
            return self.task_dataset[index]
        return {"gere_replay_index": index - self.num_task}


class _InterpolatingCollator:
    """Collates task rows with the user's collator and passes replay rows on as indices."""

    def __init__(self, task_collator):
        self.task_collator = task_collator

    def __call__(self, features):
        task = [f for f in features if "gere_replay_index" not in f]
        replay = [int(f["gere_replay_index"]) for f in features if "gere_replay_index" in f]
        batch = dict(self.task_collator(task)) if task else {}
        batch["gere_replay_index"] = torch.tensor(replay, dtype=torch.long)
        return batch


class _EvenLastBlock(Sampler[int]):
    """Pads the batch-interpolation stream to a multiple of ``per-device batch x processes``.

    With several processes, accelerate deals the stream's micro-batches out round-robin and, when the
    epoch's last (partial) global batch does not fill every process, tops it up with samples from the
    epoch's start, replay samples included. Padding the stream with task samples from the epoch's start
    instead keeps exactly k replay samples in that last global batch too (the repeated task samples are
    what a DistributedSampler would repeat). A single process needs no padding.
    """

    def __init__(self, inner: BatchInterpolationSampler, multiple: int):
        self.inner, self.multiple = inner, multiple

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.inner) // self.multiple) * self.multiple

    def __iter__(self) -> Iterator[int]:
        first_task: list[int] = []
        count = 0
        for index in self.inner:
            if index < self.inner.num_task and len(first_task) < self.multiple:
                first_task.append(index)
            count += 1
            yield index
        for i in range(len(self) - count):
            yield first_task[i % len(first_task)]


class GeReMixin:
    """The GeRe machinery; mixed into `Trainer` and `Seq2SeqTrainer` below."""

    def __init__(
        self,
        *args,
        gere_config: GeReConfig | None = None,
        activation_store: ActivationStore | None = None,
        replay_set: ReplaySet | None = None,
        gere_hidden_state_saving_dir: str | None = None,
        reuse_gere_hidden_state: bool | None = None,
        num_interpolate_per_batch: int | None = None,
        w_strategy: str | float | None = None,
        gere_data_file: str | None = None,
        **kwargs,
    ):
        overrides = {
            "store_dir": gere_hidden_state_saving_dir,
            "reuse_store": reuse_gere_hidden_state,
            "num_interpolate_per_batch": num_interpolate_per_batch,
            "margin_weight": None if w_strategy is None else str(w_strategy),
            "replay_source": gere_data_file,
        }
        config = gere_config or GeReConfig()
        self.gere = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean; the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._gere_store = activation_store
        self._gere_replay_set = replay_set
        self._gere_ready = False
        self._gere_sums: dict[str, float] = {}
        self._gere_counts: dict[str, int] = {}
        self._draw_base: int | None = None
        self._draws = 0

    # ------------------------------------------------------------------------------------------ set-up

    @property
    def gere_store(self) -> ActivationStore | None:
        return self._gere_store

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        # With batch interpolation a process runs one forward pass (task or replay rows) or two (both),
        # depending on its micro-batch. DDP's default broadcast of buffers at every forward is a collective,
        # so unequal counts would pair mismatched collectives and hang; the buffers of a causal LM (rotary
        # frequencies) are identical on every process anyway, so GeRe turns the broadcast off.
        if (
            self.gere.parts
            and self.gere.num_interpolate_per_batch
            and self.args.ddp_broadcast_buffers is None
        ):
            for handler in args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.broadcast_buffers = False
        return args

    def _check_interpolation_across_processes(self) -> None:
        """Refuse set-ups where batch interpolation's unequal forward counts per process would hang."""
        if self.args.world_size <= 1:
            return
        sharded = None
        if self.is_fsdp_enabled:
            sharded = "FSDP"
        elif (
            self.is_deepspeed_enabled
            and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
        ):
            sharded = "DeepSpeed ZeRO-3"
        if sharded is None and not self.args.ddp_broadcast_buffers:
            return
        why = (
            f"under {sharded} every forward pass"
            if sharded
            else "with ddp_broadcast_buffers=True every forward pass"
        )
        raise GeReError(
            f"batch interpolation runs one or two forward passes per process and micro-batch, but {why} is a "
            "collective that all processes must run equally often. Use a separate replay batch "
            "(num_interpolate_per_batch=0, replay_batch_size=N)"
            + ("" if sharded else " or leave ddp_broadcast_buffers unset")
            + "; see docs/distributed.md"
        )

    def _unwrapped(self, model=None):
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    def _gere_prepare(self) -> None:
        """Build or open the activation store (or the online statistics) once, before training."""
        if self._gere_ready or not self.gere.parts:
            return
        cfg, model = self.gere, self._unwrapped()
        tokenizer = self.processing_class
        if tokenizer is None:
            raise GeReError("GeReTrainer needs the tokenizer: pass processing_class=tokenizer")
        replay_set = self._gere_replay_set
        if replay_set is None and (self._gere_store is None or cfg.reference == "online"):
            replay_set = cfg.load_replay_set()
        spec = cfg.store_spec()
        if not cfg.needs_reference and self._gere_store is None:
            # CE replay (BaselineR) needs only the replay tokens: no store, no statistics.
            self._replay_tokens = tokenize_replay_set(replay_set, tokenizer, cfg.replay_max_length)
        elif cfg.reference == "online":
            if not hasattr(model, "disable_adapter"):
                raise GeReError(
                    "reference='online' takes the reference states from the model with its adapter disabled, "
                    "so it needs a peft (LoRA) model; use reference='store' for full fine-tuning"
                )
            with model.disable_adapter():
                running = replay_statistics(
                    model,
                    tokenizer,
                    replay_set,
                    spec,
                    progress=self.is_world_process_zero(),
                    device=self.args.device,
                )
            self._online_stats = {
                layer: (torch.from_numpy(r.mean).float(), torch.from_numpy(r.std).float())
                for layer, r in running.items()
            }
            self._replay_tokens = tokenize_replay_set(replay_set, tokenizer, cfg.replay_max_length)
        else:
            if self._gere_store is None:
                store_dir = cfg.store_dir or os.path.join(self.args.output_dir, "gere_store")
                # Every process takes part: the forward pass is split across them (see gere.store). Under
                # DeepSpeed or FSDP the Trainer has not placed the model yet; device= runs the pass there.
                self._gere_store = extract_store(
                    model,
                    tokenizer,
                    replay_set,
                    store_dir,
                    spec,
                    regenerate=not cfg.reuse_store,
                    progress=self.is_world_process_zero(),
                    device=self.args.device,
                )
            self._check_store_contents(spec)
            self._replay_tokens = [self._gere_store.tokens(i) for i in range(len(self._gere_store))]
        self._gere_ready = True

    def _check_store_contents(self, spec) -> None:
        contents = self._gere_store.manifest["contents"]
        missing = [
            name
            for name, needed, have in (
                ("label codes (tm)", spec.tm, contents["tm"]),
                ("hidden states (l1/l2)", spec.features, contents["features"]),
                ("top-k logits (kl)", bool(spec.topk), bool(contents["topk"])),
            )
            if needed and not have
        ]
        if missing:
            raise GeReError(
                f"activation store {self._gere_store.path} lacks {', '.join(missing)} needed by objective "
                f"{self.gere.objective!r}; re-extract it for this objective"
            )
        wanted = set(resolve_layers(self._unwrapped(), tuple(self.gere.layers)))
        if not wanted <= set(self._gere_store.layers):
            raise GeReError(
                f"activation store {self._gere_store.path} records layers {list(self._gere_store.layers)}, "
                f"not {sorted(wanted)}; re-extract it with --layers"
            )

    def train(self, *args, **kwargs):
        if self.gere.parts and self.gere.num_interpolate_per_batch:
            self._check_interpolation_across_processes()  # before the store is built, not after
        self._gere_prepare()
        self._draw_base = None
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ data

    def get_train_dataloader(self) -> DataLoader:
        k = self.gere.num_interpolate_per_batch
        if not (self.gere.parts and k):
            return super().get_train_dataloader()
        self._check_interpolation_across_processes()
        self._gere_prepare()
        if self.train_dataset is None:
            raise GeReError("GeReTrainer: training requires a train_dataset")
        task_dataset, collator = self.train_dataset, self.data_collator
        import datasets

        if isinstance(task_dataset, datasets.Dataset):
            task_dataset = self._remove_unused_columns(task_dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        global_batch = self._train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        sampler = BatchInterpolationSampler(
            len(task_dataset),
            len(self._replay_tokens),
            k,
            global_batch,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        if self.args.world_size > 1:
            sampler = _EvenLastBlock(sampler, self._train_batch_size * self.args.world_size)
        loader = DataLoader(
            _InterpolatedDataset(task_dataset, len(self._replay_tokens)),
            batch_size=self._train_batch_size,
            sampler=sampler,
            collate_fn=_InterpolatingCollator(collator),
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _draw_replay_indices(self) -> list[int]:
        """Separate replay batch: a deterministic stream of seeded permutations of the replay set; process
        p takes its slice of each global draw, so processes never repeat each other within a draw."""
        if self._draw_base is None:
            self._draw_base = self.state.global_step * self.args.gradient_accumulation_steps
            self._draws = 0
        size, world, rank = self.gere.replay_batch_size, self.args.world_size, self.args.process_index
        start = ((self._draw_base + self._draws) * world + rank) * size
        self._draws += 1
        n = len(self._replay_tokens)
        out, perms = [], {}
        for position in range(start, start + size):
            round_no, offset = divmod(position, n)
            if round_no not in perms:
                g = torch.Generator().manual_seed(self.gere.replay_seed * 1_000_003 + round_no)
                perms[round_no] = torch.randperm(n, generator=g).tolist()
            out.append(perms[round_no][offset])
        return out

    # ------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        replay_index = inputs.pop("gere_replay_index", None)
        parts: dict[str, torch.Tensor] = {}
        outputs = None
        if "input_ids" in inputs or "inputs_embeds" in inputs:
            outputs = model(**inputs)
            if isinstance(outputs, dict) and outputs.get("loss") is None:
                raise GeReError(
                    "the model returned no loss for the task batch: the collator must provide labels"
                )
            parts["task_ce"] = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if self.gere.parts and model.training:
            self._gere_prepare()
            if replay_index is not None:
                indices = replay_index.tolist()
            elif not self.gere.num_interpolate_per_batch:
                indices = self._draw_replay_indices()
            else:
                indices = []
            if indices:
                parts.update(self._replay_losses(model, indices))
        if not parts:
            raise GeReError("empty batch: neither task nor replay samples")
        loss = self._combine(parts)
        if not torch.isfinite(loss):
            shown = {k: round(float(v.detach()), 6) for k, v in parts.items()}
            raise GeReError(
                f"the loss became {float(loss.detach())} at step {self.state.global_step + 1} (parts: {shown}); "
                "training stopped before this update, so checkpoints saved earlier are intact. Lower "
                "the learning rate or the margin weight, or check the inputs for NaN/Inf"
            )
        if model.training:
            for name, value in parts.items():
                self._gere_sums[name] = self._gere_sums.get(name, 0.0) + float(value.detach())
                self._gere_counts[name] = self._gere_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def _combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        ce_terms = [parts[n] for n in ("task_ce", "replay_ce") if n in parts]
        ce = sum(ce_terms) / len(ce_terms) if ce_terms else None
        total = ce if ce is not None else 0.0
        for name, weight_name in _REGULARISERS.values():
            if name in parts:
                w = resolve_margin_weight(self.gere.weight, ce, parts[name])
                parts[weight_name] = torch.tensor(w)
                total = total + w * parts[name]
        return total

    def _replay_batch(self, indices: list[int], device):
        ids, mask = pad_right([self._replay_tokens[i] for i in indices], self._pad_id(), device)
        labels = ids.masked_fill(mask == 0, -100)
        return ids, mask, labels

    def _pad_id(self) -> int:
        tok = self.processing_class
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def _replay_losses(self, model, indices: list[int]) -> dict[str, torch.Tensor]:
        cfg, store = self.gere, self._gere_store
        device = self.args.device
        ids, mask, labels = self._replay_batch(indices, device)
        need_hidden = bool({"tm", "l1", "l2"} & set(cfg.parts))
        reference = None
        if cfg.reference == "online":
            with torch.no_grad(), self._unwrapped(model).disable_adapter():
                reference = self._unwrapped(model)(
                    input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden, use_cache=False
                )
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden, use_cache=False)
        parts: dict[str, torch.Tensor] = {}
        if "ce" in cfg.parts:
            parts["replay_ce"] = causal_lm_ce(out.logits, labels)
        real = mask.bool()
        layers = self._layer_indices(len(out.hidden_states)) if need_hidden else []
        for part in ("tm", "l1", "l2"):
            if part not in cfg.parts:
                continue
            values = []
            for layer in layers:
                hidden = out.hidden_states[layer]
                if part == "tm":
                    if reference is not None:
                        mean, std = self._online_stats[layer]
                        low, high = (
                            (mean - cfg.threshold_k * std).to(device),
                            (mean + cfg.threshold_k * std).to(device),
                        )
                        codes = threshold_codes(reference.hidden_states[layer], low, high)
                    else:
                        low, high = (t.to(device) for t in store.thresholds(layer))
                        codes = torch.full(hidden.shape, CODE_NEUTRAL, dtype=torch.uint8, device=device)
                        codes[real] = torch.cat([store.codes(i, layer) for i in indices]).to(device)
                    values.append(coded_margin_loss(hidden, codes, low, high, mask, cfg.margin_reduction))
                else:
                    if reference is not None:
                        ref = reference.hidden_states[layer]
                    else:
                        ref = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device)
                        ref[real] = torch.cat([store.features(i, layer) for i in indices]).to(
                            device, hidden.dtype
                        )
                    values.append(feature_loss(hidden, ref, mask, norm=part))
            parts[_REGULARISERS[part][0]] = sum(values) / len(values)
        if "kl" in cfg.parts:
            if reference is not None:
                ref_values, ref_indices = reference.logits.float().topk(cfg.kl_topk, dim=-1)
            else:
                shape = (*ids.shape, int(store.manifest["contents"]["topk"]))
                ref_values = torch.zeros(shape, device=device)
                ref_indices = torch.zeros(shape, dtype=torch.long, device=device)
                pairs = [store.topk(i) for i in indices]
                ref_values[real] = torch.cat([v for v, _ in pairs]).to(device).float()
                ref_indices[real] = torch.cat([i for _, i in pairs]).to(device).long()
            parts["replay_kl"] = topk_kl_loss(out.logits, ref_values, ref_indices, mask, cfg.kl_temperature)
        return parts

    def _layer_indices(self, num_states: int) -> list[int]:
        return sorted({layer + num_states if layer < 0 else layer for layer in self.gere.layers})

    # ------------------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._gere_counts is not None:
            means = torch.tensor(
                [self._gere_sums.get(n, 0.0) / max(self._gere_counts.get(n, 0), 1) for n in LOSS_PARTS],
                dtype=torch.float64,
            )
            present = torch.tensor([float(n in self._gere_counts) for n in LOSS_PARTS], dtype=torch.float64)
            if self.args.world_size > 1:
                # Every process logs at the same steps, so this collective is matched across processes.
                stacked = self.accelerator.reduce(
                    torch.stack([means * present, present]).to(self.args.device), "sum"
                )
                means, present = (stacked[0] / stacked[1].clamp_min(1)).cpu(), stacked[1].cpu()
            for name, value, seen in zip(LOSS_PARTS, means.tolist(), present.tolist()):
                if seen and not math.isnan(value):
                    logs[name] = round(value, 6)
            self._gere_sums, self._gere_counts = {}, {}
        super().log(logs, *args, **kwargs)


class GeReTrainer(GeReMixin, Trainer):
    """`transformers.Trainer` with GeRe replay. See the module docstring."""


class GeReSeq2SeqTrainer(GeReMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with GeRe replay (replay itself needs a decoder-only model)."""
