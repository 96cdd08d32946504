"""Black-box verification of a suspect served over HTTP: the file-level function behind ``wmark verify --suspect URL``.

It opens the suspect (checking the server, the model and the key fit), wraps it with a transcript and
cover traffic, runs the trigger-set test, and writes the evidence report. Concurrency is used by asking
``concurrency`` triggers per step in sequential mode (the test still consumes answers in key order and
stops at the first crossing; at most ``concurrency - 1`` answers past it are recorded but never counted).
"""

from __future__ import annotations

import os

from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.keys import load_key
from wmark.suspects.http import HttpOptions, open_http_suspect, read_token
from wmark.suspects.probe import CoverTraffic, ProbeSuspect
from wmark.transcript import Transcript
from wmark.verify import DEFAULT_ALPHA, Mode, Verdict, decide, trigger_set_test

PathLike = str | os.PathLike[str]


def verify_remote(*, key: PathLike, url: str, protocol: str = "v2", model_name: str | None = None,
                  template: str | None = None, token_env: str | None = None, token_file: PathLike | None = None,
                  alpha: float = DEFAULT_ALPHA, mode: Mode = "sequential", max_queries: int | None = None,
                  rate: float | None = None, timeout: float = 10.0, retries: int = 3, concurrency: int = 1,
                  transcript: PathLike | None = None, transcript_sync: str = "fsync", cover_data: str | None = None, cover_ratio: float = 1.0,
                  report: PathLike | None = None, tiebreak: PathLike | None = None, served: PathLike | None = None,
                  served_arch: str | None = None, holdout: str | None = None, tiebreak_queries: int = 1000,
                  tiebreak_log: PathLike | None = None, client: str | None = None, log_queries: int = 1000,
                  log_rounds: int = 21, progress: bool = False) -> Verdict:
    """Verify a suspect prediction API with the key's trigger set (and optionally the tie-break test).

    Args:
        key: The owner's key file.
        url: The server or endpoint (``http://host:port``, ``.../v2/models/NAME``, or the JSON endpoint).
        protocol: ``v2``, ``tfserving`` or ``json``.
        model_name: The model's name on a v2 / TensorFlow Serving server (unless ``url`` names it).
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
        tiebreak: A tie-break rule file (:mod:`wmark.schemes.api_tiebreak`): also ask the suspect the first
            ``tiebreak_queries`` verification inputs the rule commits (pairs from ``served``, architecture
            ``served_arch``), through the same transcript; Holm-combined with the trigger-set test.
        served: The owner's served model file the rule was built from.
        served_arch: Its architecture.
        holdout: Only for a rule that commits no verification inputs: the owner's own inputs (dataset spec),
            never a client's; the ``tiebreak_queries`` nearest to a tie of ``served`` are asked.
        tiebreak_queries: How many verification inputs to ask (0: none, only the log test).
        tiebreak_log: The tie-break API's log (with ``tiebreak`` and ``client``): also ask the suspect
            ``log_queries`` of the inputs ``client`` asked (:func:`~wmark.schemes.api_tiebreak.tiebreak_log_test`).
        client: The API client suspected of training the suspect.
        log_queries: How many of the client's logged inputs to ask.
        log_rounds: In how many rounds (the later ones chosen from the suspect's earlier answers; the
            transcript replays them identically on resume).
        progress: Show a progress bar.

    Returns:
        The verdict; ``tests[0].details`` holds the probe's statistics, the server's self-description and
        the transcript summary.
    """
    from wmark.schemes.api_tiebreak import (
        check_log_options,
        committed_test_wanted,
        tiebreak_log_test_from_files,
        tiebreak_requested,
        tiebreak_test_from_files,
        trigger_share,
    )

    k = load_key(key)
    with_tiebreak = tiebreak_requested(rule=tiebreak, served=served, arch=served_arch, holdout=holdout)
    check_log_options(log=tiebreak_log, client=client, with_tiebreak=with_tiebreak)
    committed = with_tiebreak and committed_test_wanted(queries=tiebreak_queries, log=tiebreak_log)
    token = read_token(env=token_env, file=os.fspath(token_file) if token_file else None)
    options = HttpOptions(timeout=timeout, retries=retries, rate=rate, concurrency=concurrency)
    cover = None
    if cover_data:
        ds = load_dataset(cover_data)
        if tuple(ds.input_shape) != tuple(k.input_shape):
            raise UsageError(
                f"The cover data's inputs are {tuple(ds.input_shape)} but the key's are {tuple(k.input_shape)}; "
                "use data from the suspect's domain."
            )
        cover = CoverTraffic(ds.x_test.numpy(), ratio=cover_ratio, seed=k.seed("cover/traffic"))
    suspect = open_http_suspect(url=url, protocol=protocol, num_classes=k.num_classes,
                                input_shape=tuple(k.input_shape), model_name=model_name, template=template,
                                token=token, options=options)
    log = None
    try:
        if transcript is not None:
            log = Transcript(transcript, key_commitment=k.commitment(), suspect=suspect.description,
                             protocol=protocol, durability=transcript_sync)
        probe = ProbeSuspect(suspect, transcript=log, cover=cover)
        test = trigger_set_test(key=k, suspect=probe, alpha=alpha, mode=mode, max_queries=max_queries,
                                batch_size=concurrency, progress=progress,
                                share=trigger_share(other_tests=committed, log_test=tiebreak_log is not None))
        test.details["probe"] = {
            "protocol": protocol, "endpoint": suspect.description, "server": suspect.server_info,
            **probe.stats.to_dict(),
            "http": {"requests": suspect.stats.requests, "retries": suspect.stats.retries,
                     "seconds_backing_off": round(suspect.stats.seconds_waiting, 3)},
            "options": {"rate": rate, "timeout": timeout, "retries": retries, "concurrency": concurrency,
                        "cover_ratio": cover_ratio if cover else 0.0, "cover_data": cover_data,
                        "token": "bearer (from --token-env/--token-file)" if token else "none"},
        }
        tests = [test]
        if committed:
            tests.append(tiebreak_test_from_files(key=k, suspect=probe, rule=tiebreak,  # type: ignore[arg-type]
                                                  served=served, arch=served_arch,  # type: ignore[arg-type]
                                                  holdout=holdout,
                                                  queries=tiebreak_queries))
        if tiebreak_log is not None:
            tests.append(tiebreak_log_test_from_files(key=k, suspect=probe, rule=tiebreak,  # type: ignore[arg-type]
                                                      served=served, arch=served_arch, log=tiebreak_log,  # type: ignore[arg-type]
                                                      client=client, queries=log_queries,  # type: ignore[arg-type]
                                                      rounds=log_rounds))
        if log is not None:
            test.details["transcript"] = log.summary()
        verdict = decide(key=k, tests=tests, alpha=alpha, suspect=suspect.description)
        if committed:  # the report names the rule and served model, so the tie-break test can be re-checked
            from wmark.recheck import record_tiebreak_files

            record_tiebreak_files(verdict, rule=tiebreak, served=served, arch=served_arch,  # type: ignore[arg-type]
                                  holdout=holdout, queries=tiebreak_queries)
    finally:
        suspect.close()
        if log is not None:
            log.close()
    if report is not None:
        from wmark.report import write_report

        write_report(verdict=verdict, key=k, path=report)
    return verdict
