"""Serve a model over the Open Inference Protocol v2 (starlette + uvicorn), to try verification end to end.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{name}`` (model metadata), ``GET /v2/models/{name}/ready`` and
``POST /v2/models/{name}/infer``, each model route also under ``/v2/models/{name}/versions/{version}``. The
server holds one model, so one version: ``"1"`` unless ``build_app`` is given another; any other version
gets HTTP 404 like any other model name. Bad requests get HTTP 400 with ``{"error": ...}``, a body over the
size limit HTTP 413, one sent as another type than JSON HTTP 415 (:mod:`wmark.serve_input`).

With ``labels_only`` the model answers only its top-1 label (an INT64 output), as many paid APIs do; otherwise
softmax scores (FP32, N×C). With a token, model routes require ``Authorization: Bearer <token>``. A text
classifier is served Hugging Face style at ``POST /hf/models/{name}`` (:mod:`wmark.text_serving`).

Example:
    >>> from wmark.models import build_model
    >>> app = build_app(model=build_model("fmnist-mlp", num_classes=10, input_shape=(1, 28, 28)), name="m",
    ...                 num_classes=10, input_shape=(1, 28, 28))
    >>> sorted(r.path for r in app.routes)[:2]
    ['/v2', '/v2/health/live']
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wmark import __version__
from wmark.contract import forward_names
from wmark.errors import RuntimeFailure, UsageError, WmarkError
from wmark.monitor.gate import Gate, Refusal
from wmark.monitor.text_features import monitor_featurizer, text_keys
from wmark.serve_input import (
    BODY_TIMEOUT_S,
    MAX_BATCH,
    BadRequest,
    decode_v2_input,
    default_body_limit,
    model_failed,
    read_json,
    text_char_limit,
)
from wmark.serve_protocol import HEADER_TIMEOUT_S, header_deadline, http_protocol
from wmark.serve_runtime import BackgroundServer, listen, run_until_terminated, serve_in_background
from wmark.suspects.base import Suspect
from wmark.suspects.local import LocalSuspect
from wmark.text import TextInputs
from wmark.training import resolve_device

# the server's public surface, with the runtime (wmark.serve_runtime) it starts
__all__ = ["BackgroundServer", "build_app", "read_clients", "serve", "serve_in_background"]

ANONYMOUS = "anonymous"
LABEL_OUTPUT = {"name": "label", "datatype": "INT64", "shape": [-1]}

def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _refusal(refusal: Refusal) -> JSONResponse:
    return JSONResponse({"error": refusal.message, "reason": refusal.reason}, status_code=refusal.status,
                        headers=refusal.headers())


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, a method it does not take) in the v2 error body, not plain text."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def build_app(*, model: torch.nn.Module, name: str, num_classes: int, input_shape: tuple[int, ...],
              labels_only: bool = False, token: str | None = None, version: str = "1",
              on_infer: Callable[[np.ndarray], None] | None = None, answerer: Suspect | None = None,
              clients: Mapping[str, str] | None = None, gate: Gate | None = None,
              text: TextInputs | None = None, max_body_bytes: int | None = None,
              body_timeout: float = BODY_TIMEOUT_S) -> Starlette:
    """The ASGI application serving ``model`` as ``name``.

    Args:
        model: The model (put in eval mode).
        name: Its name in URLs.
        num_classes: Number of classes it answers over.
        input_shape: Shape of one input (without the batch dimension).
        labels_only: Answer only the top-1 label instead of every class's probability.
        token: Bearer token required on model routes (``None``: open).
        version: The served model's version: reported in metadata and answers, and the only one its versioned
            routes (``/v2/models/{name}/versions/{version}/...``) answer.
        on_infer: Called with each batch of inputs before inference (tests count requests with it).
        answerer: What answers instead of the bare model, e.g. a
            :class:`~wmark.schemes.tiebreak.TieBreakAPI` wrapping it (the owner's API-side mark); it
            must return scores unless ``labels_only``.
        clients: Client name → bearer token, instead of one ``token``: a request must carry one of them,
            and an ``answerer`` with a ``for_client`` method (a marked API) answers, and logs, as that client.
        gate: Per-client policy and extraction monitor (:class:`~wmark.monitor.gate.Gate`); adds ``/metrics``.
            A client whose policy says ``"mark": "on-alarm"`` gets the bare model's answers (not the
            ``answerer``'s) until the monitor's alarm for it. It guards the text endpoint as it does ``infer``;
            there the monitor sees each text as its hashed tokens (:mod:`wmark.monitor.text_features`).
        text: For a text classifier, how strings become its inputs: it is then served at
            ``/hf/models/{name}`` (``{"inputs": "..."}`` in, ``[{label, score}]`` out) instead of ``infer``.
        max_body_bytes: Largest request body read; a larger one is refused with HTTP 413 while it is being read.
            Default :func:`~wmark.serve_input.default_body_limit`, room for the largest request the model
            answers (:data:`~wmark.serve_input.MAX_BATCH` inputs): below it, legal requests would be refused.
        body_timeout: Seconds a client has to send a request's whole body; a slower one gets HTTP 408 and its
            connection is closed (default :data:`~wmark.serve_input.BODY_TIMEOUT_S`, which says why).

    Raises:
        UsageError: On both ``token`` and ``clients``, an empty or duplicated client token, a ``gate`` whose
            monitor profile was calibrated on the other modality (or another tokenizer), a policy that marks on
            alarm without an ``answerer`` or without a monitor, a ``max_body_bytes`` that is not a positive
            integer, a ``body_timeout`` that is not a positive number of seconds, or a model that fails on an input
            of ``input_shape`` (as
            :class:`~wmark.suspects.LocalSuspect` would).
    """
    if token is not None and clients is not None:
        raise UsageError("Give one bearer token or per-client tokens, not both.")
    if clients is not None and (not clients or any(not t for t in clients.values())
                                or len(set(clients.values())) != len(clients)):
        raise UsageError("Per-client tokens must be non-empty and distinct, one per client.")
    if text is not None:
        from wmark.text_serving import SharedTokens

        # one tokenization per request for the length check, the model and the monitor (under text_lock below)
        text = dataclasses.replace(text, tokenizer=SharedTokens(text.tokenizer))
    # the text endpoint's monitor sees hashed tokens; refused here, a mismatched profile would watch nothing
    hashed = None if gate is None or gate.monitor is None else monitor_featurizer(gate.monitor.profile, text)
    if gate is not None and gate.policy.marks_on_alarm:
        if answerer is None:
            raise UsageError("The policy marks clients on alarm (\"mark\": \"on-alarm\") but no API-side mark is "
                             "served; serve with --mark tiebreak and its rule, or drop the field.")
        if gate.monitor is None:
            raise UsageError("The policy marks clients on alarm (\"mark\": \"on-alarm\") but no monitor raises "
                             "alarms; add --monitor with a calibrated profile.")
    if max_body_bytes is not None and (isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int)
                                       or max_body_bytes <= 0):
        raise UsageError(f"The request body limit must be a positive number of bytes, got {max_body_bytes!r}.")
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, int | float) or not 0 < body_timeout < math.inf:
        raise UsageError(f"The request body deadline must be a positive number of seconds, got {body_timeout!r}.")
    by_client = {name: answerer.for_client(name) for name in clients or {}
                 } if answerer is not None and hasattr(answerer, "for_client") else {}
    shape = tuple(int(s) for s in input_shape)
    per_item = int(np.prod(shape))
    body_limit = max_body_bytes or default_body_limit(input_size=per_item,
                                                      text_max_length=None if text is None else text.max_length)
    # the bare model answers through a LocalSuspect, so that its answers are those of verifying the model file
    local = LocalSuspect(model, input_shape=shape, text=text)
    # Requests run concurrently in the threadpool: an eval-mode model, the answerers, the query log and the gate
    # are safe to share between threads. A Hugging Face fast tokenizer is not ("Already borrowed"), so the text
    # endpoint encodes under this lock.
    text_lock = threading.Lock()
    metrics_token = None if gate is None else gate.metrics_token
    output = ({"name": "label", "datatype": "INT64", "shape": [-1]} if labels_only
              else {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]})
    metadata = {"name": name, "versions": [version], "platform": f"wmark-pytorch/{torch.__version__}",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}], "outputs": [output]}

    def client_of(request: Request) -> str | None:
        """The client a request authenticates as ("" when the server is open), or None if it does not."""
        given = request.headers.get("authorization", "").encode()
        if clients is not None:
            found = None
            for client, secret in clients.items():  # every token compared, in constant time each
                if hmac.compare_digest(given, f"Bearer {secret}".encode()):
                    found = client
            return found
        if token is None:
            return ""
        return "" if hmac.compare_digest(given, f"Bearer {token}".encode()) else None

    def check_model(request: Request) -> JSONResponse | None:
        if client_of(request) is None:
            return _error(401, "missing or invalid bearer token")
        if request.path_params["model"] != name:
            return _error(404, f"unknown model {request.path_params['model']!r}")
        asked = request.path_params.get("version")
        if asked is not None and asked != version:
            return _error(404, f"model {name!r} has no version {asked!r}; this server serves version {version!r}")
        return None

    async def live(_: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def server_meta(_: Request) -> JSONResponse:
        return JSONResponse({"name": "wmark", "version": __version__, "extensions": []})

    def metadata_for(client: str) -> dict[str, Any]:
        if gate is None or labels_only:
            return metadata
        mode, k = gate.answer_mode(client)
        outputs = [{"name": "label", "datatype": "INT64", "shape": [-1]}] if mode == "label" else [
            {"name": "top_k_labels", "datatype": "INT64", "shape": [-1, k]},
            {"name": "top_k_scores", "datatype": "FP32", "shape": [-1, k]}] if mode == "top-k" else [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]}]
        return dict(metadata, outputs=outputs)

    async def model_meta(request: Request) -> JSONResponse:
        return check_model(request) or JSONResponse(metadata_for(client_of(request) or ANONYMOUS))

    async def model_ready(request: Request) -> JSONResponse:
        return check_model(request) or JSONResponse({"name": name, "ready": True})

    def predict(x: np.ndarray, client: str) -> tuple[np.ndarray | None, np.ndarray]:
        """The served probabilities (None when the answerer gives labels only) and top-1 labels."""
        marked = answerer is not None and (gate is None or gate.marked(client or ANONYMOUS))
        answers = (by_client.get(client, answerer) if answerer is not None and marked else local).query(x)
        scores = None if answers.scores is None else np.asarray(answers.scores, dtype=np.float32)
        return scores, np.asarray(answers.labels, dtype=np.int64)

    def watch(client: str, x: np.ndarray, probs: np.ndarray | None, labels: np.ndarray,
              keys: list[bytes] | None = None) -> None:
        """Feed the gate an answered request: the probabilities its client saw (one-hot labels if none), and for
        texts each one's key, which tells a repeat."""
        if gate is not None:
            seen = probs if probs is not None else np.eye(num_classes, dtype=np.float32)[labels]
            gate.after_answer(client or ANONYMOUS, x, seen, keys)

    def answer_mode(client: str) -> tuple[str, int]:
        return ("scores", num_classes) if gate is None else gate.answer_mode(client or ANONYMOUS)

    def admit(client: str, n: int) -> JSONResponse | None:
        """The gate's refusal of a request of ``n`` inputs (``None``: admitted, and counted)."""
        refusal = None if gate is None else gate.admit(client or ANONYMOUS, n)
        if refusal is None:
            return None
        return _refusal(refusal)

    def precheck(client: str, n: int) -> JSONResponse | None:
        """The gate's refusal of a request of ``n`` inputs before any work on them (``None``: ask :func:`admit`)."""
        refusal = None if gate is None else gate.precheck(client or ANONYMOUS, n)
        return None if refusal is None else _refusal(refusal)

    def answer(x: np.ndarray, client: str) -> list[dict[str, Any]]:
        probs, labels = predict(x, client)
        watch(client, x, probs, labels)
        mode, k = answer_mode(client)
        if labels_only or probs is None or mode == "label":
            return [dict(output if labels_only else LABEL_OUTPUT, shape=[len(x)], data=labels.tolist())]
        assert probs is not None
        if mode == "top-k":
            k = min(k, num_classes)
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            return [{"name": "top_k_labels", "datatype": "INT64", "shape": [len(x), k], "data": top.reshape(-1).tolist()},
                    {"name": "top_k_scores", "datatype": "FP32", "shape": [len(x), k],
                     "data": np.take_along_axis(probs, top, axis=1).reshape(-1).tolist()}]
        return [dict(output, shape=[len(x), num_classes], data=probs.reshape(-1).tolist())]

    async def infer(request: Request) -> Response:
        refused = check_model(request)
        if refused is not None:
            return refused
        if text is not None:
            return _error(400, f"this model takes text; POST {{\"inputs\": \"...\"}} to /hf/models/{name}")
        try:
            # decoded where it is parsed: in a worker thread for a large body, as decoding takes as long as parsing
            read = await read_json(request, body_limit, timeout=body_timeout,
                                   decode=lambda doc: (doc, decode_v2_input(doc, shape, per_item)))
        except BadRequest as exc:
            return _error(400, str(exc))
        if isinstance(read, JSONResponse):
            return read
        doc, x = read
        client = client_of(request) or ""
        refused = admit(client, len(x))
        if refused is not None:
            return refused
        if on_infer is not None:
            on_infer(x)
        try:
            outputs = await run_in_threadpool(answer, x, client)
        except RuntimeFailure:  # NaN or infinite outputs, from inputs far outside the model's range (1e38)
            return _error(400, "the model's outputs on these inputs are NaN or infinite; send values in the range "
                               "it was trained on")
        except Exception as exc:  # noqa: BLE001 - any failure of the owner's model: a JSON 500, not a dropped connection
            return model_failed(exc)
        body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
        if isinstance(doc, dict) and "id" in doc:
            body["id"] = doc["id"]
        return JSONResponse(body)

    async def metrics(request: Request) -> Response:
        assert gate is not None
        if metrics_token is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                                 f"Bearer {metrics_token}".encode()):
            return _error(401, "missing or invalid bearer token for /metrics")
        exposition, content_type = gate.metrics()
        return Response(exposition, media_type=content_type)

    routes = [
        Route("/v2", server_meta),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", live),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    if gate is not None:
        routes.append(Route("/metrics", metrics))
    if text is not None:
        from wmark.text_serving import hf_text_endpoint

        def answer_text(x: np.ndarray, client: str) -> Any:
            with text_lock:
                marked = answerer is not None and (gate is None or gate.marked(client or ANONYMOUS))
                answers = (by_client.get(client, answerer) if answerer is not None and marked else local).query(x)
                seen = x if hashed is None else hashed(x)  # from the encoding SharedTokens keeps, under the lock
            watch(client, seen, answers.scores, np.asarray(answers.labels, dtype=np.int64), text_keys(x))
            return answers

        def check_text(texts: list[str]) -> None:
            assert text is not None
            with text_lock:
                text.token_ids(texts)

        routes.append(Route("/hf/models/{model}", hf_text_endpoint(
            answer=answer_text, labels_only=labels_only, client_of=client_of, check_model=check_model,
            max_batch=MAX_BATCH, admit=admit, precheck=precheck, answer_mode=answer_mode, max_body_bytes=body_limit,
            max_chars=text_char_limit(text.max_length), check=check_text if gate is not None else None,
            body_timeout=body_timeout),
            methods=["POST"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def serve(*, name: str, arch: str | None = None, weights: str | os.PathLike[str] | None = None, host: str = "127.0.0.1",
          port: int = 8080, labels_only: bool = False, token_env: str | None = None,
          key: str | os.PathLike[str] | None = None, mark: str | None = None,
          rule: str | os.PathLike[str] | None = None, beta: float | None = None, rate: float | None = None,
          candidates: str | None = None, clients_file: str | os.PathLike[str] | None = None,
          log: str | os.PathLike[str] | None = None, log_durability: str = "process",
          policy: str | os.PathLike[str] | None = None,
          monitor: str | os.PathLike[str] | None = None, alarm_log: str | os.PathLike[str] | None = None,
          monitor_state: str | os.PathLike[str] | None = None, device: str | None = None,
          max_body_bytes: int | None = None, body_timeout: float = BODY_TIMEOUT_S,
          header_timeout: float = HEADER_TIMEOUT_S, announce: Callable[[str], None] | None = None) -> None:
    """Load a model file and serve it until interrupted (blocking), as version ``"1"`` of ``name``.

    With ``mark`` and the owner's ``key``, answers go through that API-side mark (:func:`wmark.marks.open_served`):
    ``tiebreak`` with ``rule`` (from ``wmark tiebreak build``, which names the served model, so ``arch`` and
    ``weights`` are needed only if it moved) or ``flip`` (``rate``, ``candidates``). It keeps no state unless
    ``log`` is given: then each client's queries are recorded there
    (:class:`~wmark.schemes.querylog.QueryLog`), under the names of ``clients_file`` (a JSON object,
    client name → bearer token, readable by its owner only), or under ``"anonymous"`` without one;
    ``log_durability`` (``process`` or ``fsync``) says whether each request's rows are fsync'd.

    With ``policy`` (a policy file, :mod:`wmark.monitor.policy`) and/or ``monitor`` (a calibrated profile from
    ``wmark monitor calibrate``, on texts for a text model), every inference request, v2 or text, passes a
    :class:`~wmark.monitor.gate.Gate`: quotas, rate limits, answer modes, the extraction monitor's alarms (one
    JSON line each in ``alarm_log``) and their actions; ``monitor_state`` keeps quota counts and alarms across
    restarts; ``GET /metrics`` is served, counting connections closed at the header deadline too.

    The model answers on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; default CUDA when present); requests
    arrive as host arrays and follow it there.

    A request body over ``max_body_bytes`` is refused with HTTP 413 as it is read; the default is room for the
    largest request the model answers (:func:`~wmark.serve_input.default_body_limit`). One not received whole within
    ``body_timeout`` seconds is refused with HTTP 408 (:data:`~wmark.serve_input.BODY_TIMEOUT_S`), and so is a
    request line and headers not received whole within ``header_timeout`` seconds (:mod:`wmark.serve_protocol`).

    Raises:
        UsageError: If the weights do not load, the port, body limit or header deadline is invalid, the token
            variable is unset, an option of a mark is given without it, the policy file or monitor profile is
            invalid, or the weights hold a text model (its forward takes ``input_ids``) whose file records no
            tokenizer.
    """
    from wmark.io import read_metadata, wmark_metadata
    from wmark.keys import load_key
    from wmark.marks import open_served
    from wmark.text_serving import text_inputs_of

    if not 0 <= port <= 65535:
        raise UsageError(f"Port {port} is out of range 0-65535.")
    if not name or "/" in name:
        raise UsageError(f"Model name {name!r} must be non-empty and contain no '/'.")
    header_timeout = header_deadline(header_timeout)  # refused before the model loads
    on = resolve_device(device)
    token = None
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise UsageError(f"The environment variable {token_env} holding the token is unset or empty.")
    if token is not None and clients_file is not None:
        raise UsageError("Give one bearer token or per-client tokens, not both.")
    clients = None if clients_file is None else read_clients(clients_file)
    served = open_served(key=None if key is None else load_key(key), mark=mark, arch=arch, weights=weights, rule=rule,
                         beta=beta, rate=rate, candidates=candidates, log=log, log_durability=log_durability)
    served.to(on)
    gate = None
    listener: socket.socket | None = None
    serving = False
    try:
        text = text_inputs_of(wmark_metadata(read_metadata(served.weights)))
        if text is None and "input_ids" in forward_names(served.model):
            # served over v2 as an image model, it would answer every request with HTTP 500
            raise UsageError(f"{served.weights} holds a text model but records no tokenizer (wmark.modality), so its "
                             "text endpoint cannot tokenize; save it with wmark (`wmark train` or `wmark embed`, or "
                             "save_model with metadata=Watermarker.metadata() of its text key).")
        gate = _make_gate(policy=policy, monitor=monitor, alarm_log=alarm_log, monitor_state=monitor_state,
                          clients=list(clients or [ANONYMOUS]), labels_only=labels_only,
                          num_classes=served.num_classes, input_size=int(np.prod(served.input_shape)), text=text)
        app = build_app(model=served.model, name=name, num_classes=served.num_classes, input_shape=served.input_shape,
                        labels_only=labels_only, token=token, answerer=served.answerer, clients=clients, gate=gate,
                        text=text, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
        listener = listen(host, port)
        port = int(listener.getsockname()[1])
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                                http=http_protocol(header_timeout, None if gate is None else gate.header_timed_out))
        server = uvicorn.Server(config)
        if announce is not None:
            mode = "label-only" if labels_only else "scores"
            auth = (", bearer token required" if token else "") + (f", {len(clients)} client tokens" if clients else "")
            scale = getattr(served.answerer, "beta", None)
            auth += (f", {served.mark} marked" if served.mark else "") + (f" at beta {scale:g}" if scale else "")
            auth += f", logging to {log}" if served.log else ""
            auth += (", policy" if policy else "") + (", extraction monitor" if monitor else "")
            auth += f", on {on}" if on.type != "cpu" else ""
            route = "hf" if text is not None else "v2"
            announce(f"serving {name} ({mode}{auth}) on http://{host}:{port}/{route}/models/{name}")
        serving = True
        run_until_terminated(server, listener)
    except WmarkError:
        # refused before the first request (a bad policy, a busy port): a log this run created holds nothing yet
        if not serving and served.log is not None:
            served.log.discard()
        if not serving and gate is not None and gate.created_alarm_log and gate.alarm_log is not None:
            gate.alarm_log.unlink(missing_ok=True)
        raise
    finally:
        served.close()
        if listener is not None:
            listener.close()
        if gate is not None:
            gate.close(save=serving)


def _make_gate(*, policy: str | os.PathLike[str] | None, monitor: str | os.PathLike[str] | None,
               alarm_log: str | os.PathLike[str] | None, monitor_state: str | os.PathLike[str] | None,
               clients: list[str], labels_only: bool, num_classes: int, input_size: int,
               text: TextInputs | None = None) -> Gate | None:
    """The request gate for :func:`serve`, or ``None`` when neither a policy nor a monitor is asked for."""
    from wmark.monitor.monitor import ExtractionMonitor, load_profile
    from wmark.monitor.policy import load_policy

    if policy is None and monitor is None:
        if alarm_log is not None or monitor_state is not None:
            raise UsageError("An alarm log or monitor state file needs a policy file or a monitor profile too.")
        return None
    rules = None if policy is None else load_policy(policy, clients=clients)
    watcher = None
    if monitor is not None:
        profile = load_profile(monitor)
        monitor_featurizer(profile, text)  # a text profile for an image model, or the reverse, is refused
        if profile.num_classes != num_classes or (text is None and profile.feature_map.mean.size != input_size):
            raise UsageError(f"Monitor profile {monitor} was calibrated for another input shape or class count; "
                             "calibrate it on this model's inputs.")
        watcher = ExtractionMonitor(profile=profile)
    metrics_token = None
    if rules is not None and rules.metrics_token_env is not None:
        metrics_token = os.environ.get(rules.metrics_token_env, "").strip()
        if not metrics_token:
            raise UsageError(f"The environment variable {rules.metrics_token_env} holding the metrics token is unset.")
    return Gate(policy=rules, clients=clients, monitor=watcher, alarm_log=alarm_log, state_path=monitor_state,
                labels_only=labels_only, metrics_token=metrics_token)


def read_clients(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a per-client token file: a JSON object, client name → bearer token, readable by its owner only.

    Raises:
        UsageError: If the file is missing, readable by others, not such an object, or reuses a token.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Client token file {p} does not exist; write a JSON object {{\"client\": \"token\"}}.")
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise UsageError(f"Client token file {p} is readable by others; `chmod 600 {p}` (it holds bearer tokens).")
    try:
        doc = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not doc or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                       for k, v in doc.items()):
        raise UsageError(f"Client token file {p} must be a non-empty JSON object of client name -> token strings.")
    if len(set(doc.values())) != len(doc):
        raise UsageError(f"Client token file {p} gives two clients the same token; give each client its own.")
    return doc
