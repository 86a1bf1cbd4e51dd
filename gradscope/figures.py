"""Figures (matplotlib, optional: ``pip install gradscope[plot]``; imported only when a figure is drawn).

Every function takes a live :class:`~gradscope.Scope` or a loaded :class:`~gradscope.Run` (several, for the
overlays; ``gradscope.load(path)`` reads a saved log), returns a ``matplotlib.figure.Figure`` and saves it when given ``path``.
``scope.plot(kind, ...)`` is the shortcut.

Text that comes from the data (layer names, run labels) is drawn literally: a ``$`` never starts matplotlib mathtext.
A value that is NaN or infinite cannot sit on an axis: such layers/steps are marked in red (triangles along the top of
the axis, squares on the heatmap; legend entry "NaN/Inf"), and an axes with no finite value at all says so in its
middle, so a figure drawn right after a step with non-finite gradients is never blank.
"""

from __future__ import annotations

import math
import os

from .detectors import output_side_reference, signal_profile, thresholds
from typing import TYPE_CHECKING

from .record import _finite

if TYPE_CHECKING:
    from .run import Run
from .render import short_name

# Okabe & Ito's colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ALERT_COLOURS = {"vanishing": "#0072B2", "exploding": "#D55E00", "nonfinite": "#000000", "dead_units": "#CC79A7",
                 "saturation": "#E69F00", "vanishing_through_time": "#56B4E9"}
NONFINITE_COLOUR = "#FF0000"
NONFINITE_LABEL = "NaN/Inf (marked at the top)"


class NothingToDraw(ValueError):
    """The run has nothing for this figure (no ReLU site, no recurrent layer, ...); ``gradscope report`` skips it."""


def _plt():
    try:
        import matplotlib

        if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("gradscope figures need matplotlib: pip install 'gradscope[plot]'") from e
    return plt


def as_run(source):
    """``source`` if it is a run (a live Scope or a loaded Run); a clear error for anything else, a path included."""
    if hasattr(source, "history") and hasattr(source, "meta"):
        return source
    if isinstance(source, (str, os.PathLike)):
        raise TypeError(f"figures draw a Scope or a loaded Run; for a saved log pass gradscope.load({os.fspath(source)!r})"
                        " (or call .plot() on it)")
    raise TypeError(f"expected a gradscope Scope or Run (gradscope.load(path) for a saved log), "
                    f"got {type(source).__name__}")


def _literal(text) -> str:
    """``text`` from the data (a layer name, a run label) escaped so that matplotlib draws it as it is: every ``$``
    becomes ``\\$``, so no pair of them starts mathtext (which would typeset it, or raise on a name like ``a$^$``)."""
    return str(text).replace("$", r"\$")


def _label(run: Run, fallback: str) -> str:
    return _literal(run.meta.get("label") or run.meta.get("model") or fallback)


def _plottable(v, log: bool = False) -> float:
    """``v`` where it can be drawn (finite; positive on a log axis), else NaN (a gap)."""
    return float(v) if _finite(v) and (v > 0 or not log) else math.nan


def _nonfinite(v) -> bool:
    """A value was recorded and it is NaN or infinite (a missing statistic is not)."""
    return v is not None and not _finite(v)


def _mark_nonfinite(ax, xs) -> None:
    """Red triangles along the top of ``ax`` at the x positions ``xs`` whose value is NaN/Inf (one legend entry per
    axes): such a value cannot be drawn on the axis, and a silent gap would hide the failure the figure is looked at
    for."""
    if not len(xs):
        return
    label = "_nolegend_" if NONFINITE_LABEL in ax.get_legend_handles_labels()[1] else NONFINITE_LABEL
    ax.plot(list(xs), [0.97] * len(xs), "v", ms=7, color=NONFINITE_COLOUR, transform=ax.get_xaxis_transform(),
            clip_on=False, label=label)


def _note_no_finite(ax, what: str) -> None:
    """Say in the middle of ``ax`` that it has no finite value to draw, instead of leaving it blank."""
    ax.text(0.5, 0.5, f"no finite value to draw: {what}", transform=ax.transAxes, ha="center", va="center",
            fontsize=9, color=NONFINITE_COLOUR, wrap=True)


