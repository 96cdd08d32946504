"""Keys with fixed secrets, for statistical tests that must not fail by chance on one CI run in a hundred.

A test that checks a null distribution over "many fresh keys" at level 1e-3, several times, fails now and
then on a correct implementation. Over a fixed sample of keys the check is deterministic and no weaker:
the secrets are still unrelated to anything the tested models saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from wmark.keys import Key, generate_key

FIXED_CREATED = "2026-01-01T00:00:00+00:00"
"""The creation time of a fixed key: the commitment hashes it, and a trigger pass seeds its dropout from the
commitment, so a key stamped with the clock would train differently from one second to the next."""


def seeded_key(tag: str, **kwargs: Any) -> Key:
    """``generate_key(**kwargs)`` with its secret replaced by SHA-256 of ``tag`` and a fixed creation time."""
    kwargs.setdefault("owner", "Test Owner")
    key = generate_key(**kwargs)
    return dataclasses.replace(key, secret=hashlib.sha256(f"wmark-test-key/{tag}".encode()).digest(),
                               created=FIXED_CREATED)
