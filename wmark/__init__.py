"""wmark: prove who owns a machine-learning model.

Keys (:mod:`wmark.keys`) drive watermark schemes (:mod:`wmark.schemes`) embedded with
:class:`wmark.embed.Watermarker`; suspects (:mod:`wmark.suspects`) are questioned by
:mod:`wmark.verify`, whose tests come from :mod:`wmark.stats`.
"""

__version__ = "0.1.0"
