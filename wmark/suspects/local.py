"""A suspect that is a model in this process (white-box access, used black-box here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from wmark.contract import (
    BatchKeysError,
    as_float_tensor,
    forward_logits,
    forward_names,
    input_vocabulary,
    model_device,
)
from wmark.errors import RuntimeFailure, UsageError
from wmark.suspects.base import Answers
from wmark.text import TextInputs, is_text_array

if TYPE_CHECKING:
    from wmark.models import PenultimateFeaturizer


class LocalSuspect:
    """Queries an ``nn.Module`` directly, on whatever device the model is on.

    Any classifier that follows :mod:`wmark.contract` works: a tensor or a dict batch in, logits or an object
    with ``.logits`` out. Inputs follow the model's device; the model is moved only when ``device`` is given.

    Args:
        model: The suspect model.
        input_shape: Shape of one input (for text: ``(max_length,)``).
        description: Name for reports (e.g. the file it was loaded from).
        expose_scores: Whether to return softmax scores (False imitates a label-only API).
        device: Move the model there first (default: leave it where it is).
        text: For a text classifier, how strings become its inputs (:meth:`wmark.text.TextInputs.from_key`);
            queries are then arrays of strings.
        input_key: For an image model whose forward takes a dict batch, the key its images go under
            (``pixel_values``); by default they go in as a tensor.

    Raises:
        UsageError: If the model fails on a probe input of ``input_shape`` with an index, key, type or attribute
            error (typically a model that wants a dict batch), or its forward does not take the inputs by the
            names they are given under (``input_ids`` and ``attention_mask`` for text, ``input_key`` for images), or
            it takes token ids (its forward names ``input_ids``) but is to be asked images, or a text model cannot
            take the largest token id of ``text``'s tokenizer (its vocabulary is smaller), or an image model fails on a
            probe input of ``input_shape`` with a runtime error (a shape mismatch).
    """

    def __init__(self, model: nn.Module, *, input_shape: tuple[int, ...], description: str = "local model",
                 expose_scores: bool = True, device: torch.device | None = None,
                 text: TextInputs | None = None, input_key: str | None = None) -> None:
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.input_shape = tuple(input_shape)
        self.description = description
        self.expose_scores = expose_scores
        self.text = text
        self.input_key = input_key
        if text is None and input_key is None and "input_ids" in forward_names(self.model):
            # Given an image tensor as its token ids, a Hugging Face text model fails deep inside, naming neither.
            raise UsageError(f"The suspect {description}'s forward takes input_ids, so it is a text model, but it is "
                             "asked images; verify it with a text key (`wmark keygen --modality text`).")
        embeds = input_vocabulary(self.model) if text is not None else None
        if text is not None and embeds is not None and embeds < text.vocab_size:
            raise UsageError(f"The suspect {description} cannot take every token id of the tokenizer it is asked "
                             f"through: it embeds {embeds} tokens but the tokenizer makes {text.vocab_size}; use a key "
                             "made with the tokenizer the model was trained with.")
        probe_input = self._batch(self._probe_input())
        try:
            with torch.no_grad():
                probe = forward_logits(self.model, probe_input)
                if self.text is not None and embeds is None and self.device.type == "cpu":
                    # The trigger words and a text endpoint's strings may use any id the tokenizer makes. Off the CPU
                    # an id past the table is a device-side assert that breaks the process, so only the CPU tries it.
                    top = self.text.vocab_size - 1
                    forward_logits(self.model, dict(probe_input, input_ids=probe_input["input_ids"].masked_fill(
                        probe_input["attention_mask"].bool(), top)))
        except BatchKeysError as e:
            # The contract's own fix ("name the inputs in the batch") is not open here: this class builds the batch.
            raise UsageError(self._names_fix(e.held)) from e
        except (IndexError, KeyError, TypeError, AttributeError) as e:
            if self.text is not None and isinstance(e, IndexError):
                # an embedding lookup past the model's vocabulary: another tokenizer than the one it was trained with
                raise UsageError(f"The suspect {self.description} cannot take every token id of the tokenizer it is "
                                 f"asked through (IndexError: {e}): its vocabulary is smaller than the tokenizer's "
                                 f"{self.text.vocab_size} tokens; use a key made with the tokenizer the model was "
                                 "trained with.") from e
            # Raised inside the user's model, which cannot say what it was given; the probe can.
            given = (f"a dict of {', '.join(map(repr, probe_input))}" if isinstance(probe_input, Mapping)
                     else f"a tensor of shape {tuple(probe_input.shape)}")
            fix = ("wrap the model in a module whose forward(input_ids, attention_mask) calls it with them"
                   if self.text is not None else "give input_key= if its forward takes a dict batch, else check "
                   "input_shape")
            raise UsageError(f"The suspect {self.description} fails on {given} ({type(e).__name__}: {e}); "
                             f"{fix}.") from e
        except RuntimeError as e:
            if isinstance(e, torch.cuda.OutOfMemoryError) or self.text is not None:
                raise
            # a shape mismatch inside the model (mat1 and mat2 shapes...): the key's input shape is not the model's
            raise UsageError(f"The suspect {self.description} fails on an input of shape {tuple(self.input_shape)} "
                             f"(RuntimeError: {str(e).splitlines()[0]}); use a key whose input shape is the "
                             "model's.") from e
        self.num_classes: int | None = int(probe.shape[1])

    def _names_fix(self, held: list[str]) -> str:
        """The sentence for a forward that does not take the batch's keys, naming what the caller can change."""
        takes = f"The suspect {self.description}'s forward takes ({', '.join(forward_names(self.model))})"
        if self.text is not None:
            return (f"{takes}, but text goes in as {' and '.join(held)}; wrap the model in a module whose "
                    f"forward({', '.join(held)}) calls it with them.")
        return (f"{takes}, not images under {self.input_key!r}; give input_key= the name it takes them by, or wrap "
                f"the model in a module whose forward({self.input_key}) calls it.")

    @property
    def device(self) -> torch.device:
        """Where the model is (inputs are sent there)."""
        return model_device(self.model)

    def _probe_input(self) -> Any:
        if self.text is not None:
            return np.asarray(["a"], dtype=object)
        return np.zeros((1, *self.input_shape), dtype=np.float32)

    def _batch(self, inputs: Any) -> Any:
        if self.text is not None:
            if not is_text_array(inputs):
                raise UsageError("This suspect is a text classifier; ask it strings.")
            return self.text.encode(list(np.asarray(inputs, dtype=object).reshape(-1)))
        if is_text_array(inputs):
            raise UsageError("This suspect takes tensors, not text; give it the key's tokenizer to ask text.")
        images = as_float_tensor(inputs)
        return images if self.input_key is None else {self.input_key: images}

    @torch.no_grad()
    def query(self, inputs: np.ndarray) -> Answers:
        if len(inputs) == 0:  # a tokenizer fails on no text, and a model may on an empty batch
            c = self.num_classes or 0
            return Answers(labels=np.zeros(0, dtype=np.int64),
                           scores=np.zeros((0, c), dtype=np.float32) if self.expose_scores else None)
        return self._answers(forward_logits(self.model, self._batch(inputs)))

    @torch.no_grad()
    def query_with_features(self, inputs: np.ndarray, featurizer: PenultimateFeaturizer) -> tuple[Answers, np.ndarray]:
        """The answers and ``featurizer``'s features of ``inputs`` from one forward pass of this model.

        Raises:
            UsageError: When ``featurizer`` reads another model.
        """
        if featurizer.model is not self.model:
            raise UsageError("The featurizer reads another model than this suspect's; build it on the same model.")
        logits, features = featurizer.logits_and_features(self._batch(inputs))
        return self._answers(logits), features.float().cpu().numpy()

    def _answers(self, logits: torch.Tensor) -> Answers:
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise RuntimeFailure(
                f"The suspect {self.description} produced NaN or infinite outputs; its weights are corrupt or it "
                "was saved in a precision it cannot run in."
            )
        scores = torch.softmax(logits, dim=1).cpu().numpy()
        return Answers(labels=scores.argmax(1).astype(np.int64), scores=scores if self.expose_scores else None)