def _done(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _need_steps(run: Run) -> None:
    if run.history.last is None:
        raise ValueError("this run has no collected step yet: call scope.step() after loss.backward() first")


def _with_stat(source, stat: str):
    """``(run, records, names)``: the run, its collected records, and the layers/sites that have ``stat``."""
    run = as_run(source)
    _need_steps(run)
    records = run.history.records()
    names = [e.name for e in run.meta["layers"] if any(stat in r.layers.get(e.name, {}) for r in records)]
    return run, records, names


def gradient_flow(source, path=None, step: int | None = None):
    """Per layer in forward order: backprop signal and parameter-gradient RMS on a log axis, with the vanishing and
    exploding thresholds of the signal drawn and the layers that raised alerts marked."""
    plt = _plt()
    run = as_run(source)
    _need_steps(run)
    rec = run.history.last if step is None else next((r for r in run.history.records() if r.step == step), None)
    if rec is None:
        kept = run.history.steps
        raise ValueError(f"no collected step {step!r} in this run" + (f"; kept steps run from {kept[0]} to {kept[-1]}"
                                                                    if kept else " (nothing collected yet)"))
    layers = [e for e in run.meta["layers"] if e.profile and e.name in rec.layers]
    names = [e.name for e in layers]
    x = range(len(names))
    raw_sig = [rec.layers[n].get("backprop_signal") for n in names]
    raw_rms = [rec.layers[n].get("grad_rms") for n in names]
    sig = [_plottable(v, log=True) for v in raw_sig]
    rms = [_plottable(v, log=True) for v in raw_rms]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.18 * len(names) + 3)), 4.6))
    ax.plot(x, sig, "-o", ms=3, color=PALETTE[0], label="backprop signal ||dL/d output||")
    ax.plot(x, rms, "s", ms=3, color=PALETTE[1], label="parameter-gradient RMS")
    bad = [i for i in x if _nonfinite(raw_sig[i]) or _nonfinite(raw_rms[i])]
    _mark_nonfinite(ax, bad)
    if not any(math.isfinite(v) for v in sig + rms):
        _note_no_finite(ax, f"NaN/Inf gradients in {len(bad)} of {len(names)} layers at step {rec.step}"
                        if bad else f"no layer has a positive gradient at step {rec.step}")
    profile = signal_profile(rec, run.meta["layers"])
    if profile:
        th = thresholds(run.meta)  # the thresholds this run's detectors used
        ref = output_side_reference(profile, th["output_side"])
        ax.axhline(ref * th["vanishing"], color=PALETTE[0], ls=":", lw=1,
                   label=f"vanishing threshold ({th['vanishing']:g} x output side)")
        ax.axhline(ref * th["exploding"], color=PALETTE[3], ls=":", lw=1,
                   label=f"exploding threshold ({th['exploding']:g} x output side)")
    flagged = {a.layer: a.kind for a in run.alerts}
    for i, n in enumerate(names):
        if n in flagged and math.isfinite(sig[i]) and sig[i] > 0:
            ax.plot(i, sig[i], "x", ms=8, color=ALERT_COLOURS.get(flagged[n], "k"))
    ax.set_yscale("log")
    every = max(1, math.ceil(len(names) / 60))  # at most ~60 labels: deep nets label every k-th layer
    ticks = list(x)[::every]
    ax.set_xticks(ticks)
    ax.set_xticklabels([_literal(short_name(names[i], 18)) for i in ticks], rotation=90, fontsize=7)
    ax.set_xlabel("layer (forward order, input side left)" + (f", one label per {every} layers" if every > 1 else ""))
    ax.set_ylabel("L2 norm (log scale)")
    ax.set_title(f"Gradient flow, {_label(run, 'model')}, step {rec.step}  (x: layer raised an alert)")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return _done(fig, path)


def heatmap(source, path=None, stat: str = "grad_norm"):
    """Layer x step heatmap of log10 of a statistic (default: gradient norm), alerts marked where they fired."""
    plt = _plt()
    import numpy as np

    run, records, names = _with_stat(source, stat)
    if not names:
        raise NothingToDraw(f"no layer has the statistic {stat!r} in this run")
    grid = np.full((len(names), len(records)), np.nan)
    bad = []  # (step, row) of the NaN/Inf cells
    for j, r in enumerate(records):
        for i, n in enumerate(names):
            v = r.layers.get(n, {}).get(stat)
            if _nonfinite(v):
                bad.append((r.step, i))
            elif v is not None and v > 0:
                grid[i, j] = math.log10(v)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.16 * len(names) + 1.5)))
    steps = [r.step for r in records]
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label=f"log10 {_literal(stat)}")
    row = {n: i for i, n in enumerate(names)}
    for a in run.alerts:
        if a.layer in row:
            ax.plot(a.step, row[a.layer], "x", ms=6, color="white", mec=ALERT_COLOURS.get(a.kind, "k"))
    if bad:  # NaN/Inf cells would be left empty by imshow: a red square on each
        ax.plot([b[0] for b in bad], [b[1] for b in bad], "s", ms=5, mfc="none", mec=NONFINITE_COLOUR, mew=1.5,
                ls="none", label="NaN/Inf")
        ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    if np.isnan(grid).all():
        _note_no_finite(ax, f"{_literal(stat)} is NaN/Inf in {len(bad)} cells" if bad else
                        f"{_literal(stat)} is never positive")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_literal(short_name(n, 22)) for n in names], fontsize=6)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input side at the top)")
    ax.set_title(f"{_literal(stat)} per layer over training, {_label(run, 'model')}  (x: alert)")
    return _done(fig, path)


