"""Activation statistics: dead ReLU units, sigmoid/tanh saturation, gradient through time in recurrent layers.

Which call sites are tracked is decided by two visible tables, one for modules and one for functional calls:

* :data:`MODULE_KINDS` -- ``nn.ReLU``/``nn.ReLU6`` are ``"relu"`` sites, ``nn.Sigmoid``/``nn.Tanh`` are ``"sigmoid"`` /
  ``"tanh"`` sites, ``nn.RNN``/``nn.LSTM``/``nn.GRU`` are ``"recurrent"`` sites.
* :data:`FUNCTION_KINDS` -- ``F.relu``, ``torch.relu``, ``relu_``, ``Tensor.relu``, ``F.relu6``, ``torch.sigmoid``,
  ``Tensor.sigmoid`` (what ``F.sigmoid`` calls), ``torch.tanh``, ``Tensor.tanh`` and their inplace forms, when called
  inside some module's ``forward`` with no activation module of their own. They are seen through a
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

MODULE_KINDS = {nn.ReLU: "relu", nn.ReLU6: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                nn.RNN: "recurrent", nn.LSTM: "recurrent", nn.GRU: "recurrent"}
FUNCTION_KINDS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", Tensor.relu: "relu", Tensor.relu_: "relu",
    F.relu6: "relu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", Tensor.sigmoid: "sigmoid", Tensor.sigmoid_: "sigmoid",
    torch.tanh: "tanh", torch.tanh_: "tanh", Tensor.tanh: "tanh", Tensor.tanh_: "tanh",
}
# Output bounds of the saturating activations: (low, high).
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def module_kind(module: nn.Module) -> str | None:
    """The activation kind of a module (``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"recurrent"``) or None."""
    for cls, kind in MODULE_KINDS.items():
        if type(module) is cls:
            return kind
    return None


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


def fired_per_sample(out: Tensor, dim: int) -> Tensor:
    """``(samples, units)``: the largest output of each unit on each sample (one reduction over the activation)."""
    out = out.detach()
    if out.ndim <= 1:
        return out.reshape(1, -1)
    out = out.movedim(dim, 1) if dim != 1 else out
    if out.ndim == 2:
        return out
    return out.flatten(2).amax(dim=2)


class DeadUnits:
    """Which units of a ReLU-family site have not fired (output > 0) on any of the last ``window`` samples.

    State is O(units): for each unit the sample count at which it last fired, and an exponential moving average of the
    fraction of samples on which it fires (time constant ``window`` samples). A unit fires on a sample when any of its
    outputs on that sample (any position of a conv channel, any step of a sequence) is positive. The window is counted
    in samples seen on collected steps and rounded to whole batches.
    """

    def __init__(self, window: int):
        self.window = window
        self.seen = 0  # samples observed so far (host int: shapes are known without a sync)
        self.last_fired: Tensor | None = None
        self.rate: Tensor | None = None

    def observe(self, out: Tensor, dim: int) -> None:
        per_sample = fired_per_sample(out, dim)  # (N, U), >= 0 after a ReLU: non-zero means fired
        n = per_sample.shape[0]
        if n == 0:
            return  # an empty batch (a mixture-of-experts branch that got no tokens) says nothing
        fired = torch.count_nonzero(per_sample, dim=0)  # (U,) samples on which each unit fired
        if self.last_fired is None or self.last_fired.shape != fired.shape:
            self.last_fired = torch.zeros_like(fired)
            self.rate = torch.zeros(fired.shape, device=fired.device, dtype=torch.float32)
            self.seen = 0
        alpha = 1.0 if self.seen == 0 else min(1.0, n / self.window)  # the first batch sets the rate
        self.seen += n
        self.last_fired.masked_fill_(fired > 0, self.seen)
        self.rate.lerp_(fired.float() / n, alpha)

    def dead_mask(self) -> Tensor:
        return (self.seen - self.last_fired) >= min(self.window, self.seen)

    def device_stats(self) -> Tensor:
        """``[dead count, mean firing rate]`` as a float32 device vector."""
        return torch.stack([self.dead_mask().sum().float(), self.rate.mean()])


class Saturation:
    """Fraction of a sigmoid/tanh site's outputs within ``eps`` of a bound, and the mean output, over one step."""

    def __init__(self, kind: str, eps: float):
        self.low, self.high = BOUNDS[kind]
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        self.saturated: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def observe(self, out: Tensor) -> None:
        y = out.detach().float()  # bf16 would round the bounds: compare in float32 (a no-op for float32 outputs)
        mid, half = (self.high + self.low) / 2, (self.high - self.low) / 2
        sat = torch.count_nonzero((y - mid).abs() >= half - self.eps)
        total = y.sum(dtype=torch.float32)
        self.saturated = sat if self.saturated is None else self.saturated + sat
        self.total = total if self.total is None else self.total + total
        self.count += y.numel()

    def device_stats(self) -> Tensor:
        """``[saturated fraction, mean output]``."""
        return torch.stack([self.saturated.float() / self.count, self.total / self.count])


class ThroughTime:
    """Norm of dLoss/d(input at step t) of a recurrent layer for every t, averaged over the batch, summed over the
    backward passes of one step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.profile: Tensor | None = None

    def observe_grad(self, grad: Tensor, batch_dim: int | None) -> None:
        norms = torch.linalg.vector_norm(grad.detach(), dim=-1, dtype=torch.float32)  # (N, T), (T, N) or (T,)
        if batch_dim is not None:
            norms = norms.mean(dim=batch_dim)
        self.profile = norms if self.profile is None or self.profile.shape != norms.shape else self.profile + norms


class FunctionalCalls(TorchFunctionMode):
    """Sees functional activation calls made inside the model's forward and hands them to ``on_call``.

    ``on_call(kind, output)`` is called after the function ran; the collector names the site after the innermost
    module on its module stack. Calls made inside an activation *module* (``nn.ReLU`` calls ``F.relu``) are skipped by
    the collector: that module is already a site.
    """

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = FUNCTION_KINDS.get(func)
        if kind is not None and isinstance(out, Tensor):
            self.on_call(kind, out)
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
