"""A suspect behind a prediction API: one HTTP request per input, with the manners a paid API expects.

:class:`HttpSuspect` speaks one :mod:`wire protocol <wmark.suspects.protocols>` and adds a bearer token, a
request-rate limit that slows on every 429 (:class:`~wmark.suspects.pacing.RateLimiter`), timeouts, retries with
exponential backoff and full jitter that honour ``Retry-After`` on 429/503, and a thread pool for concurrent
requests; it goes through the environment's proxy (:mod:`wmark.suspects.proxies`). An error object answered in
place of a prediction (:func:`~wmark.suspects.bodies.error_body`: ``{"error": "Model x is currently loading",
"estimated_time": 20.0}``, also with HTTP 200) is retried like a 503, waiting its ``estimated_time`` (at most
``max_retry_after``), and is never recorded as an answer. A failed or malformed answer (after the retries) is an
abstention (label ``-1``), never a match. Errors that no retry can fix stop the run with one sentence
(:mod:`~wmark.suspects.refusals`): a refused token (401/403), an unknown model (404), a redirect (never followed,
so the token goes to no other address), a proxy refusing its credentials (407), an unreachable host, a TLS failure,
or answers that do not fit the key's classes.

Example:
    >>> from wmark.suspects.protocols import V2Protocol
    >>> proto = V2Protocol(url="http://127.0.0.1:9", model_name="m", num_classes=10, input_shape=(1, 28, 28))
    >>> proto.endpoint
    'http://127.0.0.1:9/v2/models/m/infer'
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from wmark.errors import RuntimeFailure, UsageError
from wmark.suspects.base import Answers
from wmark.suspects.bodies import (
    ACCEPT_ENCODING,
    BoundedBody,
    decode_body,
    error_body,
    scrubbed,
    server_message,
)
from wmark.suspects.deadline import DEADLINE, DeadlineTransport
from wmark.suspects.pacing import RateLimiter, parse_retry_after
from wmark.suspects.protocols import (
    AnswerCountMismatch,
    AnswerMismatch,
    MalformedAnswer,
    Parsed,
    WireProtocol,
)
from wmark.suspects.proxies import Proxies
from wmark.suspects.refusals import proxy_refusal, refusal, short_reason, tls_failure
from wmark.suspects.urls import origin, redact_url
from wmark.text import is_text_array

USER_AGENT = "wmark-verifier"
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpOptions:
    """Transport settings.

    Attributes:
        timeout: Seconds to wait for one answer, the whole exchange: looking the host name up, connecting, sending,
            the status line, the headers and the body (a resolver hanging, or a server trickling any of them byte by
            byte, past it is abandoned as a timeout).
        retries: Further attempts after a failed one (timeouts, 408, 429, 5xx, error bodies, dropped connections).
        backoff: Base of the exponential backoff in seconds (attempt k waits up to ``backoff * 2**k``).
        max_backoff: Cap of one backoff wait.
        max_retry_after: The longest ``Retry-After`` wait accepted; a longer one stops the run. An error body's
            ``estimated_time`` (an estimate, not a demand) is cut to it.
        rate: Most requests per second (``None``: unlimited); a server answering 429 slows the pace further.
        concurrency: Requests in flight at once.
        verify_tls: Check TLS certificates (a CA bundle path is accepted too).
        resumable: The answers go to a transcript that a re-run resumes from; a stop's message says so, or else
            that the answers so far are lost.
    """

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    rate: float | None = None
    concurrency: int = 1
    verify_tls: bool | str = True
    resumable: bool = False

    def __post_init__(self) -> None:
        # `not (0 < x)` also refuses NaN: a NaN timeout crashed httpx, a NaN rate silently lifted the limit
        if not (0 < self.timeout < math.inf):
            raise UsageError(f"The timeout must be a positive finite number of seconds, got {self.timeout}.")
        if self.retries < 0:
            raise UsageError(f"The number of retries cannot be negative, got {self.retries}.")
        if self.rate is not None and not (self.rate > 0):
            raise UsageError(f"The request rate must be positive, got {self.rate}.")
        if self.concurrency < 1:
            raise UsageError(f"Concurrency must be at least 1, got {self.concurrency}.")


@dataclass(frozen=True)
class Outcome:
    """What became of one query.

    Attributes:
        status: ``ok``, ``malformed`` (the server answered something that is not a prediction) or
            ``failed`` (no answer after every retry).
        label: The answered label, ``-1`` unless ``ok``.
        scores: Every class's score when the API returned them.
        answer: The raw answer body (text), when there was one.
        answer_sha256: SHA-256 of the raw answer bytes.
        error: Why it is not ``ok``.
        http_status: The last HTTP status seen.
        attempts: Requests sent for this query (1 + retries used).
    """

    status: str
    label: int = -1
    scores: tuple[float, ...] | None = None
    answer: str | None = None
    answer_sha256: str | None = None
    error: str = ""
    http_status: int | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    ok: int = 0
    malformed: int = 0
    failed: int = 0
    seconds_waiting: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: float) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class HttpSuspect:
    """A :class:`~wmark.suspects.base.Suspect` reached over HTTP.

    Args:
        protocol: How to phrase requests and read answers.
        token: Bearer token (sent as ``Authorization: Bearer …``; never logged or reported).
        options: Transport settings.
        headers: Extra static request headers (from a template).
        seed: Seed of the backoff jitter (``None``: fresh randomness).

    Call :meth:`connect` (or use :func:`open_http_suspect`) before querying: it checks the server and
    the model and fails with one sentence when they are not what the key needs.
    """

    def __init__(self, *, protocol: WireProtocol, token: str | None = None, options: HttpOptions | None = None,
                 headers: dict[str, str] | None = None, seed: int | None = None) -> None:
        self.protocol = protocol
        self.options = options or HttpOptions()
        self.description = redact_url(protocol.endpoint)
        self.num_classes: int | None = protocol.num_classes
        self.input_shape: tuple[int, ...] | None = protocol.input_shape
        self.server_info: dict[str, Any] = {}
        self.stats = _Stats()
        self._limiter = RateLimiter(self.options.rate)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._seen_ok = threading.Event()
        send_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Accept-Encoding": ACCEPT_ENCODING,
                        **(headers or {})}
        if token:
            send_headers["Authorization"] = f"Bearer {token}"
        limits = httpx.Limits(max_connections=self.options.concurrency + 2,
                              max_keepalive_connections=self.options.concurrency + 2)
        # The environment's proxies (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), read once as httpx would.
        proxies = Proxies.from_environment()
        self._transport = DeadlineTransport(verify=self.options.verify_tls, limits=limits, proxies=proxies)
        self._client = httpx.Client(headers=send_headers, timeout=httpx.Timeout(self.options.timeout),
                                    transport=self._transport, follow_redirects=False)
        self._has_token = bool(token)
        # A suspect echoing the request (a debug endpoint, an error quoting the headers) must not put the token or
        # a proxy's password in the transcript, a report or a message: every answer is read with them replaced,
        # longest form first (one may hold another).
        secrets = {form: "[proxy password]" for form in proxies.secrets()}
        secrets |= {form: "[token]" for form in ({token, token.replace("/", "\\/"), json.dumps(token)[1:-1]}
                                                 if token else ())}
        self._secrets = sorted(secrets.items(), key=lambda item: -len(item[0]))

    def __repr__(self) -> str:
        return f"HttpSuspect({self.description!r}, protocol={self.protocol.name!r})"

    def close(self) -> None:
        self._client.close()

    def connect(self) -> dict[str, Any]:
        """Check the server answers and serves a model that fits the key; return what it said."""
        self.server_info = self.protocol.discover(self._get_json)
        return self.server_info

    def query(self, inputs: np.ndarray) -> Answers:
        """Ask about a batch (one request per input, ``concurrency`` at a time); failures are abstentions."""
        x = inputs if is_text_array(inputs) else np.asarray(inputs, dtype=np.float32)
        labels = np.full(len(x), -1, dtype=np.int64)
        rows: list[tuple[float, ...] | None] = [None] * len(x)
        for i, outcome in self.stream(x):
            labels[i] = outcome.label
            rows[i] = outcome.scores
        scores = None
        if all(r is not None for r in rows) and len(rows):
            scores = np.asarray(rows, dtype=np.float64)
        return Answers(labels=labels, scores=scores)

    def stream(self, inputs: np.ndarray) -> Iterator[tuple[int, Outcome]]:
        """Yield ``(index, outcome)`` for every input as its answer arrives (completion order).

        When a fatal error (refused token, host gone, wrong model) or a first Ctrl-C happens, the answers of the
        requests already sent are still yielded before it is raised, so a transcript loses nothing.
        """
        x = inputs if is_text_array(inputs) else np.asarray(inputs, dtype=np.float32)
        if self.options.concurrency == 1 or len(x) <= 1:
            for i in range(len(x)):
                yield i, self._ask(x[i])
            return
        fatal: BaseException | None = None
        pool = cf.ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="wmark-http")
        try:
            futures = {pool.submit(self._ask, x[i]): i for i in range(len(x))}
            waiting = set(futures)
            while waiting:
                try:
                    done, waiting = cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
                except KeyboardInterrupt as exc:
                    if fatal is not None:
                        raise  # a second Ctrl-C (or one while stopping anyway) stops without waiting
                    fatal, done = exc, set()
                    for other in waiting:
                        other.cancel()
                for fut in done:
                    if fut.cancelled():
                        continue
                    try:
                        outcome = fut.result()
                    except (UsageError, RuntimeFailure) as exc:
                        if fatal is None:
                            fatal = exc
                            for other in waiting:
                                other.cancel()
                        continue
                    yield futures[fut], outcome
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if fatal is not None:
            raise fatal

    def _ask(self, x: np.ndarray) -> Outcome:
        req = self.protocol.request(x)
        resp, attempts, error = self._send(req.method, req.url, req.body, what="inference")
        if resp is not None and error:
            return self._malformed("", None, attempts, resp.status_code, error)
        if resp is None:
            self.stats.add(failed=1)
            return Outcome(status="failed", error=error, attempts=attempts,
                           http_status=None if not error.startswith("HTTP ") else int(error.split()[1]))
        raw = resp.content
        digest = hashlib.sha256(raw).hexdigest()
        text, is_text = decode_body(raw)
        text = self._scrub(text)
        if resp.status_code >= 400:
            message = server_message(text, resp.reason_phrase)
            if not self._seen_ok.is_set():
                raise UsageError(
                    f"The suspect at {self.description} rejected the first query (HTTP {resp.status_code}: "
                    f"{message}); check the protocol, the model name and the key's input shape."
                )
            self.stats.add(malformed=1)
            return Outcome(status="malformed", answer=text, answer_sha256=digest, attempts=attempts,
                           http_status=resp.status_code, error=f"HTTP {resp.status_code}: {message}")
        try:
            if not is_text:
                raise ValueError("the answer is not UTF-8 text, as JSON must be")
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            if not self._seen_ok.is_set():
                # An HTML page or plain text answered with 200 (a login page, a proxy, a wrong path) would
                # otherwise show the suspect every trigger of the budget for abstentions only.
                kind = resp.headers.get("content-type", "no content type").split(";")[0].strip() or "no content type"
                kind += "" if is_text else ", not UTF-8"
                raise RuntimeFailure(
                    f"The suspect at {self.description} answered the first query with something that is not JSON "
                    f"({kind}); check the URL and the protocol."
                ) from None
            return self._malformed(text, digest, attempts, resp.status_code, short_reason(exc))
        try:
            parsed: Parsed = self.protocol.parse(doc)
        except AnswerMismatch as exc:
            if not self._seen_ok.is_set():
                failure = RuntimeFailure if isinstance(exc, AnswerCountMismatch) else UsageError
                raise failure(f"The suspect at {self.description} does not fit the key: {exc}.") from None
            return self._malformed(text, digest, attempts, resp.status_code, str(exc))
        except (MalformedAnswer, ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
            return self._malformed(text, digest, attempts, resp.status_code, short_reason(exc))
        self._seen_ok.set()
        self.stats.add(ok=1)
        return Outcome(status="ok", label=parsed.label, scores=parsed.scores, answer=text, answer_sha256=digest,
                       http_status=resp.status_code, attempts=attempts)

    def _malformed(self, text: str, digest: str | None, attempts: int, status: int, error: str) -> Outcome:
        self.stats.add(malformed=1)
        return Outcome(status="malformed", answer=text, answer_sha256=digest, error=f"malformed answer: {error}",
                       http_status=status, attempts=attempts)

    def _get_json(self, url: str) -> Any:
        resp, _, error = self._send("GET", url, None, what="metadata")
        if resp is None:
            raise RuntimeFailure(
                f"The suspect at {redact_url(url)} did not answer ({error}); try again later or allow more retries."
            )
        if error:
            raise RuntimeFailure(f"GET {redact_url(url)} answered {error}; is this the right protocol?")
        text, is_text = decode_body(resp.content)
        text = self._scrub(text)
        if resp.status_code >= 400:
            message = server_message(text, resp.reason_phrase)
            raise UsageError(f"GET {redact_url(url)} failed with HTTP {resp.status_code}: {message}.")
        try:
            if not is_text:
                raise ValueError("not UTF-8")
            return json.loads(text)
        except (ValueError, RecursionError):
            raise RuntimeFailure(f"GET {redact_url(url)} did not return JSON; is this the right protocol?") from None

    def _send(self, method: str, url: str, body: Any, *, what: str) -> tuple[httpx.Response | None, int, str]:
        """Send with retries; return (response or None, attempts, last error). Raises on unfixable errors.

        A response comes back with an error only when its body is not readable (:class:`BoundedBody`: larger than
        ``MAX_ANSWER_BYTES``, in an encoding not asked for, or corrupt); its content is empty then.
        """
        error = ""
        connect_failures = 0
        attempts = 0
        for attempt in range(self.options.retries + 1):
            slot = self._limiter.wait()
            attempts += 1
            self.stats.add(requests=1, retries=int(attempt > 0))
            wait: float | None = None
            try:
                resp, problem = self._receive(method, url, body)
            except httpx.ConnectError as exc:
                if (tls := tls_failure(exc, url, handshake=True)) is not None:
                    raise tls from None
                connect_failures += 1
                error = f"cannot connect{self._via(url)} ({short_reason(exc)})"
            except httpx.ProxyError as exc:
                if str(exc).startswith("407"):
                    raise self._proxy_auth(url) from None
                connect_failures += 1  # the proxy opened no tunnel: nothing reached the suspect
                error = f"no tunnel{self._via(url)} ({short_reason(exc)})"
            except httpx.TimeoutException:
                error = f"no answer within {self.options.timeout:g} s"
            except httpx.TransportError as exc:
                if (tls := tls_failure(exc, url, handshake=False)) is not None:
                    raise tls from None
                error = f"connection dropped ({short_reason(exc)})"
            else:
                code = resp.status_code
                if code == 429:
                    self._limiter.throttled(slot)
                elif code < 400:
                    self._limiter.answered()
                if code == 407:
                    raise self._proxy_auth(url)
                if (refused := refusal(resp, url, has_token=self._has_token, scrub=self._scrub)) is not None:
                    raise refused
                failure = self._error_answer(resp, what)
                if code not in _RETRY_STATUSES and failure is None:
                    return resp, attempts, problem
                error = f"HTTP {code}" if code >= 300 or failure is None else f"HTTP {code} error body: {failure[0]}"
                if code in (429, 503):
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
                    if wait is not None and wait > self.options.max_retry_after:
                        raise RuntimeFailure(f"The suspect asks to wait {wait:.0f} s before the next request (HTTP "
                                             f"{code} Retry-After); {self._resume_hint('re-run the same command later')}.")
                if wait is None and failure is not None and failure[1] is not None:
                    # An estimate, not a demand like Retry-After: a long one is cut to the longest wait accepted.
                    wait = min(failure[1], self.options.max_retry_after)
            if attempt == self.options.retries:
                break
            delay = self._backoff(attempt) if wait is None else wait + self._jitter(0.1 * max(wait, 0.1))
            self.stats.add(seconds_waiting=delay)
            time.sleep(delay)
        if connect_failures == attempts:
            if what == "metadata" or not self._seen_ok.is_set():
                raise RuntimeFailure(
                    f"Cannot reach the suspect at {origin(url)} ({error}); check the URL and that the server is up."
                )
            raise RuntimeFailure(f"The suspect at {origin(url)} stopped answering ({error}); "
                                 f"{self._resume_hint('re-run the same verification once it is back')}.")
        return None, attempts, error

    def _resume_hint(self, rerun: str) -> str:
        """What becomes of the answers so far when the run stops: a transcript keeps them, else they are lost."""
        if self.options.resumable:
            return f"answers so far are kept: {rerun}, with the same transcript, to resume"
        return f"answers so far are lost: {rerun}, with --transcript to keep them next time"

    def _error_answer(self, resp: httpx.Response, what: str) -> tuple[str, float | None] | None:
        """The message (scrubbed, short) and suggested wait of an error body (see :func:`error_body`), else ``None``.

        Only a 2xx answer or one retried anyway counts: a 4xx error body is the server refusing the request. A 2xx
        inference answer counts only when the protocol cannot read it as a prediction either, so no template that
        reads its label from an ``error`` member has its answers taken for failures.
        """
        if resp.status_code >= 300 and resp.status_code not in _RETRY_STATUSES:
            return None
        try:
            doc = json.loads(resp.content)
        except (ValueError, RecursionError):
            return None
        found = error_body(doc)
        if found is None:
            return None
        if what == "inference" and resp.status_code < 300:
            try:
                self.protocol.parse(doc)
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                pass
            else:
                return None
        return self._scrub(found[0])[:200], found[1]

    def _receive(self, method: str, url: str, body: Any) -> tuple[httpx.Response, str]:
        """One request, answered in full within the timeout and decoded by a :class:`BoundedBody`; why it is unreadable.

        httpx's timeouts bound each read, not the whole exchange: a server sending its headers or body a byte every
        few seconds would otherwise hold a query forever (the :data:`DEADLINE` extension bounds the host name's
        lookup and every socket operation), and a huge (or hugely inflating) answer would be held in memory whole.
        """
        deadline = time.monotonic() + self.options.timeout
        request = self._client.build_request(method, url, json=body, extensions={DEADLINE: deadline})
        resp = self._client.send(request, stream=True)
        decoded = BoundedBody(resp.headers.get("content-encoding", ""))
        try:
            for chunk in resp.iter_raw():
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer did not arrive in full within the timeout", request=request)
                if not decoded.feed(chunk):
                    break
        finally:
            resp.close()
        headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(resp.status_code, headers=headers, content=decoded.content, request=request), \
            decoded.problem

    def _scrub(self, text: str) -> str:
        return scrubbed(text, self._secrets)

    def _via(self, url: str) -> str:
        """`` through the proxy …`` (named without its credentials) when one carries requests to ``url``."""
        proxy = self._transport.proxy_for(httpx.URL(url))
        return "" if proxy is None else f" through the proxy {origin(str(proxy.url))}"

    def _proxy_auth(self, url: str) -> UsageError:
        """The error for HTTP 407 from the proxy that carries requests to ``url``."""
        return proxy_refusal(url, self._transport.proxy_for(httpx.URL(url)))

    def _backoff(self, attempt: int) -> float:
        # Full jitter (uniform on [0, cap]) spreads retries of concurrent clients apart.
        return self._jitter(min(self.options.max_backoff, self.options.backoff * 2.0**attempt))

    def _jitter(self, upper: float) -> float:
        with self._rng_lock:
            return self._rng.uniform(0.0, upper)


def make_protocol(*, protocol: str, url: str, model_name: str | None, num_classes: int,
                  input_shape: tuple[int, ...], template: str | None = None,
                  version: str | None = None, input_name: str | None = None) -> WireProtocol:
    """Build the wire protocol named ``protocol`` (``v2``, ``tfserving`` or ``json``).

    Raises:
        UsageError: On a bad URL, an unknown protocol, or an option the protocol does not take.
    """
    from wmark.suspects.json_template import JsonTemplateProtocol, load_template
    from wmark.suspects.protocols import TFServingProtocol, V2Protocol

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"The suspect URL {url!r} must start with http:// or https://.")
    if input_name is not None and protocol != "v2":
        raise UsageError(f"An input name applies to the v2 protocol only, not {protocol}.")
    if version is not None and protocol == "json":
        raise UsageError("A model version applies to the v2 and tfserving protocols only; for json put it in the URL.")
    if protocol == "v2":
        return V2Protocol(url=url, model_name=model_name, num_classes=num_classes, input_shape=input_shape,
                          version=version, input_name=input_name)
    if protocol == "tfserving":
        return TFServingProtocol(url=url, model_name=model_name, num_classes=num_classes, input_shape=input_shape,
                                 version=version)
    if protocol == "json":
        if not template:
            raise UsageError("The json protocol needs a template (torchserve, hf, or a template file).")
        return JsonTemplateProtocol(url=url, template=load_template(template), num_classes=num_classes,
                                    input_shape=input_shape)
    raise UsageError(f"Unknown protocol {protocol!r}; use v2, tfserving or json.")


def open_http_suspect(*, url: str, protocol: str, num_classes: int, input_shape: tuple[int, ...],
                      model_name: str | None = None, template: str | None = None, token: str | None = None,
                      options: HttpOptions | None = None, seed: int | None = None,
                      input_name: str | None = None, version: str | None = None) -> HttpSuspect:
    """Build an :class:`HttpSuspect` and check the server (see :meth:`HttpSuspect.connect`).

    ``input_name`` names the v2 input tensor: it overrides the server's name, and is needed when the server
    describes no inputs and its model wants a name other than ``input-0`` (the key's input shape and FP32 are
    sent then; ``server_info["input_from"]`` says ``"key"``). ``version`` pins one model version on a v2 or
    TensorFlow Serving server (``.../versions/{version}/...``), which the endpoint, and so the transcript and the
    report, then name.
    """
    proto = make_protocol(protocol=protocol, url=url, model_name=model_name, num_classes=num_classes,
                          input_shape=input_shape, template=template, input_name=input_name, version=version)
    headers = getattr(proto, "headers", None)
    suspect = HttpSuspect(protocol=proto, token=token, options=options, headers=headers, seed=seed)
    try:
        suspect.connect()
    except BaseException:
        suspect.close()
        raise
    return suspect
