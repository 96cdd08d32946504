"""What `wmark serve` reads from a client: a request's JSON body, and the v2 input tensor in it.

Both endpoints (v2 ``infer`` and the Hugging Face style text endpoint) read their body with :func:`read_json`:
only when it is sent as JSON (HTTP 415 otherwise), no further than a size limit (HTTP 413 past it; by
default :func:`default_body_limit`, room for the largest request the endpoint answers) and no longer than a
deadline (HTTP 408 past it; :data:`BODY_TIMEOUT_S` by default). A large body is parsed in a worker thread, so
that other requests are answered meanwhile. The v2 endpoint decodes its input tensor with
:func:`decode_v2_input`. Every refusal is ``{"error": ...}``, one sentence.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

MAX_BATCH = 1024
"""Most inputs (images or texts) one request may hold."""
JSON_BYTES_PER_VALUE = 64
"""Room for one number of a v2 input in a request body: the longest float64 as JSON writers print it (24
characters, ``-2.2250738585072014e-308``), its separator, and nested-list brackets and indentation as
pretty-printers write them."""
TEXT_CHARS_PER_TOKEN = 32
"""Most characters a served text may hold per token of the model's maximum length (natural text averages four
or five): a longer text is refused before it is tokenized, which bounds both the tokenizer's work and the body."""
JSON_BYTES_PER_CHAR = 12
"""Most bytes one character of a string takes in JSON: one beyond the BMP escaped as a surrogate pair."""
ENVELOPE_BYTES = 64 * 1024
"""Room for everything in a request but its values: names, shape, datatype, id, parameters."""
BODY_TIMEOUT_S = 60.0
"""Default seconds a client has to send a request's whole body. uvicorn sets no deadline for a body, so a client
sending a byte every few seconds held a connection, and the body read so far, for as long as it liked; a few
hundred such clients exhaust a server. A minute lets the largest default body of a 28×28 model (about 50 MB)
arrive at 7 Mbit/s; serve larger bodies over slower links with a longer deadline."""
PARSE_ON_LOOP_BYTES = 256 * 1024
"""Largest body parsed on the event loop: it takes about the interpreter's switch interval between threads (5 ms)
to parse, so a worker thread would not let other requests in sooner. A larger one is parsed in a thread."""
_FLOAT_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
_INT_TYPES = {"UINT8": 255.0, "INT8": 255.0, "INT16": 255.0, "INT32": 255.0, "INT64": 255.0}

_NOT_NUMBERS = "data must be numbers (not strings, booleans or null), in a flat list or in nested lists of equal lengths"


class BadRequest(Exception):
    """A request the server answers with HTTP 400."""


def text_char_limit(max_length: int) -> int:
    """Most characters the text endpoint takes in one text, for a model of ``max_length`` tokens."""
    return TEXT_CHARS_PER_TOKEN * max_length


def default_body_limit(*, input_size: int, text_max_length: int | None = None) -> int:
    """The largest request body the server reads by default: room for the largest request it answers.

    That request holds :data:`MAX_BATCH` inputs, each of ``input_size`` numbers at :data:`JSON_BYTES_PER_VALUE`
    bytes, or for a text model (``text_max_length`` tokens) each a text of :func:`text_char_limit` characters
    at :data:`JSON_BYTES_PER_CHAR` bytes, plus :data:`ENVELOPE_BYTES`. A smaller default would refuse requests
    the endpoint answers; a larger one would only read more of a body that is refused anyway. (JSON allows a
    number any count of digits and spaces, so no limit admits every spelling; this one admits every request as
    JSON writers produce it.)
    """
    if text_max_length is not None:
        per_input = JSON_BYTES_PER_CHAR * text_char_limit(text_max_length) + 4  # quotes, comma, space
    else:
        per_input = JSON_BYTES_PER_VALUE * input_size
    return MAX_BATCH * per_input + ENVELOPE_BYTES


