"""Any JSON prediction endpoint, described by a small template: where the input goes, where the answer is.

Ready-made templates for a TorchServe handler (``torchserve``) and a Hugging Face style ``[{label, score}]``
answer (``hf``); :func:`load_template` reads one of those or a JSON file. The shared wire types and the other
protocols live in :mod:`wmark.suspects.protocols`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.suspects.protocols import (
    AnswerMismatch,
    MalformedAnswer,
    Parsed,
    Request,
    WireProtocol,
    _numbers,
    _unwrap,
    label_index,
)

BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    # TorchServe's image classifier handler: JSON {"data": ...} in, a top-k {class: probability} map out
    # (or {"class": name, "probability": p} from custom handlers).
    "torchserve": {
        "method": "POST",
        "request": {"data": "$input"},
        "response": [{"topk_map": ""}, {"label": "class"}, {"label": "label"}],
    },
    # Hugging Face pipelines / Inference Endpoints: {"inputs": ...} in, [{"label", "score"}] out,
    # sometimes nested one level deeper.
    "hf": {
        "method": "POST",
        "request": {"inputs": "$input"},
        "response": [{"topk": "", "label_field": "label", "score_field": "score"}],
    },
}

_PLACEHOLDERS = ("$input", "$input_flat", "$input_batch", "$input_b64")
_EXTRACTORS = ("scores", "label", "topk", "topk_map")


def template_digest(template: dict[str, Any]) -> str:
    """``sha256:`` and the digest of what a template asks and how it reads answers (a transcript is bound to it).

    Its headers are left out: they may carry credentials, and they change neither the question nor the label read.
    """
    parts = {name: template.get(name) for name in ("method", "request", "response", "labels")}
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_template(spec: str) -> dict[str, Any]:
    """A built-in template name (``torchserve``, ``hf``) or a JSON template file, validated.

    A template is ``{"method": "POST", "headers": {...}, "request": <JSON with one placeholder>,
    "response": [<extractor>, ...], "labels": [names] | null}``. Placeholders (a whole JSON string):
    ``$input`` (nested list shaped like one input), ``$input_batch`` (the same inside a one-element list),
    ``$input_flat`` (a flat list), ``$input_b64`` (base64 of the float32 little-endian bytes); a text input
    (for a text key) fills ``$input`` with the string itself and ``$input_batch`` with a one-string list. Extractors,
    tried in order, each read a dotted path (``""`` is the whole answer, integers index lists):
    ``{"scores": path}`` (every class's score), ``{"label": path}`` (a bare label),
    ``{"topk": path, "label_field": "label", "score_field": "score"}`` (a list of label/score objects) and
    ``{"topk_map": path}`` (an object mapping labels to scores).
    """
    if spec in BUILTIN_TEMPLATES:
        template = json.loads(json.dumps(BUILTIN_TEMPLATES[spec]))
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(
                f"Template {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) nor a file."
            )
        try:
            template = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"Template {path} is not valid JSON ({exc.__class__.__name__}); fix the file.") from None
    if not isinstance(template, dict) or "request" not in template or "response" not in template:
        raise UsageError(f"Template {spec!r} needs a \"request\" and a \"response\" entry.")
    response = template["response"]
    if isinstance(response, dict):
        response = [response]
    if not isinstance(response, list) or not response or not all(
            isinstance(r, dict) and any(k in r for k in _EXTRACTORS) for r in response):
        raise UsageError(f"Template {spec!r}: \"response\" must list extractors using one of {', '.join(_EXTRACTORS)}.")
    template["response"] = response
    if _count_placeholders(template["request"]) != 1:
        raise UsageError(f"Template {spec!r}: the request must hold exactly one of {', '.join(_PLACEHOLDERS)}.")
    labels = template.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise UsageError(f"Template {spec!r}: \"labels\" must be a list of class names.")
    return template


def _count_placeholders(node: Any) -> int:
    if isinstance(node, str):
        return int(node in _PLACEHOLDERS)
    if isinstance(node, list):
        return sum(_count_placeholders(v) for v in node)
    if isinstance(node, dict):
        return sum(_count_placeholders(v) for v in node.values())
    return 0


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, str) and node in values:
        return values[node]
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    return node


def _at(doc: Any, path: str) -> Any:
    node = doc
    for part in [p for p in path.split(".") if p]:
        node = _unwrap(node) if isinstance(node, list) and not part.lstrip("-").isdigit() else node
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            raise MalformedAnswer(f"the answer has nothing at {path!r}") from None
    return node


class JsonTemplateProtocol(WireProtocol):
    """A JSON endpoint described by a template (see :func:`load_template`); the URL is the endpoint itself."""

    name = "json"

    def __init__(self, *, url: str, template: dict[str, Any], num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape)
        self.url = url
        self.template = template
        self.method = str(template.get("method", "POST")).upper()
        self.names: list[str] | None = template.get("labels")
        if self.names is not None and len(self.names) != self.num_classes:
            raise UsageError(
                f"The template names {len(self.names)} classes but the key is for {self.num_classes}; fix \"labels\"."
            )

    @property
    def endpoint(self) -> str:
        return self.url

    @property
    def headers(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.template.get("headers") or {}).items()}

    def request(self, x: np.ndarray) -> Request:
        if isinstance(x, str) or (isinstance(x, np.ndarray) and x.dtype.kind in ("U", "S", "O")):
            return self._text_request(str(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else x)
        arr = np.asarray(x, dtype=np.float32).reshape(self.input_shape)
        values = {
            "$input": arr.tolist(),
            "$input_batch": [arr.tolist()],
            "$input_flat": arr.reshape(-1).tolist(),
            "$input_b64": base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii"),
        }
        return Request(self.method, self.url, _fill(self.template["request"], values))

    def _text_request(self, text: str) -> Request:
        # A text input is sent as the string itself (``$input``) or a one-string batch (``$input_batch``).
        for placeholder in ("$input_flat", "$input_b64"):
            if json.dumps(placeholder) in json.dumps(self.template["request"]):
                raise UsageError(f"The template sends {placeholder}, which cannot carry text; use $input or $input_batch.")
        return Request(self.method, self.url, _fill(self.template["request"], {"$input": text, "$input_batch": [text]}))

    def parse(self, doc: Any) -> Parsed:
        reasons = []
        mismatch: AnswerMismatch | None = None
        for extractor in self.template["response"]:
            try:
                return self._extract(doc, extractor)
            except AnswerMismatch as exc:
                mismatch = mismatch or exc
            except MalformedAnswer as exc:
                reasons.append(str(exc))
        if mismatch is not None:
            raise mismatch
        raise MalformedAnswer("; ".join(reasons) or "no extractor matched the answer")

    def _extract(self, doc: Any, extractor: dict[str, Any]) -> Parsed:
        if "scores" in extractor:
            return self._from_scores(_unwrap(_at(doc, extractor["scores"])))
        if "label" in extractor:
            return self._from_label(_unwrap(_at(doc, extractor["label"])), self.names)
        if "topk" in extractor:
            items = _unwrap_list(_at(doc, extractor["topk"]))
            lf, sf = extractor.get("label_field", "label"), extractor.get("score_field", "score")
            if not isinstance(items, list) or not items or not all(isinstance(i, dict) and lf in i for i in items):
                raise MalformedAnswer(f"the answer is not a list of objects with {lf!r}")
            scores = [i.get(sf) for i in items]
            if any(s is None for s in scores) and not all(s is None for s in scores):
                # Ranking by the first item would rank a scoreless label above every scored one.
                raise MalformedAnswer(f"some labels have a {sf!r} and some have none")
            numbers = _numbers(scores, "scores") if scores[0] is not None else None
            return self._from_label_list([i[lf] for i in items], numbers)
        mapping = _unwrap(_at(doc, extractor["topk_map"]))
        if not isinstance(mapping, dict) or not mapping:
            raise MalformedAnswer("the answer is not an object of label: score pairs")
        return self._from_label_list(list(mapping), _numbers(list(mapping.values()), "scores"))

    def _from_label_list(self, labels: list[Any], scores: list[float] | None) -> Parsed:
        """The top label of a list of labels (with their scores, when given), every label checked against the key.

        Checking only the top label would let an API answering another label set through whenever its top label
        happens to be a valid index. The list's length is not checked: a top-k answer that happens to name the
        classes ``0 .. k-1`` with scores summing to about 1 looks exactly like every class of a k-class model.

        Raises:
            AnswerMismatch: If a label is not one of the key's classes.
            MalformedAnswer: If a label is listed twice or a score is NaN or infinite.
        """
        indices = [label_index(value, self.num_classes, self.names) for value in labels]
        if len(set(indices)) != len(indices):
            raise MalformedAnswer("the answer lists a label twice")
        if scores is not None and not all(math.isfinite(s) for s in scores):
            # argmax takes a NaN for the largest score: the label scored NaN would be read as the answer.
            raise MalformedAnswer("the scores contain NaN or infinite values")
        return Parsed(label=indices[int(np.argmax(scores))] if scores is not None else indices[0])


def _unwrap_list(value: Any) -> Any:
    # [[{label, score}, ...]] (a batch of one) → [{label, score}, ...]
    while isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    return value
