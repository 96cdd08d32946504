"""Serving a text classifier the way Hugging Face endpoints do: ``{"inputs": "..."}`` in, ``[{label, score}]`` out.

``POST /hf/models/{name}`` takes one string or a list of strings under ``inputs`` and answers, per string, the
classes as ``[{"label": "LABEL_3", "score": 0.91}, ...]`` sorted by score (a list of such lists for a list of
strings), or ``[{"label": "LABEL_3"}]`` when serving labels only. ``wmark verify api --protocol json --template hf``
speaks it. A text longer than the model's maximum length (or than
:func:`~wmark.serve_input.text_char_limit` characters), or anything but strings, is refused with HTTP 400
and one sentence. Behind a policy, a client's answer mode cuts each list to its ``top_k`` best classes or to
the top label, and its quotas and rate limits refuse as on the v2 endpoint (HTTP 429 or 403, ``{"error",
"reason"}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from wmark.errors import RuntimeFailure, UsageError
from wmark.serve_input import BODY_TIMEOUT_S, model_failed, read_json
from wmark.suspects.base import Answers
from wmark.text import TextInputs, load_tokenizer

Answer = Callable[[np.ndarray, str], Answers]
Admit = Callable[[str, int], JSONResponse | None]

_BAD_MODALITY = ("The model file's wmark.modality metadata is not a text modality as wmark writes it (a tokenizer name "
                 "and vocabulary digest, and a maximum length); save the model again with wmark.")


def text_inputs_of(metadata: Mapping[str, Any]) -> TextInputs | None:
    """The text inputs a model file's ``wmark.modality`` metadata records (``None`` for an image model)."""
    modality = metadata.get("modality")
    if isinstance(modality, str):
        try:
            modality = json.loads(modality)
        except (ValueError, RecursionError):
            raise UsageError(_BAD_MODALITY) from None
    if not isinstance(modality, dict) or modality.get("kind") != "text":
        return None
    from wmark.text import check_tokenizer

    # The file's metadata is whatever was last written into it: a text modality without its tokenizer or maximum
    # length failed with a KeyError here.
    tokenizer, max_length = modality.get("tokenizer"), modality.get("max_length")
    if not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("name"), str)
            and isinstance(tokenizer.get("vocab_sha256"), str)
            and isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0):
        raise UsageError(_BAD_MODALITY)
    tok = load_tokenizer(os.fspath(tokenizer["name"]))
    check_tokenizer(modality, tok)
    return TextInputs(tokenizer=tok, max_length=max_length)


