"""Attacks a thief applies to a stolen model, for evaluating watermarks.

Each attack takes a model (or its tensors) and returns an attacked copy; the CLI writes the result as
safetensors with the attack recorded under ``wmark.attack``.
"""

from wmark.attacks.finetune import finetune, last_linear
from wmark.attacks.weights import prune, quantize

__all__ = ["finetune", "last_linear", "prune", "quantize"]
