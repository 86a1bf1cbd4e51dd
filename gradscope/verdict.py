"""What a run's alerts add up to: per kind, how many fired, from which step, and whether the condition still held at
the end (:func:`alert_summary`); and the one-line answer a person reads first (:func:`verdict`).

Whether a condition still holds is read from the step records: each collected step's ``info`` counts the conditions
of each kind that held then (``"holding.<kind>"``, written by the scope after its detectors ran). A log written before
those counts existed still gets the counts and first steps, with "active" unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOLDING = "holding."  # prefix of the step-info keys that count the conditions holding at that step, per kind


@dataclass(frozen=True)
class KindSummary:
    """The alerts of one kind in a run.

    Attributes:
        kind: the alert kind.
        alerts: how many fired (one per episode of a condition on a layer).
        layers: on how many distinct layers.
        first_step: the step of the first one.
        last_held: the last collected step at which a condition of this kind held, or None where the log does not
            say (written before gradscope recorded it).
        active: whether one still held at the last collected step (None: not recorded).
        cleared_by: when not active, the first collected step in the history after ``last_held``.
    """

    kind: str
    alerts: int
    layers: int
    first_step: int
    last_held: int | None = None
    active: bool | None = None
    cleared_by: int | None = None

    def describe(self) -> str:
        """``"vanishing x16 (from step 4, active)"``, ``"exploding x3 (from step 0, cleared by step 40)"``."""
        when = f"from step {self.first_step}" if self.alerts > 1 else f"step {self.first_step}"
        if self.active:
            when += ", active"
        elif self.active is False:
            when += f", cleared by step {self.cleared_by}" if self.cleared_by is not None else ", cleared"
        return f"{self.kind} x{self.alerts} ({when})"


def alert_summary(run) -> list[KindSummary]:
    """One :class:`KindSummary` per alert kind of ``run`` (a Scope or a loaded Run), in order of first alert."""
    by_kind: dict[str, list] = {}
    for a in run.alerts:
        by_kind.setdefault(a.kind, []).append(a)
    records = run.history.records()
    recorded = any(k.startswith(HOLDING) for r in records for k in r.info)
    out = []
    for kind, alerts in by_kind.items():
        first = min(a.step for a in alerts)
        last_held = active = cleared_by = None
        if recorded and records:
            held = [r.step for r in records if r.info.get(HOLDING + kind, 0) > 0]
            last_held = max(held) if held else None
            active = bool(held) and last_held == records[-1].step
            if not active and last_held is not None:
                cleared_by = next((r.step for r in records if r.step > last_held), None)
        out.append(KindSummary(kind, len(alerts), len({a.layer for a in alerts}), first, last_held, active, cleared_by))
    return sorted(out, key=lambda s: s.first_step)


def dead_extent(run) -> tuple[float, float] | None:
    """``(largest, final)`` dead-unit fraction of ``run``: the largest over every collected step and ReLU site, and the
    largest over the sites at the last collected step that has them (``nan`` where every value is); None when the
    run has no ReLU site."""
    per_step = []
    for r in run.history.records():
        values = [st["dead_fraction"] for st in r.layers.values() if "dead_fraction" in st]
        if values:
            finite = [v for v in values if math.isfinite(v)]
            per_step.append(max(finite) if finite else math.nan)
    if not per_step:
        return None
    finite = [v for v in per_step if math.isfinite(v)]
    return (max(finite) if finite else math.nan), per_step[-1]


def verdict(run) -> str:
    """The answer in a few words: ``"healthy"`` (no alert), ``"flagged: vanishing from step 4"`` (a condition still
    held at the end; the earliest such kind named, with how many more), ``"cleared: exploding from step 0; none active
    since step 40"`` (alerts fired and every condition cleared: the gradients look healthy now, which says nothing of
    what the episode cost the training), or ``"no steps collected"``."""
    if not run.history.records() and not run.alerts:
        return "no steps collected"
    kinds = alert_summary(run)
    if not kinds:
        return "healthy"
    open_ = [k for k in kinds if k.active is not False]  # active, or unknown: an old log
    if open_:
        first = open_[0]
        more = f" (+{len(open_) - 1} more kinds)" if len(open_) > 2 else \
            f" and {open_[1].kind} from step {open_[1].first_step}" if len(open_) == 2 else ""
        return f"flagged: {first.kind} from step {first.first_step}{more}"
    last = max(kinds, key=lambda k: k.cleared_by if k.cleared_by is not None else -1)
    what = ", ".join(dict.fromkeys(k.kind for k in kinds))
    return f"cleared: {what} from step {kinds[0].first_step}" + \
        (f"; none active since step {last.cleared_by}" if last.cleared_by is not None else "")