class SharedTokens:
    """A Hugging Face tokenizer that keeps its last batch's encoding, so that an endpoint tokenizes a request once.

    The length check, the model's inputs and the monitor's hashed tokens each ask the tokenizer for the same texts;
    the first call encodes them (special tokens included, never truncated) and the others are answered from that
    encoding: its ids, or (``add_special_tokens=False``) the ids of the texts themselves, those of a fast
    tokenizer's encoding that belong to the text (its ``sequence_ids``; a slow one is asked again). Any other
    call passes through. Not thread-safe: call it under the endpoint's tokenizer lock, which a Hugging Face fast
    tokenizer needs anyway.

    Args:
        tokenizer: The tokenizer; its other attributes are read through.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._last: tuple[tuple[str, ...], Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if "tokenizer" not in self.__dict__:  # copy and pickle probe a bare instance before its state is set
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __call__(self, texts: Any, *, add_special_tokens: bool = True, truncation: bool = False,
                 **kwargs: Any) -> Any:
        if kwargs or truncation or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self.tokenizer(texts, add_special_tokens=add_special_tokens, truncation=truncation, **kwargs)
        key = tuple(texts)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.tokenizer(texts, add_special_tokens=True, truncation=False))
        encoding = self._last[1]
        if add_special_tokens:
            return {"input_ids": encoding["input_ids"]}
        if not getattr(encoding, "is_fast", False):
            return self.tokenizer(texts, add_special_tokens=False, truncation=False)
        return {"input_ids": [[t for t, seq in zip(ids, encoding.sequence_ids(i)) if seq is not None]
                              for i, ids in enumerate(encoding["input_ids"])]}


def label_name(index: int) -> str:
    """The label a text endpoint answers for class ``index`` (Hugging Face's default ``LABEL_i``)."""
    return f"LABEL_{int(index)}"


def hf_text_endpoint(*, answer: Answer, labels_only: bool, client_of: Callable[[Request], str | None],
                     check_model: Callable[[Request], JSONResponse | None], max_batch: int, max_body_bytes: int,
                     max_chars: int, admit: Admit | None = None, precheck: Admit | None = None,
                     answer_mode: Callable[[str], tuple[str, int]] | None = None,
                     check: Callable[[list[str]], None] | None = None,
                     body_timeout: float = BODY_TIMEOUT_S) -> Callable[[Request], Any]:
    """The request handler of ``POST /hf/models/{model}``.

    Args:
        answer: Answers a batch of strings as a client (a :class:`~wmark.suspects.LocalSuspect` with text inputs,
            or the owner's marked API).
        labels_only: Answer only the top-1 label.
        client_of: The authenticated client of a request.
        check_model: The server's authentication and model-name check (a refusal, or ``None``).
        max_batch: Most strings one request may hold (the v2 endpoint's limit, so neither is a way to exhaust memory).
        max_body_bytes: Largest request body read (HTTP 413 past it).
        body_timeout: Seconds a client has to send the whole body (HTTP 408 past it).
        max_chars: Most characters one string may hold (HTTP 400 past it), so that no text costs the tokenizer
            more than a model-length one can.
        admit: The policy's refusal of a client's request of ``n`` texts, or ``None`` to answer it (it is counted).
        precheck: The refusal ``admit`` would give now, counting nothing (or ``None``); asked before ``check``, so
            that a blocked or exhausted client costs no tokenization.
        check: Raises :class:`~wmark.errors.UsageError` (HTTP 400) on texts the model cannot take (longer than its
            maximum length in tokens); run before ``admit``, so that a request refused anyway costs no quota.
        answer_mode: A client's answer mode after its request (``("scores" | "top-k" | "label", k)``), asked
            after answering, so that the request that raises an alarm is already answered as the alarm says.
    """

    async def handler(request: Request) -> JSONResponse:
        refused = check_model(request)
        if refused is not None:
            return refused
        doc = await read_json(request, max_body_bytes, timeout=body_timeout)
        if isinstance(doc, JSONResponse):
            return doc
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        single = isinstance(inputs, str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return JSONResponse({"error": "\"inputs\" must be a string or a non-empty list of strings"}, status_code=400)
        if len(texts) > max_batch:
            return JSONResponse({"error": f"at most {max_batch} inputs per request"}, status_code=400)
        longest = max(len(t) for t in texts)
        if longest > max_chars:
            return JSONResponse({"error": f"an input text is {longest} characters long, more than the {max_chars} "
                                          "this server takes; shorten it"}, status_code=400)
        try:
            for t in texts:
                t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800" is valid JSON) fails inside the tokenizer: a 500
            return JSONResponse({"error": "\"inputs\" must be valid Unicode text (no lone surrogates)"},
                                status_code=400)
        client = client_of(request) or ""
        refused = None if precheck is None else precheck(client, len(texts))
        if refused is not None:
            return refused
        if check is not None:
            try:
                await run_in_threadpool(check, texts)  # the tokenizer, off the event loop
            except UsageError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        refused = None if admit is None else admit(client, len(texts))
        if refused is not None:
            return refused
        try:
            answers = await run_in_threadpool(answer, np.asarray(texts, dtype=object), client)
        except UsageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except RuntimeFailure:
            # no text is out of a model's range (v2 answers 400 for values far outside it): the model is broken
            return JSONResponse({"error": "the served model's outputs on these texts are NaN or infinite; its weights "
                                          "are damaged, check the model file"}, status_code=500)
        except Exception as exc:  # noqa: BLE001 - any failure of the owner's model: a JSON 500, not a dropped connection
            return model_failed(exc)
        mode, k = ("scores", 0) if answer_mode is None else answer_mode(client)
        rows: list[list[dict[str, Any]]] = []
        for i, label in enumerate(np.asarray(answers.labels).reshape(-1)):
            if labels_only or answers.scores is None or mode == "label":
                rows.append([{"label": label_name(int(label))}])
                continue
            scores = np.asarray(answers.scores[i], dtype=np.float64)
            ranked = np.argsort(-scores)[:k if mode == "top-k" else None]
            rows.append([{"label": label_name(int(c)), "score": float(scores[c])} for c in ranked])
        return JSONResponse(rows[0] if single else rows)

    return handler
