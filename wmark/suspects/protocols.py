"""Wire formats of prediction APIs: how to ask one input, and how to read one answer.

Each protocol turns one float32 input into an HTTP request and one decoded JSON answer into a
:class:`Parsed` label (plus scores when the API exposes them all). Transport concerns (auth, retries,
rate limits) live in :mod:`wmark.suspects.http`; this module never touches the network except through the
``get`` callable handed to :meth:`WireProtocol.discover`.

Supported:

* :class:`V2Protocol` — the Open Inference Protocol v2 (KServe, Triton, MLServer, ``wmark serve``).
* :class:`TFServingProtocol` — TensorFlow Serving REST (``:predict``, row "instances" format).
* :class:`wmark.suspects.json_template.JsonTemplateProtocol` — any JSON endpoint described by a small
  template (its own module).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from wmark.errors import UsageError

DEFAULT_INPUT_NAME = "input-0"
"""The v2 input name sent to a server that describes no inputs (KServe's examples name theirs so)."""

GetJson = Callable[[str], Any]
"""Fetch a URL with GET through the suspect's transport and return its decoded JSON."""


class MalformedAnswer(ValueError):
    """An answer that cannot be read as a prediction; it counts as an abstention, never a match."""


class AnswerMismatch(MalformedAnswer):
    """An answer that is well formed but does not fit the key (wrong number of classes, unknown label).

    When it happens before any usable answer the suspect is the wrong model for the key, and the caller
    raises a :class:`~wmark.errors.UsageError`; later it is treated as one malformed answer.
    """


class AnswerCountMismatch(AnswerMismatch):
    """Several labels answered for one input: the suspect answers garbage whatever the key, so before any
    usable answer the caller raises a :class:`~wmark.errors.RuntimeFailure` (exit 3), not a usage error."""


@dataclass(frozen=True)
class Parsed:
    """One decoded answer: the top-1 label and, when the API returned every class's score, the scores."""

    label: int
    scores: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Request:
    """One HTTP request to send."""

    method: str
    url: str
    body: Any


class WireProtocol:
    """Base class of the protocols: override :meth:`request` and :meth:`parse`, optionally :meth:`discover`.

    Args:
        num_classes: The key's number of classes (answers are checked against it).
        input_shape: The key's shape of one input.
    """

    name = "abstract"

    def __init__(self, *, num_classes: int, input_shape: Sequence[int]) -> None:
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)

    @property
    def endpoint(self) -> str:
        """The URL reports should name."""
        raise NotImplementedError

    def discover(self, get: GetJson) -> dict[str, Any]:
        """Ask the server what it serves; return what was learnt (for reports)."""
        return {}

    def request(self, x: np.ndarray) -> Request:
        """The request that asks the suspect about one input shaped ``input_shape``."""
        raise NotImplementedError

    def parse(self, doc: Any) -> Parsed:
        """Read one decoded JSON answer; raise :class:`MalformedAnswer` when it is not a prediction."""
        raise NotImplementedError

    def _from_scores(self, values: Any) -> Parsed:
        scores = _numbers(values, "scores")
        if len(scores) != self.num_classes:
            raise AnswerMismatch(
                f"the suspect answers with {len(scores)} scores per input but the key is for "
                f"{self.num_classes} classes"
            )
        if not all(math.isfinite(s) for s in scores):
            raise MalformedAnswer("the scores contain NaN or infinite values")
        return Parsed(label=int(np.argmax(scores)), scores=tuple(scores))

    def _from_label(self, value: Any, names: Sequence[str] | None = None) -> Parsed:
        return Parsed(label=label_index(value, self.num_classes, names))


