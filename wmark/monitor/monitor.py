"""The extraction monitor: per-client signals combined into one score, with an alarm calibrated on honest traffic.

A *profile* (``wmark monitor calibrate``) holds the owner's :class:`~wmark.monitor.signals.FeatureMap` and a
calibration. Calibration runs honest query streams (e.g. logged traffic of known-good clients, each as
long as the horizon the false-alarm rate should hold over) through the same per-client code the server
uses and keeps each stream's largest value of each signal. A first part of the streams sets one scale per
signal (its largest honest value); a stream's score is ``max over signals of value / scale``. The second
part sets the alarm threshold at the order statistic that split-conformal prediction gives: if honest
streams are exchangeable with the calibration streams, a new honest stream's score exceeds it with
probability at most ``target_rate`` (or ``1/(n+1)`` when only ``n < 1/target_rate - 1`` streams are left for
it; the profile records which bound holds). Nothing else is a tuned constant.

Example:
    >>> import numpy as np
    >>> from wmark.monitor.signals import MonitorConfig, fit_feature_map
    >>> rng = np.random.default_rng(0)
    >>> fmap = fit_feature_map(x=rng.random((400, 16)), dim=4)
    >>> honest = [(rng.random((200, 16)), np.tile([0.9, 0.1, 0.0], (200, 1))) for _ in range(6)]
    >>> profile = calibrate(feature_map=fmap, streams=honest, num_classes=3, target_rate=0.2,
    ...                     config=MonitorConfig(window=64, min_queries=64))
    >>> profile.calibration["streams"]
    6
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors, wmark_metadata
from wmark.monitor.signals import SIGNALS, ClientState, FeatureMap, MonitorConfig
from wmark.monitor.text_features import check_text_spec

PROFILE_FORMAT = "wmark-monitor-profile/1"
"""The format of an image profile, as earlier versions of wmark write and read it."""
TEXT_PROFILE_FORMAT = "wmark-monitor-profile/2"
"""The format of a text profile: a reader of :data:`PROFILE_FORMAT` alone would take one for an image profile of
a model of ``buckets`` inputs, so it carries a format such readers refuse."""


@dataclass(frozen=True)
class MonitorProfile:
    """What the monitor needs: the feature map, the window settings and the calibrated alarm.

    Attributes:
        feature_map: The owner's reduced feature space.
        num_classes: Classes the served model answers over.
        config: Window sizes and cadence.
        calibration: ``scales`` (signal → honest scale), ``threshold`` (alarm when the score exceeds it),
            ``target_rate``, ``false_alarm_bound`` (the bound that holds), ``streams`` and ``queries``.
        text: For a text classifier, the features its queries become
            (:meth:`~wmark.monitor.text_features.HashedTokens.spec`); ``None`` for images, which are their own.
    """

    feature_map: FeatureMap
    num_classes: int
    config: MonitorConfig
    calibration: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] | None = None

    def new_state(self) -> ClientState:
        """A fresh per-client record for this profile."""
        return ClientState(dim=self.feature_map.dim, num_classes=self.num_classes, config=self.config,
                           near_radius=self.feature_map.near_radius, ood_radius=self.feature_map.ood_radius)

    def score(self, signals: dict[str, float]) -> float:
        """The combined score: the largest signal relative to its honest scale."""
        scales = self.calibration.get("scales", {})
        return max((signals[s] / scales[s] for s in SIGNALS if s in scales and s in signals), default=0.0)


def save_profile(profile: MonitorProfile, path: str | os.PathLike[str]) -> None:
    """Write a profile as safetensors (tensors ``mean`` and ``components``; the rest as ``wmark.monitor``), an image
    profile as :data:`PROFILE_FORMAT` and a text profile as :data:`TEXT_PROFILE_FORMAT`."""
    fm = profile.feature_map
    doc = {"format": PROFILE_FORMAT if profile.text is None else TEXT_PROFILE_FORMAT,
           "num_classes": profile.num_classes, "config": profile.config.to_dict(), "near_radius": fm.near_radius,
           "ood_radius": fm.ood_radius, "calibration": profile.calibration}
    if profile.text is not None:
        doc["text"] = profile.text
    save_tensors({"mean": torch.from_numpy(fm.mean), "components": torch.from_numpy(fm.components)}, path,
                 metadata={"monitor": doc})


def load_profile(path: str | os.PathLike[str]) -> MonitorProfile:
    """Read a profile written by :func:`save_profile`.

    Raises:
        UsageError: If the file is missing, is not a monitor profile, was never calibrated, or is a text profile in
            the image format: those were calibrated with repeats told by their features, not by their texts as the
            server tells them now, so their false-alarm bound does not hold for the served signals.
    """
    if not os.path.isfile(path):
        raise UsageError(f"Monitor profile {path} does not exist; write one with `wmark monitor calibrate`.")
    tensors, metadata = load_tensors(path)
    doc = wmark_metadata(metadata).get("monitor")
    text_format = isinstance(doc, dict) and doc.get("format") == TEXT_PROFILE_FORMAT
    if (not isinstance(doc, dict) or doc.get("format") not in (PROFILE_FORMAT, TEXT_PROFILE_FORMAT)
            or (text_format and doc.get("text") is None) or set(tensors) != {"mean", "components"}):
        raise UsageError(f"{path} is not a monitor profile; write one with `wmark monitor calibrate`.")
    if not text_format and doc.get("text") is not None:
        raise UsageError(f"Monitor profile {path} is a text profile in an older format, calibrated with other "
                         "repeats than the server counts; calibrate it again with `wmark monitor calibrate`.")
    if "threshold" not in doc.get("calibration", {}):
        raise UsageError(f"Monitor profile {path} has no calibrated threshold; calibrate it on honest streams.")
    fm = FeatureMap(tensors["mean"].numpy(), tensors["components"].numpy(), float(doc["near_radius"]),
                    float(doc["ood_radius"]))
    text = check_text_spec(doc.get("text"), size=int(fm.mean.size), path=path)
    return MonitorProfile(fm, int(doc["num_classes"]), MonitorConfig(**doc["config"]), doc["calibration"], text)


def run_stream(profile: MonitorProfile, x: np.ndarray, probs: np.ndarray, *, chunk: int | None = None,
               keys: Sequence[bytes] | None = None) -> list[tuple[int, dict[str, float]]]:
    """Feed one client's stream through a fresh record; return (queries so far, signals) at every check.

    ``chunk`` (default ``check_every``) is how many queries arrive per request; with the default the checks
    fall exactly where one-query requests would put them. ``keys`` are the queries' exact keys
    (:func:`~wmark.monitor.text_features.text_keys` for texts; ``None``: repeats are told by distance).
    """
    state = profile.new_state()
    step = chunk or profile.config.check_every
    out = []
    for i in range(0, len(x), step):
        feats, residual = profile.feature_map.transform(x[i:i + step])
        signals = state.observe(feats, residual, np.asarray(probs[i:i + step], dtype=np.float64),
                                None if keys is None else list(keys[i:i + step]))
        if signals is not None:
            out.append((state.queries, dict(signals)))
    return out


def stream_maxima(checks: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Each signal's largest value over one stream's checks (what calibration keeps of a stream)."""
    return {s: max((sig[s] for _, sig in checks), default=0.0) for s in SIGNALS}


