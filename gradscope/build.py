"""The record of one collected step, built from what the hooks collected: a function of its inputs.

:func:`build_record` turns the step's gradients, :class:`~gradscope.collect.StepBuffers` and dead-unit states into
a :class:`~gradscope.record.StepRecord` (per layer and per parameter statistics, and step-level ``info``), with one
device-to-host transfer (:class:`~gradscope.stats.Transfer`); a second one only when a gradient is non-finite.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict

import torch

from .activations import DeadUnitBank, through_time_summary
from .collect import StepBuffers
from .record import StepRecord
from .stats import Transfer, max_abs, nonfinite_counts, nonzero_counts, norms, saturation_sums, sum_by_key


def build_record(step: int, params: list, grads: list, buffers: StepBuffers, bank: DeadUnitBank, dead: list,
                 table: list[dict], extra: frozenset, *, snapshot: list | None = None, scale_t=None,
                 grads_unscaled: bool = False, loss=None, skipped: bool = False) -> tuple[StepRecord, float]:
    """The record of collected step ``step``, and what the ``.grad`` values were divided by (the loss scale, or 1).

    Args:
        params: ``(qualified name, layer name, parameter)`` of the parameters with a gradient this step; grads: their
            ``.grad`` tensors, in the same order.
        buffers: the step's collected parts (already reduced over ranks where that applies).
        bank, dead: the dead-unit states (this step's counts already folded in) and this step's ReLU sites.
        table: the layer table (``meta["layers"]``), in forward order: the record's layers follow it.
        extra: the optional statistics to compute (see :data:`gradscope.options.EXTRA_STATS`).
        snapshot: the trainable parameters one step before (same order as ``params``), for ``update_ratio``.
        scale_t: the loss scale of this backward pass (a device tensor), or None; grads_unscaled: the ``.grad``
            values were already unscaled (``scaler.unscale_`` ran).
        loss: this step's loss (tensor or number), or None; skipped: the scaler skipped this step (overflow).
    """
    weights = [p for _, _, p in params]
    tr = Transfer()
    if grads:
        tr.add("grad", norms(grads))
        if "grad_max" in extra:
            tr.add("max", max_abs(grads))
        if "grad_zero_frac" in extra:
            tr.add("nonzero", nonzero_counts(grads))
        if "weight_norm" in extra:
            tr.add("weight", norms(weights))
        if snapshot is not None:
            tr.add("update", norms(torch._foreach_sub([w.detach() for w in weights], snapshot)))
    signal_sites = out_sites = ()
    sat_sites, sat_k, sat_tot, sat_numel = saturation_sums(buffers.saturation_parts)
    if buffers.signal_parts:
        signal_sites, t = sum_by_key(buffers.signal_parts)
        tr.add("signal", t)
    if buffers.output_parts:
        out_sites, t = sum_by_key(buffers.output_parts)
        tr.add("out", t)
    if scale_t is not None:
        tr.add("scale", scale_t)
    if isinstance(loss, torch.Tensor):
        tr.add("loss", loss)
    if dead:
        count, rate = bank.stats(dead)
        tr.add("dead", count)
        tr.add("rate", rate)
    if sat_k is not None:
        tr.add("saturated", sat_k)
        tr.add("sat_total", sat_tot)
    for site, profile in buffers.through_time.items():
        tr.add(("time", site), profile)
    got = tr.fetch()  # the one transfer of this step

    n = len(grads)
    g_norm, g_max, g_nonzero = got.get("grad", []), got.get("max"), got.get("nonzero")
    w_norm, upd = got.get("weight"), got.get("update")
    sig = dict(zip(signal_sites, got.get("signal", [])))
    sig.update({site: 0.0 for site in buffers.hooked if site not in sig})  # outputs no backward pass reached
    out_sum = dict(zip(out_sites, got.get("out", [])))
    dead_stats = {site: (count, rate) for site, count, rate in zip(dead, got.get("dead", []), got.get("rate", []))}
    sat_stats = {site: (k / sat_numel[site], total / sat_numel[site])
                 for site, k, total in zip(sat_sites, got.get("saturated", []), got.get("sat_total", []))}
    scale = got["scale"][0] if scale_t is not None else 1.0
    grad_scale = 1.0 if scale_t is None or grads_unscaled else scale

    bad = [k for k in range(n) if not math.isfinite(g_norm[k])]
    nonfinite = dict(zip(bad, nonfinite_counts([grads[k] for k in bad]))) if bad else {}

    per_param = {}
    agg = defaultdict(lambda: {"sq": 0.0, "numel": 0, "max": [], "zeros": 0.0, "nf": 0, "wsq": 0.0, "usq": 0.0})
    for k, (pname, lname, p) in enumerate(params):
        numel = p.numel()
        gn = g_norm[k] / grad_scale
        st = per_param[pname] = {"grad_norm": gn, "grad_rms": gn / math.sqrt(numel),
                              "grad_nonfinite": nonfinite.get(k, 0)}
        a = agg[lname]
        a["sq"] += gn * gn
        a["numel"] += numel
        a["nf"] += nonfinite.get(k, 0)
        if g_max is not None:
            st["grad_max"] = g_max[k] / grad_scale
            a["max"].append(st["grad_max"])
        if g_nonzero is not None:
            st["grad_zero_frac"] = (numel - g_nonzero[k]) / numel
            a["zeros"] += numel - g_nonzero[k]
        if w_norm is not None:
            st["weight_norm"] = w_norm[k]
            a["wsq"] += w_norm[k] * w_norm[k]
        if upd is not None:
            st["update_ratio"] = upd[k] / w_norm[k] if w_norm[k] > 0 else math.nan
            a["usq"] += upd[k] * upd[k]

    layers = {}
    for e in table:
        name, st = e["name"], {}
        if name in agg:
            a = agg[name]
            gn = math.sqrt(a["sq"])
            st.update(grad_norm=gn, grad_rms=gn / math.sqrt(a["numel"]), grad_nonfinite=a["nf"])
            if g_max is not None:
                st["grad_max"] = _nanmax(a["max"])
            if g_nonzero is not None:
                st["grad_zero_frac"] = a["zeros"] / a["numel"]
            if w_norm is not None:
                st["weight_norm"] = wn = math.sqrt(a["wsq"])
                if upd is not None:
                    st["update_ratio"] = math.sqrt(a["usq"]) / wn if wn > 0 else math.nan
        if name in sig:
            st["backprop_signal"] = math.sqrt(sig[name]) / scale
        if name in out_sum:
            st["output_nonfinite"] = 0.0 if math.isfinite(out_sum[name]) else 1.0
            st["output_nan"] = 1.0 if math.isnan(out_sum[name]) else 0.0
        if name in dead_stats and bank.sites[name].since.numel():
            count, rate = dead_stats[name]
            tracker = bank.sites[name]
            units = tracker.since.numel()
            st.update(dead_fraction=count / units, dead_units=count, units=units, fire_rate=rate / units,
                      dead_window_filled=float(tracker.seen >= tracker.window))
        if name in sat_stats:
            st["saturation"], st["mean_output"] = sat_stats[name]
        if ("time", name) in got:
            profile = [v / scale for v in got[("time", name)]]
            st["through_time_ratio"], st["through_time_reach"] = through_time_summary(profile)
            st["through_time"] = array("f", profile)
        if st:
            layers[name] = st

    # Under a scaler, non-finite gradients are an overflow the scaler skips, unless the forward pass made a NaN:
    # that is a real fault (an infinite forward output, e.g. a -inf attention mask, is left to the scaler).
    backward_bad = bool(nonfinite) or any(not math.isfinite(v) for v in sig.values())
    forward_nan = any(math.isnan(v) for v in out_sum.values())
    if loss is not None:
        loss = got["loss"][0] if isinstance(loss, torch.Tensor) else loss
    # a non-finite loss is never the scaler's doing: it scales the loss after it is computed
    overflow = (skipped or (scale_t is not None and backward_bad and not forward_nan)) \
        and (loss is None or math.isfinite(loss))
    info = {"grad_scale": scale, "overflow": overflow}
    if loss is not None:
        info["loss"] = loss
    return StepRecord(step, layers, per_param, info), grad_scale


def _nanmax(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)
