"""Attacks a thief applies to a stolen model, for evaluating watermarks.

Each attack takes a model (or its tensors) and returns an attacked copy; the CLI writes the result as
safetensors with the attack recorded under ``wmark.attack``.
"""

from wmark.attacks.finetune import finetune, last_linear
from wmark.attacks.neurons import permute, permute_state_dict, rename_tensors
from wmark.attacks.noise import noise
from wmark.attacks.symmetry import (
    absorb_final_norm,
    flip_gain_signs,
    fold_batchnorm,
    fuse_qkv,
    lora_merge,
    permute_decoder_heads,
    permute_heads,
    permute_spaces,
    split_qkv,
)
from wmark.attacks.weights import prune, quantize

__all__ = [
    "absorb_final_norm", "finetune", "flip_gain_signs", "fold_batchnorm", "fuse_qkv", "last_linear", "lora_merge",
    "noise", "permute", "permute_decoder_heads", "permute_heads", "permute_spaces", "permute_state_dict", "prune",
    "quantize", "rename_tensors", "split_qkv",
]
