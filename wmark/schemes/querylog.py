"""One per-client query log for both API-side marks (SQLite, format ``wmark-query-log/1``; ``wmark-query-log/1+text``
for a text key's log).

A marked API records, per client, what its extraction test will need: the tie-break mark keeps the inputs
near a tie of the served model (:meth:`QueryLog.record_near_ties`), the flip mark keeps its marked inputs with
their served top-1, candidate set and keyed label (:meth:`QueryLog.record_marks`); both count each client's
queries. A log keeps at most ``max_kept`` inputs per client (``LOG_MAX_KEPT`` unless the log was created with
another): the first ones, in the order asked; later ones are only counted, so a client cannot grow the log
without bound, and which inputs are kept depends on the order of the client's queries alone. The ``meta``
table binds the log to one key (its commitment) and names the mark that wrote it and that mark's parameters,
so verification reads the right test from the log itself and refuses a log written under another key. A text
key's log keeps each input as the exact UTF-8 bytes of the string the client sent; its format name differs, so
a reader of image logs refuses it instead of misreading it. :class:`TieBreakLog` and :class:`MarkLog` open a
log of one mark.

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME", num_classes=3, input_shape=(2,))
    >>> path = os.path.join(tempfile.mkdtemp(), "api.sqlite")
    >>> with TieBreakLog(path, key=key) as log:
    ...     log.record_near_ties("alice", np.zeros((2, 2), np.float32) + [[0], [1]], np.array([0.5, 0.01]))
    ...     log.clients()
    {'alice': {'queries': 2, 'kept': 1}}
    >>> QueryLog(path, key=key).mark
    'tiebreak'
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from wmark.errors import UsageError
from wmark.keys import Key
from wmark.text import shown_claim
from wmark.transcript import foreign_sqlite

if TYPE_CHECKING:
    from typing_extensions import Self  # a torch dependency; typing.Self needs Python 3.11

LOG_FORMAT = "wmark-query-log/1"
TEXT_LOG_FORMAT = "wmark-query-log/1+text"
MARKS = ("tiebreak", "flip")
LOG_MIN_RATIO = 0.05
LOG_MAX_KEPT = 100_000


def input_digest(x: np.ndarray) -> str:
    """Hex SHA-256 of one input's shape and little-endian float32 bytes (what the flip mark's PRF is keyed on)."""
    arr = np.ascontiguousarray(x, dtype="<f4")
    head = ("x".join(str(int(d)) for d in arr.shape) + ":").encode()
    return hashlib.sha256(head + arr.tobytes()).hexdigest()


def text_digest(text: str) -> str:
    """Hex SHA-256 of one text input's UTF-8 bytes (prefixed, so no image input shares it)."""
    return hashlib.sha256(b"text:" + text.encode("utf-8")).hexdigest()


class Decision(Protocol):
    """What the flip mark decided for one input (:class:`wmark.schemes.api_mark.MarkDecision`)."""

    @property
    def digest(self) -> str: ...

    @property
    def marked(self) -> bool: ...

    @property
    def top1(self) -> int: ...

    @property
    def candidates(self) -> tuple[int, ...]: ...

    @property
    def label(self) -> int: ...


