"""wmark: prove who owns a machine-learning model.

Keys (:mod:`wmark.keys`) drive watermark schemes (:mod:`wmark.schemes`) embedded with
:class:`wmark.embed.Watermarker`; suspects (:mod:`wmark.suspects`) are questioned by tests that
:class:`wmark.evidence.Verifier` combines (weighted Holm over exact p-values from :mod:`wmark.stats`);
:func:`wmark.verify.assemble_tests` picks them for each workflow (:mod:`wmark.cli_verify`).
"""

__version__ = "0.1.0"
