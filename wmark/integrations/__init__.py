"""Training-framework integrations: the Hugging Face ``Trainer`` (:mod:`.hf`) and Lightning (:mod:`.lightning`).

Imported on demand, so wmark itself does not need either framework.
"""