def calibrate(*, feature_map: FeatureMap, streams: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int,
              target_rate: float = 0.01, config: MonitorConfig | None = None, signals: Sequence[str] = SIGNALS,
              scale_share: float = 1 / 3, keys: Sequence[Sequence[bytes]] | None = None) -> MonitorProfile:
    """Set the alarm on honest streams so that an honest stream alarms with probability ≤ ``target_rate``.

    Args:
        feature_map: The owner's feature space (:func:`~wmark.monitor.signals.fit_feature_map`).
        streams: Honest clients' query streams, each ``(inputs, the served model's probabilities)`` in
            arrival order and as long as the horizon the rate is meant for.
        num_classes: Classes the model answers over.
        target_rate: Wanted chance that an honest stream ever alarms.
        config: Window settings (default :class:`~wmark.monitor.signals.MonitorConfig`).
        signals: The signals that vote in the alarm (all are still computed and exported).
        scale_share: Share of the streams that set the per-signal scales; the rest set the threshold.
        keys: For texts, each stream's :func:`~wmark.monitor.text_features.text_keys`, as the server tells
            repeats by them: calibrated otherwise, the alarm's bound would be for other signals than it serves.

    Raises:
        UsageError: With fewer than 3 streams, a rate outside (0, 1) or an unknown signal.
    """
    cfg = config or MonitorConfig()
    probe = MonitorProfile(feature_map, num_classes, cfg)
    maxima, queries = [], 0
    for i, (x, probs) in enumerate(streams):
        maxima.append(stream_maxima(run_stream(probe, x, probs, keys=None if keys is None else keys[i])))
        queries += len(x)
    profile = calibrate_maxima(maxima=maxima, feature_map=feature_map, num_classes=num_classes, config=cfg,
                               target_rate=target_rate, signals=signals, scale_share=scale_share)
    profile.calibration["queries"] = queries
    return profile


