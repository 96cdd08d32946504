"""A durable record of every query sent to a suspect and every answer it gave (SQLite, WAL).

Each query is written as ``pending`` before it is sent and updated with its answer as soon as the answer
arrives, one committed transaction each. Answers are committed with ``synchronous=FULL`` (fsync'd: on disk
before the next one is counted, surviving even a power cut) unless ``durability="process"``; pending rows
only need to outlive the process (a lost one is simply sent again), so they skip the fsync. A process
killed with ``kill -9`` therefore loses at most the answers of requests that were in flight. Rows hold the SHA-256 of the input bytes, the answer (raw text and SHA-256), the parsed label, and
whether the query was a trigger or cover traffic. The file is bound to one key (by its public commitment,
never the secret) and one suspect URL, so a transcript cannot be replayed against another claim, and, once it
holds an answer, to the test plan of the run that gathered it (:mod:`wmark.testplan`): a fixed-n test is never
extended or changed on answers already seen, nor switched to or from a sequential one, and no test reads them
again under another tie-break rule, holdout, query log, alpha or e-process; the sequential trigger-set test may
raise its budget. A transcript an older wmark wrote without a plan, or with one that binds no rule, holdout or
log, resumes only sequentially, and is bound to this run's plan from then on.

Resuming (what :meth:`Transcript.lookup` reuses):

* ``ok`` — the answer is reused; the query is never sent again.
* ``malformed`` — the server did answer, with something that is not a prediction; it is reused as an
  abstention rather than paying for the same garbage again.
* ``failed`` (no answer after every retry: timeouts, 408/429/5xx, dropped connections) and ``pending`` (sent,
  but the process died before the answer was recorded) — sent again: they carry no information, and
  re-asking cannot bias the test because whether a query is re-asked never depends on its answer.

:func:`transcript_digest` is a SHA-256 chain over the rows in order; it goes into the evidence report so
the transcript can be checked later.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wmark import __version__
from wmark.errors import UsageError
from wmark.testplan import is_fixed, plan_refusal, unbound

FORMAT = "wmark-transcript/1"
FINAL_STATUSES = ("ok", "malformed")
# the answers that bind a transcript to its plan (a cover answer says nothing about the test)
_ANSWERED = "SELECT COUNT(*) FROM queries WHERE role = 'trigger' AND status IN ('ok', 'malformed')"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    wmark_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('trigger', 'cover')),
    input_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'malformed', 'failed')),
    label INTEGER,
    scores TEXT,
    answer TEXT,
    answer_sha256 TEXT,
    error TEXT,
    http_status INTEGER,
    attempts INTEGER,
    sent_at TEXT NOT NULL,
    answered_at TEXT
);
CREATE INDEX IF NOT EXISTS queries_by_input ON queries (input_sha256, status);
"""

MAX_ANSWER_CHARS = 65536
LEGACY_FIXED = ("The transcript {path} holds answers an older wmark recorded without their test plan, so a fixed-n "
                "test cannot be checked against them; start a new transcript (a sequential run may still resume it).")


