"""White-box watermark verification: read a suspect's weights, align them to the reference, test the bits.

:mod:`wmark.whitebox.chain` holds the layer chain and its rescaling-invariant canonical form of plain
conv/linear models (shared with the embedding scheme); :mod:`wmark.whitebox.graph` reads the unit spaces of
residual CNNs and BERT-style transformers from their real graph (``torch.fx`` or explicit rules;
:mod:`wmark.whitebox.decoder` holds those of Llama-style RMSNorm decoders, whose spaces are signed) into the
data classes of :mod:`wmark.whitebox.spaces`; :mod:`wmark.whitebox.plan` holds the alignment plan of a marked
layer and the binormalised form its mark lives in; :mod:`wmark.whitebox.align` aligns a suspect to the anchor
through that graph; :mod:`wmark.whitebox.verify` holds :func:`~wmark.whitebox.verify.verify_whitebox`, which
serves both.
"""
