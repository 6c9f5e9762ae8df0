"""`GeReTrainer`: a drop-in `transformers.Trainer` that replays general samples while training a task.

Switch an existing script by changing the class; the reference implementation's argument names work::

    trainer = GeReTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                          processing_class=tokenizer, gere_hidden_state_saving_dir="gere_store",
                          num_interpolate_per_batch=4, w_strategy="dy", gere_data_file="general.jsonl")

This module gathers tensors and calls the pure losses (`gere.losses`); reference targets come from `gere.reference`,
replay batches from `gere.replay`. Replay samples join training in one of three ways (``replay_mixing``, Sec. 4):

- ``interpolate``, batch interpolation (``num_interpolate_per_batch = k``): exactly k replay samples inside
  every global batch, see `gere.replay.sampler`;
- ``concat``: the replay set appended to the task data and shuffled with it, each replay text once per
  epoch; the reference implementation's way without interpolation, and the default when a script uses its
  argument names (with its margin weight, 100) without a `GeReConfig`;
- ``batch``: a separate replay batch (``replay_batch_size`` per device) drawn with every micro-batch; the
  default of `GeReConfig` without interpolation.

Task batches: logits at the answer positions only (exact) and length-grouped batches, `gere.task_batches`.

The loss is ``CE + w * (replay regularisers)`` (`gere.losses.combine_losses`; w: `gere.config.WeightRule`);
each part and weight is logged, and with ``grad_share_every`` each part's gradient share (`gere.diagnostics`).

Several processes (torchrun / accelerate launch): every process takes part in building the activation
store (`gere.store.extract.extract_store` splits the forward pass), batch interpolation keeps exactly k replay
samples in every global batch across processes, separate replay batches are disjoint across processes,
and the logged loss parts are averaged over processes. See docs/distributed.md for DDP, ZeRO and FSDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader, RandomSampler, Sampler
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import seed_worker

from gere.batching import (
    KeepColumns,
    adapters_disabled,
    check_context_length,
    num_hidden_states,
    pad_token_id,
    resolve_layers,
)
from gere.config import BALANCED, GeReConfig, global_batch_size, resolved_config
from gere.diagnostics import GradShareMeter
from gere.distributed import check_interpolation_across_processes
from gere.errors import GeReError
from gere.losses import combine_losses, loss_contributions, replay_losses
from gere.parts import GRAD_SHARE, LOSS_PARTS, WEIGHTS, checked_loss_parts, reads_hidden_states
from gere.reference import OnlineReference, StoreReference, replay_statistics
from gere.replay.batches import (
    REPLAY_INDEX,
    EvenLastBlock,
    InterpolatedDataset,
    InterpolatingCollator,
    SeparateReplayBatches,
    replay_batch,
)
from gere.replay.replay_set import ReplaySet, tokenize_replay_set
from gere.replay.sampler import BatchInterpolationSampler
from gere.store.extract import store_for
from gere.store.fingerprint import check_store_belongs
from gere.store.format import ActivationStore, StoreSpec
from gere.task_batches import answer_logits_inputs, length_grouped, projects_answer_logits, task_logits

LOGGED_PARTS = (*LOSS_PARTS, *WEIGHTS, *GRAD_SHARE)


class GeReMixin:
    """The GeRe machinery; mixed into `Trainer` and `Seq2SeqTrainer` below."""

    # Accept the reference's ``tokenizer=`` (transformers 5 calls it ``processing_class``); a base trainer
    # that converts it itself (LLaMA-Factory's) turns this off.
    _gere_converts_tokenizer = True

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
        check_store_model: bool = True,
        penalties: Sequence[Callable] = (),
        train_sampler: Sampler | None = None,
        answer_logits_only: bool = True,
        **kwargs,
    ):
        self.gere = resolved_config(gere_config, {
            "store_dir": gere_hidden_state_saving_dir, "reuse_store": reuse_gere_hidden_state,
            "num_interpolate_per_batch": num_interpolate_per_batch, "margin_weight": w_strategy,
            "replay_source": gere_data_file,
        })  # fmt: skip
        if "tokenizer" in kwargs and self._gere_converts_tokenizer:
            # transformers 5 removed Trainer's `tokenizer=`; scripts written for the reference still pass it.
            if kwargs.get("processing_class") is not None:
                raise GeReError("pass the tokenizer once: tokenizer= or processing_class=, not both")
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean, so the Trainer must divide it by the accumulation
        # steps and must not count items across processes for the model's loss: with batch interpolation a
        # process may hold only replay rows, and the count's all_gather would then pair with another
        # process's backward pass and hang. Both flags say so, to transformers releases old and new.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._gere_store = activation_store
        # A store handed in (or reused from store_dir) must describe this model; a continual run that trains a
        # model further from the store's base model (checked there), or gere-lf's later task, turns this off.
        self._check_store_model = check_store_model
        self._gere_replay_set = replay_set
        # Baselines' loss parts (`gere.baselines.base`), added to the loss as they are: called on the unwrapped
        # model, or with ``uses_batch`` also given the task batch (with the ``columns`` it names, carried past
        # the collator) and its logits; an inactive part sits out. A sampler replaces the Trainer's shuffling.
        self._penalties, self._train_sampler = checked_loss_parts(penalties), train_sampler
        self._batch_parts = [p for p in self._penalties if getattr(p, "uses_batch", False)]
        self._part_columns = tuple(dict.fromkeys(c for p in self._penalties for c in getattr(p, "columns", ())))
        if self._part_columns:
            self.data_collator = KeepColumns(self.data_collator, self._part_columns)
        if train_sampler is not None and self._replay_rows_in_batches:
            raise GeReError(
                f"train_sampler= and replay_mixing {self.gere.mixing!r} both decide the task batches; give the "
                "general replay set a separate batch (replay_mixing='batch', num_interpolate_per_batch=0)"
            )
        self._gere_ready, self._gere_own_logits = False, False
        self._answer_logits_only, self._answer_logits_fit = answer_logits_only, None
        self._replay_tokens: list[list[int]] = []
        self._reference: StoreReference | OnlineReference | None = None
        self._separate_batches: SeparateReplayBatches | None = None
        self._gere_sums, self._gere_counts = {}, {}  # loss part -> sum, count of micro-batches since the last log
        self._grad_share = GradShareMeter(self.gere.grad_share_every)

    # ------------------------------------------------------------------------------------------ set-up

    @property
    def gere_store(self) -> ActivationStore | None:
        return self._gere_store

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        # With replay rows inside the task batches (interpolate, concat) a process runs one forward pass (task
        # or replay rows) or two (both), depending on its micro-batch. DDP's default broadcast of buffers at
        # every forward is a collective, so unequal counts would pair mismatched collectives and hang; the
        # buffers of a causal LM (rotary frequencies) are identical on every process anyway, so GeRe turns
        # the broadcast off.
        if self._replay_rows_in_batches and self.args.ddp_broadcast_buffers is None:
            for handler in args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.broadcast_buffers = False
        return args

    @property
    def _replay_rows_in_batches(self) -> bool:
        return bool(self.gere.parts) and self.gere.mixing in ("interpolate", "concat")

    def _check_interpolation_across_processes(self) -> None:
        """Refuse set-ups where replay rows' unequal forward counts per process would hang."""
        check_interpolation_across_processes(self)

    def _one_process(self, what: str) -> bool:
        if self.args.world_size > 1:
            raise GeReError(f"{what} takes gradients on one process; run it on one process or use dy / a number")
        return True

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
        layers = resolve_layers(cfg.layers, num_hidden_states(model))
        from_store = cfg.reference == "store" and (cfg.needs_reference or self._gere_store is not None)
        if from_store:
            if self._gere_store is not None and self._check_store_model:
                check_store_belongs(self._gere_store, model, tokenizer, StoreSpec.for_config(cfg))
            store = self._gere_store or self._extract_store(model, tokenizer)
            self._check_store_contents(store, layers)
            self._gere_store = store
            self._replay_tokens = [store.tokens(i) for i in range(len(store))]
            self._reference = StoreReference(store, cfg.parts, layers) if cfg.needs_reference else None
        else:
            # CE replay (BaselineR) needs only the replay tokens; the online mode adds their statistics.
            replay_set = self._gere_replay_set or cfg.load_replay_set()
            self._replay_tokens = tokenize_replay_set(replay_set, tokenizer, cfg.replay_max_length)
            if cfg.needs_reference:
                self._reference = self._online_reference(model, tokenizer, layers)
        self._gere_ready = True

    def _extract_store(self, model, tokenizer) -> ActivationStore:
        cfg = self.gere
        replay_set = self._gere_replay_set or cfg.load_replay_set()
        # Every process takes part: the forward pass is split across them (see gere.store.extract). Under
        # DeepSpeed or FSDP the Trainer has not placed the model yet; device= runs the pass there.
        return store_for(cfg, model, tokenizer, replay_set, self.args.output_dir, device=self.args.device,
                         progress=self.is_world_process_zero(), check_model=self._check_store_model)

    def _online_reference(self, model, tokenizer, layers) -> OnlineReference:
        cfg = self.gere
        if not hasattr(model, "disable_adapter"):
            raise GeReError(
                "reference='online' takes the reference states from the model with its adapter disabled, "
                "so it needs a peft (LoRA) model; use reference='store' for full fine-tuning"
            )
        check_context_length(model, cfg.replay_max_length)
        with adapters_disabled(model):
            stats = replay_statistics(
                model, tokenizer, self._replay_tokens, layers, batch_size=cfg.extract_batch_size,
                progress=self.is_world_process_zero(), device=self.args.device,
            )  # fmt: skip
        return OnlineReference(stats, cfg.parts, cfg.threshold_k, cfg.kl_topk)

    def _check_store_contents(self, store: ActivationStore, layers) -> None:
        spec, contents = StoreSpec.for_config(self.gere), store.contents
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
                f"activation store {store.path} lacks {', '.join(missing)} needed by objective "
                f"{self.gere.objective!r}; re-extract it for this objective"
            )
        if not set(layers) <= set(store.layers):
            raise GeReError(
                f"activation store {store.path} records layers {list(store.layers)}, "
                f"not {sorted(layers)}; re-extract it with these layers (set layers)",
                setting="layers",
            )

    def train(self, *args, **kwargs):
        if self._replay_rows_in_batches:
            self._check_interpolation_across_processes()  # before the store is built, not after
        self._gere_prepare()
        self._separate_batches = None  # drawn afresh from the step training (re)starts at
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ data

    def _get_train_sampler(self, *args, **kwargs):
        sampler = length_grouped(self._train_sampler, self.args, self.train_dataset, self._train_batch_size)
        return sampler if sampler is not None else super()._get_train_sampler(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # The loss parts' own columns (LwF looks its targets up by the rows' index) are not the model's.
        self._signature_columns += [c for c in self._part_columns if c not in self._signature_columns]

    def get_train_dataloader(self) -> DataLoader:
        if not self._replay_rows_in_batches:
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
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.gere.mixing == "concat":
            # The replay set appended to the task data, shuffled with it: each replay text once per epoch.
            sampler = RandomSampler(range(len(task_dataset) + len(self._replay_tokens)),
                                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
        else:
            global_batch = global_batch_size(self._train_batch_size, self.args.gradient_accumulation_steps,
                                             self.args.world_size)  # fmt: skip
            sampler = BatchInterpolationSampler(len(task_dataset), len(self._replay_tokens),
                                                self.gere.num_interpolate_per_batch, global_batch, seed=seed,
                                                placement=self.gere.interpolation_placement)  # fmt: skip
            if self.args.world_size > 1:
                sampler = EvenLastBlock(sampler, self._train_batch_size * self.args.world_size)
        sampler = length_grouped(sampler, self.args, task_dataset, self._train_batch_size, len(task_dataset))
        loader = DataLoader(
            InterpolatedDataset(task_dataset, len(self._replay_tokens)),
            batch_size=self._train_batch_size,
            sampler=sampler,
            collate_fn=InterpolatingCollator(collator),
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _draw_replay_indices(self) -> list[int]:
        """Separate replay batch: the next draw, continuing from the micro-batches already trained."""
        if self._separate_batches is None:
            self._separate_batches = SeparateReplayBatches(
                len(self._replay_tokens), self.gere.replay_batch_size, self.gere.replay_seed,
                self.args.world_size, self.args.process_index,
            )  # fmt: skip
            self._separate_batches.restart(self.state.global_step * self.args.gradient_accumulation_steps)
        return self._separate_batches.next()

    # ------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        replay_index = inputs.pop(REPLAY_INDEX, None)
        parts: dict[str, torch.Tensor] = {}
        outputs = None
        columns = {c: inputs.pop(c) for c in self._part_columns if c in inputs}
        # Loss parts on the task batch itself (LwF's distillation) need its logits.
        on_batch = [p for p in self._batch_parts if p.active] if model.training else []
        if "input_ids" in inputs or "inputs_embeds" in inputs:
            want_outputs = return_outputs or (bool(on_batch) and not self._gere_own_logits)
            parts["task_ce"], outputs = self._task_loss(model, inputs, want_outputs, num_items_in_batch)
            if on_batch:
                logits, own_pass = task_logits(model, inputs, outputs)
                # A parent loss without logits that carry a gradient (TRL's fused LM head): own pass from now on.
                self._gere_own_logits = self._gere_own_logits or own_pass
                batch = {**inputs, **columns} if columns else inputs
                parts.update({p.name: p(self._unwrapped(model), batch, logits) for p in on_batch})
        if self.gere.parts and model.training:
            self._gere_prepare()
            if replay_index is not None:
                indices = replay_index.tolist()
            elif self.gere.mixing == "batch":
                indices = self._draw_replay_indices()
            else:
                indices = []
            if indices:
                parts.update(self._replay_losses(model, indices))
        if not parts:
            raise GeReError("empty batch: neither task nor replay samples")
        if model.training:
            for penalty in self._penalties:
                if getattr(penalty, "active", True) and penalty not in self._batch_parts:
                    value = penalty(self._unwrapped(model))  # a tensor, or a dict of named parts (O-LoRA's)
                    parts.update(value if isinstance(value, dict) else {penalty.name: value})
        step = self.state.global_step + 1  # the optimisation step this micro-batch belongs to, within the task
        balanced = self.gere.margin_rule.kind == BALANCED and self._one_process("a gb:<fraction> margin weight")
        loss, weights = combine_losses(parts, self.gere.margin_rule, step,
                                       self._grad_share.params(self._unwrapped(model)) if balanced else None)
        if not torch.isfinite(loss):
            shown = {k: round(float(v.detach()), 6) for k, v in parts.items()}
            raise GeReError(
                f"the loss became {float(loss.detach())} at step {self.state.global_step + 1} (parts: {shown}); "
                "training stopped before this update, so checkpoints saved earlier are intact. Lower "
                "the learning rate or the margin weight, or check the inputs for NaN/Inf"
            )
        if model.training:
            logged = {**{k: float(v.detach()) for k, v in parts.items()}, **weights}
            if self._grad_share.due(self.state.global_step, self.args.world_size):
                logged.update(self._grad_share.measure(loss_contributions(parts, weights), self._unwrapped(model)))
            for name, value in logged.items():
                self._gere_sums[name] = self._gere_sums.get(name, 0.0) + value
                self._gere_counts[name] = self._gere_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def _task_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        """The task loss as the parent trainer computes it (label smoothing, ``compute_loss_func``, TRL's
        SFT losses and metrics all apply), and the model outputs when asked for."""
        if not return_outputs and self._answer_logits(model, inputs):
            inputs = answer_logits_inputs(inputs)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        except ValueError as err:
            if "did not return a loss" not in str(err):
                raise
            raise GeReError(
                "the model returned no loss for the task batch: the collator must provide labels"
            ) from None
        return result if return_outputs else (result, None)

    def _answer_logits(self, model, inputs) -> bool:
        """Whether the task loss projects to the vocabulary at the answer positions only (exact: see
        `gere.task_batches`): under transformers' own ``compute_loss`` (TRL's SFT metrics read every logit) with
        no label smoothing or ``compute_loss_func``; outputs asked for (LwF's, evaluation's) keep them all."""
        if not self._answer_logits_only or not torch.is_tensor(inputs.get("labels")) or inputs["labels"].ndim != 2:
            return False
        if self._answer_logits_fit is None:
            plain = getattr(super().compute_loss, "__func__", None) is Trainer.compute_loss
            self._answer_logits_fit = (plain and self.label_smoother is None and self.compute_loss_func is None
                                       and projects_answer_logits(self._unwrapped(model)))  # fmt: skip
        return self._answer_logits_fit

    def _replay_losses(self, model, indices: list[int]) -> dict[str, torch.Tensor]:
        """Gather one replay batch, its reference targets and the model's outputs; the losses compute."""
        cfg = self.gere
        ids, mask, labels = replay_batch(self._replay_tokens, indices, pad_token_id(self.processing_class),
                                         self.args.device)  # fmt: skip
        targets = None
        if self._reference is not None:
            targets = self._reference.targets(self._unwrapped(model), indices, ids, mask)
        need_hidden = reads_hidden_states(cfg.parts)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden, use_cache=False)
        hidden = {layer: out.hidden_states[layer] for layer in self._reference.layers} if need_hidden else {}
        return replay_losses(
            cfg.parts, out.logits, hidden, labels, mask, targets,
            reduction=cfg.margin_reduction, temperature=cfg.kl_temperature,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            means = torch.tensor(
                [self._gere_sums.get(n, 0.0) / max(self._gere_counts.get(n, 0), 1) for n in LOGGED_PARTS],
                dtype=torch.float64,
            )
            present = torch.tensor([float(n in self._gere_counts) for n in LOGGED_PARTS], dtype=torch.float64)
            if self.args.world_size > 1:
                # Every process logs at the same steps, so this collective is matched across processes.
                stacked = self.accelerator.reduce(
                    torch.stack([means * present, present]).to(self.args.device), "sum"
                )
                means, present = (stacked[0] / stacked[1].clamp_min(1)).cpu(), stacked[1].cpu()
            for name, value, seen in zip(LOGGED_PARTS, means.tolist(), present.tolist()):
                if seen and not math.isnan(value):
                    logs[name] = round(value, 6)
            self._gere_sums, self._gere_counts = {}, {}
        super().log(logs, *args, **kwargs)


class GeReTrainer(GeReMixin, Trainer):
    """`transformers.Trainer` with GeRe replay. See the module docstring."""


class GeReSeq2SeqTrainer(GeReMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with GeRe replay (replay itself needs a decoder-only model)."""
