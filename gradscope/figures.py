"""Figures (matplotlib, optional: ``pip install gradscope[plot]``; imported only when a figure is drawn).

Every function takes a live :class:`~gradscope.Scope` or a loaded :class:`~gradscope.Run` (several, for the
overlays; ``gradscope.load(path)`` reads a saved log), returns a ``matplotlib.figure.Figure`` and saves it when
given ``path``.
``scope.plot(kind, ...)`` is the shortcut.

Text that comes from the data (layer names, run labels) is drawn literally: a ``$`` never starts matplotlib mathtext.
A value that is NaN or infinite cannot sit on an axis: such layers/steps are marked in red (triangles along the top of
the axis, squares on the heatmap; legend entry "NaN/Inf"), and an axes with no finite value at all says so in its
middle, so a figure drawn right after a step with non-finite gradients is never blank.

Alert marks at the first or last step are kept inside the axes (an x margin, never clipped at the edge). A timeline
of more than :data:`MAX_LEGEND` call sites colours its lines by forward order on a colour bar and names only the
highest few in its legend. :func:`uninformative` says when a figure would only show zeros or one constant (a dead-unit
figure of a run without a dead unit), so ``gradscope report`` can say that in a sentence instead.
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
MAX_LEGEND = 8  # more series than this: no legend entry each (colour bar for the order, the highest few named)
LEGEND_TOP = 5  # how many of many series the legend names


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
        raise TypeError("figures draw a Scope or a loaded Run; for a saved log pass "
                        f"gradscope.load({os.fspath(source)!r}) (or call .plot() on it)")
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
    marked = [a for a in run.alerts if a.layer in row]
    for a in marked:
        ax.plot(a.step, row[a.layer], "x", ms=6, color="white", mec=ALERT_COLOURS.get(a.kind, "k"), clip_on=False)
    _step_margin(ax, steps + [a.step for a in marked], cell=0.5)
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


def _step_margin(ax, steps, cell: float = 0.0) -> None:
    """Set the x range of ``ax`` to ``steps`` (data and alert marks) with a margin on both sides: a mark at the first
    or last step (step 0, say) sits inside the axes instead of on its edge, half clipped or hidden by the frame."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(steps), max(steps)
    pad = max(cell, 0.5, 0.03 * (hi - lo + 2 * cell))
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def _timeline(source, path, stat, ylabel, title, kind):
    plt = _plt()
    run, records, sites = _with_stat(source, stat)
    if not sites:
        raise NothingToDraw(f"this run has no {stat} (no matching activation call site was tracked)")
    many = len(sites) > MAX_LEGEND
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("viridis")
    bad, lines, steps = set(), [], [r.step for r in records]
    for i, site in enumerate(sites):
        pts = [(r.step, r.layers[site][stat]) for r in records if stat in r.layers.get(site, {})]
        bad |= {step for step, v in pts if _nonfinite(v)}
        ys = [100 * _plottable(p[1]) for p in pts]
        if many:  # colour = position in forward order (colour bar); the legend names only the highest few
            style = dict(color=cmap(i / (len(sites) - 1)), lw=1.0, label="_nolegend_")
        else:
            style = dict(color=PALETTE[i % len(PALETTE)], ls=["-", "--", ":", "-."][i // len(PALETTE) % 4],
                         label=_literal(short_name(site, 20)))
        (line,) = ax.plot([p[0] for p in pts], ys, **style)
        finite = [y for y in ys if math.isfinite(y)]
        lines.append((max(finite) if finite else -math.inf, i, line))
    _mark_nonfinite(ax, sorted(bad))
    alert_steps = [a.step for a in run.alerts if a.kind == kind and a.layer in sites]
    for step in alert_steps:
        ax.axvline(step, color=ALERT_COLOURS[kind], lw=0.8, alpha=0.5)
    _step_margin(ax, steps + alert_steps)
    peak = max((p for p, _, _ in lines), default=-math.inf)
    top = 102 if not math.isfinite(peak) or peak > 60 else max(5.0, 1.15 * peak + 1)  # small values not squashed
    ax.set_ylim(-top / 50, top)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title.format(model=_label(run, "model")))
    if many:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(norm=Normalize(0, len(sites) - 1), cmap=cmap), ax=ax, pad=0.02)
        bar.set_label(f"call site, forward order ({len(sites)} sites)", fontsize=8)
        ticks = sorted({round(k * (len(sites) - 1) / 4) for k in range(5)})
        bar.set_ticks(ticks)
        bar.set_ticklabels([_literal(short_name(sites[t], 14)) for t in ticks], fontsize=6)
        top = sorted(lines, key=lambda t: (-t[0], t[1]))[:LEGEND_TOP]
        handles = [line for _, _, line in top]
        labels = [f"{_literal(short_name(sites[i], 20))} (peak {peak:.3g}%)" for peak, i, _ in top]
        handles += [h for h, lbl in zip(*ax.get_legend_handles_labels()) if lbl == NONFINITE_LABEL]
        labels += [NONFINITE_LABEL] * (len(handles) - len(labels))
        ax.legend(handles, labels, fontsize=6, loc="best", framealpha=0.8,
                  title=f"highest {len(top)} of {len(sites)}", title_fontsize=6)
    else:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    if lines > MAX_LEGEND:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + lines // 16)
    else:
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
    if len(runs) > MAX_LEGEND:
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), ncol=1 + len(runs) // 16)
    else:
        axes[0][0].legend(fontsize=7)
    return _done(fig, path)


