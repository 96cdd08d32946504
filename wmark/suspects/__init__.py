"""Suspects: the models wmark questions, behind one interface whatever they are.

A suspect answers a batch of inputs with :class:`Answers`: a label per input (``-1`` where it gave no
usable answer: an abstention), and scores when the suspect exposes them. Local models live in
:mod:`wmark.suspects.local`.
"""

from wmark.suspects.base import Answers, Suspect
from wmark.suspects.local import LocalSuspect

__all__ = ["Answers", "LocalSuspect", "Suspect"]
