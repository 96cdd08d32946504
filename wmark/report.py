"""Evidence reports: one self-contained HTML page (and a JSON twin) that a non-specialist can read.

The page states the claim, the key's public commitment and how anyone can check it once the key is
revealed, the suspect, the test with its null hypothesis, the p-value (as log10), alpha, the queries, a
plot of the evidence against the number of queries (matplotlib, embedded as a PNG data URI), the
transcript's digest, software versions and seeds, and what a third party needs to recompute the verdict
once the key is revealed (section 9, :mod:`wmark.recheck`). It never contains the key's secret or the trigger
inputs; for a model-file suspect it records the suspect's answer to each trigger asked, by the trigger's
SHA-256. The plot is drawn with matplotlib's object API on an Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import platform
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from wmark import __version__
from wmark.io import atomic_writes
from wmark.keys import Key
from wmark.stats import log10_to_p
from wmark.testplan import describe
from wmark.verify import Verdict

_PACKAGES = ("numpy", "scipy", "torch", "httpx", "uvicorn", "starlette", "matplotlib", "safetensors")


def software_versions() -> dict[str, str]:
    """Versions of Python, wmark and the libraries a verdict depends on."""
    out = {"wmark": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def json_twin(path: str | os.PathLike[str]) -> Path:
    """The JSON file written next to an HTML report (``report.html`` → ``report.json``)."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix.lower() in (".html", ".htm") else p.with_name(p.name + ".json")


