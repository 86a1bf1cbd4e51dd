"""Every statistic a record can hold, in one table: its name, what it means, where it lives, what it costs and who
shows it by default. The option checks (``watch(extra_stats=...)``), the summary's columns, the TensorBoard and
Lightning loggers and the log reader all read this table instead of keeping lists of their own.

The numbers themselves are computed in :func:`gradscope.build.build_record` (gradients and weights, per parameter,
folded per layer as :attr:`Statistic.per_layer` says) and by the activation trackers in :mod:`gradscope.activations`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Statistic:
    name: str
    meaning: str
    per_layer: str = ""
    """How a layer's value comes from its parameters' (``"l2"``: the norm over all of them, ``"max"``, ``"mean"``,
    ``"sum"``, ``"ratio"``: of the layer's l2 norms), or ``""`` for a statistic of the layer's output only."""
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
    Statistic("grad_norm", "L2 norm of the gradient (the loss scale divided out)", "l2", logged=True, headline=True),
    Statistic("grad_rms", "gradient norm / sqrt(number of entries)", "l2", logged=True),
    Statistic("backprop_signal", "||dLoss/d output|| of the layer or call site, all its output tensors and "
              "backward passes of the step together", per_rank="mean-loss", logged=True, headline=True),
    Statistic("dead_fraction", "fraction of a ReLU site's units that fired on none of the last dead_window samples",
              per_rank="sum", column=(2, "dead%", ".1f", 100, 7), summary_row=True, logged=True, headline=True),
    Statistic("saturation", "fraction of a sigmoid/tanh site's outputs within saturation_eps of a bound",
              per_rank="sum", column=(3, "sat%", ".1f", 100, 7), summary_row=True, logged=True, headline=True),
    Statistic("through_time_ratio", "gradient norm reaching a recurrent layer's first input step over its last's",
              per_rank="mean-loss", logged=True),
    Statistic("update_ratio", "||dw|| / ||w|| of the last optimizer update (watch(update_ratio=True))", "ratio",
              column=(4, "upd/w", ".1e", 1, 7), logged=True),
    Statistic("grad_max", "max |g| over the entries", "max",
              cost="max |g| per parameter and layer (one aminmax pass over every gradient: ~1% of a resnet18 CPU "
                   "step)", column=(0, "grad_max", ".2e", 1, 9), logged=True),
    Statistic("grad_zero_frac", "fraction of exactly-zero gradient entries", "mean",
              cost="fraction of exactly-zero gradient entries (one compare-and-sum pass: ~3% of a resnet18 CPU step, "
                   "more on gradients with many zeros)", column=(1, "zero%", ".1f", 100, 6), logged=True),
    Statistic("weight_norm", "L2 norm of the weights", "l2",
              cost="L2 norm of every parameter (one pass over the weights: ~1% of a resnet18 CPU step)", logged=True),
    Statistic("grad_nonfinite", "number of NaN/Inf gradient entries (0 when the norm is finite)", "sum"),
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
