"""Library functions behind ``wmark monitor``: calibrate a profile from files, summarise alarms and state."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError
from wmark.io import load_tensors
from wmark.monitor.gate import STATE_FORMAT
from wmark.monitor.monitor import calibrate, save_profile
from wmark.monitor.signals import SIGNALS, MonitorConfig, fit_feature_map
from wmark.monitor.text_features import HashedTokens, read_text_streams, text_keys

PathLike = str | os.PathLike[str]


def read_streams(path: PathLike) -> list[np.ndarray]:
    """Honest streams from a safetensors file: ``x`` (N×…, arrival order) and ``stream`` (N,) ids.

    Raises:
        UsageError: If the file or its tensors are missing or their lengths differ.
    """
    if not os.path.isfile(path):
        raise UsageError(f"Stream file {path} does not exist; give a .safetensors file with tensors x and stream.")
    tensors, _ = load_tensors(path)
    if "x" not in tensors or "stream" not in tensors or len(tensors["x"]) != len(tensors["stream"]):
        raise UsageError(f"Stream file {path} needs tensors x (inputs) and stream (one id per input) of one length.")
    x, ids = tensors["x"].float().numpy(), tensors["stream"].long().numpy()
    return [x[ids == s] for s in np.unique(ids)]


def calibrate_profile(*, arch: str, weights: PathLike, data: str, streams: PathLike, out: PathLike,
                      target_rate: float = 0.01, dim: int = 32, config: MonitorConfig | None = None,
                      signals: Sequence[str] | None = None, device: str | None = None) -> dict[str, Any]:
    """Fit the feature map on the owner's inputs, calibrate the alarm on honest streams, write the profile.

    A text classifier (its file records a tokenizer) is calibrated on texts: the feature map is fitted on the
    hashed tokens (:class:`~wmark.monitor.text_features.HashedTokens`) of ``data``'s training texts, and
    ``streams`` is JSON Lines (:func:`~wmark.monitor.text_features.read_text_streams`).

    Args:
        arch: Architecture of the served model.
        weights: The served model file (its probabilities feed the decision-region signals).
        data: Dataset spec of the owner's natural inputs (its training inputs, or texts, fit the feature map).
        streams: Honest streams (see :func:`read_streams`), held apart from the traffic to be judged.
        out: Profile file to write.
        target_rate: Wanted chance that an honest stream as long as these ever alarms.
        dim: Reduced feature dimension.
        config: Window settings.
        signals: The signals that vote in the alarm (default all).
        device: Where the served model answers the streams (default CUDA when present).

    Returns:
        The calibration record (threshold, scales, the false-alarm bound that holds, counts).

    Raises:
        UsageError: If the streams do not fit the model's inputs, or a text model is given data without texts.
    """
    from wmark.data import load_dataset
    from wmark.io import read_metadata, wmark_metadata
    from wmark.models import load_model
    from wmark.suspects.local import LocalSuspect
    from wmark.text_serving import text_inputs_of
    from wmark.training import predict_logits, resolve_device

    on = resolve_device(device)
    start = time.perf_counter()
    metadata = wmark_metadata(read_metadata(weights))
    text = text_inputs_of(metadata)
    ds = load_dataset(data)
    model, _ = load_model(arch, weights)
    model.to(on)
    if text is None:
        fmap = fit_feature_map(x=ds.x_train.numpy(), dim=dim)
        honest = read_streams(streams)
        if honest and honest[0][0].size != fmap.mean.size:
            raise UsageError(f"The streams in {streams} do not have the shape of the inputs in {data}.")
        pairs = [(x, torch.softmax(predict_logits(model, torch.from_numpy(x)), 1).numpy()) for x in honest]
        spec, keys = None, None
    else:
        if ds.texts_train is None:
            raise UsageError(f"{weights} is a text classifier; give its owner's texts as --data (fortunes[:DIR], "
                             f"with @owner), not {data}.")
        features = HashedTokens(text.tokenizer)
        modality = metadata["modality"]  # valid, as text_inputs_of read it; a JSON string if written as one
        spec = features.spec((json.loads(modality) if isinstance(modality, str) else modality)["tokenizer"])
        fmap = fit_feature_map(x=features(ds.texts_train), dim=dim)
        served = LocalSuspect(model, input_shape=(text.max_length,), text=text)
        pairs, keys = [], []
        for texts in read_text_streams(streams):
            x = np.asarray(texts, dtype=object)
            # in slices: the tokenizer pads a batch to its longest text, and a stream may be long
            probs = [np.asarray(served.query(x[i:i + 256]).scores) for i in range(0, len(x), 256)]
            pairs.append((features(x), np.concatenate(probs)))
            keys.append(text_keys(x))
    profile = calibrate(feature_map=fmap, streams=pairs, num_classes=ds.num_classes, target_rate=target_rate,
                        config=config, signals=SIGNALS if signals is None else signals, keys=keys)
    save_profile(dataclasses.replace(profile, text=spec), out)
    return {"out": str(out), **profile.calibration, "seconds": time.perf_counter() - start}


def monitor_report(*, alarm_log: PathLike, state: PathLike | None = None) -> dict[str, Any]:
    """Summarise clients from the alarm log (and the server's state file, when given).

    Returns:
        ``{"clients": {name: {...}}, "alarms": n}``: per client its first alarm (queries, score, signals,
        action, time), its alarm count and, from the state, queries, requests and refusals by reason.

    Raises:
        UsageError: If a file is missing or not what the server writes.
    """
    log = Path(alarm_log)
    if not log.is_file():
        raise UsageError(f"Alarm log {log} does not exist; pass the file given to `wmark serve` as the alarm log.")
    clients: dict[str, dict[str, Any]] = {}
    count = 0
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise UsageError(f"Cannot read {log} as text; pass the alarm log `wmark serve` wrote.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name = rec["client"]
        except (ValueError, KeyError, TypeError):
            name = None
        if not isinstance(name, str):
            raise UsageError(f"Line {number} of {log} is not an alarm record; is it a wmark alarm log?")
        count += 1
        entry = clients.setdefault(name, {"alarms": 0})
        entry["alarms"] += 1
        entry.setdefault("first_alarm", {k: rec.get(k) for k in ("time", "queries", "score", "threshold",
                                                                 "signals", "action")})
    if state is not None:
        p = Path(state)
        try:
            doc = json.loads(p.read_text())
            saved = doc["clients"] if doc.get("format") == STATE_FORMAT else None
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            saved = None
        if not isinstance(saved, dict):
            raise UsageError(f"State file {p} is missing or not a wmark monitor state file.")
        for name, rec in saved.items():
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k) or {}, dict) for k in ("alarm", "refusals")):
                # a hand-edited record crashed the report with an AttributeError
                raise UsageError(f"State file {p} has an invalid record for client {name!r} (an object, its alarm and "
                                 "refusals objects); fix it or move the file away.")
            entry = clients.setdefault(name, {"alarms": 0})
            entry.update({k: rec.get(k) for k in ("queries_total", "queries_today", "requests", "refusals", "score",
                                                  "signals")})
            entry["alarm_state"] = None if not rec.get("alarm") else rec["alarm"].get("action")
    return {"clients": dict(sorted(clients.items())), "alarms": count}