def report_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The HTML page and the JSON twin a report path stands for.

    ``report.html`` gives ``report.json`` next to it; ``report.json`` gives ``report.html``, so the file a user
    named ``.json`` holds the JSON that ``wmark recheck`` reads, not the page.
    """
    p = Path(path)
    return (p.with_suffix(".html"), p) if p.suffix.lower() == ".json" else (p, json_twin(p))


def report_document(*, verdict: Verdict, key: Key) -> dict[str, Any]:
    """The report's content as a JSON-ready document (what the HTML page shows).

    It carries what :func:`wmark.recheck.recheck` needs to recompute the verdict once the key is revealed
    (the suspect's digests, every trigger's recorded answer or the transcript's digests) and ends with
    ``integrity.content_sha256``, the SHA-256 of everything else in canonical JSON.
    """
    from wmark.recheck import canonical_sha256, not_recheckable
    from wmark.signing import file_sha256

    doc = verdict.to_dict()
    # The probe and the transcript describe the run, not one test: found on whichever test carries them (the
    # first; an HTTP run records them there), never by which test's p-value is smallest.
    probe = next((t.details["probe"] for t in verdict.tests if t.details.get("probe")), None)
    trigger = next((t.details for t in verdict.tests if t.name == "trigger-set"), {})
    transcript = next((t.details["transcript"] for t in verdict.tests if t.details.get("transcript")), None)
    if transcript and Path(transcript["path"]).is_file():
        transcript = dict(transcript, file_sha256=file_sha256(transcript["path"]))
    has_record = trigger.get("answers") is not None or bool(transcript)
    # a white-box test records the files it read (reference, suspect, anchor) with their SHA-256
    model_files: dict[str, Any] = next((t.details["files"] for t in verdict.tests
                                        if t.name == "weights" and "files" in t.details), {})
    has_scores = bool((trigger.get("answers") or {}).get("scores"))
    body = {
        "format": "wmark-evidence/1",
        "generated_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "verdict": doc,
        "key": {"commitment": key.commitment(), "fingerprint": key.fingerprint(), "public": key.public_params()},
        "suspect": {"description": verdict.suspect, "probe": probe,
                    "file": trigger.get("suspect_file") or model_files.get("suspect") or _file_digest(verdict.suspect),
                    "transcript_sha256_chain": (transcript or {}).get("sha256_chain")},
        "transcript": transcript,
        "provenance": next((t.details["provenance"] for t in verdict.tests if "provenance" in t.details), None),
        "recheck": {
            "command": "wmark recheck --report REPORT.json --key REVEALED.key"
                       + (" --transcript TRANSCRIPT" if transcript else "")
                       + (" [--suspect S --reference R" + (" --anchor A" if model_files.get("anchor") else "") + "]"
                          if model_files else ""),
            "tests": {t.name: (not_recheckable({"name": t.name, "details": t.details}, has_record=has_record,
                                               has_scores=has_scores)
                               or ("recomputed from the revealed key and the bits read recorded here; with the "
                                   "files, re-read from them" if t.name == "weights" else
                                   "recomputed from the revealed key and the recorded answers"))
                      for t in verdict.tests},
        },
        "seeds": {
            "query_order": "derived from the key's secret (HMAC-SHA256, purpose 'trigger/order'); recomputable "
                           "once the key is revealed",
            "cover_traffic": "derived from the key's secret (purpose 'cover/traffic')"
            if (probe or {}).get("options", {}).get("cover_data") else "no cover traffic",
            "retry_jitter": "fresh randomness; it changes only when requests are sent, never which or in what "
                            "order answers are counted",
        },
        "software": software_versions(),
    }
    integrity: dict[str, str] = {"how": "content_sha256 is the SHA-256 of this document without it, as JSON with sorted "
                                "keys and no spaces; the file is that document as json.dumps(indent=2, "
                                "sort_keys=True) writes it; sign the file (wmark sign) to bind it to its author"}
    body["integrity"] = integrity
    integrity["content_sha256"] = canonical_sha256(body)
    return body


def write_report(*, verdict: Verdict, key: Key, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the HTML report and its JSON twin at :func:`report_paths` of ``path``; return the JSON document."""
    doc = report_document(verdict=verdict, key=key)
    page = render_html(doc, plot_png=_trajectory_png(verdict))
    secret_hex = key.secret.hex()
    text = json.dumps(doc, indent=2, sort_keys=True)
    if secret_hex in page or secret_hex in text:
        raise AssertionError("refusing to write a report that contains the key's secret")
    # One transaction for both: a page without its twin cannot be re-checked, a twin without its page misleads.
    with atomic_writes(*report_paths(path)) as (html_tmp, json_tmp):
        # A name that is not valid UTF-8 (a suspect's file name, as a lone surrogate) is written as its escape, the
        # way the JSON twin writes it.
        Path(html_tmp).write_text(page, encoding="utf-8", errors="backslashreplace")
        Path(json_tmp).write_text(report_text(doc), encoding="utf-8")
    return doc


def _file_digest(description: str) -> dict[str, str] | None:
    """The suspect's SHA-256 when it is a local file (a white-box suspect), so a holder of the file can match it."""
    from wmark.signing import file_sha256

    p = Path(description)
    return {"path": description, "sha256": file_sha256(p)} if p.is_file() else None


def report_text(doc: dict[str, Any]) -> str:
    """The exact text of a report's JSON twin (a re-check refuses a file that differs from it by one byte)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _trajectory_png(verdict: Verdict) -> bytes | None:
    tests = [t for t in verdict.tests if t.trajectory]
    if not tests:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    threshold = -math.log10(verdict.alpha)
    for t, color in zip(tests, ("#1f5f99", "#2e8b57", "#8e44ad", "#d35400")):
        # a test that updates its evidence once per round of queries records how many had been asked
        xs = t.details.get("trajectory_queries") or list(range(1, len(t.trajectory) + 1))
        ax.plot(xs, t.trajectory, marker="o", markersize=3, linewidth=1.6, color=color,
                label=f"{t.name}: log10 evidence (e-value)")
    ax.axhline(threshold, color="#b03a2e", linestyle="--", linewidth=1.2,
               label=f"decision threshold log10(1/alpha) = {threshold:g}")
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    # Head-room above the curve and the threshold keeps the legend clear of both.
    top = max([threshold, *(max(t.trajectory) for t in tests)])
    ax.set_ylim(min(0.0, *(min(t.trajectory) for t in tests)) - 0.3, top * 1.35 + 0.5)
    ax.set_xlabel("answered queries")
    ax.set_ylabel("log10 evidence")
    ax.set_title("Evidence against 'the suspect never saw the key', query by query", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def _alpha_text(alpha: float) -> str:
    exponent = math.log10(alpha)
    if abs(exponent - round(exponent)) < 1e-9:
        return f"10<sup>{round(exponent)}</sup>"
    return f"{alpha:g}"


def _p_text(log10_p: float, alpha: float) -> str:
    """The p-value, to as many significant digits as keep it on the side of alpha the decision is on."""
    if log10_p <= -300:
        return "below 10<sup>-300</sup>"
    detected = log10_p <= math.log10(alpha)
    p = log10_to_p(log10_p)
    digits = 4 if log10_p > -4 else 3
    while digits < 15 and (float(f"{p:.{digits - 1}e}") <= alpha) != detected:
        digits += 1
    if log10_p > -4:
        return f"{p:.{digits}g}"
    mantissa, exponent = f"{p:.{digits - 1}e}".split("e")
    return f"{mantissa} &times; 10<sup>{int(exponent)}</sup>"


def _log10_text(log10_p: float, alpha: float) -> str:
    """log10 p to two decimals, or as many more as keep it on the side of :func:`_log10_alpha_text` the
    decision is on (a log10 p of -2.996 is not -3.00 against alpha = 10^-3)."""
    if log10_p <= -300:
        return "below -300"
    detected = log10_p <= math.log10(alpha)
    shown_alpha = float(_log10_alpha_text(alpha))
    digits = 2
    while digits < 15 and (float(f"{log10_p:.{digits}f}") <= shown_alpha) != detected:
        digits += 1
    return f"{log10_p:.{digits}f}"


def _log10_alpha_text(alpha: float) -> str:
    return f"{math.log10(alpha):.6g}"


_CSS = """
body{font-family:Georgia,'DejaVu Serif',serif;color:#1d1d1d;background:#f4f4f1;margin:0;line-height:1.5}
main{max-width:900px;margin:0 auto;background:#fff;padding:32px 44px 40px;box-shadow:0 0 12px #0002}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
.sub{color:#555;margin:0 0 18px;font-size:.95em}
.verdict{padding:14px 18px;border-radius:6px;font-size:1.05em;margin:10px 0 6px}
.detected{background:#fbeaea;border-left:6px solid #b03a2e}
.not_detected{background:#eaf4ea;border-left:6px solid #2e7d32}
.inconclusive{background:#fff6e0;border-left:6px solid #c28b00}
table{border-collapse:collapse;width:100%;font-size:.93em;margin:6px 0}
th,td{text-align:left;vertical-align:top;padding:4px 8px;border-bottom:1px solid #eee}
th{width:32%;color:#444;font-weight:normal}
code,.mono{font-family:'DejaVu Sans Mono',Menlo,monospace;font-size:.86em;word-break:break-all}
pre{background:#f6f6f6;padding:8px 10px;overflow-x:auto;font-size:.85em;border-radius:4px}
img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:.9em}
footer{margin-top:30px;color:#777;font-size:.8em}
"""


def render_html(doc: dict[str, Any], *, plot_png: bytes | None) -> str:
    """The HTML page for a report document (self-contained: inline CSS, the plot as a data URI)."""
    v = doc["verdict"]
    key = doc["key"]
    public = key["public"]
    test = v["tests"][0] if v["tests"] else {}
    probe = (doc["suspect"] or {}).get("probe") or {}
    status = "inconclusive" if v["status"] == "inconclusive" else v["decision"]
    owner = _e(v["owner"])
    suspect = _e(v["suspect"])
    headline = {
        "detected": f"<b>Detected.</b> The suspect's answers carry the watermark of the key committed to by "
                    f"{owner}: evidence this strong would arise by chance with probability at most "
                    f"{_p_text(v['log10_p'], v['alpha'])}, below the bound alpha = {_alpha_text(v['alpha'])} fixed in advance.",
        "not_detected": f"<b>Not detected.</b> The suspect's answers do not show {owner}'s watermark at the bound "
                        f"alpha = {_alpha_text(v['alpha'])}. This does not prove independence; it means the evidence is "
                        "insufficient for an accusation.",
        "inconclusive": f"<b>Inconclusive.</b> {_e(v['message'])} Evidence so far: p-value at most "
                        f"{_p_text(v['log10_p'], v['alpha'])} (needs alpha = {_alpha_text(v['alpha'])}).",
    }[status]
    # An inconclusive headline quotes the message; otherwise it still holds caveats (an assumption, what the
    # suspect's file records) that the reader must see next to the verdict.
    caveat = f"<p class='note'>{_e(v['message'])}</p>" if v.get("message") and status != "inconclusive" else ""
    matches, answered = test.get("matches", 0), test.get("queries", 0) - test.get("abstentions", 0)
    null = test.get("null", {})
    claim = (f"{owner} claims that the model answering at <span class='mono'>{suspect}</span> was derived from a "
             f"model {owner} trained with a secret watermark: a set of {_e(public['schemes'].get('trigger', {}).get('n', '?'))} "
             "unusual inputs (triggers) with secretly chosen labels. A model that never saw the secret key agrees "
             f"with those labels only by chance (probability 1 in {_e(public['num_classes'])} per input); a copy keeps "
             "agreeing far more often.")
    commit_rows = _rows([
        ("Commitment (SHA-256)", f"<span class='mono'>{_e(key['commitment'])}</span>"),
        ("Owner", owner), ("Key created", _e(public["created"])),
        ("Classes", _e(public["num_classes"])), ("Input shape", _e(public["input_shape"])),
        ("Scheme parameters", f"<span class='mono'>{_e(json.dumps(public['schemes'], sort_keys=True))}</span>"),
    ])
    sent = probe.get("sent", {})
    reused = probe.get("reused", {})
    http_stats = probe.get("http", {})
    suspect_rows = [("Address", f"<span class='mono'>{suspect}</span>")]
    if probe:
        server = probe.get("server") or {}
        outputs = ", ".join(f"{o.get('name')} {o.get('datatype')} {o.get('shape')}" for o in server.get("outputs", []))
        suspect_rows += [
            ("Protocol", _e(probe.get("protocol"))),
            ("Model (as the server describes it)", _e(server.get("model", "not described"))
             + (f"; outputs: {_e(outputs)}" if outputs else "")),
            ("Answers received", "labels with scores" if probe.get("answers_with_scores") else "top-1 labels only"),
            *([("Input sent", _e(server["note"]))] if server.get("input_from") == "key" else []),
            ("Authentication", _e(probe.get("options", {}).get("token", "none"))),
        ]
    test_rows = _rows([
        ("Test", _e(test.get("name", ""))),
        ("Null hypothesis", _e("The suspect never saw the key; each answer matches the secret label with "
                               f"probability exactly {null.get('p0', 0):.4g} ({null.get('distribution', '')})")),
        ("Why the null holds", _e(null.get("why", ""))),
        ("Method", _e(test.get("method", ""))),
        ("Mode", _e(test.get("details", {}).get("mode", ""))),
        ("Matches", (f"{matches} of {answered} answered trigger queries"
                     f" (chance level: about {answered * null.get('p0', 0):.1f})")),
        ("Abstentions (failed or malformed answers, never counted as matches)", _e(test.get("abstentions", 0))),
        ("log10 p-value", _log10_text(v["log10_p"], v["alpha"])), ("p-value", _p_text(v["log10_p"], v["alpha"])),
        ("alpha (false-accusation bound)", f"{_alpha_text(v['alpha'])} (log10 = {_log10_alpha_text(v['alpha'])})"),
        ("Decision", _e(f"{v['decision']} ({v['status']})")),
    ])
    query_rows = _rows([
        ("Trigger queries counted", _e(v["queries"])),
        (("Trigger queries sent in this run / reused from the transcript (answers that arrived after the "
          "evidence sufficed are recorded but not counted)"),
         _e(f"{sent.get('trigger', v['queries'])} / {reused.get('trigger', 0)}")),
        ("Cover queries (ordinary inputs, not counted)",
         _e(f"{sent.get('cover', 0)} sent, {reused.get('cover', 0)} reused")),
        ("HTTP requests / retries", _e(f"{http_stats.get('requests', 'n/a')} / {http_stats.get('retries', 'n/a')}")),
    ])
    plot = (f"<img alt='log10 evidence against queries' src='data:image/png;base64,"
            f"{base64.b64encode(plot_png).decode()}'>" if plot_png else
            "<p class='note'>This was a fixed-size test: a single exact p-value is computed once every planned "
            "query is answered, so there is no running evidence to plot.</p>")
    transcript = doc.get("transcript")
    if transcript:
        counts = "; ".join(f"{role}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
                           for role, c in sorted(transcript["counts"].items()))
        transcript_html = "<table>" + _rows([
            ("File", f"<span class='mono'>{_e(transcript['path'])}</span>"),
            ("Digest (SHA-256 chain over every row)", f"<span class='mono'>{_e(transcript['sha256_chain'])}</span>"),
            ("Rows", _e(counts)), ("Runs (a resumed probe adds one)", _e(transcript["runs"])),
            ("Test plan (a resumed run must keep it; a sequential trigger-set test may raise its budget)",
             _e(describe(transcript["plan"]) if transcript.get("plan") else "not recorded (an older wmark)")),
        ]) + "</table>" + ("<p class='note'>Every query is recorded before it is sent and every answer as it arrives, with "
              "SHA-256 hashes of the input and of the raw answer. Recompute the digest with <code>python -c "
              "\"from wmark.transcript import transcript_digest; print(transcript_digest('FILE'))\"</code>.</p>")
    else:
        transcript_html = "<p class='note'>No transcript was kept for this run.</p>"
    all_tests_html = ""
    if len(v["tests"]) > 1:
        head = ("<tr><th>Test</th><th>A rejection shows</th><th>Null distribution and why it holds</th>"
                "<th>Assumption</th><th>Queries</th><th>Weight</th><th>log10 p</th><th>adjusted</th></tr>")
        body = "".join(
            f"<tr><td>{_e(t.get('name', ''))}</td><td>{_e(t.get('evidence_of', ''))}</td>"
            f"<td>{_e(t.get('null', {}).get('distribution', ''))}: {_e(t.get('null', {}).get('why', ''))}</td>"
            f"<td>{_e(t.get('null', {}).get('assumption', 'none'))}</td><td>{_e(t.get('queries', 0))}</td>"
            f"<td>{t.get('weight', 1.0):g}</td><td>{_log10_text(t.get('log10_p', 0.0), v['alpha'])}</td>"
            f"<td>{_log10_text(t.get('adjusted_log10_p', t.get('log10_p', 0.0)), v['alpha'])}</td></tr>"
            for t in v["tests"])
        weighted = v.get("correction") == "weighted holm"
        how = ("Holm's correction, weighted by each test's prior weight (fixed by the kind of test before any "
               "answer; a test of weight w among weights summing to W is judged at alpha w / W first)"
               if weighted else "Holm's correction")
        all_tests_html = (f"<h2>4b. Every test, combined</h2><table>{head}{body}</table><p class='note'>The tests are "
                          f"combined with {how}, which keeps the false-accusation bound alpha over all of "
                          f"them; the combined log10 p-value is {_log10_text(v['log10_p'], v['alpha'])}. The verdict names the kind of "
                          f"evidence found: {_e(v.get('kind', ''))}.</p>")
    software = _rows([(k, f"<span class='mono'>{_e(val)}</span>") for k, val in doc["software"].items()])
    seeds = _rows([(k.replace("_", " "), _e(val)) for k, val in doc["seeds"].items()])
    recheck_html = _recheck_html(doc)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Watermark evidence report: {suspect}</title><style>{_CSS}</style></head>
<body><main>
<h1>Watermark evidence report</h1>
<p class="sub">Generated {_e(doc['generated_at'])} by wmark {_e(doc['software']['wmark'])}</p>
<div class="verdict {status}">{headline}</div>{caveat}
<h2>1. The claim</h2><p>{claim}</p>
<h2>2. The key commitment, and how to check it</h2>
<table>{commit_rows}</table>
<p>The commitment is a SHA-256 hash of the key's public parameters and of a hash of its secret. {owner}
published (or timestamped) it before this verification. The secret itself is not in this report. To check the
claim later, {owner} reveals the key file; anyone then recomputes the commitment with
<code>python -c "from wmark.keys import load_key; print(load_key('KEY_FILE').commitment())"</code> and compares it
with the value above. Because the triggers, their labels and the order of the queries are all derived from
that secret, they could not have been chosen after looking at the suspect, and the same key reproduces
exactly the queries recorded in the transcript.</p>
<h2>3. The suspect</h2><table>{_rows(suspect_rows)}</table>
<h2>4. The test and its result</h2><table>{test_rows}</table>
<p class="note">The p-value bounds the probability that a model which never saw the key would produce evidence
at least this strong. The decision rule (detect when p &le; alpha) was fixed before any query.</p>
{all_tests_html}
<h2>5. Queries</h2><table>{query_rows}</table>
<h2>6. Evidence, query by query</h2>{plot}
<p class="note">The curve is the running log10 e-value; crossing the dashed line (1/alpha) is a detection. By
Ville's inequality a model that never saw the key crosses it with probability at most alpha, however long the
probe runs and whenever it stops.</p>
<h2>7. Transcript</h2>{transcript_html}
<h2>8. Software and seeds</h2><table>{software}</table><table>{seeds}</table>
{recheck_html}
<footer>Key fingerprint {_e(key['fingerprint'])}. This page is self-contained; its JSON twin holds the same
content in machine-readable form.</footer>
</main></body></html>
"""


def _recheck_html(doc: dict[str, Any]) -> str:
    """Section 9: how anyone recomputes the verdict, what each test allows, and the provenance checked."""
    recheck = doc.get("recheck") or {}
    rows = [("Command", f"<code>{_e(recheck.get('command', ''))}</code>")]
    rows += [(f"Test {name}", _e(how)) for name, how in recheck.get("tests", {}).items()]
    suspect_file = (doc.get("suspect") or {}).get("file")
    if suspect_file:
        rows.append(("Suspect file SHA-256", f"<span class='mono'>{_e(suspect_file['sha256'])}</span>"))
    weights: dict[str, Any] = next((t["details"] for t in doc["verdict"]["tests"] if t["name"] == "weights"), {})
    rows += [(f"{role.capitalize()} file SHA-256", f"<span class='mono'>{_e(f['sha256'])}</span>")
             for role, f in (weights.get("files") or {}).items() if f and role != "suspect"]
    rows.append(("Content digest of the JSON twin",
                 f"<span class='mono'>{_e(doc.get('integrity', {}).get('content_sha256', ''))}</span>"))
    prov = doc.get("provenance")
    if prov:
        signer = f"{_e(prov.get('signer_kind'))} <span class='mono'>{_e(prov.get('signer'))}</span>"
        rows += [("Signed release checked", f"<span class='mono'>{_e(prov.get('model'))}</span>, signed by {signer}"),
                 ("Release signed at", f"{_e(prov.get('signed_at'))} ({_e(prov.get('signed_at_is'))})")]
    return ("<h2>9. Re-checking this verdict</h2><table>" + _rows(rows) + "</table><p class='note'>Once the key is "
            "revealed, the command regenerates the triggers from it, replays the recorded answers through the same "
            "test code and says whether the decision and log10 p-value match (exit 0), differ (1) or whether the "
            "report, transcript or key was tampered with (2). It never needs the suspect.</p>")
