"""Watermarking schemes: what gets embedded into a model, derived entirely from the owner's key."""
