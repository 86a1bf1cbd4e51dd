"""Detectors: each a threshold, a check, a message and a remedy.

A detector is any object with a ``kind`` string and ``check(record, layers) -> list[Alert]``, where ``record`` is the
:class:`~gradscope.record.StepRecord` of a collected step and ``layers`` the scope's layer table in forward order
(dicts with ``name``, ``module`` class name, trainable ``params`` count, ``profile`` flag). ``check`` returns the
conditions that hold *now*; the scope turns them into alerts that fire only when a condition starts. Pass your own
list with ``watch(model, detectors=[...])`` to change thresholds or add detectors.

Depth-wise checks compare each parameterised layer's **backprop signal** (the norm of dLoss/d(layer output)) with the
*output-side reference*: the median signal of the last quarter of parameterised layers in forward order. The gradient
of layer i is that signal times the layer's input, so a signal that shrinks (grows) geometrically from the output to
the input is the vanishing (exploding) gradient of the textbooks.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .alerts import Alert
from .record import StepRecord, _finite, signal_profile

SATURATING = {"Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid"}
RECURRENT = {"RNN", "RNNCell"}
NORMS = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
         "InstanceNorm3d", "RMSNorm", "SyncBatchNorm"}


def output_side_reference(profile: list[tuple[str, float]], fraction: float) -> float:
    """Median signal of the last ``fraction`` of the profile (at least one layer)."""
    k = max(1, int(round(len(profile) * fraction)))
    return statistics.median(s for _, s in profile[-k:])


def _sites_with(record: StepRecord, layers: list[dict], key: str):
    """``(name, stats, value)`` for each layer or call site whose statistic ``key`` is finite this step."""
    for e in layers:
        stats = record.layers.get(e["name"], {})
        value = stats.get(key)
        if _finite(value):
            yield e["name"], stats, value


def _module_types(layers: list[dict]) -> set[str]:
    return {e.get("module", "") for e in layers}


def vanishing_hint(layers: list[dict]) -> str:
    types = _module_types(layers)
    tips = []
    if types & SATURATING:
        tips.append("replace sigmoid/tanh with ReLU-family activations (ReLU, LeakyReLU, GELU) with Kaiming init, "
                    "or at least use Xavier init for tanh")
    else:
        tips.append("use Kaiming (ReLU-family) or Xavier (tanh) initialisation")
    if types & RECURRENT:
        tips.append("use a gated recurrent layer (LSTM/GRU) instead of a plain RNN")
    if not types & NORMS:
        tips.append("add normalisation (BatchNorm/LayerNorm)")
    tips.append("add residual connections so the gradient has a short path to early layers")
    return "; ".join(tips) + "."


ZERO_HINT = ("look downstream for ReLUs that are all dead (lower the learning rate, or use LeakyReLU/GELU), for "
             ".detach() or torch.no_grad() in forward, or for a frozen zero-initialised layer.")


def exploding_hint(layers: list[dict]) -> str:
    types = _module_types(layers)
    tips = ["clip the gradient norm (torch.nn.utils.clip_grad_norm_)", "lower the learning rate",
            "check the initialisation scale (weights larger than identity amplify the gradient at every layer)"]
    if not types & NORMS:
        tips.append("add normalisation (BatchNorm/LayerNorm)")
    if types & RECURRENT:
        tips.append("use LSTM/GRU instead of a plain RNN")
    return "; ".join(tips) + "."


@dataclass
class Vanishing:
    """A layer receives almost no gradient.

    Fires for a parameterised layer when its backprop signal is below ``ratio`` times the output-side reference, or
    when its gradient RMS is below the absolute ``floor``.

    Defaults: ``ratio=1e-3`` -- under SGD such a layer moves a thousand times slower than the output layers (after
    1,000 steps it has moved as far as they move in one), which is "not learning" on any training budget; healthy
    Kaiming/ReLU MLPs and ResNets stay within a factor of ~10, while a 20-layer sigmoid MLP at PyTorch's default init
    reaches ~1e-15. ``floor=1e-10`` -- a gradient RMS this small is below float32 resolution of any weight of order
    1e-3 or larger, so the update is lost entirely (SageMaker's 1e-7 mean-|g| rule fires on healthy late training).
    ``output_side=0.25`` -- the reference is the median of the last quarter of parameterised layers, robust to one
    odd output layer.

    An *exactly* zero gradient fires only when it persists over two collected steps: a zero-initialised layer
    downstream (a ViT head, ``resnet(zero_init_residual=True)``) gives exact zeros upstream by design at step 0 and
    clears after one update, whereas all-dead ReLUs or a detached graph keep it at zero.
    """

    ratio: float = 1e-3
    floor: float = 1e-10
    output_side: float = 0.25
    kind: str = field(default="vanishing", init=False)
    _zero_before: set = field(default_factory=set, init=False, repr=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        out: dict[str, Alert] = {}
        zero_now: set[str] = set()
        profile = signal_profile(record, layers)
        hint = vanishing_hint(layers)

        def zero(name: str, metric: str) -> None:
            zero_now.add(name)
            if name in self._zero_before:
                out[name] = Alert(self.kind, name, record.step, 0.0, self.floor,
                                  "it received exactly zero gradient on two consecutive collected steps: nothing "
                                  "downstream passes gradient back to it.", ZERO_HINT, metric)

        if len(profile) >= 2:
            ref = output_side_reference(profile, self.output_side)
            if ref > 0:
                for depth, (name, s) in enumerate(profile):
                    r = s / ref
                    if s == 0:
                        zero(name, "backprop_signal_ratio")
                    elif r < self.ratio:
                        out[name] = Alert(
                            self.kind, name, record.step, r, self.ratio,
                            f"the gradient signal reaching this layer (depth {depth + 1} of {len(profile)}) is "
                            f"{r:.1e} of the output-side layers' ({s:.2e} vs {ref:.2e}), so it barely learns.",
                            hint, "backprop_signal_ratio")
        for e in layers:
            stats = record.layers.get(e["name"], {})
            rms = stats.get("grad_rms")
            # layers not called this step (an unused branch whose .grad was zeroed in place) have no signal: skip
            if not e.get("params") or not _finite(rms) or "backprop_signal" not in stats or e["name"] in out:
                continue
            if rms == 0:
                zero(e["name"], "grad_rms")
            elif rms < self.floor:
                out[e["name"]] = Alert(
                    self.kind, e["name"], record.step, rms, self.floor,
                    f"its gradient RMS is {rms:.1e}, below {self.floor:.0e}: its weights receive no usable update.",
                    hint, "grad_rms")
        self._zero_before = zero_now
        return list(out.values())


@dataclass
class Exploding:
    """A layer's gradient is too large, grows towards the input, or jumps.

    Fires for a parameterised layer when (a) its backprop signal is above ``ratio`` times the output-side reference
    (growth towards the input, e.g. weights above identity), (b) its gradient norm exceeds ``bound``, or (c) its
    gradient norm exceeds ``jump`` times its own running geometric mean (after ``warmup`` collected steps).

    Defaults: ``ratio=1e3`` mirrors the vanishing ratio. ``bound=1e4`` -- per-layer gradient norms of mean-reduced
    losses are O(0.01-10); clipping thresholds in practice are 0.1-10 (Pascanu et al. 2013), so 1e4 is far outside any
    healthy run yet low enough to catch a blow-up before it overflows. ``jump=100`` over a running mean with
    ``momentum=0.9`` (about the last 10 collected steps): normal training changes gradient norms by a few times, a
    spike by orders of magnitude; ``warmup=5`` lets the running mean settle.
    """

    ratio: float = 1e3
    bound: float = 1e4
    jump: float = 100.0
    momentum: float = 0.9
    warmup: int = 5
    output_side: float = 0.25
    kind: str = field(default="exploding", init=False)
    _log_mean: dict = field(default_factory=dict, init=False, repr=False)
    _seen: dict = field(default_factory=dict, init=False, repr=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        out: dict[str, Alert] = {}
        hint = exploding_hint(layers)
        profile = signal_profile(record, layers)
        if len(profile) >= 2:
            ref = output_side_reference(profile, self.output_side)
            if ref > 0:
                for depth, (name, s) in enumerate(profile):
                    r = s / ref
                    if r > self.ratio:
                        out[name] = Alert(
                            self.kind, name, record.step, r, self.ratio,
                            f"the gradient signal reaching this layer (depth {depth + 1} of {len(profile)}) is "
                            f"{r:.1e} times the output-side layers' ({s:.2e} vs {ref:.2e}): it grows towards the input.",
                            hint, "backprop_signal_ratio")
        for e in layers:
            name = e["name"]
            st = record.layers.get(name, {})
            g = st.get("grad_norm")
            if e.get("params") and g == math.inf and not st.get("grad_nonfinite") and name not in out:
                out[name] = Alert(self.kind, name, record.step, g, self.bound,
                                  "its gradient entries are finite but so large that their norm overflows float32.",
                                  hint, "grad_norm")
            if not e.get("params") or not _finite(g):
                continue
            if g > self.bound and name not in out:
                out[name] = Alert(self.kind, name, record.step, g, self.bound,
                                  f"its gradient norm is {g:.2e}, above {self.bound:.0e}.", hint, "grad_norm")
            seen = self._seen.get(name, 0)
            mean = self._log_mean.get(name)
            if mean is not None and seen >= self.warmup and g > 0 and name not in out:
                running = math.exp(mean)
                if g > self.jump * running:
                    out[name] = Alert(
                        self.kind, name, record.step, g / running, self.jump,
                        f"its gradient norm jumped to {g:.2e}, {g / running:.0f} times its running mean {running:.2e}.",
                        hint, "grad_norm_jump")
            if g > 0:
                lg = math.log(g)
                self._log_mean[name] = lg if mean is None else self.momentum * mean + (1 - self.momentum) * lg
                self._seen[name] = seen + 1
        return list(out.values())


@dataclass
class Nonfinite:
    """NaN or Inf in a forward output, a backprop signal or a parameter gradient.

    One alert per step, naming where the problem appears: the first module in forward order whose output is
    non-finite (the forward pass made it), else the layer closest to the loss with a non-finite gradient (the backward
    pass made it; everything on the input side of it is contaminated by propagation). No threshold: any NaN/Inf.
    """

    kind: str = field(default="nonfinite", init=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        hint = ("check the inputs and the loss for log(0), division by zero or overflow; lower the learning rate or clip "
                "gradients; under mixed precision use torch.amp.GradScaler; torch.autograd.detect_anomaly() names the op.")
        sites = [e for e in layers if e.get("profile")]
        backward_bad = any(_backward_nonfinite(record.layers.get(e["name"], {})) for e in sites)
        for e in layers:  # all modules: a parameter-free wrapper can be where the NaN is made
            st = record.layers.get(e["name"], {})
            # an infinite output with finite gradients is legitimate (a -inf attention mask); NaN never is
            if st.get("output_nan") or (st.get("output_nonfinite") and backward_bad):
                return [Alert(self.kind, e["name"], record.step, math.nan, 0.0,
                              "its forward output contains NaN/Inf, the first module in forward order to produce one "
                              "(if it is the first layer, check the input data).", hint, "output_nonfinite")]
        for e in reversed(sites):
            st = record.layers.get(e["name"], {})
            if _backward_nonfinite(st):
                n = st.get("grad_nonfinite") or 0
                what = f"{int(n)} NaN/Inf gradient entries" if n else "a NaN/Inf gradient at its output"
                return [Alert(self.kind, e["name"], record.step, float(n), 0.0,
                              f"it has {what}, the closest layer to the loss where NaN/Inf appears in the backward pass.",
                              hint, "grad_nonfinite")]
        return []


@dataclass
class DeadUnits:
    """A ReLU-family call site has many dead units: units that fired on none of the last ``dead_window`` samples.

    Fires when ``dead_fraction > threshold`` once the window has filled. Default ``threshold=0.5``, half the layer's
    capacity gone (SageMaker's DeadRelu rule uses the same). Lower values fire on healthy-but-plain nets: measured
    here, a 20-layer Kaiming ReLU MLP without normalisation on CIFAR-10 (SGD 0.01, momentum 0.9) sits at 10-23% dead
    in its deepest layers after 30 steps while its loss keeps falling; with BatchNorm the fraction stays near 0.
    keras-contrib's detector fires at 10% of feature maps summing to zero over a whole epoch.
    """

    threshold: float = 0.5
    kind: str = field(default="dead_units", init=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        return [Alert(self.kind, name, record.step, frac, self.threshold,
                      f"{int(st['dead_units'])} of {int(st['units'])} units ({100 * frac:.0f}%) have not fired on any "
                      f"of the last samples of the window: they pass no gradient and no longer learn.",
                      "lower the learning rate (a large update pushes biases far negative); use LeakyReLU or GELU, "
                      "which keep a gradient for negative inputs; use Kaiming initialisation; add normalisation "
                      "(BatchNorm) before the ReLU.", "dead_fraction")
                for name, st, frac in _sites_with(record, layers, "dead_fraction")
                if st.get("dead_window_filled") and frac > self.threshold]


@dataclass
class Saturation:
    """Most of a sigmoid/tanh call site's outputs sit at a bound, where its derivative is nearly zero.

    Fires when the saturated fraction (outputs within ``saturation_eps`` of a bound, see :func:`gradscope.watch`)
    exceeds ``threshold``. Default ``0.5``: "most of the layer" -- then most of the gradient through it is scaled by
    8% or less of the activation's maximum derivative. Glorot & Bengio (2010) saw the top hidden sigmoid layer of a
    deep net driven to 0 early in training: this is the alert that catches it.
    """

    threshold: float = 0.5
    kind: str = field(default="saturation", init=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        return [Alert(self.kind, name, record.step, sat, self.threshold,
                      f"{100 * sat:.0f}% of its outputs are at a bound (mean output "
                      f"{st.get('mean_output', math.nan):.3f}), where the activation's derivative is nearly zero.",
                      "use Xavier/Glorot initialisation for sigmoid/tanh, or smaller initial weights; normalise the "
                      "inputs and add BatchNorm/LayerNorm before the activation; prefer ReLU-family activations in "
                      "hidden layers.", "saturation")
                for name, st, sat in _sites_with(record, layers, "saturation") if sat > self.threshold]


@dataclass
class ThroughTime:
    """A recurrent layer's gradient does not reach its earliest time steps.

    Fires a ``"vanishing"`` alert when the through-time ratio (the mean gradient norm at the earliest 10% of input
    steps over that at the last 10%) is below ``ratio``. Default ``1e-3``, as for depth: the earliest inputs then
    influence learning a thousand times less than the latest, which is forgetting them.
    """

    ratio: float = 1e-3
    kind: str = field(default="vanishing", init=False)

    def check(self, record: StepRecord, layers: list[dict]) -> list[Alert]:
        return [Alert(self.kind, name, record.step, r, self.ratio,
                      f"through time: the earliest of its {len(st.get('through_time', ()))} input steps receive "
                      f"{r:.1e} of the gradient the last ones get; it reaches back only "
                      f"{int(st.get('through_time_reach', 0))} steps.",
                      "use a gated recurrent layer (LSTM/GRU; for an LSTM a forget-gate bias of 1 helps), clip "
                      "gradients, shorten the sequences or add skip connections through time; orthogonal "
                      "initialisation of the recurrent weights helps a plain RNN.", "through_time_ratio")
                for name, st, r in _sites_with(record, layers, "through_time_ratio") if r < self.ratio]


def _backward_nonfinite(stats: dict) -> bool:
    sig = stats.get("backprop_signal")
    return bool(stats.get("grad_nonfinite")) or (sig is not None and not math.isfinite(sig))


def default_detectors() -> list:
    """Fresh instances of the default detectors, with their documented default thresholds."""
    return [Vanishing(), Exploding(), Nonfinite(), DeadUnits(), Saturation(), ThroughTime()]
