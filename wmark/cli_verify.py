"""``wmark verify``: three workflows, each with only the options it uses.

* ``wmark verify file``: a stolen model file, black-box on its outputs or ``--whitebox`` on its weights.
* ``wmark verify api``: a suspect prediction API over HTTP.
* ``wmark verify extraction``: a surrogate trained on the owner's marked API (a file or a URL), tested on
  the queries its maker's client sent (the API's query log) and the tie-break rule's committed inputs.

Each exits 0 when detected, 1 when not (or inconclusive), 2 on a usage error, 3 on a runtime error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from wmark import api, cli_evidence
from wmark.cli_common import (
    ARCH_HELP,
    DATA_HELP,
    EXIT_HELP,
    _emit,
    _handle_errors,
    _progress,
    check_outputs,
    refuse,
)
from wmark.errors import UsageError
from wmark.evidence import Verdict
from wmark.recording import tiebreak_files
from wmark.schemes.tiebreak import DEFAULT_LOG_ROUNDS, DEFAULT_QUERIES
from wmark.schemes.tiebreak.sequential import SEQUENTIAL_BUDGET, SEQUENTIAL_ROUND
from wmark.verify import Mode

SUSPECT_DEVICE_HELP = "A model-file suspect answers on this device: cpu, cuda, cuda:N or mps [default: CUDA when present]."
HTTP_OPTIONS = ("protocol", "model_name", "model_version", "input_name", "template", "token_env", "token_file", "rate",
                "timeout", "retries", "concurrency", "transcript", "transcript_sync", "cover_data", "cover_ratio")


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every workflow takes: the key, the suspect, alpha, output."""
    options = [
        click.option("--key", required=True, type=click.Path(dir_okay=False), help="Owner key file."),
        click.option("--alpha", default=1e-6, show_default=True, help="Bound on the false-accusation probability."),
        click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON document."),
        click.option("--report", default=None, type=click.Path(dir_okay=False),
                     help="Write an evidence report (HTML, with a .json twin)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _trigger_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How the trigger-set test asks: sequential (default) or fixed, and its budget."""
    fn = click.option("--budget", type=int, default=None,
                      help="Most trigger queries (default: every trigger).")(fn)
    fn = click.option("--fixed", is_flag=True,
                      help="Ask the whole budget and use the exact binomial tail (default: sequential, stopping "
                           "once the evidence suffices; anytime-valid).")(fn)
    return fn


def _http_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options for a suspect reached over HTTP (see wmark.remote.verify_remote)."""
    options = [
        click.option("--protocol", type=click.Choice(["v2", "tfserving", "json"]), default="v2", show_default=True,
                     help="Open Inference Protocol v2, TensorFlow Serving REST, or a JSON template."),
        click.option("--model-name", default=None, help="Model name on a v2/TF Serving server."),
        click.option("--model-version", default=None,
                     help="v2/TF Serving: the model version to ask (default: whichever the server picks)."),
        click.option("--input-name", default=None,
                     help="v2: input tensor name (default: the server's, else input-0 with the key's shape)."),
        click.option("--template", default=None, help="json protocol: torchserve, hf, or a template file."),
        click.option("--token-env", default=None, help="Environment variable holding a bearer token."),
        click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                     help="File holding a bearer token."),
        click.option("--rate", type=float, default=None, help="Most requests per second (each HTTP 429 slows down further)."),
        click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per answer."),
        click.option("--retries", type=int, default=3, show_default=True,
                     help="Retries (backoff with jitter, honouring Retry-After)."),
        click.option("--concurrency", type=int, default=1, show_default=True, help="Requests in flight at once."),
        click.option("--transcript", default=None, type=click.Path(dir_okay=False),
                     help="SQLite transcript; re-running the same command resumes from it."),
        click.option("--transcript-sync", type=click.Choice(["fsync", "process"]), default="fsync",
                     show_default=True,
                     help="fsync: each answer reaches the disk; process: survives kill -9, not an OS crash (faster)."),
        click.option("--cover-data", default=None, help="Dataset whose inputs serve as cover traffic."),
        click.option("--cover-ratio", type=float, default=1.0, show_default=True,
                     help="Mean cover queries per trigger query."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _provenance_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that check the owner's signed release before its key or files are trusted (wmark.signing)."""
    fn = click.option("--signed-model", default=None, type=click.Path(),
                      help="The owner's signed release (black-box; white-box checks --reference).")(fn)
    fn = click.option("--signer-key", default=None, type=click.Path(dir_okay=False),
                      help="The owner's public key (PEM): the release must be signed with it and the key must be the "
                           "one it was released under.")(fn)
    return fn


def _checked_release(verdict: Verdict, release: dict[str, Any] | None, *, key: str, report: str | None) -> None:
    """Record the signed release that was checked in the verdict, and write the report (again) with it."""
    if release is not None:
        verdict.tests[0].details["provenance"] = release
    if report is not None:
        api.write_report(verdict=verdict, key=key, path=report)


def _is_url(suspect: str) -> bool:
    return suspect.startswith(("http://", "https://"))


def _finish(verdict: Verdict, *, as_json: bool, unit: str = "queries") -> None:
    doc = verdict.to_dict()
    summary = (f"{doc['decision']} ({doc['kind']}): log10 p = {doc['log10_p']:.2f} at alpha = {verdict.alpha:g}, "
               f"{doc['matches']} matches in {doc['queries']} {unit}")
    if doc["message"]:
        summary += f"\n{doc['message']}"
    _emit(doc, as_json, summary)
    sys.exit(0 if verdict.detected else 1)


@click.group(epilog=EXIT_HELP)
def verify() -> None:
    """Test a suspect for the key's watermark: a stolen file, a suspect API, or extraction from your API."""


@verify.command("file", epilog=EXIT_HELP)
@_common
@click.option("--suspect", required=True, type=click.Path(dir_okay=False), help="Suspect model file (.safetensors).")
@click.option("--arch", default=None, help=ARCH_HELP + " (black-box: the architecture the suspect's weights fit)")
@_trigger_options
@click.option("--whitebox", is_flag=True, help="Read the suspect's weights instead of querying it (needs --reference).")
@click.option("--reference", default=None, type=click.Path(dir_okay=False),
              help="whitebox: the owner's marked model (written by `wmark embed --scheme weights`).")
@click.option("--anchor", default=None, type=click.Path(dir_okay=False),
              help="whitebox (recommended): the unmarked base model the reference was fine-tuned from; aligning "
                   "to it makes the null exact by construction.")
@_provenance_options
@click.option("--reference-signature", default=None, type=click.Path(dir_okay=False),
              help="whitebox, with --signer-key: the reference's signature bundle (default REFERENCE.sig).")
@click.option("--device", default=None, help=SUSPECT_DEVICE_HELP)
@_handle_errors
def verify_file(key: str, alpha: float, as_json: bool, report: str | None, suspect: str, arch: str | None,
                budget: int | None, fixed: bool, whitebox: bool, reference: str | None,
                anchor: str | None, signer_key: str | None, signed_model: str | None,
                reference_signature: str | None, device: str | None) -> None:
    """A stolen model file: query it on the key's triggers (black-box) or read its weights (--whitebox)."""
    check_outputs(report=report, reads=(key, suspect, reference, anchor, signed_model, reference_signature))
    release = cli_evidence.check_release(key=key, signer_key=signer_key, signed_model=signed_model,
                                         reference=reference if whitebox else None,
                                         reference_signature=reference_signature)
    if whitebox:
        refuse(["arch", "budget", "fixed", "device"], "to --whitebox (it reads weights, it asks no queries)")
        if reference is None:
            raise UsageError("--whitebox needs --reference (the owner's marked model file).")
        verdict = api.verify_whitebox(key=key, reference=reference, suspect=suspect, alpha=alpha, anchor=anchor)
        if anchor is None:
            click.echo("note: aligned to the marked reference (null checked empirically); pass --anchor with the "
                       "base model it was fine-tuned from for a null exact by construction.", err=True)
    else:
        refuse(["reference", "anchor"], "without --whitebox")
        if arch is None:
            raise UsageError("A black-box check of a model file needs --arch (the architecture its weights fit); or "
                             "read its weights with --whitebox --reference.")
        verdict = api.verify(key=key, arch=arch, suspect=suspect, alpha=alpha, mode="fixed" if fixed else "sequential",
                             max_queries=budget, device=device, progress=_progress())
    _checked_release(verdict, release, key=key, report=report)
    _finish(verdict, as_json=as_json, unit="bits" if whitebox else "queries")


@verify.command("api", epilog=EXIT_HELP)
@_common
@click.option("--suspect", required=True, help="The suspect API: http://host:port, .../v2/models/NAME or a JSON endpoint.")
@_trigger_options
@_http_options
@_provenance_options
@_handle_errors
def verify_api(key: str, alpha: float, as_json: bool, report: str | None, suspect: str, budget: int | None,
               fixed: bool, signer_key: str | None, signed_model: str | None, **http: Any) -> None:
    """A suspect prediction API: ask it the key's triggers over HTTP, with a transcript and cover traffic."""
    if not _is_url(suspect):
        raise UsageError(f"{suspect} is not an http(s) URL; for a model file use `wmark verify file`.")
    check_outputs(http["transcript"], report=report,
                  reads=(key, http["transcript"], http["token_file"], http["template"], signed_model))
    refuse([] if http["cover_data"] else ["cover_ratio"], "without --cover-data")
    release = cli_evidence.check_release(key=key, signer_key=signer_key, signed_model=signed_model, reference=None,
                                         reference_signature=None)
    verdict = api.verify_remote(key=key, url=suspect, alpha=alpha, mode="fixed" if fixed else "sequential",
                                max_queries=budget, report=report, progress=_progress(), **http)
    if release is not None:
        _checked_release(verdict, release, key=key, report=report)
    _finish(verdict, as_json=as_json)


@verify.command("extraction", epilog=EXIT_HELP)
@_common
@click.option("--suspect", required=True, help="The suspected surrogate: a model file or an API URL.")
@click.option("--log", default=None, type=click.Path(dir_okay=False),
              help="The query log your marked API wrote (`wmark serve --mark ... --log`); it says which mark.")
@click.option("--client", default=None, help="The API client suspected of training the suspect (with --log).")
@click.option("--rule", default=None, type=click.Path(dir_okay=False),
              help="tiebreak: the rule your API served with (it names the served model).")
@click.option("--served", default=None, type=click.Path(dir_okay=False),
              help="tiebreak: the served model file, only if it moved since the rule was built.")
@click.option("--holdout", default=None,
              help="tiebreak, only for a rule that commits no verification inputs: the owner's own inputs, never a "
                   "client's (" + DATA_HELP + ").")
@click.option("--rule-queries", type=int, default=DEFAULT_QUERIES, show_default=True,
              help="tiebreak: committed verification inputs asked (0 with --log: only the client's queries).")
@click.option("--log-queries", type=int, default=None,
              help="The client's logged inputs asked (default 1000 for a tie-break log, at most "
                   f"{SEQUENTIAL_BUDGET} with --log-sequential; 300 for a flip log).")
@click.option("--rounds", type=int, default=DEFAULT_LOG_ROUNDS, show_default=True,
              help="tiebreak log: rounds to ask them in (the later ones where the suspect's earlier answers put it "
                   "closest to a tie); 1: the references' ranking alone.")
@click.option("--log-sequential", is_flag=True,
              help="tiebreak log: ask until the evidence decides, the log runs out or --log-queries are asked "
                   f"(rounds of {SEQUENTIAL_ROUND}; anytime-valid e-process) instead of exactly --log-queries.")
@click.option("--arch", default=None, help=ARCH_HELP + " (a model-file suspect)")
@click.option("--with-scores", is_flag=True,
              help="tiebreak, a model-file suspect: read its probabilities instead of its labels (labels by default: "
                   "as strong for images, stronger for text in the panels measured).")
@click.option("--device", default=None, help=SUSPECT_DEVICE_HELP)
@_trigger_options
@_http_options
@_provenance_options
@_handle_errors
def verify_extraction(key: str, alpha: float, as_json: bool, report: str | None, suspect: str, log: str | None,
                      client: str | None, rule: str | None, served: str | None, holdout: str | None,
                      rule_queries: int, log_queries: int | None, rounds: int, log_sequential: bool, arch: str | None,
                      with_scores: bool, device: str | None, budget: int | None, fixed: bool,
                      signer_key: str | None, signed_model: str | None, **http: Any) -> None:
    """A surrogate of your marked API: ask it the client's logged queries and the rule's committed inputs."""
    if log is None and rule is None:
        raise UsageError("Give the query log your API wrote (--log, with --client) or the tie-break rule (--rule).")
    if log is not None and client is None:
        raise UsageError("--log needs --client (the API client suspected of training the suspect).")
    refuse(["client"] if log is None else [], "without --log")
    if rule is None:
        refuse(["served", "holdout", "rule_queries", "rounds", "log_sequential", "with_scores"],
               "without --rule (tie-break only)")
    if log is None:
        refuse(["log_queries", "rounds", "log_sequential"], "without --log")
    if log_sequential:
        refuse(["rounds"], f"to --log-sequential (it asks in rounds of {SEQUENTIAL_ROUND} until the evidence decides)")
    # a model-file suspect refuses --transcript below, with the sentence that says why
    check_outputs(http["transcript"] if _is_url(suspect) else None, report=report,
                  reads=(key, suspect, log, rule, served, http["transcript"], http["token_file"], http["template"],
                         signed_model))
    files = tiebreak_files(rule=rule, served=served, served_arch=None, holdout=holdout,
                           queries=1) if rule is not None and signer_key is not None else None
    release = cli_evidence.check_release(key=key, signer_key=signer_key, signed_model=signed_model, reference=None,
                                         reference_signature=None,
                                         owner_files=(rule, (files["served"] or None) if files else None))
    tests: dict[str, Any] = {"log": log, "client": client, "rule": rule, "served": served, "holdout": holdout,
                             "rule_queries": rule_queries, "log_queries": log_queries, "log_rounds": rounds,
                             "log_mode": "sequential" if log_sequential else "fixed"}
    mode: Mode = "fixed" if fixed else "sequential"
    if _is_url(suspect):
        refuse(["arch", "with_scores", "device"], "to an API suspect")
        refuse([] if http["cover_data"] else ["cover_ratio"], "without --cover-data")
        verdict = api.verify_remote(key=key, url=suspect, alpha=alpha, mode=mode, max_queries=budget, report=report,
                                    progress=_progress(), **tests, **http)
    else:
        refuse(HTTP_OPTIONS, "to a model-file suspect (they are for an API URL)")
        if arch is None:
            raise UsageError("A model-file suspect needs --arch (the architecture its weights fit).")
        verdict = api.verify(key=key, arch=arch, suspect=suspect, alpha=alpha, mode=mode, max_queries=budget,
                             labels_only=not with_scores, device=device, progress=_progress(), **tests)
    if release is not None or not _is_url(suspect):
        _checked_release(verdict, release, key=key, report=report)
    _finish(verdict, as_json=as_json)
