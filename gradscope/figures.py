"""Figures (matplotlib, optional: ``pip install gradscope[plot]``). The core never imports this module.

Every function takes a live :class:`~gradscope.Scope`, a loaded :class:`~gradscope.Run` or a path to a saved log
(several, for the overlays), returns a ``matplotlib.figure.Figure`` and saves it when given ``path``.
``scope.plot(kind, ...)`` is the shortcut.
"""

from __future__ import annotations

import math
import os

from .detectors import output_side_reference, signal_profile
from .record import Run, load
from .render import short_name

# Okabe & Ito's colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ALERT_COLOURS = {"vanishing": "#0072B2", "exploding": "#D55E00", "nonfinite": "#000000", "dead_units": "#CC79A7",
                 "saturation": "#E69F00"}


def _plt():
    try:
        import matplotlib

        if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("gradscope figures need matplotlib: pip install 'gradscope[plot]'") from e
    return plt


def as_run(source) -> Run:
    """A Run from a Scope/Run (as is) or a path to a saved log."""
    if isinstance(source, Run):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load(source)
    raise TypeError(f"expected a gradscope Scope, Run or path to a saved log, got {type(source).__name__}")


def _label(run: Run, fallback: str) -> str:
    return run.meta.get("label") or run.meta.get("model") or fallback


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
    names = [e["name"] for e in run.meta["layers"] if any(stat in r.layers.get(e["name"], {}) for r in records)]
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
    layers = [e for e in run.meta["layers"] if e.get("profile") and e["name"] in rec.layers]
    names = [e["name"] for e in layers]
    x = range(len(names))
    sig = [rec.layers[n].get("backprop_signal", math.nan) for n in names]
    rms = [rec.layers[n].get("grad_rms", math.nan) for n in names]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.18 * len(names) + 3)), 4.6))
    ax.plot(x, sig, "-o", ms=3, color=PALETTE[0], label="backprop signal ||dL/d output||")
    ax.plot(x, rms, "s", ms=3, color=PALETTE[1], label="parameter-gradient RMS")
    profile = signal_profile(rec, run.meta["layers"])
    if profile:
        ref = output_side_reference(profile, 0.25)
        ax.axhline(ref * 1e-3, color=PALETTE[0], ls=":", lw=1, label="vanishing threshold (1e-3 x output side)")
        ax.axhline(ref * 1e3, color=PALETTE[3], ls=":", lw=1, label="exploding threshold (1e3 x output side)")
    flagged = {a.layer: a.kind for a in run.alerts}
    for i, n in enumerate(names):
        if n in flagged and math.isfinite(sig[i]) and sig[i] > 0:
            ax.plot(i, sig[i], "x", ms=8, color=ALERT_COLOURS.get(flagged[n], "k"))
    ax.set_yscale("log")
    every = max(1, math.ceil(len(names) / 60))  # at most ~60 labels: deep nets label every k-th layer
    ticks = list(x)[::every]
    ax.set_xticks(ticks)
    ax.set_xticklabels([short_name(names[i], 18) for i in ticks], rotation=90, fontsize=7)
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
        raise ValueError(f"no layer has the statistic {stat!r} in this run")
    grid = np.full((len(names), len(records)), np.nan)
    for j, r in enumerate(records):
        for i, n in enumerate(names):
            v = r.layers.get(n, {}).get(stat)
            if v is not None and v > 0 and math.isfinite(v):
                grid[i, j] = math.log10(v)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.16 * len(names) + 1.5)))
    steps = [r.step for r in records]
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label=f"log10 {stat}")
    row = {n: i for i, n in enumerate(names)}
    for a in run.alerts:
        if a.layer in row:
            ax.plot(a.step, row[a.layer], "x", ms=6, color="white", mec=ALERT_COLOURS.get(a.kind, "k"))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([short_name(n, 22) for n in names], fontsize=6)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input side at the top)")
    ax.set_title(f"{stat} per layer over training, {_label(run, 'model')}  (x: alert)")
    return _done(fig, path)


def _timeline(source, path, stat, ylabel, title, kind):
    plt = _plt()
    run, records, sites = _with_stat(source, stat)
    if not sites:
        raise ValueError(f"this run has no {stat} (no matching activation call site was tracked)")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, site in enumerate(sites):
        pts = [(r.step, r.layers[site][stat]) for r in records if stat in r.layers.get(site, {})]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=PALETTE[i % len(PALETTE)],
                ls=["-", "--", ":", "-."][i // len(PALETTE) % 4], label=short_name(site, 20))
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
    lines = 0
    for k, run in enumerate(runs):
        _need_steps(run)
        rec = run.history.last
        for name, st in rec.layers.items():
            if "through_time" in st:
                label = (labels[k] if labels else _label(run, f"run {k}")) + f" ({short_name(name, 16)})"
                values = [v if v > 0 else math.nan for v in st["through_time"]]
                ax.plot(range(len(values)), values, color=PALETTE[lines % len(PALETTE)], label=label)
                lines += 1
    if not lines:
        raise ValueError("no recurrent layer (nn.RNN/LSTM/GRU) with a through-time profile in these runs")
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


def _series(run: Run, metric: str):
    xs, ys = [], []
    for r in run.history.records():
        if metric == "signal_ratio":
            v = run.signal_ratio(r)
        elif metric == "grad_norm":
            sq = [st["grad_norm"] ** 2 for st in r.layers.values() if "grad_norm" in st]
            v = math.sqrt(sum(sq)) if sq else math.nan
        else:
            key = "dead_fraction" if metric == "max_dead" else "saturation"
            vals = [st[key] for st in r.layers.values() if key in st]
            v = 100 * max(vals) if vals else math.nan
        xs.append(r.step)
        ys.append(v)
    return xs, ys


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
        for k, run in enumerate(runs):
            _need_steps(run)
            xs, ys = _series(run, metric)
            ax.plot(xs, ys, color=PALETTE[k % len(PALETTE)], label=labels[k] if labels else _label(run, f"run {k}"))
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    return _done(fig, path)


FIGURES = {"flow": gradient_flow, "heatmap": heatmap, "dead": dead_units, "saturation": saturation,
           "time": through_time}
