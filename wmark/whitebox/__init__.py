"""White-box watermark verification: read a suspect's weights, align them to the reference, test the bits.

:mod:`wmark.whitebox.chain` holds the layer chain and its rescaling-invariant canonical form (shared with
the embedding scheme); :mod:`wmark.whitebox.verify` holds :func:`~wmark.whitebox.verify.verify_whitebox`.
"""
