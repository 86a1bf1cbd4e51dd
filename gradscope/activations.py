"""Activation statistics: dead ReLU units, sigmoid/tanh saturation, gradient through time in recurrent layers.

Which call sites are tracked is decided by two visible tables, one for modules and one for functional calls:

* :data:`MODULE_KINDS` -- ``nn.ReLU``/``nn.ReLU6`` are ``"relu"`` sites, ``nn.Sigmoid``/``nn.Tanh`` are ``"sigmoid"`` /
  ``"tanh"`` sites, ``nn.RNN``/``nn.LSTM``/``nn.GRU`` are ``"recurrent"`` sites.
* :data:`FUNCTION_KINDS` -- ``F.relu``, ``torch.relu``, ``relu_``, ``Tensor.relu``, ``F.relu6``, ``torch.sigmoid``,
  ``Tensor.sigmoid`` (what ``F.sigmoid`` calls), ``torch.tanh``, ``Tensor.tanh`` and their inplace forms, when called
  inside some module's ``forward`` with no activation module of their own (a sigmoid/tanh inside an activation
  function, GELU's or SiLU's, is none: :func:`gradscope.anatomy.inside_activation`). They are seen through a
  ``torch.overrides.TorchFunctionMode`` that is active only during the model's forward pass on collected steps, and are
  named after the innermost module whose forward made them: ``"block:relu"``, ``"block:relu#2"`` (``":relu"`` for the
  root module's own forward).

Every tracker keeps O(units) device state and never holds a batch of activations across steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .stats import _wide

MODULE_KINDS = {nn.ReLU: "relu", nn.ReLU6: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                nn.RNN: "recurrent", nn.LSTM: "recurrent", nn.GRU: "recurrent"}
FUNCTION_KINDS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", Tensor.relu: "relu", Tensor.relu_: "relu",
    F.relu6: "relu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", Tensor.sigmoid: "sigmoid", Tensor.sigmoid_: "sigmoid",
    torch.tanh: "tanh", torch.tanh_: "tanh", Tensor.tanh: "tanh", Tensor.tanh_: "tanh",
}
# Parameter-free modules whose output is finite whenever their input is (in float32/bfloat16/float64; float16's small
# range lets dropout's 1/(1-p) and the like overflow): where the input is the output just checked for NaN/Inf, that
# check covers theirs too (see Collector._record_output). Exact types, as MODULE_KINDS: a subclass may compute more.
FINITE_FROM_FINITE = frozenset({
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity, nn.Flatten, nn.Unflatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.Softmax,
})
# The same by qualified class name, for libraries gradscope does not import: Hugging Face's GELU/SiLU/Mish variants
# (not its ReLUSquaredActivation: a square of a finite float can overflow).
FINITE_FROM_FINITE_NAMES = frozenset(f"transformers.activations.{name}" for name in (
    "GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUActivation", "SiLUActivation", "FastGELUActivation",
    "QuickGELUActivation", "ClippedGELUActivation", "AccurateGELUActivation", "MishActivation", "LinearActivation"))
# Output bounds of the saturating activations: (low, high).
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def module_kind(module: nn.Module) -> str | None:
    """The activation kind of a module (``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"recurrent"``) or None."""
    for cls, kind in MODULE_KINDS.items():
        if type(module) is cls:
            return kind
    return None


def finite_from_finite(module: nn.Module) -> bool:
    """Whether ``module`` makes no NaN/Inf from a finite input (:data:`FINITE_FROM_FINITE`,
    :data:`FINITE_FROM_FINITE_NAMES`; a LeakyReLU whose slope is at most 1 too)."""
    cls = type(module)
    if cls is nn.LeakyReLU:
        return abs(module.negative_slope) <= 1
    return cls in FINITE_FROM_FINITE or f"{cls.__module__}.{cls.__qualname__}" in FINITE_FROM_FINITE_NAMES


def unit_dim(ndim: int) -> int:
    """Which dimension indexes the *units* of an activation of ``ndim`` dimensions (dimension 0 is the sample).

    ``(N, F)`` -> features (1); ``(N, T, F)`` -> features (2, the last: a sequence of feature vectors, as nn.Linear and
    Transformers lay them out); ``(N, C, ...)`` with 4 or more dims -> channels (1); ``(F,)`` -> 0 (one sample).
    A ``(N, C, L)`` Conv1d output is the ambiguous case: override it with ``watch(..., unit_dims={site: 1})``.
    """
    if ndim <= 1:
        return 0
    if ndim == 3:
        return 2
    return 1


def _ones_row(n: int, device: torch.device, cache: dict | None) -> Tensor:
    """A ``(1, n)`` row of ones, kept in ``cache`` (the caller's: a plain dict, which ``torch.compile`` traces
    through without a warning) when one is given."""
    if cache is None:
        return torch.ones(1, n, device=device)
    key = (n, device)
    ones = cache.get(key)
    if ones is None:
        if len(cache) > 64:
            cache.clear()
        ones = cache[key] = torch.ones(1, n, device=device)
    return ones


KEEP_PER_SAMPLE = 1 << 16
"""A ReLU site's per-sample totals (samples x units) up to this many entries are kept as they are, and counted with
the other sites' of the same forward pass in one matmul (:func:`count_fired`); larger ones are counted in the hook."""