async def read_json(request: Request, max_bytes: int, *, timeout: float = BODY_TIMEOUT_S,
                    decode: Callable[[Any], Any] | None = None) -> Any:
    """The request's JSON body (passed through ``decode`` if given), or the response that refuses it.

    A body over ``max_bytes`` gets HTTP 413: a declared ``Content-Length`` is checked before anything is read,
    and a chunked body is counted as it arrives, so no more than ``max_bytes`` (plus one chunk) is ever held.
    A body not received whole within ``timeout`` seconds gets HTTP 408, and its connection is closed. A body
    that is not JSON, or nests too deeply to parse, gets HTTP 400. A ``Content-Type`` other than JSON
    (``application/json`` or ``application/*+json``; none is taken as JSON) gets HTTP 415, as FastAPI (and so
    KServe) refuses it: the types a web page may send cross-site without asking (``text/plain``, forms) would
    otherwise let any page a user opens put queries into an open server's query log and quotas.

    A body over :data:`PARSE_ON_LOOP_BYTES` is parsed, and ``decode`` run on it, in a worker thread: parsing
    tens of megabytes takes about a second, during which the event loop answered no other request.
    ``decode``'s exceptions reach the caller.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        return JSONResponse({"error": f"the request body must be JSON, sent with Content-Type: application/json "
                                      f"(not {kind[:60]})"}, status_code=415)
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:
        declared = 0
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                break

    if declared <= max_bytes:
        try:
            await asyncio.wait_for(receive(), timeout)
        except ClientDisconnect:  # uncaught, each one logged a traceback as an error of the application
            return JSONResponse({"error": "the client left before sending the whole body"}, status_code=400)
        except asyncio.TimeoutError:
            # closed: the rest of the body may still be trickling in, and nothing else can follow it
            return JSONResponse({"error": f"the request body did not arrive within {timeout:g} seconds; send it "
                                          "faster or in smaller requests"}, status_code=408,
                                headers={"Connection": "close"})
    if declared > max_bytes or len(body) > max_bytes:
        return JSONResponse({"error": f"the request body is larger than this server's limit of {max_bytes} bytes; "
                                      "send fewer inputs per request"}, status_code=413)
    if len(body) <= PARSE_ON_LOOP_BYTES:
        return _parse(body, decode, yielding=False)
    return await run_in_threadpool(_parse, body, decode, yielding=True)


def _parse(body: bytes | bytearray, decode: Callable[[Any], Any] | None, *, yielding: bool) -> Any:
    """``body`` parsed as JSON and passed through ``decode``, or the response that refuses it.

    ``yielding`` parses numbers with Python functions: the C parser holds the interpreter's lock until it
    returns, so in a worker thread alone it would still stop the event loop; a Python call per number lets the
    loop's thread take the lock at every switch interval. (Strings have no such hook; their C scanning runs at
    hundreds of megabytes a second.)
    """
    hooks: dict[str, Any] = {"parse_float": _float, "parse_int": _int} if yielding else {}
    try:
        doc = json.loads(body, **hooks)
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
    except RecursionError:  # JSON arrays nested thousands deep
        return JSONResponse({"error": "the request body nests JSON too deeply"}, status_code=400)
    return doc if decode is None else decode(doc)


def _float(text: str) -> float:
    return float(text)


def _int(text: str) -> int:
    return int(text)


def decode_v2_input(doc: Any, shape: tuple[int, ...], per_item: int) -> np.ndarray:
    """The batch of inputs a v2 infer request carries, shaped ``[N, *shape]`` as FP32.

    Raises:
        BadRequest: If the request is not one input tensor of ``N`` inputs of ``per_item`` finite numbers each,
            with ``N`` at most :data:`MAX_BATCH`, or has an ``id`` that is not a string.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise BadRequest("the request needs \"inputs\": a list with one input tensor")
    if not isinstance(doc.get("id", ""), str):  # it is echoed back: NaN or 1e400 there was a 500 after answering
        raise BadRequest("the request's \"id\" must be a string, as the v2 protocol says")
    tensor = doc["inputs"][0]
    if not isinstance(tensor, dict) or not isinstance(tensor.get("data"), list):
        raise BadRequest("the input tensor needs \"data\" (a flat list)")
    datatype = str(tensor.get("datatype", "FP32")).upper()
    if datatype not in _FLOAT_TYPES and datatype not in _INT_TYPES:
        raise BadRequest(f"unsupported datatype {datatype!r}; send FP32")
    dims = tensor.get("shape")
    if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                         for d in dims):
        raise BadRequest("the input tensor needs a \"shape\" of positive integers")
    # [2, 32] is two inputs of 32 values, not one of 64; the product stops past per_item, as the full product of
    # a shape of thousand-digit dimensions takes minutes, and its digits are more than str() may print
    if _product_up_to(dims[1:], per_item) != per_item:
        raise BadRequest(f"inputs must be shaped [N, {', '.join(map(str, shape))}], got {_shortened(dims)}")
    batch = dims[0]
    if batch > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} inputs per request")
    data = _flat_numbers(tensor["data"])
    total = batch * per_item
    if len(data) != total:
        raise BadRequest(f"the shape {dims} holds {total} values but data has {len(data)}")
    try:
        x = np.asarray(data, dtype=np.float64)
    except OverflowError:  # an integer beyond a float
        raise BadRequest("data must be numbers a float can hold") from None
    if datatype in _INT_TYPES:
        # integer data are 8-bit pixel values; anything else divided by 255 would be a silently wrong image
        if not np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
            raise BadRequest(f"{datatype} data are pixel values, whole numbers from 0 to 255; send FP32 for others")
        x = x / _INT_TYPES[datatype]
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    # checked after the cast: a value beyond FP32's range (1e39) becomes inf there, and its NaN scores are no JSON
    if not np.isfinite(x).all():
        raise BadRequest("data contains NaN or infinite values, or values beyond FP32's range")
    return x.reshape(batch, *shape)


