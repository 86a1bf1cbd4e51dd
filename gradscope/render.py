"""Render: the text table a person reads in a terminal."""

from __future__ import annotations

import math

from .detectors import output_side_reference, signal_profile, thresholds
from .statistics import STATISTICS, names
from .verdict import alert_summary, verdict

NAME_WIDTH = 30
# folding of long tables (summary(full=False)): a table of more rows than FOLD_ABOVE shows its first HEAD_ROWS and
# last TAIL_ROWS rows, every row of a layer with an alert and ALERT_CONTEXT rows either side of it; each run of
# MIN_FOLD or more rows left between them becomes one line with the ranges of their signal and grad_rms
FOLD_ABOVE = 40
HEAD_ROWS = TAIL_ROWS = 4
ALERT_CONTEXT = 1
MIN_FOLD = 3
# overall input/output signal ratio: inside [1/STEADY, STEADY] "roughly steady", else "somewhat" up to a factor of
# STRONG, beyond it plainly shrinks/grows
STEADY = 1.5
STRONG = 10.0
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


def shown_rows(n: int, alerting, full: bool = False) -> list[bool]:
    """Which of ``n`` table rows the summary shows; ``alerting`` holds the indices of rows of layers with an alert.

    All of them when ``full`` or ``n <= FOLD_ABOVE``; else the input-side and output-side rows, every alerting row
    with its neighbours, and any gap too short to be worth a folded line.
    """
    if full or n <= FOLD_ABOVE:
        return [True] * n
    keep = [i < HEAD_ROWS or i >= n - TAIL_ROWS for i in range(n)]
    for i in alerting:
        for j in range(max(0, i - ALERT_CONTEXT), min(n, i + ALERT_CONTEXT + 1)):
            keep[j] = True
    i = 0
    while i < n:
        if keep[i]:
            i += 1
            continue
        j = i
        while j < n and not keep[j]:
            j += 1
        if j - i < MIN_FOLD:
            keep[i:j] = [True] * (j - i)
        i = j
    return keep


def value_range(values, fmt: str = ".1e") -> str:
    """``"lo..hi"`` over the finite values (one value when they are all equal), ``"-"`` when there is none; the count
    of non-finite values (nan, inf) is added when there are some."""
    vals = [v for v in values if v is not None]
    finite = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (None, None)
    text = "-" if lo is None else format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}..{format(hi, fmt)}"
    bad = len(vals) - len(finite)
    return text + (f" ({bad} non-finite)" if bad else "")


def fold_groups(names_: list[str]) -> list[list[int]]:
    """Split a run of consecutive folded rows (their layer names) into the groups that get one line each: one per
    top-level submodule (``layer1``, ``layer2`` in ``layer2.3.conv1``; names without a dot go together), a group of
    fewer than ``MIN_FOLD`` rows joining its neighbour. Returns the row indices of each group."""
    groups: list[tuple[str, list[int]]] = []
    for i, name in enumerate(names_):
        key = name.split(".")[0] if "." in name else ""
        if groups and groups[-1][0] == key:
            groups[-1][1].append(i)
        else:
            groups.append((key, [i]))
    merged: list[list[int]] = []
    for _, idx in groups:
        if merged and (len(idx) < MIN_FOLD or len(merged[-1]) < MIN_FOLD):
            merged[-1].extend(idx)
        else:
            merged.append(idx)
    return merged


def _fold_lines(folded) -> list[str]:
    """One line per group of folded rows ``[(name, stats), ...]``: its first and last name, the count, and the ranges
    of the backprop signal and the gradient RMS."""
    out = []
    for idx in fold_groups([name for name, _ in folded]):
        stats = [folded[i][1] for i in idx]
        out.append(f"  {short_name(folded[idx[0]][0])} - {short_name(folded[idx[-1]][0])}: {len(idx)} rows folded, "
                   f"signal {value_range(st.get('backprop_signal') for st in stats)}, "
                   f"grad_rms {value_range(st.get('grad_rms') for st in stats)} (summary(full=True) shows them)")
    return out