class QueryLog:
    """The per-client SQLite log of a marked API (see the module docstring).

    Args:
        path: The database file.
        key: The owner's key; a log written under another key is refused.
        mark: ``tiebreak`` or ``flip``: required to create a log; when opening one, the mark it must hold
            (None: whichever).
        params: The mark's parameters, recorded in a new log (flip: ``rate`` and ``candidates``; tie-break:
            ``min_ratio``, default ``LOG_MIN_RATIO``; both: ``max_kept``, the most inputs kept per client, default
            ``LOG_MAX_KEPT``); checked against an existing log where given.
        create: Make a new log if missing (the API does); verification opens existing logs only.
        durability: ``"process"`` (each request's rows survive a crash of the server process, not a power cut;
            no fsync per request) or ``"fsync"`` (each request's rows reach the disk before it is answered,
            several milliseconds per request on most disks).

    Raises:
        UsageError: On a missing, unreadable or foreign log, another key, another mark or other parameters.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: Key, mark: str | None = None,
                 params: dict[str, Any] | None = None, create: bool = False, durability: str = "process") -> None:
        self.path = Path(path)
        if durability not in ("process", "fsync"):
            raise UsageError(f"Unknown query log durability {durability!r}; use process or fsync.")
        if mark is not None and mark not in MARKS:
            raise UsageError(f"Unknown API mark {mark!r}; use tiebreak or flip.")
        if not create and not self.path.is_file():
            raise UsageError(f"Query log {self.path} does not exist; the marked API writes it when serving with a "
                             "log.")
        if create and not self.path.parent.exists():
            raise UsageError(f"Directory {self.path.parent} does not exist; create it first.")
        # a refusal after this point must not leave behind a log this call made (an empty database); the file is
        # claimed exclusively, so a log another process created at the same moment is never taken for ours
        self._created = False
        if create:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                self._created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise UsageError(f"Cannot create the query log {self.path} ({exc.strerror}); choose a writable "
                                 "path.") from None
        try:
            self._open(key, mark, params, create, durability)
        except BaseException:
            self.discard()
            raise

    def _open(self, key: Key, mark: str | None, params: dict[str, Any] | None, create: bool,
              durability: str) -> None:
        try:
            # a server answers from worker threads; the lock serialises them on this one connection
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._lock = threading.Lock()
            self._kept: dict[str, int] = {}  # per client, once counted: inputs kept
            # another SQLite file (a verification transcript given as the log) is refused before anything is written
            foreign = foreign_sqlite(self._db, formats=(LOG_FORMAT, TEXT_LOG_FORMAT),
                                     tables=("meta", "inputs", "clients"))
            if foreign is not None:
                raise UsageError(f"{self.path} is not a wmark query log ({foreign}); give the log the marked API "
                                 "wrote, or a new path to serve with.")
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: commits survive the process, and no fsync per request (FULL's cost 3 ms of a 4 ms request)
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS inputs (
                    client TEXT NOT NULL, digest TEXT NOT NULL, input BLOB NOT NULL, ratio REAL,
                    top1 INTEGER, candidates TEXT, label INTEGER, created REAL NOT NULL,
                    PRIMARY KEY (client, digest));
                CREATE TABLE IF NOT EXISTS clients (client TEXT PRIMARY KEY, queries INTEGER NOT NULL);
                """
            )
            meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path} is not a readable SQLite query log ({exc}).") from None
        if not meta:
            if not create or mark is None:
                raise UsageError(f"{self.path} is an empty query log; the marked API writes it.")
            meta = self._initialise(key, mark, dict(params or {}))
        want = TEXT_LOG_FORMAT if key.kind == "text" else LOG_FORMAT
        if meta.get("format") in (LOG_FORMAT, TEXT_LOG_FORMAT) and meta.get("format") != want:
            raise UsageError(f"The query log {self.path} holds {'text' if want == LOG_FORMAT else 'image'} inputs, the "
                             f"key is for {key.kind} inputs; verify with the key that served the API.")
        if meta.get("format") != want:
            raise UsageError(f"{self.path} is not a wmark query log (expected format {want}); logs of earlier "
                             "versions are not read, serve again to write a new one.")
        if meta.get("key_commitment") != key.commitment():
            raise UsageError(f"The query log {self.path} was written under another key; verify with the key that "
                             "served the API.")
        if mark is not None and meta["mark"] != mark:
            raise UsageError(f"The query log {self.path} was written by the {meta['mark']} mark's API, not the "
                             f"{mark} mark's; use that mark's log.")
        self.mark = meta["mark"]
        self.text = want == TEXT_LOG_FORMAT
        self.commitment = key.commitment()
        self.input_shape = tuple(json.loads(meta["input_shape"]))
        self.params = json.loads(meta["params"])
        # a log from before logs recorded their rule has none to compare
        self.rule = meta.get("rule", "")
        for name, value in (params or {}).items():
            if self.params.get(name) != value:
                raise UsageError(f"The log {self.path} was written with {name} {self.params.get(name)}, not {value}; "
                                 "use a new log.")

    def _initialise(self, key: Key, mark: str, params: dict[str, Any]) -> dict[str, str]:
        params.setdefault("max_kept", LOG_MAX_KEPT)
        if type(params["max_kept"]) is not int or params["max_kept"] < 1:
            raise UsageError(f"A query log keeps at least one input per client; max_kept {params['max_kept']!r} is not "
                             "a positive integer.")
        if mark == "tiebreak":
            params.setdefault("min_ratio", LOG_MIN_RATIO)
        elif {"rate", "candidates"} - set(params):
            raise UsageError("A new flip-mark log records the marking rate and the candidate-set size; give both.")
        if mark == "flip" and key.kind == "text":
            raise UsageError("The flip mark serves image classifiers; mark a text API with the tie-break mark.")
        meta = {"format": TEXT_LOG_FORMAT if key.kind == "text" else LOG_FORMAT, "key_commitment": key.commitment(), "num_classes": str(key.num_classes),
                "input_shape": json.dumps(list(key.input_shape)), "mark": mark,
                "params": json.dumps(params, sort_keys=True)}
        with self._db:
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        return meta

    def check_rule(self, digest: str) -> None:
        """Tie-break: refuse a log written while another rule or served model answered (``digest``: the rule's
        :attr:`~wmark.schemes.tiebreak.TieBreakRule.served_digest`); its clients were answered with another head.

        Raises:
            UsageError: If the log records another rule.
        """
        if self.rule and self.rule != digest:
            raise UsageError(f"The query log {self.path} was written while another tie-break rule or served model "
                             "answered; use the rule and served model that wrote it, or a new log.")

    def bind_rule(self, digest: str) -> None:
        """Tie-break: the API answering into this log binds it to its rule (:meth:`check_rule`, then, in a log that
        records none and holds no client yet, record ``digest``). A log of an older wmark, with clients and no
        rule, stays unbound.

        Raises:
            UsageError: If the log records another rule.
        """
        self.check_rule(digest)
        with self._lock, self._db:
            if not self.rule and not self._db.execute("SELECT 1 FROM clients LIMIT 1").fetchone():
                self._db.execute("INSERT INTO meta VALUES (?, ?)", ("rule", digest))
                self.rule = digest

    @property
    def max_kept(self) -> int:
        """The most inputs kept per client (a log from before logs recorded it: ``LOG_MAX_KEPT``)."""
        return int(self.params.get("max_kept", LOG_MAX_KEPT))

    @property
    def min_ratio(self) -> float:
        """Tie-break mark: the least runner-up to top score ratio of a kept input."""
        return float(self.params["min_ratio"])

    @property
    def rate(self) -> float:
        """Flip mark: the marking rate."""
        return float(self.params["rate"])

    @property
    def candidates(self) -> int:
        """Flip mark: the candidate-set size."""
        return int(self.params["candidates"])

    def _count(self, client: str, n: int) -> None:
        self._db.execute("INSERT INTO clients VALUES (?, ?) ON CONFLICT(client) DO UPDATE SET queries = queries + ?",
                         (client, n, n))

    def _keep(self, client: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` of ``client`` (new digests only) up to ``max_kept`` kept per client; the caller holds the lock
        and the transaction."""
        kept = self._kept.get(client)
        if kept is None:
            kept = self._db.execute("SELECT COUNT(*) FROM inputs WHERE client = ?", (client,)).fetchone()[0]
        room = max(0, self.max_kept - kept)
        if room and rows:
            kept += self._db.executemany("INSERT OR IGNORE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                         rows[:room]).rowcount
        self._kept[client] = kept

    def record_near_ties(self, client: str, inputs: np.ndarray, ratios: np.ndarray) -> None:
        """Tie-break mark: count one batch for ``client`` and keep the inputs whose served runner-up to top score
        ratio is at least ``min_ratio`` (a key-free filter: the near ties the log test ranks), up to ``max_kept`` per
        client. A text log takes strings and keeps their UTF-8 bytes.

        Raises:
            UsageError: On strings for an image log or numbers for a text log.
        """
        now = time.time()
        rows = [(client, *self._encode(x), float(r), None, None, None, now)
                for x, r in zip(inputs, ratios) if r >= self.min_ratio]
        with self._lock, self._db:
            self._keep(client, rows)
            self._count(client, len(inputs))

    def _encode(self, x: Any) -> tuple[str, bytes]:
        """One input's digest and stored bytes."""
        value = x.item() if isinstance(x, np.generic) else x
        if self.text != isinstance(value, str):
            raise UsageError(f"The query log {self.path} keeps {'text' if self.text else 'image'} inputs; log "
                             f"{'strings' if self.text else 'float arrays'}.")
        if isinstance(value, str):
            return text_digest(value), value.encode("utf-8")
        return input_digest(x), np.ascontiguousarray(x, dtype="<f4").tobytes()

    def record_marks(self, client: str, inputs: np.ndarray, decisions: Sequence[Decision]) -> None:
        """Flip mark: count one batch for ``client`` and keep its marked inputs with their decisions, up to ``max_kept``
        per client."""
        now = time.time()
        rows = [(client, d.digest, np.ascontiguousarray(x, dtype="<f4").tobytes(), None, d.top1,
                 json.dumps(list(d.candidates)), d.label, now) for x, d in zip(inputs, decisions) if d.marked]
        with self._lock, self._db:
            self._keep(client, rows)
            self._count(client, len(decisions))

    def clients(self) -> dict[str, dict[str, int]]:
        """Per client: queries answered and inputs kept."""
        with self._lock:
            counts = self._db.execute("SELECT client, queries FROM clients").fetchall()
            kept = self._db.execute("SELECT client, COUNT(*) FROM inputs GROUP BY client").fetchall()
        out = {c: {"queries": int(q), "kept": 0} for c, q in counts}
        for c, n in kept:
            out.setdefault(c, {"queries": 0, "kept": 0})["kept"] = int(n)
        return out

    def _rows(self, client: str, limit: int | None) -> list[tuple[Any, ...]]:
        sql = "SELECT digest, input, top1, candidates, label FROM inputs WHERE client = ? ORDER BY rowid"
        with self._lock:
            bounded = limit is not None
            rows = self._db.execute(sql + (" LIMIT ?" if bounded else ""), (client, limit) if bounded else (client,))
            return rows.fetchall()

    def inputs(self, client: str, limit: int | None = None) -> np.ndarray:
        """The kept inputs of one client, in the order they were first asked (N×shape, float32; for a text log an
        object array of the strings, exactly as sent); with ``limit``, only the first ``limit`` of them.

        Rows are only ever appended (a client's repeated input is ignored, not moved) and read in rowid order, so
        the first ``limit`` stay the same while the API keeps logging.

        Raises:
            UsageError: If the log holds nothing for ``client``.
        """
        rows = self._rows(client, limit)
        if not rows:
            # client names come from the server's token file: control characters must not reach a terminal
            known = ", ".join(shown_claim(c, 80) for c in sorted(self.clients())) or "none"
            raise UsageError(f"The query log {self.path} holds no inputs of client {client!r} (clients: {known}).")
        if self.text:
            texts = np.empty(len(rows), dtype=object)
            texts[:] = [bytes(r[1]).decode("utf-8") for r in rows]
            return texts
        return np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).reshape(-1, *self.input_shape).copy()

    def records(self, client: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Flip mark: the marked inputs of one client with their decisions, in the order first answered (the first
        ``limit`` of them when given)."""
        return [{"digest": digest, "x": np.frombuffer(blob, dtype="<f4").reshape(self.input_shape).copy(),
                 "top1": int(top1), "candidates": json.loads(cands), "label": int(label)}
                for digest, blob, top1, cands, label in self._rows(client, limit)]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def discard(self) -> None:
        """Close the log and, if opening it created the file, delete it: for a server that refuses to start."""
        db = getattr(self, "_db", None)  # None when connecting itself failed
        if db is not None:
            db.close()
        if self._created:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TieBreakLog(QueryLog):
    """A :class:`QueryLog` of the tie-break mark (created if missing unless ``create`` is false)."""

    def __init__(self, path: str | os.PathLike[str], *, key: Key, create: bool = True,
                 durability: str = "process") -> None:
        super().__init__(path, key=key, mark="tiebreak", create=create, durability=durability)


class MarkLog(QueryLog):
    """A :class:`QueryLog` of the flip mark; a new one records ``rate`` and ``candidates``, an existing one is
    checked against them where given."""

    def __init__(self, path: str | os.PathLike[str], *, key: Key, rate: float | None = None,
                 candidates: int | None = None, create: bool = True, durability: str = "process") -> None:
        params = {name: value for name, value in (("rate", None if rate is None else float(rate)),
                                                  ("candidates", None if candidates is None else int(candidates)))
                  if value is not None}
        super().__init__(path, key=key, mark="flip", params=params, create=create, durability=durability)