def label_index(value: Any, num_classes: int, names: Sequence[str] | None = None) -> int:
    """Map an answered label (an int, ``"3"``, ``"LABEL_3"`` or a class name in ``names``) to its index.

    Raises:
        AnswerMismatch: If the label is outside the key's classes or an unknown name.
        MalformedAnswer: If it is not a label at all.
    """
    if isinstance(value, bool) or value is None:
        raise MalformedAnswer(f"{value!r} is not a label")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise MalformedAnswer(f"{value!r} is not a class index")
        value = int(value)
    if isinstance(value, str):
        if names is not None and value in names:
            return list(names).index(value)
        match = re.fullmatch(r"(?:label[_ ]?)?(\d+)", value.strip(), flags=re.IGNORECASE)
        if not match:
            raise AnswerMismatch(
                f"the suspect answers the label {value!r}, which is not a class index; list the class names "
                "under \"labels\" in the template"
            )
        value = int(match.group(1))
    if not isinstance(value, int):
        raise MalformedAnswer(f"{type(value).__name__} is not a label")
    if not 0 <= value < num_classes:
        raise AnswerMismatch(f"the suspect answers label {value}, outside the key's {num_classes} classes")
    return value


def _numbers(values: Any, what: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise MalformedAnswer(f"{what} are not a non-empty list")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MalformedAnswer(f"{what} contain a non-number")
        out.append(float(v))
    return out


def _unwrap(value: Any) -> Any:
    # Batched APIs wrap a single answer in one-element lists, sometimes twice (Hugging Face pipelines).
    while isinstance(value, list) and len(value) == 1 and isinstance(value[0], (list, dict)):
        value = value[0]
    return value


def _split_model_url(url: str, marker: str) -> tuple[str, str | None]:
    """Split ``http://h:p/prefix/<marker>/<name>...`` into the base URL and the model name."""
    head, sep, tail = url.partition(marker)
    if not sep:
        return url.rstrip("/"), None
    name = re.split(r"[/:]", tail, maxsplit=1)[0]
    return head.rstrip("/"), name or None


class V2Protocol(WireProtocol):
    """Open Inference Protocol v2: ``GET /v2/models/{name}`` for metadata, ``POST .../infer`` to predict.

    The input's name, datatype and shape come from the model's metadata. A server that describes no inputs
    (a KServe ``ModelServer`` with a custom Python ``Model`` answers ``"inputs": []``) is sent the key's input
    spec instead: FP32, shaped ``[1, *input_shape]``, named ``input_name``; :meth:`discover` records that the
    spec came from the key. Answers may be FP32/FP64 scores (N×C), an integer label (label-only servers), or
    Triton's classification strings ``"score:index[:name]"`` (top-k; the first is the top-1).

    Args:
        url: The server (``http://host:port``) or a model URL (``http://host:port/v2/models/NAME``).
        model_name: The model's name (taken from ``url`` when it names one).
        version: A model version, if the server keeps several.
        input_name: The input tensor's name; overrides the server's, and names the input when the server
            describes none (default ``DEFAULT_INPUT_NAME``).
    """

    name = "v2"

    def __init__(self, *, url: str, model_name: str | None, num_classes: int, input_shape: Sequence[int],
                 version: str | None = None, input_name: str | None = None) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape)
        base, from_url = _split_model_url(url, "/v2/models/")
        self.base = base
        self.model_name = model_name or from_url
        if not self.model_name:
            raise UsageError("The v2 protocol needs a model name: give it, or a URL ending in /v2/models/NAME.")
        self.version = version
        if input_name is not None and not input_name.strip():
            raise UsageError("The v2 input name cannot be empty; give the name the model's input tensor has.")
        self.chosen_input_name = input_name
        self.input_name = input_name or DEFAULT_INPUT_NAME
        self.datatype = "FP32"
        self.shape: list[int] = [1, *self.input_shape]
        self.output_name: str | None = None

    @property
    def _model_path(self) -> str:
        path = f"{self.base}/v2/models/{quote(self.model_name or '', safe='')}"
        return f"{path}/versions/{quote(self.version, safe='')}" if self.version else path

    @property
    def endpoint(self) -> str:
        return f"{self._model_path}/infer"

    def discover(self, get: GetJson) -> dict[str, Any]:
        meta = get(self._model_path)
        if not isinstance(meta, dict) or not ({"name", "inputs"} & set(meta)) or \
                not isinstance(meta.get("inputs") or [], list):
            raise UsageError(f"{self._model_path} does not answer with v2 model metadata; is this a v2 server?")
        outputs = self._check_outputs(meta.get("outputs"))
        info: dict[str, Any] = {"model": self.model_name, "platform": meta.get("platform"),
                                "outputs": [{k: o.get(k) for k in ("name", "datatype", "shape")} for o in outputs]}
        if not meta.get("inputs"):
            # KServe's custom Python models describe no inputs: ask in the key's input spec, and say so.
            self.shape = [1, *self.input_shape]
            return {**info, "input": {"name": self.input_name, "datatype": self.datatype, "shape": self.shape},
                    "input_from": "key",
                    "note": f"the server does not describe its inputs; sent the key's input spec ({self.input_name}, "
                            f"FP32, shape {self.shape})"}
        try:
            first = meta["inputs"][0]
            self.input_name = self.chosen_input_name or str(first["name"])
            self.datatype = str(first.get("datatype", "FP32")).upper()
            shape = [int(s) for s in first.get("shape", [])]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # OverflowError: int(Infinity)
            raise UsageError(
                f"{self._model_path} does not describe its inputs as the v2 protocol requires; is this a v2 server?"
            ) from None
        if shape:
            dims = [1 if s < 0 else s for s in shape]
            per_item = dims[1:] if len(dims) > len(self.input_shape) or dims[0] == 1 else dims
            if int(np.prod(per_item)) != int(np.prod(self.input_shape)):
                raise UsageError(
                    f"Model {self.model_name} takes inputs shaped {shape} but the key's inputs are "
                    f"{list(self.input_shape)}; use the key made for this model."
                )
            self.shape = [1, *per_item]
        return {**info, "input": {"name": self.input_name, "datatype": self.datatype, "shape": shape},
                "input_from": "server"}

    def _check_outputs(self, outputs: Any) -> list[dict[str, Any]]:
        """The described outputs (dicts only); refuses score outputs of the wrong width."""
        described = [o for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []
        for out in described:
            try:
                dims = [int(s) for s in out.get("shape") or []]
            except (TypeError, ValueError, OverflowError):
                dims = []
            is_scores = dims and str(out.get("datatype", "")).upper().startswith("FP") and dims[-1] > 1
            if is_scores and dims[-1] != self.num_classes:
                raise UsageError(
                    f"Model {self.model_name} answers {dims[-1]} scores per input but the key is for "
                    f"{self.num_classes} classes; use the key made for this model."
                )
        if len(described) > 1:
            self.output_name = _preferred_output(described)
        return described

    def request(self, x: np.ndarray) -> Request:
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.datatype.startswith(("UINT", "INT")):
            data: list[Any] = np.rint(np.clip(flat, 0.0, 1.0) * 255.0).astype(np.int64).tolist()
        else:
            data = flat.tolist()
        body: dict[str, Any] = {"inputs": [{"name": self.input_name, "shape": self.shape,
                                            "datatype": self.datatype, "data": data}]}
        return Request("POST", self.endpoint, body)

    def parse(self, doc: Any) -> Parsed:
        if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list) or not doc["outputs"]:
            raise MalformedAnswer("the answer has no outputs")
        outputs = doc["outputs"]
        chosen = next((o for o in outputs if isinstance(o, dict) and o.get("name") == self.output_name), None)
        out = chosen or outputs[0]
        if not isinstance(out, dict) or not isinstance(out.get("data"), list):
            raise MalformedAnswer("the output has no data")
        rows = _answer_rows(out)
        if rows > 1:
            # One input was sent: flattening several rows would read, say, two 5-class rows as one 10-class answer.
            raise AnswerCountMismatch(f"the suspect answers {rows} rows for one input")
        datatype = str(out.get("datatype", "")).upper()
        data = _row_major(out["data"])
        if datatype == "BYTES":
            return self._from_classification(data)
        if datatype.startswith(("INT", "UINT")) or (len(data) == 1 and self.num_classes > 1):
            if len(data) != 1:
                raise AnswerCountMismatch(f"the suspect answers {len(data)} integers per input instead of one label")
            return self._from_label(data[0])
        return self._from_scores(data)

    def _from_classification(self, data: list[Any]) -> Parsed:
        # Triton's classification extension: "score:index" or "score:index:name", best first.
        if not data or not isinstance(data[0], str):
            raise MalformedAnswer("the classification output is empty")
        parts = data[0].split(":")
        if len(parts) < 2:
            raise MalformedAnswer(f"{data[0]!r} is not a score:index classification")
        return self._from_label(parts[1])