def _flat_numbers(data: list[Any]) -> list[Any]:
    """``data`` in row-major order: a flat list of JSON numbers, or nested lists of equal lengths holding them.

    Raises:
        BadRequest: On ragged lists, or on an item that is not a JSON number: NumPy would read the string
            ``"0.5"`` as 0.5, ``true`` as 1 and ``null`` as NaN.
    """
    while data and isinstance(data[0], list):
        width = len(data[0])
        if not all(isinstance(row, list) and len(row) == width for row in data):
            raise BadRequest(_NOT_NUMBERS)
        data = [v for row in data for v in row]
    if not {type(v) for v in data} <= {int, float}:  # exact types: a JSON boolean is a Python int
        raise BadRequest(_NOT_NUMBERS)
    return data


def _shortened(dims: list[int]) -> str:
    """``dims`` as a list, cut to about 80 characters (a refusal need not echo a shape of thousands of digits)."""
    shown = str(dims)
    if len(shown) <= 80:
        return shown
    cut = shown.rfind(", ", 0, 76)
    return shown[:cut] + ", ...]" if cut > 0 else shown[:76] + "...]"


def _product_up_to(dims: list[int], bound: int) -> int:
    """The product of positive ``dims``, or ``bound + 1`` once it passes ``bound`` (it can only grow then)."""
    product = 1
    for d in dims:
        product *= d
        if product > bound:
            return bound + 1
    return product

def model_failed(exc: BaseException) -> JSONResponse:
    """The answer to a request the served model raised on: a JSON 500 naming only the exception's type (its
    message may hold the server's paths or data), with the traceback in the server's log.

    Starlette would answer a plain-text 500 and re-raise, and uvicorn then drops the connection, which a client
    reads as a network failure and retries.
    """
    logging.getLogger("wmark.serve").error("the served model failed on a request", exc_info=exc)
    return JSONResponse({"error": f"the served model failed on these inputs ({type(exc).__name__}); the server's "
                                  "log has the details"}, status_code=500)
