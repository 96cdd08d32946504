"""Attacks a thief applies to a stolen model, for evaluating watermarks.

Each attack takes a model (or its tensors) and returns an attacked copy; the CLI writes the result as
safetensors with the attack recorded under ``wmark.attack``.
"""

from wmark.attacks.finetune import finetune, last_linear
from wmark.attacks.neurons import permute, permute_state_dict, rename_tensors
from wmark.attacks.noise import noise
from wmark.attacks.weights import prune, quantize

__all__ = ["finetune", "last_linear", "noise", "permute", "permute_state_dict", "prune", "quantize", "rename_tensors"]