def _answer_rows(out: dict[str, Any]) -> int:
    """The rows of a v2 output: its declared first dimension when it has several, else its nesting."""
    shape = out.get("shape")
    if isinstance(shape, list) and len(shape) > 1 and isinstance(shape[0], int) and shape[0] > 1:
        return shape[0]
    data = out["data"]
    return len(data) if len(data) > 1 and all(isinstance(v, list) for v in data) else 1


def _row_major(values: list[Any]) -> list[Any]:
    """Tensor data flattened: the v2 protocol lets a server send it nested row-major (``[[0.1, 0.9]]``) or flat."""
    while values and all(isinstance(v, list) for v in values):
        values = [x for v in values for x in v]
    return values


def _preferred_output(outputs: list[Any]) -> str | None:
    for want in ("FP", "INT", "UINT", "BYTES"):
        for out in outputs:
            if isinstance(out, dict) and str(out.get("datatype", "")).upper().startswith(want):
                return str(out.get("name"))
    return None


class TFServingProtocol(WireProtocol):
    """TensorFlow Serving REST: ``POST /v1/models/{name}[/versions/{v}]:predict`` with ``{"instances": [...]}``.

    ``GET /v1/models/{name}`` checks the model exists; when ``/metadata`` says the model takes channels-last
    images (H×W×C), inputs are transposed to match. Answers may be a score list, a bare label, or a dict of
    named outputs (``scores``/``probabilities`` and ``classes``/``class_ids``); literal ``NaN`` and
    ``Infinity`` tokens are read (and such a row counts as malformed).

    ``predictions`` holds one entry per instance and exactly one instance is sent, so a flat list of numbers is
    read by that row count, not guessed: one entry is the label (``[3]``); several cannot be one per instance,
    so they are the instance's row from an output without a batch dimension, read as scores when there are as
    many as the key's classes and refused otherwise.
    """

    name = "tfserving"
    _SCORE_KEYS = ("scores", "probabilities", "probs", "logits", "predictions", "output_0")
    _LABEL_KEYS = ("classes", "class_ids", "class", "label", "labels", "predicted_class")

    def __init__(self, *, url: str, model_name: str | None, num_classes: int, input_shape: Sequence[int],
                 version: str | None = None) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape)
        base, from_url = _split_model_url(url, "/v1/models/")
        self.base = base
        self.model_name = model_name or from_url
        if not self.model_name:
            raise UsageError("TensorFlow Serving needs a model name: give it, or a URL ending in /v1/models/NAME.")
        self.version = version
        self.channels_last = False

    @property
    def _model_path(self) -> str:
        path = f"{self.base}/v1/models/{quote(self.model_name or '', safe='')}"
        return f"{path}/versions/{quote(self.version, safe='')}" if self.version else path

    @property
    def endpoint(self) -> str:
        return f"{self._model_path}:predict"

    def discover(self, get: GetJson) -> dict[str, Any]:
        status = get(self._model_path)
        info: dict[str, Any] = {"model": self.model_name, "status": status.get("model_version_status")
                                if isinstance(status, dict) else None}
        try:
            meta = get(f"{self._model_path}/metadata")
        except UsageError:
            return info
        dims = _tf_input_dims(meta)
        chw = self.input_shape
        if dims and len(chw) == 3 and dims[1:] == [chw[1], chw[2], chw[0]] and list(chw) != dims[1:]:
            self.channels_last = True
        info["channels_last"] = self.channels_last
        return info

    def request(self, x: np.ndarray) -> Request:
        arr = np.asarray(x, dtype=np.float32).reshape(self.input_shape)
        if self.channels_last:
            arr = np.moveaxis(arr, 0, -1)
        return Request("POST", self.endpoint, {"instances": [arr.tolist()]})

    def parse(self, doc: Any) -> Parsed:
        if not isinstance(doc, dict):
            raise MalformedAnswer("the answer is not a JSON object")
        if "error" in doc:
            raise MalformedAnswer(f"the server answered an error: {str(doc['error'])[:200]}")
        rows = doc.get("predictions", doc.get("outputs"))
        if not isinstance(rows, list) or not rows:
            raise MalformedAnswer("the answer has no predictions")
        if len(rows) == 1 or not isinstance(rows[0], (int, float)):
            if len(rows) > 1:
                # One input was sent: reading the first of several rows would take an answer meant for no query.
                raise AnswerCountMismatch(f"the suspect answers {len(rows)} predictions for one input")
            return self._parse_row(rows[0])
        if len(_numbers(rows, "predictions")) != self.num_classes:
            # Neither one label nor one row of the key's scores: naming a cause (another model's class count,
            # several labels for one input) would be a guess.
            raise AnswerMismatch(
                f"the suspect answers a flat list of {len(rows)} numbers for one input, neither one label nor the "
                f"key's {self.num_classes} scores; the server should answer {{\"predictions\": [<label>]}} or "
                f"{{\"predictions\": [[<{self.num_classes} scores>]]}}"
            )
        return self._parse_row(rows)

    def _parse_row(self, row: Any) -> Parsed:
        if isinstance(row, dict):
            for name in self._SCORE_KEYS:
                scores = _unwrap(row.get(name))  # a batch of one may nest the scores: [[0.1, 0.9]]
                if isinstance(scores, list) and len(scores) == self.num_classes:
                    return self._from_scores(scores)
            for name in self._LABEL_KEYS:
                if name in row:
                    value = row[name]
                    if isinstance(value, list):
                        scores = next((row[s] for s in self._SCORE_KEYS if isinstance(row.get(s), list)), None)
                        value = _top_of(value, scores)
                    return self._from_label(value)
            other = next((_unwrap(row[s]) for s in self._SCORE_KEYS if isinstance(row.get(s), list)), None)
            if other is not None:
                # Scores for another number of classes and no label: another model than the key's, say so.
                return self._from_scores(other)
            raise MalformedAnswer(f"no scores or label among the outputs {sorted(row)[:5]}")
        if isinstance(row, list):
            if len(row) == 1:
                return self._from_label(row[0])
            return self._from_scores(row)
        return self._from_label(row)


def _tf_input_dims(meta: Any) -> list[int] | None:
    try:
        sigs = meta["metadata"]["signature_def"]["signature_def"]
        sig = sigs.get("serving_default") or next(iter(sigs.values()))
        tensor = next(iter(sig["inputs"].values()))
        return [int(d["size"]) for d in tensor["tensor_shape"]["dim"]]
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        return None


def _top_of(labels: list[Any], scores: Any) -> Any:
    if not labels:
        raise MalformedAnswer("the answer's class list is empty")
    if isinstance(scores, list) and len(scores) == len(labels):
        nums = _numbers(scores, "scores")
        return labels[int(np.argmax(nums))]
    return labels[0]
