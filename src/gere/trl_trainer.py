"""`GeReSFTTrainer`: TRL's `SFTTrainer` with GeRe replay (``pip install 'gere[trl]'``).

The task loss is SFTTrainer's own (`SFTTrainer.compute_loss`), so its loss types, metrics
(``mean_token_accuracy``, ``entropy``, ``num_tokens``), packing, padding-free batches and ``peft_config``
work as they do without GeRe; the replay parts of `gere.trainer.GeReMixin` are added on top and logged
beside SFT's metrics::

    trainer = GeReSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                             gere_config=GeReConfig(replay_source="general.jsonl"))

Several processes: SFT gathers its metrics across processes inside every task loss. With replay rows
inside the task batches (``replay_mixing`` interpolate or concat) a process may hold a micro-batch of
replay rows only and would skip that gather while the others wait in it, so those modes are refused under
several processes; the separate replay batch (``replay_mixing: batch``, the default) keeps every micro-batch
a task batch.

LwF (``penalties=[LwF(...)]``) works on the rows SFTTrainer tokenized: build the dataset with
`gere.baselines.lwf.with_index`, then ``lwf.prepare(model, trainer.train_dataset, pad_id)`` before ``train()``.
Packing and padding-free batches are refused with it.
"""

from __future__ import annotations

from gere.errors import GeReError
from gere.trainer import GeReMixin

try:
    from trl import SFTTrainer
except ImportError as err:  # the extra is optional
    raise GeReError(f"GeReSFTTrainer needs TRL ({err}); install it with pip install 'gere[trl]'") from None


class GeReSFTTrainer(GeReMixin, SFTTrainer):
    """`trl.SFTTrainer` with GeRe replay. See the module docstring."""

    def train(self, *args, **kwargs):
        if self.args.world_size > 1 and self._replay_rows_in_batches:
            raise GeReError(
                f"GeReSFTTrainer with replay_mixing {self.gere.mixing!r} under {self.args.world_size} processes: "
                "a process holding only replay rows would skip SFTTrainer's metric gathering while the others "
                "wait in it. Use replay_mixing='batch' (num_interpolate_per_batch=0, replay_batch_size=N)"
            )
        if self._batch_parts and (
            self.args.packing or getattr(self.args, "padding_free", False)
        ):
            raise GeReError(
                "LwF distils each training row toward its own stored logits, and packed or padding-free batches "
                "join rows: set packing=False and padding_free=False in the SFTConfig"
            )
        return super().train(*args, **kwargs)
