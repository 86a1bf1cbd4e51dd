"""Render: the text table a person reads in a terminal."""

from __future__ import annotations

import math

from .detectors import output_side_reference, signal_profile, thresholds
from .statistics import STATISTICS, names

NAME_WIDTH = 30
ACTIVATION_STATS = set(names(summary_row=True))
# (statistic, column title, (format, scale, width)): shown only when some row has the statistic
OPTIONAL_COLUMNS = [(s.name, s.column[1], s.column[2:]) for s in sorted(
    (s for s in STATISTICS.values() if s.column), key=lambda s: s.column[0])]


def _scaled(v, fmt):
    return None if v is None else v * fmt[1]


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """Fit a qualified module name into ``width`` characters, keeping its informative tail."""
    name = name or "(root)"
    if len(name) <= width:
        return name
    return "…" + name[-(width - 1):]


def _num(v, fmt: str = ".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, fmt)


def format_summary(run, max_names: int = 8) -> str:
    """The summary of a run: last collected step per layer, depth profile, alerts with remedies."""
    rec = run.history.last
    layers = run.meta.get("layers", [])
    head = f"gradscope summary: {run.meta.get('model', 'model')}"
    if rec is None:
        return head + " (no step collected yet: call scope.step() after loss.backward())"
    every = run.meta.get("every", 1)
    lines = [f"{head}, step {rec.step} (collected every {every}), {len(layers)} layers/call sites, "
             f"{len(run.alerts)} alerts"]
    if rec.info.get("overflow"):
        lines.append("  (this step overflowed under the AMP grad scaler and was skipped by it)")
    profile = signal_profile(rec, layers)
    ref = output_side_reference(profile, thresholds(run.meta)["output_side"]) if profile else math.nan
    rows = [e for e in layers if e.profile or e.name in rec.layers and
            ACTIVATION_STATS & rec.layers[e.name].keys()]
    extra = [(key, title, fmt) for key, title, fmt in OPTIONAL_COLUMNS
             if any(key in rec.layers.get(e.name, {}) for e in rows)]
    cols = f"{'layer':<{NAME_WIDTH}} {'module':<14} {'params':>9} {'grad_norm':>9} {'grad_rms':>9} " \
           f"{'signal':>9} {'sig/out':>8}" + "".join(f" {title:>{fmt[2]}}" for _, title, fmt in extra)
    lines += [cols, "-" * len(cols)]
    flagged = {a.layer for a in run.alerts}
    for e in rows:
        st = rec.layers.get(e.name, {})
        sig = st.get("backprop_signal")
        ratio = sig / ref if (e.params and sig is not None and ref and math.isfinite(ref)) else None
        mark = " !" if e.name in flagged else ""
        optional = "".join(f" {_num(_scaled(st.get(key), fmt), fmt[0]):>{fmt[2]}}"
                           for key, _, fmt in extra)
        lines.append(
            f"{short_name(e.name):<{NAME_WIDTH}} {e.module[:14]:<14} {e.params:>9,} "
            f"{_num(st.get('grad_norm')):>9} {_num(st.get('grad_rms')):>9} {_num(sig):>9} {_num(ratio, '.1e'):>8}"
            f"{optional}{mark}")
    for e in layers:
        st = rec.layers.get(e.name, {})
        if "through_time" in st:
            tt = list(st["through_time"])
            picks = sorted({0, len(tt) // 4, len(tt) // 2, 3 * len(tt) // 4, len(tt) - 1})
            shown = ", ".join(f"t={t}: {tt[t]:.1e}" for t in picks)
            lines.append(f"gradient through time, {short_name(e.name, 20)} ({len(tt)} steps): {shown}; earliest/last "
                         f"{st['through_time_ratio']:.1e}, reaches back {int(st['through_time_reach'])} steps")
    lines.append("")
    if len(profile) >= 2:
        factor = run.decay_factor(rec)
        overall = run.signal_ratio(rec)
        trend = (f"input side gets {overall:.1e} of the output side's: shrinks towards the input" if overall < 0.1 else
                 f"input side gets {overall:.1e}x the output side's: grows towards the input" if overall > 10 else
                 "roughly steady with depth")
        lines.append(f"backprop signal, input -> output over {len(profile)} parameterised layers: "
                     f"{profile[0][1]:.2e} ({short_name(profile[0][0], 20)}) ... {profile[-1][1]:.2e} "
                     f"({short_name(profile[-1][0], 20)}); average factor per layer {factor:.3g} ({trend})")
    else:
        lines.append("backprop signal: fewer than two parameterised layers with a signal; no depth profile")
    alerts = run.alerts
    if not alerts:
        lines.append("alerts: none")
        return "\n".join(lines)
    lines.append(f"alerts: {len(alerts)} (each fired when its condition started; scope.alerts has them all)")
    for kind in dict.fromkeys(a.kind for a in alerts):
        of_kind = [a for a in alerts if a.kind == kind]
        names = list(dict.fromkeys(a.layer or "(root)" for a in of_kind))
        shown = ", ".join(names[:max_names]) + (f", ... and {len(names) - max_names} more" if len(names) > max_names else "")
        first = of_kind[0]
        lines.append(f"  {kind}: {len(of_kind)} alerts on {len(names)} layers from step {first.step}: {shown}")
        lines.append(f"    e.g. {first.layer or '(root)'} at step {first.step}: {first.message}")
        lines.append(f"    remedy: {first.hint}")
    return "\n".join(lines)