def _values(records, stat: str) -> dict[str, list]:
    """``{layer or site: [its values of stat over records]}`` for the layers that have ``stat``."""
    out: dict[str, list] = {}
    for r in records:
        for name, st in r.layers.items():
            if stat in st:
                out.setdefault(name, []).append(st[stat])
    return out


def uninformative(source, kind: str) -> str | None:
    """Why the figure ``kind`` (a key of :data:`FIGURES`) of this run would carry no information, as a sentence to
    print instead (``"no dead units: ..."``), or None when it is worth drawing (or has nothing to draw at all, which
    the figure itself raises as :class:`NothingToDraw`).

    A figure carries nothing when every value it plots is 0, or one and the same constant: a dead-unit timeline of a
    run without a dead unit, a saturation timeline without a saturated output, a heatmap of a single value. One NaN or
    infinite value makes it worth drawing: the figure marks it."""
    run = as_run(source)
    records = run.history.records()
    if not records:
        return None
    m = len(records)
    steps = f"{m} collected step{'s' if m != 1 else ''}"
    if kind in ("dead", "saturation", "heatmap"):
        stat = {"dead": "dead_fraction", "saturation": "saturation", "heatmap": "grad_norm"}[kind]
        per_site = _values(records, stat)
        values = [v for vs in per_site.values() for v in vs]
        if not values or any(_nonfinite(v) for v in values) or len(set(values)) > 1:
            return None
        v, n = values[0], len(per_site)
        if kind == "dead":
            sites = f"{n} ReLU call site{'s' if n != 1 else ''}"
            return (f"no dead units: {sites}, 0% dead at each of {steps}" if v == 0 else
                    f"dead units constant: {sites}, {100 * v:.3g}% dead at each of {steps}")
        if kind == "saturation":
            sites = f"{n} sigmoid/tanh call site{'s' if n != 1 else ''}"
            return (f"no saturation: {sites}, 0% of outputs at a bound at each of {steps}" if v == 0 else
                    f"saturation constant: {sites}, {100 * v:.3g}% of outputs at a bound at each of {steps}")
        return f"gradient norm {v:.3g} for every one of {n} layers at each of {steps}: no heatmap to draw"
    last = records[-1]
    if kind == "time":
        values = [v for st in last.layers.values() for v in st.get("through_time", ())]
        if values and not any(_nonfinite(v) for v in values) and all(v == 0 for v in values):
            return f"gradient through time exactly zero at every input step (step {last.step})"
        return None
    if kind == "flow":
        names = [e.name for e in run.meta["layers"] if e.profile and e.name in last.layers]
        values = [last.layers[n].get(k) for n in names for k in ("backprop_signal", "grad_rms")]
        values = [v for v in values if v is not None]
        if values and not any(_nonfinite(v) for v in values) and all(v == 0 for v in values):
            return f"no gradient: every layer's gradient is exactly zero at step {last.step}"
        return None
    raise ValueError(f"kind must be one of {sorted(FIGURES)}, got {kind!r}")


FIGURES = {"flow": gradient_flow, "heatmap": heatmap, "dead": dead_units, "saturation": saturation,
           "time": through_time}
