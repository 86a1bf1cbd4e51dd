"""The arguments of ``gradscope.watch()``: each checked once, with an error that names the fix."""

from __future__ import annotations

import os

import torch

from .detectors import default_detectors
from .statistics import STATISTICS


EXTRA_STATS = {s.name: s.cost for s in STATISTICS.values() if s.optional}
"""Statistics beyond the defaults, chosen with ``watch(..., extra_stats=...)``. No detector needs them: they are
descriptive, and each is a full pass over every gradient or weight on each collected step, so they are opt-in."""


def _iterable(x) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


def extra_stats_from(extra_stats) -> frozenset:
    """The statistic names of ``extra_stats`` (a name, a collection of names, or "all")."""
    if extra_stats == "all":
        return frozenset(EXTRA_STATS)
    if not isinstance(extra_stats, str) and not (_iterable(extra_stats)
                                                 and all(isinstance(n, str) for n in extra_stats)):
        raise TypeError(f"extra_stats must be a statistic name, a collection of them or 'all', got {extra_stats!r}; "
                        f"e.g. extra_stats=('grad_max',) or () for none")
    names = frozenset({extra_stats} if isinstance(extra_stats, str) else extra_stats)
    if names - EXTRA_STATS.keys():
        raise ValueError(f"unknown extra_stats {sorted(names - EXTRA_STATS.keys())}; choose from "
                         f"{sorted(EXTRA_STATS)} or 'all', e.g. extra_stats=('grad_max',)")
    return names


def check_scaler(scaler) -> None:
    """Raise TypeError unless ``scaler`` is None or a GradScaler."""
    if scaler is not None and not (hasattr(scaler, "is_enabled") and hasattr(scaler, "get_scale")):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def check_options(*, every, optimizer, scaler, detectors, raise_on, extra_stats, log_to, functional, update_ratio,
                  log_all_ranks, reduce_ranks, dead_window, saturation_eps, unit_dims) -> tuple[list, frozenset,
                                                                                               frozenset]:
    """Check ``watch()``'s arguments; return ``(detectors, raise_on, extra_stats)`` in their normal form (fresh
    default detectors for None, a frozenset of alert kinds, a frozenset of statistic names).

    Raises:
        TypeError / ValueError: an argument of the wrong type or value; the message names a valid one.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(f"every must be a positive int (collect on every N-th step), got {every!r}; e.g. every=10")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_scaler(scaler)
    if detectors is not None and (isinstance(detectors, (str, bytes)) or not _iterable(detectors)):
        raise TypeError(f"detectors must be a list of detector instances, got {detectors!r}; e.g. "
                        "detectors=[gradscope.Vanishing(ratio=1e-4), gradscope.Nonfinite()] (or [] for none)")
    detectors = default_detectors() if detectors is None else list(detectors)
    for d in detectors:
        if not (isinstance(getattr(d, "kind", None), str) and callable(getattr(d, "check", None))):
            raise TypeError(f"{d!r} is not a detector: it needs a 'kind' string and a check(record, layers) method")
    kinds = {d.kind for d in detectors}
    if not isinstance(raise_on, str) and not (_iterable(raise_on) and all(isinstance(k, str) for k in raise_on)):
        raise TypeError(f"raise_on must be an alert kind or a collection of them, got {raise_on!r}; "
                        "e.g. raise_on={'nonfinite'}")
    raise_on = frozenset({raise_on} if isinstance(raise_on, str) else raise_on)
    if raise_on - kinds:
        raise ValueError(f"raise_on names unknown alert kinds {sorted(raise_on - kinds)}; "
                         f"the detectors in use raise {sorted(kinds)}")
    extra = extra_stats_from(extra_stats)
    if log_to is not None and not isinstance(log_to, (str, os.PathLike)):
        raise TypeError(f"log_to must be a file path (str or os.PathLike) or None, got {log_to!r}")
    for name, flag in (("functional", functional), ("update_ratio", update_ratio), ("log_all_ranks", log_all_ranks)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if reduce_ranks is not None and not isinstance(reduce_ranks, bool):
        raise TypeError(f"reduce_ranks must be True, False or None (automatic), got {reduce_ranks!r}")
    if isinstance(dead_window, bool) or not isinstance(dead_window, int) or dead_window < 1:
        raise ValueError(f"dead_window must be a positive int (samples), got {dead_window!r}; e.g. dead_window=1000")
    if not isinstance(saturation_eps, (int, float)) or not 0 < saturation_eps < 1:
        raise ValueError(f"saturation_eps must be a number in (0, 1), got {saturation_eps!r}; e.g. 0.02")
    if unit_dims is not None and not (isinstance(unit_dims, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in unit_dims.items())):
        raise TypeError("unit_dims must map call-site names to dimension ints, e.g. {'conv.1': 1}; "
                        f"got {unit_dims!r}")
    return detectors, raise_on, extra


def refuse_step_options(watch_kwargs: dict, trainer: str) -> None:
    """A trainer callback closes the steps itself and takes the AMP scaler from the trainer: ``watch()``'s
    ``optimizer=`` and ``scaler=`` would close them a second time, so they are refused."""
    for key in ("optimizer", "scaler"):
        if key in watch_kwargs:
            raise TypeError(f"GradscopeCallback closes steps itself and takes the AMP scaler from the {trainer}: "
                            f"do not pass {key}=")
