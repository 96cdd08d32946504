"""The one contract wmark asks of a classifier: any ``torch.nn.Module`` that maps a batch to logits.

A batch is a tensor (images, token ids) or a dict of named tensors (``pixel_values``, ``input_ids`` and
``attention_mask``, any keys the model's ``forward`` takes). The output is a batch × classes tensor, or an
object with ``.logits`` (a Hugging Face ``ModelOutput``), or a tuple whose first element is the logits.
Inputs always follow the model to its device (CPU, CUDA or MPS) and floating-point dtype; the model itself is never
moved or cast.

Example:
    >>> from torch import nn
    >>> model = nn.Linear(3, 2)
    >>> forward_logits(model, torch.zeros(4, 3)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from wmark.errors import UsageError

Batch = torch.Tensor | Mapping[str, torch.Tensor]

# The names a forward takes its main input under (Hugging Face's, for text, images and audio). A parameter so named
# wants that tensor, never the whole dict batch; a forward that names one wants a dict batch to hold one of them.
INPUT_NAMES = frozenset({"input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"})


class BatchKeysError(UsageError):
    """A dict batch lacks inputs the model's ``forward`` names.

    Its message names both fixes: the inputs named in the batch (for a caller who builds it), or the model
    wrapped so its forward takes the batch's keys (for one who does not, such as a trigger pass whose text
    batches are always ``input_ids``/``attention_mask``). A :class:`~wmark.suspects.LocalSuspect` catches this
    and names the one fix open to its own caller.

    Args:
        wanted: The names the forward wants that the batch lacks (``every``: all of them; else any one).
        held: The keys the batch holds.

    Attributes:
        held: The keys the batch holds (the message a caller writes instead names them).
    """

    def __init__(self, wanted: list[str], held: list[str], *, every: bool = False) -> None:
        self.held = held
        super().__init__(f"The batch has no {(', ' if every else ' or ').join(repr(w) for w in wanted)} (it holds "
                         f"{', '.join(repr(k) for k in held) or 'nothing'}); name the model's inputs in the batch, or wrap the "
                         "model in a module whose forward takes the batch's keys.")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None for a model with none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move a tensor, or every tensor of a dict batch, to ``device`` (other values are left alone); with
    ``float_dtype``, floating-point tensors are cast to it (token ids and masks keep theirs)."""
    if isinstance(batch, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and batch.is_floating_point() else batch.dtype
        # non_blocking only where the copy is host-to-CUDA; a copy down to the CPU must be complete before use
        return batch.to(device, dtype, non_blocking=torch.device(device).type == "cuda")
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    return batch


def to_model(batch: Any, model: nn.Module) -> Any:
    """``batch`` on the model's device, its floating-point tensors in the model's dtype: triggers and verifier
    inputs are float32, and a float16, bfloat16 or float64 model refuses them ("mat1 and mat2 must have the same
    dtype")."""
    return to_device(batch, model_device(model), model_float_dtype(model))


def _forward_names(model: nn.Module) -> tuple[list[str], set[str], bool]:
    """The forward's named parameters in order, the required ones, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return [], set(), True
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty}
    return named, required, any(p.kind == p.VAR_KEYWORD for p in params)


def forward_names(model: nn.Module) -> list[str]:
    """The names of the parameters the model's ``forward`` takes by keyword, in order."""
    return _forward_names(model)[0]


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on a batch already on its device: a tensor positionally, a dict by keyword.

    A dict goes in as keywords when the forward names its keys (extra keys it does not take, such as
    ``token_type_ids`` for a model without them, are dropped); a forward that takes one required batch and
    none of the keys gets the whole dict (unless that parameter is named as an input, such as ``pixel_values``),
    one that takes only ``**kwargs`` gets every key.

    Raises:
        BatchKeysError: If the forward needs a named input the dict batch lacks: a required one, or, when every
            input is optional (Hugging Face models), each of the main inputs (:data:`INPUT_NAMES`) it names.
    """
    if not isinstance(batch, Mapping):
        return model(batch)
    names, required, var_kw = _forward_names(model)
    named, keys = set(names), set(batch)
    if not named & keys:
        if var_kw and not named:
            return model(**batch)
        if len(required) == 1 and not required & INPUT_NAMES:
            return model(dict(batch))
        # required inputs are each needed ("no 'a', 'b'"); without any, the first two names are alternatives
        raise BatchKeysError(sorted(required) or names[:2], list(batch), every=bool(required))
    missing = sorted(required - keys)
    main = [n for n in names if n in INPUT_NAMES]
    if not required and main and not keys & set(main):
        # Every input optional (Hugging Face): without its main input the model fails deep inside, naming neither.
        raise BatchKeysError(main, list(batch))
    if missing:
        raise BatchKeysError(missing, list(batch), every=True)
    return model(**{k: v for k, v in batch.items() if k in named})


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits``, or the first tuple element.

    Raises:
        UsageError: If no batch × classes tensor can be found.
    """
    if isinstance(output, torch.Tensor):
        logits = output
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise UsageError(f"The model returns {type(output).__name__}; it must return logits or an object with .logits.")
    if logits.ndim != 2:
        raise UsageError(f"The model returns outputs shaped {tuple(logits.shape)}; expected batch × classes.")
    return logits


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of ``model`` on ``batch``, with the batch moved to the model's device and dtype first (:func:`to_model`)."""
    return logits_of(call_model(model, to_model(batch, model)))


def split_batch(batch: Any, *, label_key: str = "labels") -> tuple[Batch, torch.Tensor]:
    """A training batch as ``(inputs, labels)``: an ``(x, y)`` pair, or a dict whose ``label_key`` holds the labels.

    Raises:
        UsageError: If the batch is neither, or a dict without labels.
    """
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise UsageError(f"The dict batch has no {label_key!r} (it holds {', '.join(map(repr, batch))}); "
                             "put the labels under that key.")
        return {k: v for k, v in batch.items() if k != label_key}, batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UsageError("Batches must be (inputs, labels) pairs or dicts holding the labels.")


def batch_len(batch: Batch) -> int:
    """The number of examples in a tensor or dict batch."""
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a tensor or dict batch."""
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def host_array(x: Any) -> np.ndarray:
    """``x`` as a NumPy array in host memory (a tensor on any device is detached and copied to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_float_tensor(x: Any) -> torch.Tensor:
    """Verifier inputs (NumPy or tensor) as a float32 tensor, for image-like models."""
    return torch.as_tensor(host_array(x), dtype=torch.float32)


def input_vocabulary(model: nn.Module) -> int | None:
    """The size of the input embedding table of the first module (the model, or one inside it: a Lightning module's
    or a DDP wrapper's) that names one through ``get_input_embeddings()``; None when none does."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            embedding = getter()
        except NotImplementedError:
            continue
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    return None
