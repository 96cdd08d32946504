"""Lightning integration: a ``Callback`` that adds the trigger loss to every optimizer step.

Lightning owns the loop, so the callback adds the watermark where Lightning lets a callback touch gradients:
in ``on_before_optimizer_step`` (after the training step's backward, before the optimizer step) it runs the
module on the next triggers (cycled in key order, identical on every DDP rank) and adds the gradient of their
cross-entropy. The triggers weigh as they do in :meth:`wmark.embed.Watermarker.attach`'s plain loop:

* a trigger pass of their own (lookahead, :class:`~wmark.embed.Watermarker`'s default for image keys, or a
  ``trigger_margin``) takes ``trigger_per_batch`` triggers per optimizer step, each counting like one natural
  sample among the step's ``batch size × accumulate_grad_batches`` (whose losses Lightning divides by
  ``accumulate_grad_batches``), at the looked-ahead weights, learnt triggers adding none under a margin;
* mixed triggers (``trigger_mixing=True``) give exactly the gradient of ``trigger_per_batch`` triggers joining
  each of the step's batches: the natural gradient is scaled by ``batch size / (batch size + trigger_per_batch)``
  and the step's triggers add theirs, as the mean loss over a mixed batch weighs them.

Lightning clips gradients (``gradient_clip_val``) after ``on_before_optimizer_step``, so the clipped gradient
includes the triggers' (a lookahead pass looks ahead along the unclipped natural gradient).

The weights scheme's hook goes on the optimizer when training starts. The module's ``forward`` must take the
model's batch (a tensor, or ``input_ids``/``attention_mask`` for text); pass ``forward=`` otherwise (mixing only).
The trigger forward runs in training mode, like the module's own, but draws its random numbers (dropout masks)
from a stream forked and seeded from the key's commitment and the step's count
(:func:`~wmark.schemes.trigger_lookahead.shared_rng`): every DDP rank adds the same trigger gradient, which DDP does
not all-reduce, and the training loop's own stream is left as if the pass had not run. Each training batch's
kind is checked first, as :meth:`wmark.embed.Watermarker.attach` checks it: a text key's triggers on an image
model, or the reverse, are refused before the trigger pass reaches the module.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=3, callbacks=[WatermarkCallback(Watermarker(key))])  # doctest: +SKIP
    >>> trainer.fit(module, train_loader)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from wmark.contract import Batch, forward_logits
from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.integrations.common import (
    check_natural_batch,
    inner_optimizer,
    input_key_for,
    natural_batch_size,
    trigger_accuracy,
    trigger_batch,
)
from wmark.schemes.trigger_lookahead import LookaheadTriggerStep, pass_seed, shared_rng


class WatermarkCallback(L.Callback):
    """Embeds a :class:`~wmark.embed.Watermarker`'s schemes in a ``lightning.Trainer`` run.

    Args:
        watermarker: What to embed (its ``trigger_per_batch`` triggers join every optimizer step, or with mixed
            triggers every batch; see the module docstring).
        weight: Multiplier of each trigger's loss relative to a natural sample's (1, the default: a trigger counts
            like one natural sample of the batch it joins, as in :meth:`wmark.embed.Watermarker.attach`'s loop).
        forward: ``forward(module, batch) -> logits`` when the module's own ``forward`` does not take the
            model's batch.

    Attributes:
        trigger_accuracy: Share of triggers answered with their secret labels after training (``None`` before).
    """

    def __init__(self, watermarker: Watermarker, *, weight: float = 1.0,
                 forward: Callable[[nn.Module, Batch], Any] | None = None) -> None:
        if weight <= 0:
            raise UsageError(f"The trigger loss weight must be positive, got {weight}.")
        if "trigger" in watermarker.schemes and watermarker.trigger_step and forward is not None:
            raise UsageError("The trigger pass runs the module's own forward; drop forward= or make the Watermarker "
                             "with trigger_mixing=True.")
        self.watermarker = watermarker
        self.weight = float(weight)
        self.forward = forward
        self.trigger_accuracy: float | None = None
        self._cursor = 0
        self._passes = 0
        self._batch_size: int | None = None  # the last training batch's, against which the triggers weigh
        self._lookahead: LookaheadTriggerStep | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wm = self.watermarker
        if "trigger" in wm.schemes:
            wm.check_vocabulary(pl_module)
        if "trigger" in wm.schemes and wm.trigger_step:
            self._lookahead = wm.lookahead_step(pl_module)
        if "weights" in wm.schemes:
            if len(trainer.optimizers) != 1:
                raise UsageError("The weights scheme needs exactly one optimizer in the Lightning module.")
            wm.attach_optimizer(model=pl_module, optimizer=inner_optimizer(trainer.optimizers[0]))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Refuse a batch of the other kind than the triggers (a text key's on images, an image key's on tokens).

        Raises:
            UsageError: Before the training step, naming the fix.
        """
        wm = self.watermarker
        if "trigger" in wm.schemes:
            try:
                check_natural_batch(batch, wm.triggers, input_key=wm.input_key, label_key=wm.label_key)
                self._batch_size = natural_batch_size(batch, label_key=wm.label_key)
            except UsageError:
                wm.detach()  # the run ends here, so the Watermarker can be attached again once fixed
                raise

    def _logits(self, pl_module: L.LightningModule, batch: Batch) -> torch.Tensor:
        if self.forward is not None:
            from wmark.contract import logits_of, to_device

            return logits_of(self.forward(pl_module, to_device(batch, pl_module.device)))
        return forward_logits(pl_module, batch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        wm = self.watermarker
        if "trigger" not in wm.schemes:
            return
        # Under automatic optimization Lightning divides each batch's loss by accumulate_grad_batches (and refuses
        # accumulation under manual optimization), so the step's natural gradient is the mean over all its batches.
        steps = int(trainer.accumulate_grad_batches) if getattr(pl_module, "automatic_optimization", True) else 1
        if self._lookahead is not None:
            self._lookahead.batch_size = self._batch_size
            self._lookahead.accumulation_steps = steps
            self._lookahead.add_gradient(weight=self.weight * self._lookahead.share())
            return
        self._mix(pl_module, steps)

    def _mix(self, pl_module: L.LightningModule, steps: int) -> None:
        """Turn the step's natural gradient into that of its batches with ``trigger_per_batch`` triggers mixed in.

        A mixed batch of ``size`` natural samples and ``per_batch`` triggers averages over both, so the natural
        gradient shrinks by ``size / (size + per_batch)`` and each of the step's ``steps × per_batch`` triggers adds
        ``weight / (steps × (size + per_batch))`` times its loss's gradient.
        """
        wm = self.watermarker
        triggers = wm.triggers
        per_batch = wm.trigger_per_batch
        size = self._batch_size or per_batch
        n, count = len(triggers), per_batch * steps
        idx = [(self._cursor + i) % n for i in range(count)]
        self._cursor = (self._cursor + count) % n
        batch = trigger_batch(triggers, idx, input_key=input_key_for(pl_module, triggers, wm.input_key))
        with torch.no_grad():
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.mul_(size / (size + per_batch))
        self._passes += 1
        with torch.enable_grad(), shared_rng(pl_module, pass_seed(wm.key) + self._passes):
            logits = self._logits(pl_module, batch)
            loss = torch.nn.functional.cross_entropy(logits, triggers.labels[idx].to(logits.device))
            (self.weight * per_batch / (size + per_batch) * loss).backward()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A run that raised never reaches on_train_end: without this the Watermarker stayed attached, its hooks on the
        # dead run's optimizer, and the next fit() was refused as attaching twice.
        self.watermarker.detach()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wm = self.watermarker
        wm.detach()
        if "trigger" in wm.schemes and self.forward is None:
            self.trigger_accuracy = trigger_accuracy(pl_module, wm.triggers, input_key=wm.input_key)
