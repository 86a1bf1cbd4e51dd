"""The record of one collected step, built from what the hooks collected: a function of its inputs.

:func:`build_record` turns the step's gradients, :class:`~gradscope.collect.StepBuffers` and dead-unit states into
a :class:`~gradscope.record.StepRecord` (per layer and per parameter statistics, and step-level ``info``), with one
device-to-host transfer (:class:`~gradscope.stats.Transfer`); a second one only when a gradient is non-finite.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict
from operator import itemgetter

import torch

from .activations import DeadUnitBank, through_time_summary
from .collect import StepBuffers
from .record import LayerInfo, StepRecord
from .statistics import FOLDS, MEASURES, STATISTICS, Statistic
from .stats import Transfer, nonfinite_counts, saturation_sums, sum_by_key


def measure_params(grads: list, weights: list, extra: frozenset, snapshot: list | None = None) \
        -> tuple[list[Statistic], dict]:
    """The statistics of the parameters this step computes, and the :data:`MEASURES` they read, as device tensors
    (one entry per parameter, nothing fetched yet): ``(wanted, {measure: vector})``.

    ``grads``, ``weights`` (and ``snapshot``, the weights one step before, for ``update_ratio``): same order, this
    rank's tensors (a sharded parameter's local shard). ``extra``: the optional statistics asked for.
    """
    wanted = [s for s in STATISTICS.values() if s.reads and (not s.optional or s.name in extra)] if grads else []
    measured = {}
    for s in wanted:
        for m in s.reads:  # in order: none after one that cannot be measured (update_ratio's before a first step)
            if m not in measured:
                measured[m] = MEASURES[m].compute(grads, weights, snapshot)
            if measured[m] is None:
                break
    wanted = [s for s in wanted if all(measured.get(m) is not None for m in s.reads)]
    return wanted, {m: v for m, v in measured.items() if v is not None}


def build_record(step: int, params: list, grads: list, buffers: StepBuffers, bank: DeadUnitBank, dead: list,
                 table: list[LayerInfo], wanted: list[Statistic], measured: dict, *, scale_t=None,
                 grads_unscaled: bool = False, loss=None, skipped: bool = False,
                 count_nonfinite=None) -> tuple[StepRecord, float]:
    """The record of collected step ``step``, and what the ``.grad`` values were divided by (the loss scale, or 1).

    Args:
        params: ``(qualified name, layer name, parameter)`` of the parameters with a gradient this step; grads: their
            ``.grad`` tensors, in the same order.
        buffers: the step's collected parts (already reduced over ranks where that applies).
        bank, dead: the dead-unit states (this step's counts already folded in) and this step's ReLU sites.
        table: the layer table (``meta["layers"]``), in forward order: the record's layers follow it.
        wanted, measured: from :func:`measure_params` (sharded parameters' already combined over ranks).
        scale_t: the loss scale of this backward pass (a device tensor), or None; grads_unscaled: the ``.grad``
            values were already unscaled (``scaler.unscale_`` ran).
        loss: this step's loss (tensor or number), or None; skipped: the scaler skipped this step (overflow).
        count_nonfinite: ``[(grad, index in params)] -> [NaN/Inf entries]`` for the gradients whose norm is not
            finite (default: :func:`gradscope.stats.nonfinite_counts` of each; sharded parameters: of the whole).
    """
    tr = Transfer()
    for m, v in measured.items():
        tr.add(("param", m), v)
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

    sig = dict(zip(signal_sites, got.get("signal", [])))
    sig.update({site: 0.0 for site in buffers.hooked if site not in sig})  # outputs no backward pass reached
    out_sum = dict(zip(out_sites, got.get("out", [])))
    dead_stats = {site: (count, rate) for site, count, rate in zip(dead, got.get("dead", []), got.get("rate", []))}
    sat_stats = {site: (k / sat_numel[site], total / sat_numel[site])
                 for site, k, total in zip(sat_sites, got.get("saturated", []), got.get("sat_total", []))}
    scale = got["scale"][0] if scale_t is not None else 1.0
    grad_scale = 1.0 if scale_t is None or grads_unscaled else scale

    # the parameters' statistics: each entry of ``wanted`` folds its measures per parameter, then per layer
    raw = {m: [v / grad_scale for v in got[("param", m)]] if MEASURES[m].scaled else got[("param", m)]
           for m in measured if ("param", m) in got}
    g_norm = raw.get("grad_norm", [])
    bad = [k for k, v in enumerate(g_norm) if not math.isfinite(v)]
    if bad:
        pairs = [(grads[k], k) for k in bad]
        counts = count_nonfinite(pairs) if count_nonfinite else nonfinite_counts([g for g, _ in pairs])
        nonfinite = dict(zip(bad, counts))
    else:
        nonfinite = {}
    numels = [p.numel() for _, _, p in params]

    # per parameter: one column per statistic (its fold's ``each``), then one dict per parameter from the rows
    names = [s.name for s in wanted] + ["grad_nonfinite"]
    columns = [FOLDS[s.per_layer].each(tuple(raw[m] for m in s.reads), numels) for s in wanted]
    columns.append([nonfinite.get(k, 0) for k in range(len(params))] if nonfinite else [0] * len(params))
    per_param = {pname: dict(zip(names, row)) for (pname, _, _), row in zip(params, zip(*columns))}
    groups = defaultdict(list)
    for k, (_, lname, _) in enumerate(params):
        groups[lname].append(k)
    folded = {}  # per layer: a copy of its one parameter's values, or its parameters' folded
    reads = list(dict.fromkeys(m for s in wanted for m in s.reads))
    group_folds = [(s.name, FOLDS[s.per_layer].group, s.reads) for s in wanted]
    for lname, idx in groups.items():
        if len(idx) == 1:
            folded[lname] = dict(per_param[params[idx[0]][0]])
            continue
        pick = itemgetter(*idx)  # (a tuple of the layer's entries of a column)
        cols = {m: pick(raw[m]) for m in reads}
        n = pick(numels)
        st = {name: group(tuple(cols[m] for m in r), n) for name, group, r in group_folds}
        st["grad_nonfinite"] = sum(pick(columns[-1]))
        folded[lname] = st

    layers = {}
    for e in table:
        name = e.name
        st = folded.get(name) or {}
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