def calibrate_maxima(*, maxima: Sequence[dict[str, float]], feature_map: FeatureMap, num_classes: int,
                     config: MonitorConfig, target_rate: float = 0.01, signals: Sequence[str] = SIGNALS,
                     scale_share: float = 1 / 3) -> MonitorProfile:
    """:func:`calibrate` from the honest streams' :func:`stream_maxima` (to try several signal sets)."""
    if not 0 < target_rate < 1:
        raise UsageError(f"The target false-alarm rate must be between 0 and 1, not {target_rate}.")
    unknown = sorted(set(signals) - set(SIGNALS))
    if unknown or not signals:
        raise UsageError(f"Unknown or no alarm signals {unknown}; choose from {', '.join(SIGNALS)}.")
    if len(maxima) < 3:
        raise UsageError(f"Calibration needs at least 3 honest streams, got {len(maxima)}; record more.")
    n_scale = min(len(maxima) - 2, max(1, round(scale_share * len(maxima))))
    floors = {"coverage": 1.0 / num_classes, "prada": 0.01}
    scales = {s: max(max(m[s] for m in maxima[:n_scale]), floors.get(s, 1.0 / config.window)) for s in signals}
    scored = MonitorProfile(feature_map, num_classes, config, {"scales": scales})
    held = sorted(scored.score(m) for m in maxima[n_scale:])
    k = math.ceil((1 - target_rate) * (len(held) + 1))
    threshold, bound = (held[k - 1], target_rate) if k <= len(held) else (held[-1], 1 / (len(held) + 1))
    calibration = {"scales": scales, "threshold": float(threshold), "target_rate": target_rate,
                   "false_alarm_bound": bound, "streams": len(maxima), "threshold_streams": len(held),
                   "queries": None}
    return MonitorProfile(feature_map, num_classes, config, calibration)


@dataclass(frozen=True)
class Alarm:
    """An alarm raised for a client (written to the alarm log as one JSON line)."""

    client: str
    queries: int
    score: float
    threshold: float
    signals: dict[str, float]
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"event": "alarm", "client": self.client, "queries": self.queries, "score": round(self.score, 4),
                "threshold": round(self.threshold, 4), "signals": {k: round(v, 4) for k, v in self.signals.items()},
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))}


