"""What `wmark serve` reads from a client: a request's JSON body, and the v2 input tensor in it.

Both endpoints (v2 ``infer`` and the Hugging Face style text endpoint) read their body with :func:`read_json`,
and the v2 endpoint decodes its input tensor with :func:`decode_v2_input`; what either refuses is answered
with HTTP 400 and ``{"error": ...}``, one sentence.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

MAX_BATCH = 1024
"""Most inputs (images or texts) one request may hold."""
_FLOAT_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
_INT_TYPES = {"UINT8": 255.0, "INT8": 255.0, "INT16": 255.0, "INT32": 255.0, "INT64": 255.0}


class BadRequest(Exception):
    """A request the server answers with HTTP 400."""


async def read_json(request: Request) -> Any:
    """The request's JSON body, or the HTTP 400 response that refuses it (not JSON, or nested too deeply to read)."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
    except RecursionError:  # JSON arrays nested thousands deep
        return JSONResponse({"error": "the request body nests JSON too deeply"}, status_code=400)


def decode_v2_input(doc: Any, shape: tuple[int, ...], per_item: int) -> np.ndarray:
    """The batch of inputs a v2 infer request carries, shaped ``[N, *shape]`` as FP32.

    Raises:
        BadRequest: If the request is not one input tensor of ``N`` inputs of ``per_item`` finite numbers each,
            with ``N`` at most :data:`MAX_BATCH`.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise BadRequest("the request needs \"inputs\": a list with one input tensor")
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
    data = tensor["data"]
    if any(isinstance(v, list) for v in data[:1]):
        try:
            data = np.asarray(data, dtype=np.float64).reshape(-1).tolist()
        except (TypeError, ValueError, OverflowError):  # ragged lists, strings, integers beyond a float
            raise BadRequest("data must be numbers, in a flat list or in nested lists of equal lengths") from None
    total = math.prod(dims)  # Python integers: NumPy's int64 product wrapped around ([2**32, 2**32] held 0 values)
    if len(data) != total:
        raise BadRequest(f"the shape {dims} holds {total} values but data has {len(data)}")
    if math.prod(dims[1:]) != per_item:  # [2, 32] is two inputs of 32 values, not one of 64
        raise BadRequest(f"inputs must be shaped [N, {', '.join(map(str, shape))}], got {dims}")
    batch = dims[0]
    if batch > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} inputs per request")
    try:
        x = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest("data must be numbers") from None
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