def fired_counts(out: Tensor, dim: int, check: bool = True, ones: dict | None = None, keep: bool = False) \
        -> tuple[Tensor, Tensor | None, int]:
    """Forward-side work of a ReLU-family site: ``(fired, check, n)``.

    fired: float32 ``(units,)``, on how many of the ``n`` samples each unit fired (any output > 0: any position of a
    conv channel, any step of a sequence); or, with ``keep`` and up to :data:`KEEP_PER_SAMPLE` entries, a new float32
    ``(n, units)`` tensor that is > 0 exactly where a unit fired on a sample, for :func:`count_fired` to count later
    (one op per site here instead of three: on CUDA each op is a kernel launch, ~20 us of host time on an H200 host;
    on CPU the ops are cheap and the extra copies are not, so the collector keeps on CUDA only). check (when
    asked for, else None): the float32 sum of the outputs, non-finite iff they hold NaN/Inf, the site's forward NaN
    check. ReLU outputs are >= 0, so a unit fired on a sample iff its summed outputs on that sample are > 0, and the
    count is ``ones @ sign(per-sample sums)``: several times faster on CPU than ``count_nonzero``, ``amax`` or a
    column ``sum`` on such shapes. ``ones``: a dict the caller owns (the collector's) that keeps the rows of ones.
    """
    x = out.detach()
    if x.ndim <= 1:
        x, dim = x.reshape(1, -1), 1
    if dim != 1:
        x = x.movedim(dim, 1)
    made_here = x.ndim > 2
    if made_here:
        x = x.sum(dim=tuple(range(2, x.ndim)), dtype=torch.float32)  # (N, U) per-sample totals
    n = x.shape[0]
    total = x.sum(dtype=torch.float32) if check else None
    if keep and x.numel() <= KEEP_PER_SAMPLE:
        # kept, so it must be a tensor of our own that nothing changes later (the output itself may be changed in
        # place); float32: counts above 256 are not exact in bfloat16
        if not made_here:
            x = x.sign()  # exact in any dtype (a float32 copy of a float64 1e-50 would be 0: "never fired")
            if x.dtype != torch.float32:
                x = x.float()
        return x, total, n
    return _counts(x, ones), total, n


def _counts(per_sample: Tensor, ones: dict | None) -> Tensor:
    """``(units,)`` float32: on how many samples (rows) each unit (column) is > 0 (a NaN is not: its sign is 0)."""
    fired = per_sample.sign()
    if fired.dtype != torch.float32:
        fired = fired.float()  # counts above 256 are not exact in bfloat16
    if _autocast_on(fired.device.type):
        return fired.sum(0)  # autocast would run the matmul in 16 bits
    return (_ones_row(fired.shape[0], fired.device, ones) @ fired).reshape(-1)


def count_fired(parts: list, ones: dict | None = None) -> list:
    """``[(site, fired, n)]`` from :func:`fired_counts` with every kept ``(n, units)`` entry replaced by its counts:
    the entries of the same ``n`` (one batch) side by side in one matrix, counted with one ``sign`` and one matmul."""
    groups: dict = {}
    for i, (_, fired, _) in enumerate(parts):
        if fired.ndim == 2:
            groups.setdefault((fired.shape[0], fired.device), []).append(i)
    if not groups:
        return parts
    parts = list(parts)
    for idx in groups.values():
        block = [parts[i][1] for i in idx]
        counts = _counts(torch.cat(block, dim=1) if len(block) > 1 else block[0], ones)
        for i, c in zip(idx, counts.split([b.shape[1] for b in block])):
            parts[i] = (parts[i][0], c, parts[i][2])
    return parts


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class DeadUnitState:
    """Which units of a ReLU-family site have not fired (output > 0) on any of the last ``window`` samples.

    State is O(units): for each unit the number of samples since the batch in which it last fired (capped at
    ``window``), and an exponential moving average of the fraction of samples on which it fires (time constant
    ``window`` samples). The window is counted in samples seen on collected steps and rounded to whole batches. A NaN
    output counts as not firing (the step raises a ``nonfinite`` alert anyway).

    ``since`` and ``rate`` are views into the flat vectors of a :class:`DeadUnitBank`, which updates every site at once.
    """

    def __init__(self, window: int):
        self.window = window
        self.seen = 0  # samples observed so far (host int: shapes are known without a sync)
        self.since: Tensor | None = None  # float32 (units,): samples since the unit last fired, at most window
        self.rate: Tensor | None = None

    def dead_mask(self) -> Tensor:
        return self.since >= min(self.window, self.seen)


