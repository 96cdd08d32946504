"""The durable transcript: resume without re-asking, kill -9 mid-run, failed rows, cover traffic, digest."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import pytest
from httpkit import Counting, faulty_v2_app, memorising_model

from wmark import api
from wmark.errors import RuntimeFailure, UsageError
from wmark.keys import generate_key, save_key
from wmark.serve import BackgroundServer, build_app, serve_in_background
from wmark.transcript import Transcript, transcript_digest

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def key200(tmp_path_factory):
    key = generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=200)
    path = tmp_path_factory.mktemp("keys") / "owner.key"
    save_key(key, path)
    return key, path


@pytest.fixture(scope="module")
def model200(key200):
    return memorising_model(key200[0])


def _rows(path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT role, input_sha256, status FROM queries ORDER BY seq").fetchall()
    finally:
        db.close()


def _answered_so_far(path) -> int:
    try:
        return sum(r[2] == "ok" for r in _rows(path)) if path.exists() else 0
    except sqlite3.OperationalError:
        return 0  # the CLI has not created the tables yet


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wmark.cli import main; main()", *args]


def test_kill_9_mid_run_then_resume_repeats_no_answered_query(key200, model200, tmp_path):
    _, key_path = key200
    counter = Counting()
    app = build_app(model=model200, name="m", num_classes=10, input_shape=SHAPE, labels_only=True, on_infer=counter)
    transcript = tmp_path / "probe.sqlite"
    with serve_in_background(app) as server:
        args = ["verify", "api", "--key", str(key_path), "--suspect", server.url, "--model-name", "m", "--fixed",
                "--budget", "200", "--rate", "60", "--json"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(_cli(*args, "--transcript", str(transcript)), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if _answered_so_far(transcript) >= 40:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = _rows(transcript)
        answered = {h for _, h, s in at_kill if s == "ok"}
        # Rows are queued as pending before they are sent; at concurrency 1 at most one was in flight.
        unanswered = {h for _, h, s in at_kill if s == "pending"}
        assert 40 <= len(answered) < 200
        assert len(answered) + len(unanswered) == 200
        assert sum(counter.by_input.values()) >= len(answered)

        resumed = subprocess.run(_cli(*args, "--transcript", str(transcript)), capture_output=True, text=True,
                                 timeout=120, check=False)
        repeated = {h for h, n in counter.by_input.items() if n > 1}
        assert not repeated & answered
        assert repeated <= unanswered and len(repeated) <= 1
        assert len(counter.by_input) == 200

        counter.by_input = Counter()
        fresh = subprocess.run(_cli(*args, "--transcript", str(tmp_path / "fresh.sqlite")), capture_output=True,
                               text=True, timeout=120, check=False)
        assert counter.total == 200
    assert resumed.returncode == fresh.returncode == 0, resumed.stderr + fresh.stderr
    a, b = json.loads(resumed.stdout), json.loads(fresh.stdout)
    for field in ("decision", "status", "log10_p", "matches", "queries"):
        assert a[field] == b[field], field
    assert a["tests"][0]["details"]["probe"]["reused"]["trigger"] == len(answered)


def test_resume_after_the_server_died(key200, model200, tmp_path):
    _, key_path = key200
    transcript = tmp_path / "t.sqlite"
    seen = Counting()
    holder: dict[str, BackgroundServer] = {}

    def die_after_25(x) -> None:
        seen(x)
        if seen.total >= 25:
            server = holder["server"].server
            server.should_exit = server.force_exit = True
            # Hold the event loop so the shutdown wins the race against the requests still arriving;
            # a graceful drain could otherwise answer all of them before the server is gone.
            time.sleep(0.3)

    app = build_app(model=model200, name="m", num_classes=10, input_shape=SHAPE, labels_only=True,
                    on_infer=die_after_25)
    holder["server"] = server = BackgroundServer(app).start()
    with pytest.raises(RuntimeFailure,
                       match="stopped answering.*; answers so far are kept: .*, with the same transcript, to resume"):
        api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=60,
                          transcript=transcript, retries=1, timeout=2.0)
    server.stop()
    ok_before = [r for r in _rows(transcript) if r[2] == "ok"]
    assert 25 <= len(ok_before) < 60  # uvicorn drains open keep-alive connections while shutting down
    counter = Counting()
    again = build_app(model=model200, name="m", num_classes=10, input_shape=SHAPE, labels_only=True, on_infer=counter)
    with serve_in_background(again, port=server.port) as restarted:
        verdict = api.verify_remote(key=key_path, url=restarted.url, model_name="m", mode="fixed", max_queries=60,
                                    transcript=transcript)
    assert counter.total == 60 - len(ok_before)
    assert not set(counter.by_input) & {h for _, h, _ in ok_before}
    assert verdict.tests[0].queries == 60 and verdict.detected


def test_failed_rows_are_retried_on_resume_but_malformed_ones_are_not(key200, model200, tmp_path):
    _, key_path = key200
    transcript = tmp_path / "t.sqlite"
    plan = {"mode": "first"}

    def behaviour(n: int):
        if plan["mode"] == "first":
            return None if n % 3 == 0 else (500 if n % 3 == 1 else b"garbage")
        return None

    app, calls = faulty_v2_app(model200, name="m", shape=SHAPE, behaviour=behaviour)
    with serve_in_background(app) as server:
        first = api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=12,
                                  transcript=transcript, retries=0)
        statuses = Counter(r[2] for r in _rows(transcript))
        assert statuses == {"ok": 4, "failed": 4, "malformed": 4}
        assert first.tests[0].abstentions == 8
        plan["mode"] = "second"
        before = calls["requests"]
        second = api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=12,
                                   transcript=transcript, retries=0)
    assert calls["requests"] - before == 4
    assert second.tests[0].abstentions == 4
    assert second.tests[0].details["probe"]["reused"]["trigger"] == 8


def test_transcript_is_bound_to_its_key_and_suspect(tmp_path):
    path = tmp_path / "t.sqlite"
    Transcript(path, key_commitment="a" * 64, suspect="http://x/infer", protocol="v2").close()
    with pytest.raises(UsageError, match="another key commitment"):
        Transcript(path, key_commitment="b" * 64, suspect="http://x/infer", protocol="v2")
    with pytest.raises(UsageError, match="another suspect"):
        Transcript(path, key_commitment="a" * 64, suspect="http://y/infer", protocol="v2")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="not a wmark transcript"):
        Transcript(tmp_path / "junk.sqlite", key_commitment="a" * 64, suspect="s")


def _sqlite_state(path) -> tuple[bytes, list[str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return path.read_bytes(), [db.execute("PRAGMA journal_mode").fetchone()[0],
                                   *sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master"))]
    finally:
        db.close()


def test_a_query_log_and_a_transcript_refuse_each_other_untouched(tmp_path):
    """Both are SQLite files: given one for the other, each used to add its tables (and WAL mode) to the file
    before refusing it."""
    from wmark.schemes.querylog import TieBreakLog

    key = generate_key(owner="o", num_classes=10, input_shape=SHAPE, num_triggers=10)
    log, transcript, own = tmp_path / "log.sqlite", tmp_path / "t.sqlite", tmp_path / "own.sqlite"
    TieBreakLog(log, key=key).close()
    Transcript(transcript, key_commitment=key.commitment(), suspect="http://x/infer", protocol="v2").close()
    db = sqlite3.connect(own)
    db.execute("CREATE TABLE results (score REAL)")
    db.commit()
    db.close()
    for path, why in ((log, "it holds 'wmark-query-log/1' data"), (own, "it is another SQLite database")):
        before = _sqlite_state(path)
        with pytest.raises(UsageError, match=rf"^{path} is not a wmark transcript \({why}\); give a new "):
            Transcript(path, key_commitment=key.commitment(), suspect="http://x/infer", protocol="v2")
        assert _sqlite_state(path) == before
    for path in (transcript, own):
        before = _sqlite_state(path)
        with pytest.raises(UsageError, match=rf"^{path} is not a wmark query log \(it (holds 'wmark-transcript/1' "
                                             r"data|is another SQLite database)\); give the log"):
            TieBreakLog(path, key=key)
        assert _sqlite_state(path) == before


def test_digest_is_recomputable_and_tamper_evident(tmp_path):
    path = tmp_path / "t.sqlite"
    log = Transcript(path, key_commitment="a" * 64, suspect="http://x/infer", protocol="v2")
    (seq,) = log.begin([("0" * 64, "trigger")])
    log.finish(seq, status="ok", label=3, answer='{"x": 1}', answer_sha256="f" * 64)
    summary = log.summary()
    log.close()
    assert transcript_digest(path) == summary["sha256_chain"]
    db = sqlite3.connect(path)
    db.execute("UPDATE queries SET label = 4")
    db.commit()
    db.close()
    assert transcript_digest(path) != summary["sha256_chain"]


def test_cover_traffic_is_recorded_but_never_counted(key200, model200, tmp_path):
    _, key_path = key200
    counter = Counting()
    app = build_app(model=model200, name="m", num_classes=10, input_shape=SHAPE, labels_only=True, on_infer=counter)
    transcript = tmp_path / "t.sqlite"
    with serve_in_background(app) as server:
        plain = api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=30)
        plain_requests = counter.total
        covered = api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=30,
                                    transcript=transcript, cover_data="digits", cover_ratio=2.0)
        again = counter.total
        api.verify_remote(key=key_path, url=server.url, model_name="m", mode="fixed", max_queries=30,
                          transcript=transcript, cover_data="digits", cover_ratio=2.0)
    roles = Counter(r[0] for r in _rows(transcript))
    assert roles["trigger"] == 30 and 30 <= roles["cover"] <= 100
    assert again - plain_requests == 30 + roles["cover"]
    assert counter.total == again, "a resumed run re-asked cover queries"
    assert (covered.log10_p, covered.tests[0].matches, covered.tests[0].queries) == \
        (plain.log10_p, plain.tests[0].matches, plain.tests[0].queries)


def test_cover_data_of_another_shape_is_refused(key200, tmp_path):
    _, key_path = key200
    with pytest.raises(UsageError, match="cover data's inputs"):
        api.verify_remote(key=key_path, url="http://127.0.0.1:9", model_name="m", cover_data=str(_file28(tmp_path)))


def _file28(tmp_path):
    import torch

    from wmark.io import save_tensors

    path = tmp_path / "d28.safetensors"
    save_tensors({"x": torch.zeros(10, 1, 28, 28), "y": torch.arange(10)}, path)
    return path
