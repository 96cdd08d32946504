"""Model extraction: a thief trains a surrogate on a victim API's answers to the thief's own inputs.

The victim is any :class:`wmark.suspects.Suspect` — a local model, a remote API, or an API behind the
owner's marked API — so the attack sees exactly what a client would. The training itself is
:mod:`wmark.distill`, shared with the owner's reference surrogates; this module is the attacker's view of it.
"""

from wmark.distill import (
           LABEL_MODES,
           Extraction,
           LabelMode,
           accuracy_reached,
           extract,
           extraction_targets,
           query_victim,
)

__all__ = ["LABEL_MODES", "Extraction", "LabelMode", "accuracy_reached", "extract", "extraction_targets",
           "query_victim"]
