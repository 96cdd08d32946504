"""Lookahead trigger embedding: learn the triggers where a thief's fine-tune will take the weights.

A thief who fine-tunes a stolen copy on natural data moves every weight along that data's descent
directions, and triggers learnt only at the current weights are forgotten on the way. This embedding
anticipates the move: at each optimizer step, after the user's loss on a natural batch has filled the
gradients, a copy of the weights is moved by a simulated fine-tune step (each tensor by ``radius`` times its
norm along the sign of its descent direction, as an Adam step moves), the trigger loss is evaluated there, and
its gradient is added to the natural one at the original weights (a first-order lookahead, as in MAML or
SAM). The model's own weights and buffers are never changed by it.

It is :class:`~wmark.embed.Watermarker`'s default for image keys, at ``DEFAULT_LOOKAHEAD`` with
``LOOKAHEAD_PER_BATCH`` triggers per step: chosen on Fashion-MNIST CNNs against a 5-epoch Adam fine-tune
(``docs/trigger-embedding.md``); other data may want other values.

The triggers and their labels are the key's own (:func:`wmark.schemes.trigger_set.generate_triggers`), so the
null is unchanged: a model that never saw the key matches each label with probability exactly 1/C.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from wmark.contract import call_model, logits_of, split_batch, to_model
from wmark.errors import UsageError
from wmark.keys import Key
from wmark.schemes.trigger_set import LoaderProxy, TriggerSet, check_inputs

DEFAULT_LOOKAHEAD = 0.05
LOOKAHEAD_PER_BATCH = 4


class _BatchSizeLoader(LoaderProxy):
    """Passes batches through unchanged, showing each to the step (its size, its inputs' kind and form)."""

    def __init__(self, loader: Iterable, step: LookaheadTriggerStep, label_key: str) -> None:
        self.loader = loader
        self.step = step
        self.label_key = label_key

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if not self.released:
                self.step.see_batch(batch, label_key=self.label_key)
            yield batch


class LookaheadTriggerStep:
    """Optimizer step pre-hook that adds the lookahead trigger gradient (see the module docstring).

    Args:
        model: The model being trained (a ``DistributedDataParallel`` wrapper is looked through).
        triggers: The key's trigger set.
        radius: Size of the simulated fine-tune step, relative to each parameter tensor's norm (0: the triggers'
            own pass at the current weights).
        per_batch: Triggers per step; their loss is weighted ``per_batch / (natural batch size ×
            accumulation_steps)``, as if they had joined the step's batches.
        input_key: Name to pass the triggers under, or ``None`` to pass a tensor (until a dict batch is seen).
        batch_key: The inputs' key in natural dict batches (default ``input_ids`` for text triggers, else
            ``pixel_values``); a model trained on dict batches gets its triggers under it.
        margin: If set, a trigger whose label already leads every other logit by at least this much at the
            looked-ahead weights adds no loss, so learnt triggers stop pulling the weights away from the natural
            task (the loss is still divided by ``per_batch``).
        seed: Seeds the trigger pass's random draws (dropout), with the pass's count; the same on every rank
            (:func:`pass_seed` of the key, as :meth:`wmark.embed.Watermarker.lookahead_step` gives it).

    Raises:
        UsageError: If ``radius`` or ``margin`` is negative or ``per_batch`` is below 1.
    """

    def __init__(self, *, model: nn.Module, triggers: TriggerSet, radius: float, per_batch: int,
                 input_key: str | None = None, margin: float | None = None, batch_key: str | None = None,
                 seed: int = 0) -> None:
        if not radius >= 0:
            raise UsageError(f"The lookahead radius must be at least 0, got {radius}.")
        if per_batch < 1:
            raise UsageError(f"per_batch must be at least 1, got {per_batch}.")
        if margin is not None and not margin >= 0:  # NaN too: it would void the margin silently
            raise UsageError(f"The trigger margin must be at least 0 (or None for none), got {margin}.")
        self.margin = margin
        self.model: nn.Module = getattr(model, "module", model) if hasattr(model, "no_sync") else model
        self.triggers = triggers
        self.radius = float(radius)
        self.per_batch = per_batch
        self.input_key = input_key
        self.batch_key = batch_key or ("input_ids" if triggers.is_text else "pixel_values")
        self.batch_size: int | None = None
        # Batches whose losses, each divided by this, one optimizer step sums (gradient accumulation).
        self.accumulation_steps = 1
        self._seen_shape: tuple[int, ...] | None = None  # one natural image's shape, as the loader gave it
        self._cursor = 0
        self.seed = seed
        self._passes = 0
        self._call = _Call(self.model)

    def wrap_loader(self, loader: Iterable, *, label_key: str = "labels") -> _BatchSizeLoader:
        """The user's loader, unchanged, but telling this step the natural batch size."""
        return _BatchSizeLoader(loader, self, label_key)

    def see_batch(self, batch: Any, *, label_key: str = "labels") -> None:
        """Take note of a natural batch before its step: its size, and the form the triggers must take to match it.

        Raises:
            UsageError: If a dict batch lacks ``batch_key``, or the batch's inputs are not of the triggers' kind
                (float images for an image key, token ids for a text key).
        """
        inputs, labels = split_batch(batch, label_key=label_key)
        self.batch_size = len(labels)
        check_inputs(inputs, self.triggers, batch_key=self.batch_key)
        x = inputs.get(self.batch_key) if isinstance(inputs, Mapping) else inputs
        if isinstance(x, torch.Tensor) and not self.triggers.is_text:
            self._seen_shape = tuple(x.shape[1:])
        if isinstance(inputs, Mapping) and self.input_key is None:
            # A forward that takes the whole dict (one parameter, no input named) indexes it by the batch's key,
            # so the triggers go under that key, as mixing puts them.
            self.input_key = self.batch_key

    def _next_indices(self) -> list[int]:
        n = len(self.triggers)
        idx = [(self._cursor + i) % n for i in range(self.per_batch)]
        self._cursor = (self._cursor + self.per_batch) % n
        return idx

    def _batch(self, idx: list[int]) -> Any:
        from wmark.integrations.common import trigger_batch

        return to_model(trigger_batch(self.triggers, idx, input_key=self.input_key), self.model)

    def share(self) -> float:
        """The triggers' weight in a step: ``per_batch / (batch size × accumulation_steps)``.

        Each trigger's loss then counts like one natural sample's among the step's ``batch size ×
        accumulation_steps``, as if the triggers had joined the step's batch (before any natural batch is seen,
        the batch is taken to be ``per_batch`` samples). Every integration weighs its trigger pass by it.
        """
        return self.per_batch / ((self.batch_size or self.per_batch) * self.accumulation_steps)

    def hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: add :meth:`share` ``×`` the trigger loss's gradient at the looked-ahead weights
        (nothing when no natural gradient was computed this step)."""
        self.add_gradient(weight=self.share())

    def add_gradient(self, *, weight: float) -> None:
        """Add ``weight ×`` the gradient of the next triggers' mean cross-entropy at the looked-ahead weights.

        Call it after the natural loss's backward and before the optimizer steps (a trainer's
        before-optimizer-step callback). The model's weights and buffers are not touched: the trigger forward runs
        on looked-ahead copies of the weights and of the buffers, with batch norms on their running statistics
        (as the triggers meet them at inference; the statistics stay the natural data's).

        The pass draws its random numbers (dropout masks) from a forked stream seeded by ``seed`` and the pass's
        count (:func:`shared_rng`): every DDP rank draws the same masks, and the training loop's own stream is left
        where it was, as if the pass had not run.
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        live: list[torch.Tensor] = [p for _, p in named if p.grad is not None]
        if not live:
            return  # no natural gradient this step (nothing to anticipate, nothing will step)
        idx = self._next_indices()
        batch = self._batch(idx)
        with torch.no_grad():
            # Adam's step moves every coordinate alike, so the simulated step follows sign(g), scaled to radius times
            # the tensor's norm (a zero gradient's sign is zero: that tensor does not move). Batched over tensors:
            # this runs every optimizer step.
            steps = torch._foreach_sign([p.grad for p in live if p.grad is not None])
            sizes = torch._foreach_clamp_min(torch._foreach_norm(steps), 1.0)
            scales = torch._foreach_div(torch._foreach_mul(torch._foreach_norm(live), self.radius), sizes)
            torch._foreach_mul_(steps, list(scales))  # 0-dim tensors broadcast
            ahead = iter(torch._foreach_sub(live, steps))
            moved = {f"model.{n}": (next(ahead) if p.grad is not None else p.detach()).requires_grad_(True)
                     for n, p in named}
            state = {**moved, **{f"model.{n}": b.clone() for n, b in self.model.named_buffers()}}
        self._passes += 1
        with torch.enable_grad(), _running_statistics(self.model), shared_rng(self.model, self.seed + self._passes):
            try:
                logits = logits_of(functional_call(self._call, state, (batch,)))
            except RuntimeError as e:
                self._refuse_shape(e)
                raise
            labels = self.triggers.labels[idx].to(logits.device)
            losses = F.cross_entropy(logits, labels, reduction="none")
            if self.margin is not None:
                losses = losses[_margins(logits.detach(), labels) < self.margin]
                if not len(losses):
                    return
            loss = losses.sum() / len(idx) * weight
            # autograd.grad, not backward(): a DistributedDataParallel wrapper's reducer must not see this pass.
            grads = torch.autograd.grad(loss, list(moved.values()), allow_unused=True)
        for (_, p), g in zip(named, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.dtype))

    def _refuse_shape(self, error: RuntimeError) -> None:
        """Name the shapes when the model fails on the triggers and the natural images it was given are shaped
        otherwise (a key made for other inputs), instead of the model's own error (a matmul's shapes)."""
        want = tuple(self.triggers.inputs.shape[1:])
        if self._seen_shape not in (None, want) and not isinstance(error, torch.OutOfMemoryError):
            raise UsageError(f"Batches hold inputs of shape {self._seen_shape} but the key's triggers are {want}, on "
                             "which the model fails; make a key whose input shape matches the model's.") from error


