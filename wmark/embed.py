"""Embed watermarks in the user's own training loop.

One entry point, in the spirit of opacus' ``PrivacyEngine.make_private``: hand your model, optimizer and
data loader to :meth:`Watermarker.attach` and train with what it gives back. The watermarker owns what it
attached (wrapped loaders, optimizer hooks); :meth:`Watermarker.detach` removes them, and attaching twice
is an error.

Example:
    >>> import torch
    >>> from wmark.keys import generate_key
    >>> from wmark.models import build_model
    >>> from wmark.training import make_loader
    >>> key = generate_key(owner="ACME", num_classes=10, input_shape=(1, 28, 28))
    >>> model = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28))
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> loader = make_loader(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), batch_size=32)
    >>> wm = Watermarker(key, schemes=("trigger",))
    >>> wm.trigger_lookahead, wm.trigger_per_batch  # an image key's default: lookahead, 4 triggers per step
    (0.05, 4)
    >>> model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)
    >>> x, y = next(iter(loader))
    >>> x.shape[0]  # the batches stay as they are: the optimizer step learns the triggers
    32
    >>> wm.detach()
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from wmark.contract import input_vocabulary
from wmark.errors import UsageError
from wmark.keys import Key
from wmark.schemes import trigger_set
from wmark.schemes.trigger_lookahead import (
    DEFAULT_LOOKAHEAD,
    LOOKAHEAD_PER_BATCH,
    LookaheadTriggerStep,
    pass_seed,
)
from wmark.schemes.weights import WeightsEmbedder
from wmark.text import TextInputs

KNOWN_SCHEMES = ("trigger", "weights")


class Watermarker:
    """Adds one or more watermark schemes to a training loop.

    Args:
        key: The owner's key; every trigger and label is derived from it.
        schemes: Which schemes to embed.
        trigger_per_batch: Trigger samples per optimizer step (trigger scheme). Default (None): 8 when mixing
            (they join each batch), ``LOOKAHEAD_PER_BATCH`` (4) with a trigger pass of the library's own, which
            costs time per sample and kept about as many triggers with 4 as with 8.
        trigger_lookahead: A positive radius learns the triggers at weights moved by a simulated fine-tune step
            of that size (relative to each tensor's norm) along the sign of the natural batch's descent
            direction, in an optimizer step pre-hook, so that they survive a thief's fine-tune
            (``docs/trigger-embedding.md``); :meth:`attach` then needs ``optimizer=``. ``0`` turns lookahead off
            (the triggers are mixed in, or with a margin get their own pass at the current weights). Default (None): ``DEFAULT_LOOKAHEAD`` (0.05, chosen on Fashion-MNIST CNNs) for image
            keys, ``0`` for text keys (on MiniLM lookahead learnt none of the triggers).
        trigger_margin: A trigger whose label already leads every other logit by this much (at the looked-ahead
            weights) adds no loss, so learnt triggers stop pulling the weights from the natural task. It needs the
            library's own trigger pass, so with ``trigger_lookahead=0`` the triggers get that pass at the current
            weights instead of joining the batches. Default None: every trigger always adds its loss.
        trigger_mixing: True mixes the triggers into the training batches (the loader or dataset carries them,
            no optimizer hook; neither lookahead nor a margin applies to mixed batches); False asks for their own
            pass. Default (None): mixing exactly when there is neither lookahead nor a margin (a text key's
            default, or ``trigger_lookahead=0``); otherwise :meth:`attach` needs ``optimizer=``.
        weights_layer: Layer to mark (weights scheme); default the largest conv/linear layer before the head.
        input_key: The inputs' key in dict batches (default ``input_ids`` for text keys, else ``pixel_values``).
        label_key: The labels' key in dict batches.
        tokenizer: For a text key, its already loaded tokenizer (checked against the key); by default the
            tokenizer the key names is loaded.

    Raises:
        UsageError: On an unknown scheme, a negative radius or margin, or mixing asked together with a radius
            or a margin.
    """

    def __init__(self, key: Key, *, schemes: Sequence[str] = ("trigger",), trigger_per_batch: int | None = None,
                 weights_layer: str | None = None, input_key: str | None = None, label_key: str = "labels",
                 tokenizer: Any = None, trigger_lookahead: float | None = None,
                 trigger_margin: float | None = None, trigger_mixing: bool | None = None) -> None:
        unknown = [s for s in schemes if s not in KNOWN_SCHEMES]
        if unknown:
            raise UsageError(f"Unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_SCHEMES)}.")
        if not schemes:
            raise UsageError("Name at least one scheme to embed.")
        # `not (0 <= x < inf)` also refuses NaN, which silently switched the lookahead off or voided the margin
        if trigger_lookahead is not None and not (0 <= trigger_lookahead < math.inf):
            raise UsageError(f"The trigger lookahead radius must be 0 (off) or positive and finite, got "
                             f"{trigger_lookahead}.")
        if trigger_margin is not None and not (0 <= trigger_margin < math.inf):
            raise UsageError(f"The trigger margin must be at least 0 and finite, got {trigger_margin}.")
        if trigger_mixing:
            if trigger_lookahead or trigger_margin is not None:
                raise UsageError("Mixed triggers take neither a lookahead radius nor a margin; drop trigger_lookahead "
                                 "and trigger_margin, or trigger_mixing.")
            trigger_lookahead = 0.0
        else:
            if trigger_lookahead is None:
                trigger_lookahead = 0.0 if key.kind == "text" else DEFAULT_LOOKAHEAD
            if trigger_mixing is False and trigger_lookahead == 0 and trigger_margin is None:
                raise UsageError("A trigger pass of its own needs a lookahead radius or a margin; give "
                                 "trigger_lookahead or trigger_margin, or mix the triggers.")
        self.key = key
        self.schemes = tuple(schemes)
        self.trigger_margin = trigger_margin
        # The library computes the trigger loss itself (its own pass in the optimizer step) for lookahead, and for
        # a margin, which mixed batches cannot apply: the user's loss averages the triggers with the data.
        self.trigger_step = trigger_lookahead > 0 or trigger_margin is not None
        if trigger_per_batch is None:
            trigger_per_batch = LOOKAHEAD_PER_BATCH if self.trigger_step else trigger_set.MIXING_PER_BATCH
        if trigger_per_batch < 1:
            raise UsageError(f"trigger_per_batch must be at least 1, got {trigger_per_batch}.")
        self.trigger_per_batch = trigger_per_batch
        self.trigger_lookahead = float(trigger_lookahead)
        self._attached = False
        self._triggers: trigger_set.TriggerSet | None = None
        self.weights_layer = weights_layer
        self._weights: WeightsEmbedder | None = None
        self._hooks: list[Any] = []
        self._loaders: list[trigger_set.LoaderProxy] = []
        self.input_key = input_key or ("input_ids" if key.kind == "text" else "pixel_values")
        self.label_key = label_key
        self.tokenizer = tokenizer

    @property
    def triggers(self) -> trigger_set.TriggerSet:
        """The key's trigger set (generated on first use)."""
        if self._triggers is None:
            self._triggers = trigger_set.generate_triggers(self.key, tokenizer=self.tokenizer)
        return self._triggers

    def attach(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               data_loader: Iterable | None = None,
               accumulation_steps: int = 1) -> tuple[nn.Module, torch.optim.Optimizer | None, Any]:
        """Prepare a training loop; returns ``(model, optimizer, data_loader)`` to train with.

        Args:
            model: The model being trained.
            optimizer: Its optimizer (the trigger pass and the weights scheme add their gradients in step pre-hooks).
            data_loader: The natural training batches (trigger scheme).
            accumulation_steps: Batches per optimizer step, for a loop that accumulates gradients and divides each
                batch's loss by this number (as the Hugging Face ``Trainer`` does). The trigger pass runs once per
                step, so it weighs its triggers against ``batch size × accumulation_steps`` samples: the triggers
                keep the share of the gradient they have in one batch of that size (left at 1, such a loop gives
                them ``accumulation_steps`` times that share). A loop that sums the undivided losses leaves it at 1.

        Example (4 batches per optimizer step)::

            model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader,
                                                 accumulation_steps=4)
            for i, (x, y) in enumerate(loader, 1):
                (F.cross_entropy(model(x), y) / 4).backward()
                if i % 4 == 0:
                    optimizer.step()  # the trigger pass adds its gradient here, once per step
                    optimizer.zero_grad()

        Raises:
            UsageError: If already attached, if a scheme lacks what it needs (a data loader for the
                trigger scheme), if a text key's tokenizer makes ids the model cannot embed
                (:meth:`check_vocabulary`), or if ``accumulation_steps`` is not a whole number of at least 1 (or
                is above 1 for mixed triggers, which join every batch).
        """
        if self._attached:
            raise UsageError("This Watermarker is already attached; call detach() before attaching again.")
        self._check_accumulation(accumulation_steps)
        if "trigger" in self.schemes:
            self.check_vocabulary(model)
        with self._all_or_nothing():
            if "trigger" in self.schemes:
                if data_loader is None:
                    raise UsageError("The trigger scheme needs data_loader= (or use wrap_dataset for a framework's "
                                     "loader).")
                data_loader = self._attach_triggers(model, optimizer, data_loader, accumulation_steps)
            if "weights" in self.schemes:
                if optimizer is None:
                    raise UsageError("The weights scheme needs optimizer= (it adds its gradient in a step pre-hook).")
                self._hook_weights(model, optimizer)
        self._attached = True
        return model, optimizer, data_loader

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Remove the hooks an attach installed if a later scheme refuses, so the optimizer is left as it was.

        Without it a trigger hook stayed on the optimizer when the weights scheme refused its layer: training
        then learnt triggers the caller believed unattached, and attaching again after the fix added them twice.
        """
        try:
            yield
        except BaseException:
            self.detach()
            self._weights = None
            raise

    def _check_accumulation(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise UsageError(f"accumulation_steps must be a whole number of batches per optimizer step, at least 1, "
                             f"got {steps!r}.")
        if steps > 1 and "trigger" in self.schemes and not self.trigger_step:
            # Mixed triggers join every batch: each batch's loss, and so the step's, already holds its share of them.
            raise UsageError("Mixed triggers join every batch, so accumulation_steps does not apply to them; drop it, "
                             "or lower trigger_per_batch for fewer triggers per step.")

    def _attach_triggers(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, data_loader: Iterable,
                         accumulation_steps: int) -> Any:
        loader: trigger_set.LoaderProxy
        if not self.trigger_step:
            loader = trigger_set.TriggerMixingLoader(data_loader, self.triggers, per_batch=self.trigger_per_batch,
                                                     input_key=self.input_key, label_key=self.label_key)
        else:
            if optimizer is None:
                raise UsageError("The trigger pass needs optimizer= (it adds its gradient in a step pre-hook); pass "
                                 "it, or make the Watermarker with trigger_mixing=True to mix the triggers into the "
                                 "batches.")
            step = self.lookahead_step(model)
            step.accumulation_steps = int(accumulation_steps)
            self._hooks.append(optimizer.register_step_pre_hook(step.hook))
            loader = step.wrap_loader(data_loader, label_key=self.label_key)
        self._loaders.append(loader)
        return loader

    def lookahead_step(self, model: nn.Module) -> LookaheadTriggerStep:
        """The trigger step for ``model`` (for a trainer integration that calls it itself); radius 0 without lookahead.

        Raises:
            UsageError: If this Watermarker mixes its triggers into the batches.
        """
        if not self.trigger_step:
            raise UsageError("This Watermarker mixes its triggers into the batches; make it with a positive "
                             "trigger_lookahead or a trigger_margin for a trigger step.")
        return LookaheadTriggerStep(model=model, triggers=self.triggers, radius=self.trigger_lookahead,
                                    per_batch=self.trigger_per_batch, input_key=self._trigger_input_name(model),
                                    margin=self.trigger_margin, batch_key=self.input_key, seed=pass_seed(self.key))

    def attach_optimizer(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                         trigger_batch_size: int | None = None) -> LookaheadTriggerStep | None:
        """Install the step pre-hooks on an optimizer a framework built: the weights scheme's and, with
        ``trigger_batch_size``, the lookahead trigger step's, which is returned (``None`` without one) so that an
        integration can tell it the samples of a step that has fewer (the short last accumulation window of an
        epoch).

        The trainer integrations (:mod:`wmark.integrations`) call this when training starts. Mixed triggers
        reach the model through :meth:`wrap_dataset`; lookahead triggers through this hook (the Hugging Face
        ``Trainer``) or the integration's own callback (Lightning, whose optimizer computes the gradients inside
        ``step``, after any pre-hook).

        Args:
            model: The model being trained.
            optimizer: The framework's (inner) optimizer.
            trigger_batch_size: Natural samples per optimizer step (batch size × accumulation steps), to weigh
                the lookahead triggers as if they had joined the batch; None installs no trigger hook.

        Raises:
            UsageError: If already attached.
        """
        if self._attached:
            raise UsageError("This Watermarker is already attached; call detach() before attaching again.")
        if "trigger" in self.schemes:
            self.check_vocabulary(model)
        step = None
        with self._all_or_nothing():
            if trigger_batch_size is not None and "trigger" in self.schemes and self.trigger_step:
                # Before the weights scheme's hook, as in attach(): the simulated step follows the natural gradient.
                step = self.lookahead_step(model)
                step.batch_size = trigger_batch_size
                self._hooks.append(optimizer.register_step_pre_hook(step.hook))
            if "weights" in self.schemes:
                self._hook_weights(model, optimizer)
        self._attached = True
        return step

    def check_vocabulary(self, model: nn.Module) -> None:
        """Refuse a text key whose tokenizer makes token ids past the model's input embedding table.

        Checked from the sizes alone, before any trigger reaches the model: an out-of-range id failed the trigger
        pass with a bare ``IndexError`` on the CPU, and is a device-side assert on CUDA. Only a model that names
        its input embeddings (``get_input_embeddings()``, as Hugging Face models do, or a module inside it that
        does) is checked.

        Raises:
            UsageError: If the tokenizer's largest token id is not below the embedding table's size.
        """
        if self.key.kind != "text":
            return
        size = input_vocabulary(model)
        text = TextInputs.from_key(self.key, tokenizer=self.tokenizer)
        if size is not None and text is not None and text.vocab_size > size:
            raise UsageError(f"The key's tokenizer makes token ids up to {text.vocab_size - 1} but the model embeds "
                             f"only {size} tokens; use a key made with the tokenizer the model was trained with.")

    def _refuse_lookahead(self) -> None:
        if "trigger" in self.schemes and self.trigger_step:
            raise UsageError("This Watermarker adds the triggers in the optimizer step, not through the dataset: train "
                             "on the dataset as it is with the integration's callback, or make the Watermarker with "
                             "trigger_mixing=True to mix the triggers into the dataset.")

    def _trigger_input_name(self, model: nn.Module) -> str | None:
        from wmark.integrations.common import input_key_for

        return input_key_for(getattr(model, "module", model), self.triggers, self.input_key)

    def _hook_weights(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._weights = WeightsEmbedder(self.key, model, layer=self.weights_layer)
        self._hooks.append(optimizer.register_step_pre_hook(self._weights.hook))

    def wrap_dataset(self, dataset: torch.utils.data.Dataset, *, repeats: int = 10) -> torch.utils.data.Dataset:
        """Append the triggers to a dataset, for a framework that builds its own loader (the HF ``Trainer``).

        Trigger items take the dataset's own form: ``(x, y)`` pairs, or dicts under ``input_key`` /
        ``label_key`` (for text, unpadded ``input_ids`` and ``attention_mask`` that a padding collator pads).

        Raises:
            UsageError: With a trigger pass of its own (lookahead or a margin), which adds the triggers in the
                optimizer step instead
                (:class:`wmark.integrations.hf.WatermarkCallback` does it for the ``Trainer``).
        """
        self._refuse_lookahead()
        return trigger_set.TriggerMixingDataset(dataset, self.triggers, repeats=repeats, input_key=self.input_key,
                                                label_key=self.label_key)

    def detach(self) -> None:
        """Release everything attach() installed: its optimizer hooks, and the loader it returned, which then yields
        the wrapped loader's batches as they are. Safe to call when not attached."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for loader in self._loaders:
            loader.released = True
        self._loaders.clear()
        self._attached = False

    def metadata(self) -> dict[str, Any]:
        """``wmark.*`` metadata for the marked model's file: schemes, parameters, commitment; never the secret."""
        trigger = "trigger" in self.schemes  # a weights-only file records no trigger settings
        return {
            "schemes": list(self.schemes),
            "commitment": self.key.commitment(),
            "owner": self.key.owner,
            "scheme_params": {s: self.key.schemes.get(s, {}) for s in self.schemes},
            **({"trigger_per_batch": self.trigger_per_batch} if trigger else {}),
            **({"trigger_lookahead": self.trigger_lookahead} if trigger and self.trigger_lookahead > 0 else {}),
            **({"trigger_margin": self.trigger_margin} if trigger and self.trigger_margin is not None else {}),
            **({"modality": self.key.modality} if self.key.modality is not None else {}),
            **({"weights": self._weights.metadata()} if self._weights is not None else {}),
        }

