"""Black-box verification of a suspect served over HTTP: the function behind ``wmark verify api`` and
``wmark verify extraction --suspect URL``.

It opens the suspect (checking the server, the model and the key fit), wraps it with a transcript and
cover traffic, runs the trigger-set test, and writes the evidence report. Concurrency is used by asking
``concurrency`` triggers per step in sequential mode (the test still consumes answers in key order and
stops at the first crossing; at most ``concurrency - 1`` answers past it are recorded but never counted).
"""

from __future__ import annotations

import os

import numpy as np

from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.keys import Key, load_key
from wmark.recording import record_tiebreak_files, tiebreak_files
from wmark.schemes.tiebreak.inputs import owner_texts
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.json_template import JsonTemplateProtocol, template_digest
from wmark.suspects.probe import CoverTraffic, ProbeSuspect
from wmark.suspects.tokens import read_token
from wmark.testplan import recorded_log_read, verification_plan
from wmark.text import TextInputs
from wmark.transcript import Transcript, answered_plan
from wmark.verify import DEFAULT_ALPHA, Mode, Verdict, Verifier, assemble_tests

PathLike = str | os.PathLike[str]


def verify_remote(*, key: PathLike, url: str, protocol: str = "v2", model_name: str | None = None,
                  model_version: str | None = None,
                  input_name: str | None = None, template: str | None = None, token_env: str | None = None, token_file: PathLike | None = None,
                  alpha: float = DEFAULT_ALPHA, mode: Mode = "sequential", max_queries: int | None = None,
                  rate: float | None = None, timeout: float = 10.0, retries: int = 3, concurrency: int = 1,
                  transcript: PathLike | None = None, transcript_sync: str = "fsync", cover_data: str | None = None, cover_ratio: float = 1.0,
                  report: PathLike | None = None, log: PathLike | None = None, client: str | None = None,
                  rule: PathLike | None = None, served: PathLike | None = None, served_arch: str | None = None,
                  holdout: str | None = None, rule_queries: int = 1000, log_queries: int | None = None,
                  log_rounds: int = 21, log_mode: Mode = "fixed", progress: bool = False) -> Verdict:
    """Verify a suspect prediction API with the key's trigger set (and optionally the API-side mark tests).

    Args:
        key: The owner's key file.
        url: The server or endpoint (``http://host:port``, ``.../v2/models/NAME``, or the JSON endpoint).
        protocol: ``v2``, ``tfserving`` or ``json``.
        model_name: The model's name on a v2 / TensorFlow Serving server (unless ``url`` names it).
        model_version: The model version to ask on a v2 / TensorFlow Serving server (default: the server's
            choice, which may change between runs).
        input_name: The v2 input tensor's name (default: the server's, or ``input-0`` when the server describes
            no inputs and the key's input spec is sent; the report says which).
        template: For ``json``: ``torchserve``, ``hf`` or a template file.
        token_env: Environment variable holding a bearer token.
        token_file: File holding a bearer token.
        alpha: Bound on the probability of accusing a model that never saw the key.
        mode: ``sequential`` (stop once the evidence suffices) or ``fixed``.
        max_queries: Trigger query budget (cover traffic and retries are not counted).
        rate: Most requests per second.
        timeout: Seconds to wait for one answer.
        retries: Further attempts after a failed request.
        concurrency: Requests in flight at once.
        transcript: SQLite transcript to record to and resume from.
        transcript_sync: ``fsync`` (each answer on disk before the next) or ``process`` (each answer survives
            the process being killed, not an operating-system crash).
        cover_data: Dataset spec whose test inputs serve as cover traffic.
        cover_ratio: Mean cover queries per trigger query.
        report: Write the evidence report here (HTML) and its JSON twin next to it.
        log: The owner's marked API's query log, with ``client``: also ask the suspect that client's logged
            queries (see :func:`wmark.verify.assemble_tests`, which assembles the tests for files and APIs alike).
        client: The API client suspected of training the suspect.
        rule: The tie-break rule the owner's API served with: also ask its committed inputs (``rule_queries``)
            and, with a tie-break log, the log test.
        served: The served model file, only if it moved since the rule was built.
        served_arch: Its architecture, only for a rule that records none.
        holdout: Only for a rule that commits no verification inputs: the owner's own inputs (dataset spec).
        rule_queries: Committed tie-break inputs to ask (0: none, only the log test).
        log_queries: Logged inputs to ask: for a tie-break log 1000 (``log_mode`` ``sequential``: at most
            10,000); 300 for a flip-mark log.
        log_mode: The tie-break log test: ``fixed`` (exactly ``log_queries`` in ``log_rounds``) or
            ``sequential`` (until the evidence suffices; anytime-valid).
        log_rounds: Fixed tie-break log test: in how many rounds (the later ones chosen from the suspect's earlier
            answers; the transcript replays them identically on resume).
        progress: Show a progress bar.

    Returns:
        The verdict; ``tests[0].details`` holds the probe's statistics, the server's self-description and
        the transcript summary.
    """
    k = load_key(key)
    if k.kind == "text" and protocol != "json":
        # v2 and TF Serving carry numeric tensors here (wmark serve answers text only at /hf/models/NAME), and
        # sending a string as one would fail on the first trigger rather than say what to do.
        raise UsageError(f"A text key asks its suspect strings, which the {protocol} protocol does not carry; use "
                         "--protocol json --template hf with the suspect's /hf/models/NAME endpoint.")
    # a transcript's answers were read with the client's first logged inputs its plan counts: read those again, not
    # the ones the API logged since
    log_read = recorded_log_read(answered_plan(transcript), client) if transcript is not None else None
    tests = assemble_tests(key=k, mode=mode, max_queries=max_queries, batch_size=concurrency, progress=progress,
                           log=log, client=client, rule=rule, served=served, served_arch=served_arch,
                           holdout=holdout, rule_queries=rule_queries, log_queries=log_queries, log_rounds=log_rounds,
                           log_mode=log_mode, log_read=log_read)
    token = read_token(env=token_env, file=os.fspath(token_file) if token_file else None)
    options = HttpOptions(timeout=timeout, retries=retries, rate=rate, concurrency=concurrency,
                          resumable=transcript is not None)
    cover = None
    if cover_data:
        cover = CoverTraffic(_cover_inputs(k, cover_data), ratio=cover_ratio, seed=k.seed("cover/traffic"))
    suspect = open_http_suspect(url=url, protocol=protocol, num_classes=k.num_classes,
                                input_shape=tuple(k.input_shape), model_name=model_name, template=template,
                                token=token, options=options, input_name=input_name,
                                version=model_version)
    record = None
    try:
        if transcript is not None:
            template_id = (template_digest(suspect.protocol.template)
                           if isinstance(suspect.protocol, JsonTemplateProtocol) else "")
            record = Transcript(transcript, key_commitment=k.commitment(), suspect=suspect.description,
                                protocol=protocol, template=template_id, durability=transcript_sync,
                                plan=verification_plan(tests, alpha=alpha, client=client))
        probe = ProbeSuspect(suspect, transcript=record, cover=cover)
        verdict = Verifier(key=k, alpha=alpha, tests=tests).run(suspect=probe, description=suspect.description)
        verdict.tests[0].details["probe"] = {
            "protocol": protocol, "endpoint": suspect.description, "server": suspect.server_info,
            **probe.stats.to_dict(),
            "http": {"requests": suspect.stats.requests, "retries": suspect.stats.retries,
                     "seconds_backing_off": round(suspect.stats.seconds_waiting, 3)},
            "options": {"rate": rate, "timeout": timeout, "retries": retries, "concurrency": concurrency,
                        "cover_ratio": cover_ratio if cover else 0.0, "cover_data": cover_data,
                        "token": "bearer" if token else "none"},
        }
        if record is not None:
            verdict.tests[0].details["transcript"] = record.summary()
            verdict.message = " ".join(filter(None, [verdict.message, record.plan_note]))
        files = tiebreak_files(rule=rule, served=served, served_arch=served_arch, holdout=holdout,
                               queries=rule_queries)
        if files is not None:  # the report names the rule and served model, so the tie-break test can be re-checked
            record_tiebreak_files(verdict, **files)
    finally:
        suspect.close()
        if record is not None:
            record.close()
    if report is not None:
        from wmark.report import write_report

        write_report(verdict=verdict, key=k, path=report)
    return verdict


def _cover_inputs(key: Key, spec: str) -> np.ndarray:
    """The cover inputs of a dataset: its test inputs, or for a text key its test texts the suspect can take.

    Raises:
        UsageError: If the data does not fit the key (other input shapes, or no texts for a text key).
    """
    ds = load_dataset(spec)
    text = TextInputs.from_key(key)
    if text is None:
        if tuple(ds.input_shape) != tuple(key.input_shape):
            raise UsageError(
                f"The cover data's inputs are {tuple(ds.input_shape)} but the key's are {tuple(key.input_shape)}; "
                "use data from the suspect's domain."
            )
        return ds.x_test.numpy()
    if ds.texts_test is None:
        raise UsageError(f"The cover data {spec} holds no texts but the key is a text key; use a text dataset such "
                         "as fortunes.")
    # A text suspect is asked strings, never token ids, and refuses a text longer than the key's maximum.
    return owner_texts(ds.texts_test, text)