def _timeline(source, path, stat, ylabel, title, kind):
    plt = _plt()
    run, records, sites = _with_stat(source, stat)
    if not sites:
        raise NothingToDraw(f"this run has no {stat} (no matching activation call site was tracked)")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    bad = set()
    for i, site in enumerate(sites):
        pts = [(r.step, r.layers[site][stat]) for r in records if stat in r.layers.get(site, {})]
        bad |= {step for step, v in pts if _nonfinite(v)}
        ax.plot([p[0] for p in pts], [100 * _plottable(p[1]) for p in pts], color=PALETTE[i % len(PALETTE)],
                ls=["-", "--", ":", "-."][i // len(PALETTE) % 4], label=_literal(short_name(site, 20)))
    _mark_nonfinite(ax, sorted(bad))
    for a in run.alerts:
        if a.kind == kind and a.layer in sites:
            ax.axvline(a.step, color=ALERT_COLOURS[kind], lw=0.8, alpha=0.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title.format(model=_label(run, "model")))
    ax.legend(fontsize=6, ncol=max(1, len(sites) // 12 + 1), loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _done(fig, path)


def dead_units(source, path=None):
    """Dead fraction (%) of every ReLU call site over steps; vertical lines where dead_units alerts fired."""
    return _timeline(source, path, "dead_fraction", "dead units (%)", "Dead ReLU units per call site, {model}",
                     "dead_units")


def saturation(source, path=None):
    """Saturated fraction (%) of every sigmoid/tanh call site over steps; lines where saturation alerts fired."""
    return _timeline(source, path, "saturation", "outputs at a bound (%)", "Saturation per sigmoid/tanh site, {model}",
                     "saturation")


def through_time(sources, path=None, labels=None):
    """Norm of dLoss/d(input at step t) against t (log scale) for the recurrent layers of one or several runs."""
    plt = _plt()
    runs = [as_run(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    lines, bad, finite = 0, set(), False
    for k, run in enumerate(runs):
        _need_steps(run)
        rec = run.history.last
        for name, st in rec.layers.items():
            if "through_time" in st:
                label = (_literal(labels[k]) if labels else _label(run, f"run {k}")) + \
                    f" ({_literal(short_name(name, 16))})"
                values = [_plottable(v, log=True) for v in st["through_time"]]
                bad |= {t for t, v in enumerate(st["through_time"]) if _nonfinite(v)}
                finite = finite or any(math.isfinite(v) for v in values)
                ax.plot(range(len(values)), values, color=PALETTE[lines % len(PALETTE)], label=label)
                lines += 1
    if not lines:
        plt.close(fig)
        raise NothingToDraw("no recurrent layer (nn.RNN/LSTM/GRU) with a through-time profile in these runs")
    _mark_nonfinite(ax, sorted(bad))
    if not finite:
        _note_no_finite(ax, "every through-time gradient is NaN/Inf or zero")
    ax.set_yscale("log")
    ax.set_xlabel("input time step t (the last step is on the right)")
    ax.set_ylabel("||dLoss / d input_t||, batch mean")
    ax.set_title("Gradient through time (gaps: exactly zero)")
    ax.legend(fontsize=7)
    return _done(fig, path)


COMPARISON_METRICS = {
    "signal_ratio": ("input-side / output-side backprop signal", True),
    "grad_norm": ("total gradient norm", True),
    "max_dead": ("largest dead fraction (%)", False),
    "saturation": ("largest saturated fraction (%)", False),
}


SERIES_STAT = {"signal_ratio": "backprop_signal", "grad_norm": "grad_norm", "max_dead": "dead_fraction",
               "saturation": "saturation"}


def _series(run: Run, metric: str):
    """``(steps, values, bad)``: the metric per collected step (NaN where it cannot be had) and the steps on which a
    layer's underlying statistic was NaN/Inf."""
    xs, ys, bad = [], [], []
    key = SERIES_STAT[metric]
    for r in run.history.records():
        vals = [st[key] for st in r.layers.values() if key in st]
        if any(_nonfinite(v) for v in vals):
            bad.append(r.step)
        if metric == "signal_ratio":
            v = run.signal_ratio(r)
        elif metric == "grad_norm":
            v = math.hypot(*vals) if vals else math.nan
        else:
            v = 100 * max(vals) if vals else math.nan
        xs.append(r.step)
        ys.append(v)
    return xs, ys, bad


def comparison(sources, path=None, labels=None, metrics=("signal_ratio", "grad_norm", "max_dead")):
    """Several runs side by side: one panel per metric, one line per run."""
    plt = _plt()
    runs = [as_run(s) for s in sources]
    unknown = set(metrics) - set(COMPARISON_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {sorted(COMPARISON_METRICS)}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        title, log = COMPARISON_METRICS[metric]
        bad, finite = set(), False
        for k, run in enumerate(runs):
            _need_steps(run)
            xs, ys, nonfinite = _series(run, metric)
            bad |= set(nonfinite)
            ys = [_plottable(y, log) for y in ys]
            finite = finite or any(math.isfinite(y) for y in ys)
            ax.plot(xs, ys, color=PALETTE[k % len(PALETTE)],
                    label=_literal(labels[k]) if labels else _label(run, f"run {k}"))
        _mark_nonfinite(ax, sorted(bad))
        if not finite:
            _note_no_finite(ax, "NaN/Inf at every step" if bad else "no run has this statistic")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    return _done(fig, path)


FIGURES = {"flow": gradient_flow, "heatmap": heatmap, "dead": dead_units, "saturation": saturation,
           "time": through_time}
