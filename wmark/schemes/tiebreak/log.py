"""The tie-break API's per-client log of near-tie inputs (SQLite), read by the log test."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wmark.errors import UsageError
from wmark.keys import Key
from wmark.schemes.api_mark import input_digest
from wmark.schemes.tiebreak.rule import top_pairs

if TYPE_CHECKING:
    from typing_extensions import Self  # a torch dependency; typing.Self needs Python 3.11

LOG_FORMAT = "wmark-tiebreak-log/1"
LOG_MIN_RATIO = 0.05


class TieBreakLog:
    """SQLite record of the inputs each client asked the tie-break API, near a tie of the served model.

    A surrogate fits its own training queries best, so testing it on exactly the inputs its maker sent
    (:func:`tiebreak_log_test`) is much stronger than on the owner's inputs. Only inputs whose served
    runner-up has at least ``LOG_MIN_RATIO`` of the top score are kept: a key-free filter (the served
    model's scores alone) that keeps the near ties the verification ranks (38 % of Fashion-MNIST queries)
    and drops the confident majority. Per-client query counts are kept as well. A ``meta`` table binds the
    log to one key (its commitment), so a log cannot be verified under another key.

    Args:
        path: The database file (created unless ``create`` is false).
        key: The owner's key; a log written under another key is refused.
        create: Make a new log if missing (the API does); verification opens existing logs only.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: Key, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UsageError(f"Tie-break log {self.path} does not exist; the tie-break API writes it "
                             "(`wmark attack extract --tiebreak RULE --api-log FILE`, or TieBreakAPI(log=...)).")
        if create and not self.path.parent.exists():
            raise UsageError(f"Directory {self.path.parent} does not exist; create it first.")
        try:
            # a server answers from worker threads; the lock serialises them on this one connection
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._lock = threading.Lock()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS inputs (
                    client TEXT NOT NULL, digest TEXT NOT NULL, input BLOB NOT NULL, ratio REAL NOT NULL,
                    created REAL NOT NULL, PRIMARY KEY (client, digest));
                CREATE TABLE IF NOT EXISTS clients (client TEXT PRIMARY KEY, queries INTEGER NOT NULL);
                """
            )
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path} is not a readable SQLite tie-break log ({exc}).") from None
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        expected = {"format": LOG_FORMAT, "key_commitment": key.commitment(), "num_classes": str(key.num_classes),
                    "input_shape": json.dumps(list(key.input_shape)), "min_ratio": repr(LOG_MIN_RATIO)}
        if not meta:
            if not create:
                raise UsageError(f"{self.path} is an empty tie-break log; the tie-break API writes it.")
            with self._db:
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(expected.items()))
            meta = expected
        if meta.get("format") != LOG_FORMAT:
            raise UsageError(f"{self.path} is not a wmark tie-break log (expected format {LOG_FORMAT}); an API-mark "
                             "log goes to --api-log instead.")
        if meta.get("key_commitment") != key.commitment():
            raise UsageError(f"The tie-break log {self.path} was written under another key; verify with the key "
                             "that served the API.")
        self.commitment = key.commitment()
        self.input_shape = tuple(json.loads(meta["input_shape"]))
        self.min_ratio = float(meta["min_ratio"])

    def record(self, client: str, inputs: np.ndarray, scores: np.ndarray) -> None:
        """Count one batch for ``client`` and keep its inputs near a tie of the served ``scores``."""
        ratio, _, _ = top_pairs(scores)
        now = time.time()
        rows = [(client, input_digest(x), np.ascontiguousarray(x, dtype="<f4").tobytes(), float(r), now)
                for x, r in zip(inputs, ratio) if r >= self.min_ratio]
        with self._lock, self._db:
            self._db.executemany("INSERT OR IGNORE INTO inputs VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute(
                "INSERT INTO clients VALUES (?, ?) ON CONFLICT(client) DO UPDATE SET queries = queries + ?",
                (client, len(inputs), len(inputs)),
            )

    def clients(self) -> dict[str, dict[str, int]]:
        """Per client: queries answered and inputs kept."""
        with self._lock:
            counts = self._db.execute("SELECT client, queries FROM clients").fetchall()
            kept = self._db.execute("SELECT client, COUNT(*) FROM inputs GROUP BY client").fetchall()
        out = {c: {"queries": int(q), "kept": 0} for c, q in counts}
        for c, n in kept:
            out.setdefault(c, {"queries": 0, "kept": 0})["kept"] = int(n)
        return out

    def inputs(self, client: str) -> np.ndarray:
        """The kept inputs of one client, in the order they were first asked (N×shape, float32).

        Raises:
            UsageError: If the log holds nothing for ``client``.
        """
        with self._lock:
            rows = self._db.execute("SELECT input FROM inputs WHERE client = ? ORDER BY rowid", (client,)).fetchall()
        if not rows:
            known = ", ".join(sorted(self.clients())) or "none"
            raise UsageError(f"The tie-break log {self.path} holds no inputs of client {client!r} (clients: {known}).")
        return np.stack([np.frombuffer(b, dtype="<f4") for (b,) in rows]).reshape(-1, *self.input_shape).copy()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