class ExtractionMonitor:
    """Thread-safe per-client monitor over a calibrated profile; an alarm latches once raised.

    A request's inputs wait (at most ``check_every`` queries per client) until the client's next check is
    due and are then processed together: the signals at each check are exactly those of one-by-one
    processing, at a fraction of the per-request cost.

    Args:
        profile: The calibrated profile.
    """

    def __init__(self, *, profile: MonitorProfile) -> None:
        self.profile = profile
        self.threshold = float(profile.calibration["threshold"])
        self.states: dict[str, ClientState] = {}
        self.waiting: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[bytes]]] = {}
        self.scores: dict[str, float] = {}
        self.alarms: dict[str, Alarm] = {}
        self.checked: dict[str, int] = {}  # queries at each client's latest check (read without the lock)
        self.lock = threading.Lock()

    def observe(self, client: str, x: np.ndarray, probs: np.ndarray,
                keys: Sequence[bytes] | None = None) -> Alarm | None:
        """Record a request's inputs and the served model's probabilities; return a newly raised alarm.

        ``keys`` are the inputs' exact keys, which a text profile needs
        (:func:`~wmark.monitor.text_features.text_keys`: its feature vectors, a bag of tokens, are the same for
        the same words in another order, which is no repeat); images are told apart by distance.

        Raises:
            ValueError: If the profile is a text profile and no keys, or not one per input, are given.
        """
        if self.profile.text is not None and (keys is None or len(keys) != len(x)):
            raise ValueError("a text profile's monitor needs one key per text (text_keys), to tell repeats")
        cfg = self.profile.config
        with self.lock:
            state = self.states.get(client)
            if state is None:
                state = self.states[client] = self.profile.new_state()
            xs, ps, ks = self.waiting.setdefault(client, ([], [], []))
            xs.append(x)
            ps.append(probs)
            ks.extend(keys or [])
            if state.queries + sum(len(b) for b in xs) < max(cfg.min_queries, state.last_check + cfg.check_every):
                return None
            batch = np.concatenate(xs)
            feats, residual = self.profile.feature_map.transform(batch)
            batch_keys = list(ks) if self.profile.text is not None else None
            batch_probs = np.asarray(np.concatenate(ps), dtype=np.float64)
            xs.clear()
            ps.clear()
            ks.clear()
            alarm, start = None, 0
            while start < len(feats):
                # Cut at every check point: a large request checked only at its end showed the signals of its
                # last `window` queries alone, so a thief could hide any queries before an honest-looking tail.
                # (at least one query: a state restored under another config may already be past its check point)
                due = max(cfg.min_queries, state.last_check + cfg.check_every) - state.queries
                end = start + max(1, due)
                signals = state.observe(feats[start:end], residual[start:end], batch_probs[start:end],
                                        None if batch_keys is None else batch_keys[start:end])
                start = end
                if signals is None:
                    continue
                self.checked[client] = state.queries
                score = self.scores[client] = self.profile.score(signals)
                if score > self.threshold and client not in self.alarms:
                    alarm = self.alarms[client] = Alarm(client, state.queries, score, self.threshold, dict(signals),
                                                        time.time())
            return alarm

    def latest(self, client: str) -> tuple[int, dict[str, float], float] | None:
        """``(queries at the last check, its signals, its score)`` for one client (``None``: no check yet)."""
        with self.lock:
            state = self.states.get(client)
            if state is None or not state.signals:
                return None
            return state.last_check, dict(state.signals), self.scores.get(client, 0.0)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per client: queries, repeats, latest signals and score, alarm state."""
        with self.lock:
            return {c: {"queries": s.queries + sum(len(b) for b in self.waiting.get(c, ([], [], []))[0]),
                        "repeats": s.repeats, "signals": dict(s.signals),
                        "score": self.scores.get(c, 0.0), "alarm": c in self.alarms}
                    for c, s in self.states.items()}


def first_alarm(profile: MonitorProfile, checks: Sequence[tuple[int, dict[str, float]]]
                ) -> tuple[int | None, float, dict[str, float]]:
    """The query count of the first check whose score exceeds the threshold (``None``: never), the highest
    score reached and the signals at the alarm (or at the highest score)."""
    threshold = float(profile.calibration["threshold"])
    best, best_signals = 0.0, {}
    for queries, signals in checks:
        score = profile.score(signals)
        if score > threshold:
            return queries, score, signals
        if score >= best:
            best, best_signals = score, signals
    return None, best, best_signals
