"""What the trainer callbacks (Lightning, Hugging Face) share: the numbers of a collected step as trainer metrics, and
new alerts issued as Python warnings."""

from __future__ import annotations

import warnings

from ..record import _finite, layer_scalars


def step_metrics(scope, record, stats) -> dict:
    """``{"gradscope/decay_factor": ..., "gradscope/<stat>/<layer>": ...}`` of ``record`` (the decay factor only
    when finite; ``stats``: the per-layer statistics to include)."""
    metrics = {}
    factor = scope.decay_factor(record)
    if _finite(factor):
        metrics["gradscope/decay_factor"] = factor
    metrics.update((f"gradscope/{stat}/{layer}", v) for stat, layer, v in layer_scalars(record, stats))
    return metrics


def warn_alerts(alerts, stacklevel: int = 2) -> None:
    """Issue each alert as a ``RuntimeWarning`` with its message and remedy; ``stacklevel`` as the caller's own
    ``warnings.warn`` would take it."""
    for alert in alerts:
        warnings.warn(f"gradscope: {alert.kind} in {alert.layer or '(root)'} at step {alert.step}: "
                      f"{alert.message} Remedy: {alert.hint}", RuntimeWarning, stacklevel=stacklevel + 1)