class DeadUnitBank:
    """The dead-unit state of all ReLU sites in two flat float32 vectors, updated with a few ops per step.

    The forward pass only computes :func:`fired_counts` per site (:func:`count_fired` finishes them). :meth:`update`
    takes one batch per site, in a fixed
    order (the *layout*); while the layout stays the same from step to step (the usual case) the update and
    :meth:`stats` cost the same handful of ops whatever the number of sites. A new layout (a site seen for the first
    time, a width change, a branch not taken) copies the states into new flat vectors once.
    """

    def __init__(self, window: int):
        self.window = window
        self.sites: dict[str, DeadUnitState] = {}
        self.layout: tuple = ()  # ((site, units), ...) of the flat vectors
        self._since = self._rate = self._segment = None

    def fold(self, parts: list) -> list[str]:
        """Fold one step's ``(site, fired counts, samples)`` parts into the states (a site observed k times is updated
        in k rounds); return the step's ReLU sites in forward order."""
        rounds: list[list] = []
        depth: dict = {}
        for part in parts:
            k = depth[part[0]] = depth.get(part[0], -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(part)
        for batch in rounds:
            self.update(batch)
        return [site for site in depth if site in self.sites]

    def _relayout(self, layout: tuple, device) -> None:
        since, rate = [], []
        for site, units in layout:
            t = self.sites.setdefault(site, DeadUnitState(self.window))
            if t.since is None or t.since.numel() != units:
                t.since = torch.zeros(units, device=device)
                t.rate = torch.zeros(units, device=device)
                t.seen = 0
            since.append(t.since.to(device))
            rate.append(t.rate.to(device))
        self._since, self._rate = torch.cat(since), torch.cat(rate)
        sizes = [u for _, u in layout]
        for (site, _), s, r in zip(layout, self._since.split(sizes), self._rate.split(sizes)):
            self.sites[site].since, self.sites[site].rate = s, r
        self._segment = self._per_unit_values(list(range(len(layout))), sizes, torch.int64)
        self.layout = layout

    def update(self, parts: list[tuple[str, Tensor, int]]) -> None:
        """Fold ``[(site, fired counts (units,), samples)]``, each site at most once, into the states."""
        parts = [p for p in parts if p[2] > 0]  # an empty batch (an expert that got no tokens) says nothing
        if not parts:
            return
        layout = tuple((site, counts.numel()) for site, counts, _ in parts)
        device = parts[0][1].device
        if layout != self.layout:
            self._relayout(layout, device)
        trackers = [self.sites[site] for site, _ in layout]
        ns = [n for _, _, n in parts]
        alphas = [1.0 if t.seen == 0 else min(1.0, n / self.window) for t, n in zip(trackers, ns)]  # 1: first batch
        fired = torch.cat([c if c.device == device else c.to(device) for _, c, _ in parts]) if len(parts) > 1 \
            else parts[0][1].clone()
        fired.nan_to_num_(nan=0.0)
        n, alpha = self._per_unit(ns), self._per_unit(alphas)
        self._since.add_(n).mul_(fired == 0).clamp_max_(float(self.window))
        self._rate.lerp_(fired.div_(n), alpha)
        for t, k in zip(trackers, ns):
            t.seen += k

    def _per_unit(self, values: list[float]):
        """One scalar when every site has the same value (the usual case), else a per-unit vector."""
        if all(v == values[0] for v in values):
            return float(values[0])
        return self._per_unit_values(values, [u for _, u in self.layout], torch.float32)

    def _per_unit_values(self, values: list, sizes: list[int], dtype) -> Tensor:
        # built on the device from scalars: no host-to-device copy, which would synchronise on CUDA
        device = self._since.device
        return torch.cat([torch.full((u,), v, dtype=dtype, device=device) for v, u in zip(values, sizes)])

    def stats(self, sites: list[str]) -> tuple[Tensor, Tensor]:
        """``(dead units, summed firing rates)`` of ``sites`` as two float32 vectors."""
        if tuple(sites) != tuple(site for site, _ in self.layout):
            trackers = [self.sites[site] for site in sites]
            return (torch.stack([t.dead_mask().sum().float() for t in trackers]),
                    torch.stack([t.rate.sum() for t in trackers]))
        threshold = self._per_unit([min(self.window, self.sites[site].seen) for site in sites])
        both = torch.stack([(self._since >= threshold).float(), self._rate])
        sums = both.new_zeros(2, len(sites)).index_add_(1, self._segment, both)
        return sums[0], sums[1]


def saturation_counts(out: Tensor, kind: str, eps: float) -> tuple[Tensor, Tensor, int]:
    """Forward-side work of a sigmoid/tanh site: ``(saturated count, output sum, numel)``.

    An output within ``eps`` of a bound is saturated. Compared in float32 (bf16 would round the bounds). The output
    sum doubles as the site's forward NaN check and gives the mean output.

    The distance from the centre is compared in place (``ge_``: 1.0 or 0.0 in the same buffer) and summed as floats:
    on CPU a bool tensor's sum is 3-4x slower than the whole rest (a (8, 64, 512) tanh output: 45 against 170 us).
    A float32 sum of 0/1 values is exact while the count fits in 2**24; larger outputs are summed in float64 (MPS,
    which has none: float32).
    """
    low, high = BOUNDS[kind]
    y = out.detach()
    if y.dtype != torch.float32:
        y = y.float()
    mid, half = (high + low) / 2, (high - low) / 2
    # tanh (centred on 0): no shifted copy, 2.5x faster on a (8, 64, 512) output on CPU
    far = (y.abs() if mid == 0 else (y - mid).abs_()).ge_(half - eps)
    numel = y.numel()
    saturated = far.sum(dtype=_wide(far.device)) if numel > _EXACT_F32 else far.sum()  # (MPS: float32, its widest)
    return saturated, y.sum(), numel


_EXACT_F32 = 1 << 24  # float32 holds every integer up to this exactly
_TINY_NORM = 1e-15  # a float32 norm at least this (a sum of squares >= 1e-30) lost nothing to underflow: see TINY_SQ
_HUGE_NORM = 1e18  # nor to overflow below this (float32 squares overflow at ~1.8e19)


class TimeProfile:
    """Norm of dLoss/d(input at step t) of a recurrent layer for every t, averaged over the batch, summed over the
    backward passes of one step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.profile: Tensor | None = None

    def observe_grad(self, grad: Tensor, batch_dim: int | None) -> None:
        # float64: the earliest steps of a plain RNN get gradients whose float32 squares underflow to 0. On CPU a
        # float32 gradient is measured in float32 first (2-3x cheaper: no float64 copy) and that is kept when every
        # norm lies where no square can have underflowed or overflowed (reading a CPU tensor is no sync)
        g = grad.detach()
        norms = None
        if g.is_cpu and g.dtype is torch.float32 and g.layout is torch.strided and g.numel():  # (aminmax: not empty)
            fast = torch.linalg.vector_norm(g, dim=-1)  # (N, T), (T, N) or (T,)
            lo, hi = torch.aminmax(fast)
            if lo.item() >= _TINY_NORM and hi.item() < _HUGE_NORM:
                norms = fast.double()
        if norms is None:
            norms = torch.linalg.vector_norm(g, dim=-1, dtype=_wide(g.device))
        if batch_dim is not None:
            norms = norms.mean(dim=batch_dim)
        self.profile = norms if self.profile is None or self.profile.shape != norms.shape else self.profile + norms


class FunctionalCalls(TorchFunctionMode):
    """Sees functional activation calls made inside the model's forward and hands them to ``on_call``.

    ``on_call(kind, output, input)`` is called after the function ran; the collector names the site after the
    innermost module on its module stack. Calls made inside an activation *module* (``nn.ReLU`` calls ``F.relu``) are
    skipped by the collector: that module is already a site.
    """

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = FUNCTION_KINDS.get(func)
        if kind is not None and isinstance(out, Tensor):
            self.on_call(kind, out, args[0] if args else (kwargs or {}).get("input"))
        return out


REACH_LEVEL = 1e-3
"""A step still "receives" gradient when it gets at least this fraction of what the last steps get."""


def through_time_summary(profile: list[float]) -> tuple[float, int]:
    """``(ratio, reach)`` of a through-time profile.

    ratio: mean of the earliest 10% of steps over the mean of the last 10% (at least one step each).
    reach: how many steps back, counted from the last, the gradient still arrives at ``REACH_LEVEL`` of the last
    steps' level: ``T - t0`` for the earliest step ``t0`` at or above that level.
    """
    t = len(profile)
    k = max(1, t // 10)
    late = sum(profile[-k:]) / k
    early = sum(profile[:k]) / k
    if not late > 0:
        return float("nan"), 0
    level = REACH_LEVEL * late
    t0 = next((i for i, v in enumerate(profile) if v >= level), t)
    return early / late, t - t0
