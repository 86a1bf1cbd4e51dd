"""Every statistic a record can hold, in one table: its name, what it means, how it is computed and folded, what it
costs and who shows it by default. The record builder, the option checks (``watch(extra_stats=...)``), the summary's
columns, the TensorBoard and Lightning loggers and the log reader all read this table instead of keeping lists of
their own.

A statistic of the parameters is computed from the table alone: :func:`gradscope.build.build_record` runs the
:data:`MEASURES` its entry ``reads`` (one device tensor per measure, one number per parameter, all fetched with the
step's single transfer) and folds them with its :data:`FOLDS` entry, once per parameter and once per layer (over the
layer's parameters). Adding one is a measure function (if no existing one fits) plus one :class:`Statistic` entry::

    MEASURES["abs_sum"] = Measure(lambda grads, weights, before: abs_sums(grads), scaled=True)
    FOLDS["mean_abs"] = Fold(lambda cols, numels: sum(cols[0]) / sum(numels),
                             lambda cols, numels: [s / n for s, n in zip(cols[0], numels)])
    STATISTICS["grad_mean_abs"] = Statistic("grad_mean_abs", "mean |g|", "mean_abs", reads=("abs_sum",), cost="...")

Statistics of a layer's output (backprop signal, dead units, saturation, gradient through time) come from the hooks
(:mod:`gradscope.collect`, :mod:`gradscope.activations`); their entries here describe them for the readers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .stats import max_abs, nonzero_counts, norms


@dataclass(frozen=True)
class Measure:
    """One number per parameter, computed on the device: ``compute(grads, weights, before)`` returns a 1-D tensor
    (one entry per parameter, in order) or None when it cannot be computed this step (``before``, the parameters one
    collected step earlier, is None). ``weights`` are the parameters themselves (a sharded one's local shard), which
    require grad: detach what is computed from them, as the measures here do (``norms`` detaches). ``scaled``: it is
    of the gradient, so the loss scale is divided out.
    ``across_shards``: how the numbers of a sharded parameter's shards (FSDP2: one per rank) make the whole
    parameter's (:mod:`gradscope.sharded`): ``"norm"`` an L2 norm (squares summed), ``"sum"`` a count, ``"max"``."""

    compute: Callable
    scaled: bool = False
    across_shards: str = "norm"


MEASURES: dict[str, Measure] = {
    "grad_norm": Measure(lambda grads, weights, before: norms(grads), scaled=True),
    "grad_max": Measure(lambda grads, weights, before: max_abs(grads), scaled=True, across_shards="max"),
    "grad_nonzero": Measure(lambda grads, weights, before: nonzero_counts(grads), across_shards="sum"),
    "weight_norm": Measure(lambda grads, weights, before: norms(weights)),
    "update_norm": Measure(lambda grads, weights, before: None if before is None else
                           norms(torch._foreach_sub([w.detach() for w in weights], before))),
}
"""The per-parameter measurements the statistics read, by name."""


def _l2(values: list[float]) -> float:
    return abs(values[0]) if len(values) == 1 else math.sqrt(sum(v * v for v in values))


def _nanmax(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _ratio(num: list[float], den: list[float]) -> float:
    d = _l2(den)
    return _l2(num) / d if d > 0 else math.nan


@dataclass(frozen=True)
class Fold:
    """How a statistic's values come from the measures it reads. ``cols[i]`` holds the values of its ``reads[i]``
    over some parameters, ``numels`` their entry counts (sequences: lists, or tuples for a group).

    ``group(cols, numels) -> value``: of a group of parameters (a layer's). ``each(cols, numels) -> [value]``: of
    each parameter alone, the same as ``group`` on a group of one, computed for all of them in one call (the
    per-parameter values are most of a collected step's Python work)."""

    group: Callable
    each: Callable


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


FOLDS: dict[str, Fold] = {
    "l2": Fold(lambda cols, numels: _l2(cols[0]), lambda cols, numels: [abs(v) for v in cols[0]]),
    "rms": Fold(lambda cols, numels: _l2(cols[0]) / math.sqrt(sum(numels)),
                lambda cols, numels: [abs(v) / math.sqrt(n) for v, n in zip(cols[0], numels)]),
    "max": Fold(lambda cols, numels: _nanmax(cols[0]), lambda cols, numels: list(cols[0])),
    "zero_frac": Fold(lambda cols, numels: sum(n - z for n, z in zip(numels, cols[0])) / sum(numels),
                      lambda cols, numels: [(n - z) / n for n, z in zip(numels, cols[0])]),
    "ratio": Fold(lambda cols, numels: _ratio(cols[0], cols[1]),
                  lambda cols, numels: [_div(abs(u), abs(w)) for u, w in zip(cols[0], cols[1])]),
}
"""The folds by name: ``l2`` the norm over the parameters, ``rms`` that over sqrt(entries), ``max``, ``zero_frac``
the fraction of zero entries from nonzero counts, ``ratio`` the norm of the first measure over that of the second."""


@dataclass(frozen=True)
class Statistic:
    name: str
    meaning: str
    per_layer: str = ""
    """For a statistic of the parameters: its :data:`FOLDS` entry, how a parameter's and a layer's value come from the
    measures it ``reads``; ``""`` for a statistic of the layer's output."""
    reads: tuple = ()
    """The :data:`MEASURES` a statistic of the parameters is folded from (empty: not computed from the table)."""
    per_rank: str = "same"
    """Under ``torch.distributed``: ``"same"`` (gradients DDP already all-reduced), ``"sum"`` (counts over all ranks'
    samples), ``"mean-loss"`` (of the mean of the ranks' losses, as DDP optimises), ``"local"`` (this rank's)."""
    cost: str = ""
    """For an optional statistic (``watch(extra_stats=...)``), what one collected step pays for it; "" for defaults."""
    column: tuple | None = None
    """``(position, title, format, scale, width)`` of its column in ``summary()``, shown when a row has the
    statistic, after the default columns in ``position`` order; or None."""
    summary_row: bool = False  # a call site without parameters gets a summary row when it has this statistic
    logged: bool = False  # written by the TensorBoard logger by default (when present in a record)
    headline: bool = False  # logged by the Lightning callback by default: the few that tell most
    profile: bool = False  # a list, one value per time step, not one number

    @property
    def optional(self) -> bool:
        return bool(self.cost)


STATISTICS: dict[str, Statistic] = {s.name: s for s in [
    Statistic("grad_norm", "L2 norm of the gradient (the loss scale divided out)", "l2", ("grad_norm",), logged=True,
              headline=True),
    Statistic("grad_rms", "gradient norm / sqrt(number of entries)", "rms", ("grad_norm",), logged=True),
    Statistic("backprop_signal", "||dLoss/d output|| of the layer or call site, all its output tensors and "
              "backward passes of the step together", per_rank="mean-loss", logged=True, headline=True),
    Statistic("dead_fraction", "fraction of a ReLU site's units that fired on none of the last dead_window samples",
              per_rank="sum", column=(2, "dead%", ".1f", 100, 7), summary_row=True, logged=True, headline=True),
    Statistic("saturation", "fraction of a sigmoid/tanh site's outputs within saturation_eps of a bound",
              per_rank="sum", column=(3, "sat%", ".1f", 100, 7), summary_row=True, logged=True, headline=True),
    Statistic("through_time_ratio", "gradient norm reaching a recurrent layer's first input step over its last's",
              per_rank="mean-loss", logged=True),
    Statistic("update_ratio", "||dw|| / ||w|| of the last optimizer update (watch(update_ratio=True))", "ratio",
              ("update_norm", "weight_norm"),
              column=(4, "upd/w", ".1e", 1, 7), logged=True),
    Statistic("grad_max", "max |g| over the entries", "max", ("grad_max",),
              cost="max |g| per parameter and layer (one aminmax pass over every gradient: ~1% of a resnet18 CPU "
                   "step)", column=(0, "grad_max", ".2e", 1, 9), logged=True),
    Statistic("grad_zero_frac", "fraction of exactly-zero gradient entries", "zero_frac", ("grad_nonzero",),
              cost="fraction of exactly-zero gradient entries (one compare-and-sum pass: ~3% of a resnet18 CPU step, "
                   "more on gradients with many zeros)", column=(1, "zero%", ".1f", 100, 6), logged=True),
    Statistic("weight_norm", "L2 norm of the weights", "l2", ("weight_norm",),
              cost="L2 norm of every parameter (one pass over the weights: ~1% of a resnet18 CPU step)", logged=True),
    Statistic("grad_nonfinite", "number of NaN/Inf gradient entries (0 when the norm is finite; counted only "
              "then, with a second transfer)"),
    Statistic("output_nonfinite", "1 when the forward output had NaN/Inf, else 0", per_rank="sum"),
    Statistic("output_nan", "1 when the forward output had NaN, else 0", per_rank="sum"),
    Statistic("dead_units", "number of dead units of a ReLU site", per_rank="sum"),
    Statistic("units", "number of units of a ReLU site"),
    Statistic("fire_rate", "mean over units of the fraction of samples a unit fires on", per_rank="sum"),
    Statistic("dead_window_filled", "1 once the site has seen dead_window samples", per_rank="sum"),
    Statistic("mean_output", "mean output of a sigmoid/tanh site", per_rank="sum"),
    Statistic("through_time_reach", "input steps back over which the gradient stays above 1e-3 of the last's",
              per_rank="mean-loss"),
    Statistic("through_time", "gradient norm per input step of a recurrent layer", per_rank="mean-loss",
              summary_row=True, profile=True),
]}
"""The statistics, by name, in the order loggers write them."""


def names(**flags) -> tuple[str, ...]:
    """The names of the statistics whose attributes equal ``flags`` (e.g. ``names(logged=True)``), in table order."""
    return tuple(s.name for s in STATISTICS.values() if all(getattr(s, k) == v for k, v in flags.items()))
