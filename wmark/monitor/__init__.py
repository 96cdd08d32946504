"""Watch the owner's own API: per-client policy (quotas, rate limits, answer modes) and an extraction monitor.

See ``docs/monitoring.md``. :mod:`wmark.monitor.policy` reads the policy file, :mod:`wmark.monitor.signals`
computes the per-client signals, :mod:`wmark.monitor.monitor` combines and calibrates them, and
:mod:`wmark.monitor.gate` applies all of it in the request path of :mod:`wmark.serve`; for a text classifier,
:mod:`wmark.monitor.text_features` turns each query into the feature vector the signals read.
"""
