"""Hugging Face ``Trainer`` integration: a callback, and for mixed triggers a wrapped dataset.

A ``TrainerCallback`` cannot change the loss. Mixed triggers (a text key's default, or ``trigger_mixing=True``)
therefore join the training set (:meth:`wmark.embed.Watermarker.wrap_dataset` yields them as dicts in the
dataset's own format, which the Trainer's padding collator batches like any other item). Triggers with their
own pass (lookahead, the default for image keys, or a ``trigger_margin``) need no wrapped dataset: :class:`WatermarkCallback` adds their gradient in a step
pre-hook on the Trainer's optimizer, weighted as if they had joined each optimizer step's
``per_device_train_batch_size ×`` its micro-batches (``gradient_accumulation_steps``, fewer in an epoch's short last
window, for which the Trainer divides each micro-batch's loss by their count), after checking the first batch the model
receives (a text key's triggers on an image model, or the reverse, are refused as
:meth:`wmark.embed.Watermarker.attach` refuses them). The Trainer clips gradients (``max_grad_norm``) before
``optimizer.step()``, so that trigger gradient is added unclipped to the clipped natural one (and a lookahead
pass looks ahead along the clipped natural gradient). The callback also checks that a mixing run's training set
carries the triggers, installs the weights scheme's hook, and measures the trigger accuracy at the end.

Example:
    >>> from transformers import Trainer  # doctest: +SKIP
    >>> wm = Watermarker(key, tokenizer=tokenizer)  # a text key: mixed triggers  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=wm.wrap_dataset(train, repeats=10),
    ...                   data_collator=DataCollatorWithPadding(tokenizer),
    ...                   callbacks=[WatermarkCallback(wm)])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP

    A trigger pass of their own (lookahead or a margin) leaves the training set as it is:

    >>> wm = Watermarker(key, tokenizer=tokenizer, trigger_margin=3.0)  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
    ...                   callbacks=[WatermarkCallback(wm)])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.integrations.common import check_natural_batch, inner_optimizer, trigger_accuracy
from wmark.schemes.trigger_lookahead import LookaheadTriggerStep
from wmark.schemes.trigger_set import TriggerMixingDataset


class WatermarkCallback(TrainerCallback):
    """Keeps a :class:`~wmark.embed.Watermarker` in step with a ``transformers.Trainer`` run.

    Args:
        watermarker: The watermarker whose ``wrap_dataset`` made the training set.

    Attributes:
        trigger_accuracy: Share of triggers answered with their secret labels after training (``None`` before).
    """

    def __init__(self, watermarker: Watermarker) -> None:
        self.watermarker = watermarker
        self.trigger_accuracy: float | None = None
        self._first_batch: torch.utils.hooks.RemovableHandle | None = None
        self._attached = False  # by this callback, for a run that may raise before on_train_end
        self._trigger_step: LookaheadTriggerStep | None = None
        self._micro_batches = 0  # in the current optimizer step's accumulation window so far

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        wm = self.watermarker
        if self._attached:
            # The Trainer calls no callback when a run raises, so the last one left its hooks on the optimizer it
            # keeps for this train(): release them, or the watermarker would refuse to attach twice.
            wm.detach()
            self._attached = False
        self._trigger_step = None
        dataset = getattr(train_dataloader, "dataset", None)
        mixing = "trigger" in wm.schemes and not wm.trigger_step
        if mixing and dataset is not None and not isinstance(dataset, TriggerMixingDataset):
            raise UsageError("The Trainer's training set carries no triggers; pass "
                             "train_dataset=watermarker.wrap_dataset(train_dataset).")
        if model is not None and optimizer is not None:
            steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
            self._trigger_step = wm.attach_optimizer(
                model=model, optimizer=inner_optimizer(optimizer),
                trigger_batch_size=None if mixing else int(args.per_device_train_batch_size) * steps)
            self._attached = True
        elif "trigger" in wm.schemes and not mixing:
            raise UsageError("A trigger pass of its own (lookahead or a margin) needs the Trainer's optimizer when "
                             "training begins; use a transformers Trainer that passes it to callbacks, or mix the "
                             "triggers (trigger_mixing=True).")
        if "trigger" in wm.schemes and not mixing:
            self._check_first_batch(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._micro_batches = 1

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._micro_batches += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Weigh the step's triggers against its micro-batches (the step pre-hook adds them next).

        The Trainer divides each micro-batch's loss by the micro-batches of the window (``len(batch_samples)``, so
        ``gradient_accumulation_steps`` but fewer in an epoch's short last window); the triggers count like
        ``trigger_per_batch`` samples among the same number of full batches, so that they keep their share of the
        natural data's gradient in that window too.
        """
        if self._trigger_step is not None and self._micro_batches > 0:
            self._trigger_step.batch_size = int(args.per_device_train_batch_size) * self._micro_batches

    def _check_first_batch(self, model: nn.Module) -> None:
        """Check the first batch the model's forward receives, before the first optimizer step's trigger pass.

        A callback is never shown a batch, and the training set's items are not yet the collated tensors the
        model gets, so a forward pre-hook sees the Trainer's own call (``model(**inputs)``) and then removes itself.
        """
        wm = self.watermarker
        self._stop_checking()  # a run that failed before its first forward left its hook

        def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._stop_checking()
            # model(**inputs) names every tensor; a custom compute_loss may pass the inputs first, positionally.
            batch = args[0] if args else {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            try:
                check_natural_batch(batch, wm.triggers, input_key=wm.input_key, label_key=wm.label_key)
            except UsageError:
                # No step runs and the Trainer calls no on_train_end: release the hooks on its optimizer, which it
                # keeps for its next train().
                wm.detach()
                raise

        self._first_batch = model.register_forward_pre_hook(check, with_kwargs=True)

    def _stop_checking(self) -> None:
        if self._first_batch is not None:
            self._first_batch.remove()
            self._first_batch = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        wm = self.watermarker
        self._stop_checking()  # a run of no steps never called the model
        wm.detach()
        self._attached = False
        self._trigger_step = None
        if model is not None and "trigger" in wm.schemes:
            self.trigger_accuracy = trigger_accuracy(model, wm.triggers, input_key=wm.input_key)
            state.log_history.append({"wmark_trigger_accuracy": self.trigger_accuracy, "step": state.global_step})