def pass_seed(key: Key) -> int:
    """The seed of a key's trigger passes: from its public commitment, so it tells nothing of the secret."""
    digest = hashlib.sha256(b"wmark/trigger-pass-rng\x00" + key.commitment().encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def shared_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """Draw from CPU and model-device CUDA streams seeded by ``seed``, restoring the caller's streams afterwards.

    DDP all-reduces only the gradients of its own backward. A trigger pass's gradient is added on each rank alone,
    so the replicas stay identical only if every rank computes the same one; with dropout that needs the same masks,
    which per-rank seeds (or data pipelines that draw unevenly) would otherwise make differ. Seeding a fork costs no
    communication and needs no process group, where all-reducing the trigger gradient would send a second full
    gradient every step and would have to tell data parallelism (same weights) from sharded or model-parallel
    wrappers (different weights). Forking also leaves the training loop's own stream untouched.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    seed %= 2**63
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


@contextlib.contextmanager
def _running_statistics(model: nn.Module) -> Iterator[None]:
    """Batch norms in eval mode for the trigger pass: a few triggers' own batch statistics are not what the
    model normalises them with at inference, so triggers learnt under them are not learnt at all."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's label logit minus its best other logit."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true - others.amax(1)


class _Call(nn.Module):
    """The model under a name, called through :func:`wmark.contract.call_model` (tensor or dict batches)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return call_model(self.model, batch)