def input_sha256(x: np.ndarray | str) -> str:
    """SHA-256 of one input's float32 little-endian bytes, prefixed by its shape (what was asked, exactly).

    A text input (a string) hashes as ``text|`` followed by its UTF-8 bytes.
    """
    if isinstance(x, str):
        return hashlib.sha256(b"text|" + x.encode("utf-8")).hexdigest()
    arr = np.ascontiguousarray(np.asarray(x, dtype="<f4"))
    h = hashlib.sha256(("x".join(map(str, arr.shape)) + "|").encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Recorded:
    """A row of the transcript as :meth:`Transcript.lookup` returns it."""

    seq: int
    role: str
    status: str
    label: int
    scores: tuple[float, ...] | None
    error: str


class Transcript:
    """One SQLite transcript file bound to a key commitment and a suspect.

    Args:
        path: The file (created if missing).
        key_commitment: The key's public commitment.
        suspect: The suspect's URL (or description).
        protocol: The wire protocol's name.
        template: What identifies the JSON protocol's template
            (:func:`~wmark.suspects.json_template.template_digest`; ``""`` for other protocols): the recorded labels
            were read by its extractors and class names, so no run under another one resumes them. A transcript an
            older wmark wrote without one is bound to this run's.
        durability: ``"fsync"`` (every answer reaches the disk before the next is counted) or ``"process"``
            (every answer survives the process being killed, but not an operating-system crash; faster on
            disks with slow fsync).
        plan: The run's test plan (:func:`wmark.testplan.verification_plan`), recorded while the transcript holds
            no answer; once it holds one, a run of another plan is refused (:func:`wmark.testplan.plan_refusal`),
            and so is a fixed-n run on answers an older wmark recorded without a plan (or without the inputs the
            plan binds). ``None``: none is checked.

    Raises:
        UsageError: If the file belongs to another key or suspect, or is not a transcript, or holds answers
            gathered under another test plan.
    """

    def __init__(self, path: str | os.PathLike[str], *, key_commitment: str, suspect: str,
                 protocol: str = "", template: str = "", durability: str = "fsync",
                 plan: dict[str, Any] | None = None) -> None:
        if durability not in ("fsync", "process"):
            raise UsageError(f"Unknown transcript durability {durability!r}; use fsync or process.")
        self._answer_sync = "FULL" if durability == "fsync" else "NORMAL"
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise UsageError(f"Directory {self.path.parent} for the transcript does not exist; create it first.")
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            # Another SQLite file (a query log given as the transcript) is refused before anything is written: the
            # schema below and WAL mode would otherwise change a file that is not a transcript.
            foreign = foreign_sqlite(self._db, formats=(FORMAT,), tables=("meta", "runs", "queries"))
            if foreign is not None:
                self._db.close()
                raise UsageError(f"{self.path} is not a wmark transcript ({foreign}); give a new transcript path.")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path} is not a wmark transcript ({exc}); give a new transcript path.") from None
        want = {"format": FORMAT, "key_commitment": key_commitment, "suspect": suspect, "protocol": protocol,
                "template": template}
        have = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        if have:
            for name, value in want.items():
                if name != "template" and have.get(name) != value:
                    self._db.close()
                    raise UsageError(
                        f"The transcript {self.path} was made for another {name.replace('_', ' ')} "
                        f"({have.get(name)!r}, not {value!r}); give a new transcript path."
                    )
            if have.get("template", template) != template:
                self._db.close()
                raise UsageError(f"The transcript {self.path} holds answers read under another JSON template; resume "
                                 "it with the template it was made with, or give a new transcript path.")
        with self._tx():
            # a transcript an older wmark wrote has no template row: it is bound to this run's from now on
            self._db.executemany("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                                 [*want.items(), ("created", _now())])
        recorded = json.loads(have["plan"]) if "plan" in have else None
        answered = self._db.execute(_ANSWERED).fetchone()[0]
        if plan is not None and answered:
            refusal = (plan_refusal(self.path, recorded, plan) if recorded is not None
                       else LEGACY_FIXED.format(path=self.path) if is_fixed(plan) else None)
            if refusal is not None:
                self._db.close()
                raise UsageError(refusal)
        older = recorded is None or unbound(recorded, plan) if plan is not None else False
        with self._tx():
            cur = self._db.execute("INSERT INTO runs (started_at, wmark_version) VALUES (?, ?)",
                                   (_now(), __version__))
            if plan is not None and (older or not answered):
                # no answer seen yet, so this run's plan becomes the transcript's; an older wmark's answers (seen
                # under a plan nobody recorded, or one that bound no rule, holdout, log, or sequential alpha or
                # budget) are bound to it from this run on, and the verdict says so
                since = [("plan_since_run", str(cur.lastrowid)),
                         ("plan_before", "none" if recorded is None else "unbound")] if answered else []
                self._db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                                     [("plan", json.dumps(plan, sort_keys=True)), *since])
        self.run = int(cur.lastrowid or 0)
        self.meta = want
        stored = dict(self._db.execute(
            "SELECT name, value FROM meta WHERE name IN ('plan', 'plan_since_run', 'plan_before')"))
        self.plan: dict[str, Any] | None = json.loads(stored["plan"]) if "plan" in stored else None
        self.plan_since_run = int(stored["plan_since_run"]) if "plan_since_run" in stored else None
        self._plan_before = stored.get("plan_before", "none")

    @property
    def plan_note(self) -> str:
        """A note for the verdict when earlier runs of the transcript recorded no plan, or one without the inputs its
        tests read (an older wmark), else ``""``."""
        if self.plan_since_run is None:
            return ""
        earlier = "Run 1" if self.plan_since_run == 2 else f"Runs 1 to {self.plan_since_run - 1}"
        if self._plan_before == "unbound":
            return (f"{earlier} of the transcript {self.path} recorded a test plan without the tie-break rule, holdout or "
                    "query log its tests read, or a sequential test's alpha or budget (an older wmark), so whether its "
                    "answers were read under other ones is unknown: the sequential test keeps its alpha on its own, not "
                    "combined with a verdict given before.")
        return (f"{earlier} of the transcript {self.path} recorded no test plan (an older wmark), so whether a fixed-n "
                "test was read on its answers is unknown: the sequential test keeps its alpha on its own, not combined "
                "with a verdict given before.")

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    def lookup(self, digest: str, role: str) -> Recorded | None:
        """The reusable answer to an input (``ok`` first, else ``malformed``), or ``None`` if it must be sent."""
        row = self._db.execute(
            "SELECT seq, role, status, label, scores, error FROM queries WHERE input_sha256 = ? AND role = ? "
            "AND status IN ('ok', 'malformed') ORDER BY (status = 'ok') DESC, seq DESC LIMIT 1",
            (digest, role),
        ).fetchone()
        if row is None:
            return None
        seq, role_, status, label, scores, error = row
        return Recorded(seq=seq, role=role_, status=status, label=-1 if label is None else int(label),
                        scores=tuple(json.loads(scores)) if scores else None, error=error or "")

    def begin(self, digests: list[tuple[str, str]]) -> list[int]:
        """Record queries about to be sent (``(input_sha256, role)`` pairs) as pending; return their rows."""
        seqs = []
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for digest, role in digests:
                cur = self._db.execute(
                    "INSERT INTO queries (run, role, input_sha256, status, sent_at) VALUES (?, ?, ?, 'pending', ?)",
                    (self.run, role, digest, _now()))
                seqs.append(int(cur.lastrowid or 0))
        return seqs

    def finish(self, seq: int, *, status: str, label: int = -1, scores: tuple[float, ...] | None = None,
               answer: str | None = None, answer_sha256: str | None = None, error: str = "",
               http_status: int | None = None, attempts: int = 1) -> None:
        """Record the answer to a pending query (committed before returning)."""
        if status not in ("ok", "malformed", "failed"):
            raise ValueError(f"unknown status {status!r}")
        self._db.execute(f"PRAGMA synchronous={self._answer_sync}")
        with self._tx():
            self._db.execute(
                "UPDATE queries SET status = ?, label = ?, scores = ?, answer = ?, answer_sha256 = ?, error = ?, "
                "http_status = ?, attempts = ?, answered_at = ? WHERE seq = ?",
                (status, label if status == "ok" else None, json.dumps(list(scores)) if scores else None,
                 None if answer is None else answer[:MAX_ANSWER_CHARS], answer_sha256, error or None, http_status,
                 attempts, _now(), seq))

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per role and status."""
        out: dict[str, dict[str, int]] = {}
        for role, status, n in self._db.execute("SELECT role, status, COUNT(*) FROM queries GROUP BY role, status"):
            out.setdefault(role, {})[status] = int(n)
        return out

    def summary(self) -> dict[str, Any]:
        """Path, binding, counts, number of runs and digest, for reports."""
        runs = int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        return {"path": str(self.path), "format": FORMAT, "key_commitment": self.meta["key_commitment"],
                "suspect": self.meta["suspect"], "protocol": self.meta["protocol"], "runs": runs,
                "plan": self.plan, "plan_since_run": self.plan_since_run,
                "counts": self.counts(), "sha256_chain": _chain(self._db)}


def answered_plan(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The test plan a transcript's answers are bound to, read without writing to the file: what a run resuming it
    must read the same way before it opens the transcript (:func:`wmark.testplan.recorded_log_read`). ``None``
    where the file does not exist, holds no answer yet, records no plan or is no transcript (:class:`Transcript`
    then says what to do)."""
    if not Path(path).is_file():
        return None
    try:
        db = sqlite3.connect(readonly_uri(path), uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name = 'plan'").fetchone()
            answered = db.execute(_ANSWERED).fetchone()[0]
        finally:
            db.close()
        return json.loads(row[0]) if row is not None and answered else None
    except (sqlite3.DatabaseError, json.JSONDecodeError):
        return None


def foreign_sqlite(db: sqlite3.Connection, *, formats: tuple[str, ...], tables: tuple[str, ...]) -> str | None:
    """What makes an SQLite database not one of ``formats`` (a phrase), or ``None`` if it is one or is empty.

    A database holding only some of ``tables`` and no format yet (one whose creation was cut short) is not
    foreign.

    Raises:
        sqlite3.DatabaseError: If the file is not an SQLite database.
    """
    found = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    found.discard("sqlite_sequence")
    row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone() if "meta" in found else None
    if row is not None and row[0] not in formats:
        return f"it holds {row[0]!r} data"
    if row is None and found - set(tables):
        return "it is another SQLite database"
    return None


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


_CHAIN_COLUMNS = ("seq", "run", "role", "input_sha256", "status", "label", "scores", "answer_sha256", "error",
                  "http_status", "attempts", "sent_at", "answered_at")


def _chain(db: sqlite3.Connection) -> str:
    h = hashlib.sha256(FORMAT.encode())
    meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    h.update(json.dumps(meta, sort_keys=True).encode())
    for row in db.execute(f"SELECT {', '.join(_CHAIN_COLUMNS)} FROM queries ORDER BY seq"):
        h = hashlib.sha256(h.digest() + json.dumps(dict(zip(_CHAIN_COLUMNS, row)), sort_keys=True).encode())
    return h.hexdigest()


def readonly_uri(path: str | os.PathLike[str]) -> str:
    """An SQLite URI opening ``path`` read-only, its ``#``, ``?`` and ``%`` escaped (as is, they end the path or
    start the query, so another file is opened, read-write)."""
    return Path(path).absolute().as_uri() + "?mode=ro"


def transcript_digest(path: str | os.PathLike[str]) -> str:
    """Recompute a transcript's digest: SHA-256 chained over its metadata and every row in order.

    Raises:
        UsageError: If the file is missing or not a transcript.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Transcript {p} does not exist.")
    try:
        db = sqlite3.connect(readonly_uri(p), uri=True)
        try:
            return _chain(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{p} is not a wmark transcript ({exc}).") from None