def depth_trend(ratio: float) -> str:
    """The words for the input side's backprop signal over the output side's (:meth:`Run.signal_ratio`)."""
    if math.isnan(ratio):
        return "no ratio: the output side has no signal"
    share = f"input side gets {ratio:.1e} of the output side's" if ratio < 1 else \
        f"input side gets {ratio:.1e}x the output side's"
    if ratio < 1 / STRONG:
        return f"{share}: shrinks towards the input"
    if ratio < 1 / STEADY:
        return f"{share}: shrinks somewhat towards the input"
    if ratio <= STEADY:
        return f"{share}: roughly steady with depth"
    if ratio <= STRONG:
        return f"{share}: grows somewhat towards the input"
    return f"{share}: grows towards the input"


def format_summary(run, max_names: int = 8, full: bool = False) -> str:
    """The summary of a run: the verdict, last collected step per layer, depth profile, alerts with remedies.

    Args:
        max_names: layers named per alert kind before "... and N more".
        full: one row per layer/call site. Without it a table of more than ``FOLD_ABOVE`` rows shows the input-side
            and output-side rows and every row of a layer with an alert (with its neighbours), and folds each run of
            rows between them into one line with the range of their backprop signal and grad_rms.
    """
    rec = run.history.last
    layers = run.meta.get("layers", [])
    head = f"gradscope summary: {run.meta.get('model', 'model')}"
    if rec is None:
        return head + " (no step collected yet: call scope.step() after loss.backward())"
    every = run.meta.get("every", 1)
    lines = [f"{head}, step {rec.step} (collected every {every}), {len(layers)} layers/call sites, "
             f"{len(run.alerts)} alerts", f"verdict: {verdict(run)}"]
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
    keep = shown_rows(len(rows), [i for i, e in enumerate(rows) if e.name in flagged], full)
    folded: list = []
    for e, show in zip(rows, keep):
        st = rec.layers.get(e.name, {})
        if not show:
            folded.append((e.name, st))
            continue
        if folded:
            lines += _fold_lines(folded)
            folded = []
        sig = st.get("backprop_signal")
        ratio = sig / ref if (e.params and sig is not None and ref and math.isfinite(ref)) else None
        mark = " !" if e.name in flagged else ""
        optional = "".join(f" {_num(_scaled(st.get(key), fmt), fmt[0]):>{fmt[2]}}"
                           for key, _, fmt in extra)
        lines.append(
            f"{short_name(e.name):<{NAME_WIDTH}} {e.module[:14]:<14} {e.params:>9,} "
            f"{_num(st.get('grad_norm')):>9} {_num(st.get('grad_rms')):>9} {_num(sig):>9} {_num(ratio, '.1e'):>8}"
            f"{optional}{mark}")
    if folded:  # not reached while the output-side rows are always shown
        lines += _fold_lines(folded)
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
        lines.append(f"backprop signal, input -> output over {len(profile)} parameterised layers: "
                     f"{profile[0][1]:.2e} ({short_name(profile[0][0], 20)}) ... {profile[-1][1]:.2e} "
                     f"({short_name(profile[-1][0], 20)}); average factor per layer {factor:.3g} "
                     f"({depth_trend(run.signal_ratio(rec))})")
    else:
        lines.append("backprop signal: fewer than two parameterised layers with a signal; no depth profile")
    alerts = run.alerts
    if not alerts:
        lines.append("alerts: none")
        return "\n".join(lines)
    lines.append(f"alerts: {len(alerts)} (each fired when its condition started; scope.alerts has them all)")
    remedies: dict[str, str] = {}  # remedy text -> the kind it was first printed under
    for kind in alert_summary(run):
        of_kind = [a for a in alerts if a.kind == kind.kind]
        names = list(dict.fromkeys(a.layer or "(root)" for a in of_kind))
        shown = ", ".join(names[:max_names]) + (f", ... and {len(names) - max_names} more"
                                                if len(names) > max_names else "")
        first = of_kind[0]
        lines.append(f"  {kind.describe()} on {len(names)} layer{'s' if len(names) != 1 else ''}: {shown}")
        lines.append(f"    e.g. {first.layer or '(root)'} at step {first.step}: {first.message}")
        if first.hint in remedies:
            lines.append(f"    remedy: as for {remedies[first.hint]} above")
        else:
            remedies[first.hint] = kind.kind
            lines.append(f"    remedy: {first.hint}")
    return "\n".join(lines)
