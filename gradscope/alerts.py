"""Alerts: what a detector says about a layer, and the bookkeeping that fires each one once per episode."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

logger = logging.getLogger("gradscope")


class GradientError(RuntimeError):
    """Raised by ``Scope.step()`` for alert kinds listed in ``watch(..., raise_on=...)``.

    ``err.alerts`` holds the alerts that caused it; they are also in ``scope.alerts`` and the history.
    """

    def __init__(self, alerts: list["Alert"]):
        self.alerts = list(alerts)
        super().__init__("\n".join(str(a) for a in self.alerts))


@dataclass(frozen=True)
class Alert:
    """One diagnosis: a condition that started at ``step`` on ``layer``.

    Attributes:
        kind: the detector's kind: ``"nonfinite"``, ``"exploding"``, ``"vanishing"``, ``"vanishing_through_time"``,
            ``"dead_units"``, ``"saturation"`` (a detector of your own names its own).
        layer: qualified module name (a call site such as ``"layer1.0.relu#2"`` for a second call).
        step: the step index at which the condition started.
        value: the measured quantity that crossed the threshold.
        threshold: the threshold it crossed.
        message: one sentence a person understands.
        hint: the remedy that fits the evidence.
        metric: which quantity ``value`` is (``"backprop_signal_ratio"``, ``"grad_norm"``, ...).
        related: other layers the alert names, most involved first: for a whole-model spike (``layer=""``) the layers
            whose gradient jumped most.
    """

    kind: str
    layer: str
    step: int
    value: float
    threshold: float
    message: str
    hint: str
    metric: str = ""
    related: tuple = ()

    def __str__(self) -> str:
        return f"[gradscope] step {self.step} {self.kind} in {self.layer or '(root)'}: {self.message} Hint: {self.hint}"

    def to_dict(self) -> dict:
        return asdict(self)


def log_alerts(new: list[Alert], max_names: int = 6) -> None:
    """One WARNING per alert kind and step on the ``"gradscope"`` logger (each alert in full at DEBUG)."""
    for kind in dict.fromkeys(a.kind for a in new):
        group = [a for a in new if a.kind == kind]
        names = [a.layer or "(root)" for a in group]
        shown = ", ".join(names[:max_names]) + (f", ... ({len(names)} layers)" if len(names) > max_names else "")
        first = group[0]
        where = f"layers {shown}" if len(names) > 1 else f"layer {shown}"
        logger.warning("step %d: %s in %s. %s: %s Hint: %s", first.step, kind, where, first.layer or "(root)",
                       first.message, first.hint)
        for a in group:
            logger.debug("%s", a)


@dataclass
class AlertBook:
    """Turns per-step conditions into alerts that fire when a condition starts.

    A condition is keyed by ``(kind, layer)``. It fires on the first collected step where it holds and stays silent
    while it keeps holding. Once it has been clear for ``rearm_after`` consecutive collected steps its episode is
    over, and it fires again when it returns. The default of 10 keeps a quantity that wobbles around a threshold
    (a deep plain net's signal ratio near 1e-3, step after step) to one alert per episode instead of one per wobble.
    """

    raise_on: frozenset = frozenset()
    max_alerts: int = 10_000
    rearm_after: int = 10
    log: bool = True  # log new alerts to the "gradscope" logger (False on ranks other than 0 under torch.distributed)
    alerts: list = field(default_factory=list)
    _clear_for: dict = field(default_factory=dict)  # key of an open episode -> collected steps it has been clear

    def update(self, conditions: Iterable[Alert], partial: bool = False) -> list[Alert]:
        """Record this step's conditions; log and return only those that just started.

        With ``partial=True`` (a step the detectors did not see, e.g. an AMP overflow) conditions not listed keep
        their state instead of counting as clear.
        """
        conditions = list(conditions)
        now = {(a.kind, a.layer) for a in conditions}
        new = [a for a in conditions if (a.kind, a.layer) not in self._clear_for]
        if not partial:
            for key in list(self._clear_for):
                if key not in now:
                    self._clear_for[key] += 1
                    if self._clear_for[key] >= self.rearm_after:
                        del self._clear_for[key]
        for key in now:
            self._clear_for[key] = 0
        if self.log:
            log_alerts(new)
        for a in new:
            if len(self.alerts) >= self.max_alerts:
                self.alerts.pop(0)  # the newest max_alerts are kept (documented)
            self.alerts.append(a)
        return new

    def holding(self) -> dict[str, int]:
        """``{kind: conditions}`` that held at the last update (episodes whose condition was reported then, or kept
        by a partial update)."""
        out: dict[str, int] = {}
        for (kind, _), clear in self._clear_for.items():
            if clear == 0:
                out[kind] = out.get(kind, 0) + 1
        return out

    def raise_if_needed(self, new: list[Alert]) -> None:
        fatal = [a for a in new if a.kind in self.raise_on]
        if fatal:
            raise GradientError(fatal)
