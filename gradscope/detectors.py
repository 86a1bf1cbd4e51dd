"""Detectors: each a threshold, a check, a message and a remedy.

A detector is any object with a ``kind`` string and ``check(record, layers) -> list[Alert]``, where ``record`` is the
:class:`~gradscope.record.StepRecord` of a collected step and ``layers`` the scope's layer table in forward order
(dicts with ``name``, ``module`` class name, trainable ``params`` count, ``profile`` flag, and ``role`` for activation
sites that are gates or parts of another activation). ``check`` returns the conditions that hold *now*; the scope turns
them into alerts that fire only when a condition starts. A detector with a ``context`` attribute gets the scope's
:class:`Context` (what the model has, which optimizer trains it) in it. Pass your own list with
``watch(model, detectors=[...])`` to change thresholds or add detectors.

Depth-wise checks read the **backprop signal** of each parameterised layer (the norm of dLoss/d(layer output)) along
the forward order. Residual branches that are small by design (a zero-initialised last BatchNorm, layer scale, ReZero)
carry a tiny signal while the residual stream beside them carries the gradient, so no check compares a layer with a
median of its neighbours: the *output-side level* is the **largest** signal among the last quarter of parameterised
layers (the residual stream, or the head), and a layer vanishes only when **every** layer from the input up to it gets
less than ``ratio`` of that level -- the gradient has decayed along the main path and no path brings it back. The
flagged layers are then always the input-side end of the network, which is where the textbooks' vanishing gradient is.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from .alerts import Alert
from .record import LayerInfo, StepRecord, _finite, signal_profile

SATURATING = {"Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid", "F.sigmoid", "F.tanh"}
RECURRENT = {"RNN", "RNNCell"}
GATED = {"LSTM", "GRU", "LSTMCell", "GRUCell"}
ADAPTIVE = {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor",
            "Lamb", "LAMB", "Lion", "FusedAdam", "DeepSpeedCPUAdam", "AdamW8bit", "Adam8bit", "PagedAdamW"}


@dataclass
class Context:
    """What the scope knows about the model and its training, for the detectors' remedies and judgements.

    Attributes:
        has_norm: the model has normalisation layers (BatchNorm, LayerNorm, RMSNorm, ...); None when unknown (a
            detector used without a scope): a remedy then never recommends adding them.
        has_residual: the model has residual connections (see :func:`gradscope.anatomy.has_residual`); None: unknown.
        optimizer: class name of the optimizer when the scope knows it (``watch(..., optimizer=...)``), else None.
        adaptive: whether that optimizer normalises updates per parameter (Adam family, RMSprop, Adagrad); None when
            the optimizer is unknown.
        eps: the smallest ``eps`` of its parameter groups (an adaptive optimizer's update shrinks below it); 0 for an
            adaptive optimizer without one (Lion's sign update has full size for any nonzero gradient).
    """

    has_norm: bool | None = None
    has_residual: bool | None = None
    optimizer: str | None = None
    adaptive: bool | None = None
    eps: float | None = None


def output_side(profile: list, fraction: float = 0.25) -> list:
    """The output side of a profile in forward order: its last ``fraction`` (at least one entry)."""
    return profile[-max(1, int(round(len(profile) * fraction))):]


def output_side_reference(profile: list[tuple[str, float]], fraction: float = 0.25) -> float:
    """The output-side level: the largest signal among the last ``fraction`` of the profile (at least one layer).

    The largest, not a median: in a network whose residual branches are small by design the last layers are mostly
    inside such branches, and only the largest signal there is the gradient the residual stream carries.
    """
    return max(s for _, s in output_side(profile, fraction))


def _check_positive(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        want = "a positive int" if kind is int else "a positive number"
        raise ValueError(f"{name} must be {want}, got {value!r}")


_EMPTY: dict = {}  # the statistics of a layer a record lacks (read only)


def _sites_with(record: StepRecord, layers: list[LayerInfo], key: str):
    """``(name, stats, value)`` for each layer or call site whose statistic ``key`` is finite this step."""
    get = record.layers.get
    for e in layers:
        stats = get(e.name)
        if stats is not None:
            value = stats.get(key)
            if value is not None and _finite(value):
                yield e.name, stats, value


def _module(layers: list[LayerInfo], name: str) -> str:
    """The module class of layer ``name``, or "" when the table does not list it."""
    return next((e.module for e in layers if e.name == name), "")


def activation_after(layers: list[LayerInfo], name: str) -> str | None:
    """The module class of the first activation site after layer ``name`` in forward order, before the next
    parameterised layer (``"ReLU"``, ``"F.sigmoid"``, ...), or None."""
    seen = False
    for e in layers:
        if seen:
            if e.params:
                return None
            if e.role:
                continue  # a gate, or the tanh inside a GELU: not the layer's activation
            if e.module in SATURATING or e.module in ("ReLU", "ReLU6", "F.relu"):
                return e.module
        elif e.name == name:
            seen = True
    return None


ADAM_NOTE = ("(gradscope does not know the optimizer: under Adam-family optimizers a small gradient still gives a "
             "normal-size update, so pass optimizer= to watch() to let it judge from the update)")


def vanishing_hint(layers: list[LayerInfo], name: str, context: Context) -> str:
    """A remedy for a vanishing gradient at layer ``name``, from its own module, the activation after it and what
    the model already has."""
    module = _module(layers, name)
    tips = []
    if module in RECURRENT:
        tips.append("use a gated recurrent layer (LSTM/GRU), clip gradients and initialise the recurrent weights "
                    "orthogonally")
    act = activation_after(layers, name)
    if act in SATURATING:
        tips.append("replace the sigmoid/tanh after it with a ReLU-family activation (ReLU, LeakyReLU, GELU) with "
                    "Kaiming init, or at least use Xavier init for tanh")
    else:
        tips.append("use Kaiming initialisation for ReLU-family layers (Xavier for tanh), so each layer keeps the "
                    "gradient's scale")
    if context.has_norm is False:
        tips.append("add normalisation (BatchNorm/LayerNorm)")
    if context.has_residual is False:
        tips.append("add residual connections so the gradient has a short path to early layers")
    text = "; ".join(tips) + "."
    return text + (" " + ADAM_NOTE if context.adaptive is None else "")


ZERO_HINT = ("look downstream for ReLUs that are all dead (lower the learning rate, or use LeakyReLU/GELU), for "
             ".detach() or torch.no_grad() in forward, or for a frozen zero-initialised layer.")


def _depth_message(depth: int, n: int, r: float, path: float, ref: float, relation: str, more: str) -> str:
    """``relation``: "at most ... of" (vanishing: ``path`` is the largest signal up to the layer) or "at least ...
    times" (exploding: the smallest)."""
    return (f"the gradient signal reaching this layer (depth {depth + 1} of {n}) and every layer before it is "
            f"{relation.format(r=r)} the output side's ({path:.2e} vs {ref:.2e}){more}")


@dataclass
class Vanishing:
    """The gradient reaching the input-side layers along the network's main path is too small to train them.

    Fires for parameterised layer i when the largest backprop signal among layers 0..i (input side first) is below
    ``ratio`` times the output-side level (:func:`output_side_reference`). Layers in a branch that is small by design
    never fire while the layers before the branch get the gradient. Whether the layer learns is judged from its update
    where the scope knows it: with ``watch(..., update_ratio=True)`` the layer's ||dw|| / ||w|| must also be below
    ``ratio`` times the largest on the output side; else, under a known adaptive optimizer (``watch(...,
    optimizer=...)`` with Adam, RMSprop, ...), its gradient RMS must be below ``10 * eps`` of that optimizer -- above
    it, Adam's update has its normal size and the layer learns.

    Defaults: ``ratio=1e-3`` -- under SGD such a layer moves a thousand times slower than the output layers (after
    1,000 steps it has moved as far as they move in one), which is "not learning" on any training budget; healthy
    Kaiming/ReLU MLPs and ResNets stay within a factor of ~10, while a 20-layer sigmoid MLP at PyTorch's default init
    reaches ~1e-15. ``output_side=0.25``: the last quarter of parameterised layers is the output side.
    ``patience=5``: the condition must hold on 5 collected steps in a row, and ``recovery=2``: without the ratio growing
    2-fold over them -- a vanishing gradient is a state, not a moment. A ViT with layer scale 1e-5 starts its patch
    embedding at ~1e-6 of the output side (its gradient reaches it only through the scaled attention branches) and
    climbs past 1e-3 within ~10 AdamW steps as the scales grow; a deep sigmoid MLP stays at ~1e-10.

    An *exactly* zero gradient fires on any parameterised layer, on the path or not, when it persists over two
    collected steps: a zero-initialised layer downstream (a ViT head, a zero-init residual branch) gives exact zeros
    by design at step 0 and clears after one update, whereas all-dead ReLUs or a detached graph keep it at zero.
    """

    ratio: float = 1e-3
    patience: int = 5
    recovery: float = 2.0
    output_side: float = 0.25
    kind: str = field(default="vanishing", init=False)
    context: Context = field(default_factory=Context, repr=False, compare=False)
    _zero_before: set = field(default_factory=set, init=False, repr=False)
    _held: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        _check_positive("patience", self.patience, int)
        for name in ("ratio", "recovery", "output_side"):
            _check_positive(name, getattr(self, name))

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        out: dict[str, Alert] = {}
        zero_now: set[str] = set()
        profile = signal_profile(record, layers)
        ctx = self.context

        def zero(name: str, metric: str) -> None:
            zero_now.add(name)
            if name in self._zero_before:
                out[name] = Alert(self.kind, name, record.step, 0.0, 0.0,
                                  "it received exactly zero gradient on two consecutive collected steps: nothing "
                                  "downstream passes gradient back to it.", ZERO_HINT, metric)

        held: dict[str, deque] = {}
        if len(profile) >= 2:
            ref = output_side_reference(profile, self.output_side)
            updates = [record.layers[n].get("update_ratio") for n, _ in output_side(profile, self.output_side)]
            update_ref = max((u for u in updates if _finite(u)), default=0.0)
            best = 0.0
            for depth, (name, s) in enumerate(profile[:-1]):
                best = max(best, s)
                if not ref > 0 or best >= self.ratio * ref:
                    break  # every later layer has a path at least this good
                st = record.layers[name]
                rms, update = st.get("grad_rms"), st.get("update_ratio")
                if _finite(update) and update_ref > 0:
                    if update >= self.ratio * update_ref:
                        continue  # its weights move at the output side's relative pace: it learns (update_ratio=True)
                elif ctx.adaptive and ctx.eps is not None and _finite(rms) and rms >= 10 * ctx.eps:
                    continue  # Adam rescales this gradient to a normal-size update
                if best == 0:
                    zero(name, "backprop_signal_ratio")
                    continue
                r = best / ref
                ratios = held[name] = self._held.get(name) or deque(maxlen=self.patience)
                ratios.append(r)
                if len(ratios) < self.patience or r >= self.recovery * ratios[0]:
                    continue  # not yet persistent, or recovering by itself (a warm-up of small-by-design paths)
                n = len(profile)
                out[name] = Alert(self.kind, name, record.step, r, self.ratio,
                                  _depth_message(depth, n, r, best, ref, "at most {r:.1e} of",
                                                 (f" on {self.patience} collected steps in a row" if self.patience > 1
                                                  else "") + ", so it barely learns."),
                                  vanishing_hint(layers, name, ctx), "backprop_signal_ratio")
        self._held = held
        for e in layers:
            stats = record.layers.get(e.name, {})
            rms = stats.get("grad_rms")
            # layers not called this step (an unused branch whose .grad was zeroed in place) have no signal: skip
            if e.params and rms == 0 and "backprop_signal" in stats and e.name not in out:
                zero(e.name, "grad_rms")
        self._zero_before = zero_now
        return list(out.values())


def exploding_hint(kind: str, layers: list[LayerInfo], name: str, context: Context) -> str:
    """A remedy for an exploding gradient: ``kind`` is ``"spike"`` (a jump in time), ``"depth"`` (growth towards the
    input) or ``"time"`` (growth back through a recurrent layer's time steps)."""
    module = _module(layers, name)
    if kind == "spike":
        tips = ["lower the learning rate (or add warm-up)", "clip the gradient norm (torch.nn.utils.clip_grad_norm_)",
                "check that step's batch for corrupt or unnormalised input data"]
    elif kind == "time":
        tips = ["clip the gradient norm (torch.nn.utils.clip_grad_norm_, Pascanu et al. 2013)",
                "initialise the recurrent weights orthogonally with gain <= 1"]
        if module in RECURRENT:
            tips.append("use LSTM/GRU instead of a plain RNN")
    else:
        tips = ["check the initialisation scale (weights larger than identity amplify the gradient at every layer; "
                "use Kaiming/Xavier init)", "clip the gradient norm (torch.nn.utils.clip_grad_norm_)"]
        if context.has_residual is False:
            tips.append("add residual connections (deep plain stacks with BatchNorm amplify the gradient towards the "
                        "input at init)")
    if kind != "spike" and context.has_norm is False:
        tips.append("add normalisation (BatchNorm/LayerNorm)")
    return "; ".join(tips) + "."


FLOAT32_SQUARE_MAX = 1.8e19
"""sqrt of float32's largest value: a gradient norm above it means squares that overflow float32."""


@dataclass
class Exploding:
    """The gradient grows towards the input, grows back through time, or jumps.

    Four conditions, each ``kind="exploding"`` with its own ``metric``:

    * ``backprop_signal_ratio`` -- depth: every layer from the input up to layer i gets more than ``ratio`` times the
      output-side level (weights above identity; deep plain stacks with BatchNorm at init).
    * ``through_time_ratio`` -- time: a recurrent layer's earliest input steps receive more than ``ratio`` times the
      gradient of its last ones.
    * ``grad_norm`` -- a layer's gradient norm above :data:`FLOAT32_SQUARE_MAX`: its squares overflow float32.
    * ``grad_norm_spike`` / ``loss_spike`` -- instability: the whole model's gradient norm (or the loss, when given
      with ``scope.step(loss=...)``) jumps above ``jump`` times its median over the last ``window`` collected steps.
      The alert names the layer whose gradient jumped most and lists the next ones. Growth an optimizer produces
      smoothly (layer scale under AdamW, a network leaving its initialisation) stays within a few times per step.

    Defaults: ``ratio=1e3`` mirrors the vanishing ratio. ``jump=10``: step-to-step changes of a healthy run's global
    gradient norm stay within a few times (measured on the alert benchmark's healthy runs, ``scripts/alert_bench.py``);
    a learning rate far too high, a corrupt batch or a divergence moves it by an order of magnitude or more within
    one or two steps. ``loss_jump=10`` likewise for the loss. ``window=20`` collected steps of history, from the first
    one on (a run that diverges after one update is caught at its second step).
    """

    ratio: float = 1e3
    jump: float = 10.0
    loss_jump: float = 10.0
    window: int = 20
    output_side: float = 0.25
    kind: str = field(default="exploding", init=False)
    context: Context = field(default_factory=Context, repr=False, compare=False)
    _norms: deque = field(default=None, init=False, repr=False)
    _losses: deque = field(default=None, init=False, repr=False)
    _layer_norms: dict = field(default_factory=dict, init=False, repr=False)
    _loss_max: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self):
        _check_positive("window", self.window, int)
        for name in ("ratio", "jump", "loss_jump"):
            _check_positive(name, getattr(self, name))
        self._norms = deque(maxlen=self.window)
        self._losses = deque(maxlen=self.window)

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        out: dict = {}  # layer name (or (root, metric) for the whole-model spike) -> Alert
        ctx = self.context
        profile = signal_profile(record, layers)
        if len(profile) >= 2:
            ref = output_side_reference(profile, self.output_side)
            low = math.inf  # the smallest signal from the input up to this layer
            for depth, (name, s) in enumerate(profile[:-1]):
                low = min(low, s)
                if not ref > 0 or low <= self.ratio * ref:
                    break
                r = low / ref
                out[name] = Alert(self.kind, name, record.step, r, self.ratio,
                                  _depth_message(depth, len(profile), r, low, ref, "at least {r:.1e} times",
                                                 ": it grows towards the input."),
                                  exploding_hint("depth", layers, name, ctx), "backprop_signal_ratio")
        for name, st, g in _sites_with(record, layers, "grad_norm"):
            if g > FLOAT32_SQUARE_MAX and name not in out:
                out[name] = Alert(self.kind, name, record.step, g, FLOAT32_SQUARE_MAX,
                                  f"its gradient norm is {g:.2e}: squares of entries this large overflow float32 (in "
                                  "Adam's second moment, in clip_grad_norm_), so the next update is inf or NaN.",
                                  exploding_hint("spike", layers, name, ctx), "grad_norm")
        for name, st, r in _sites_with(record, layers, "through_time_ratio"):
            if r > self.ratio and name not in out:
                out[name] = Alert(
                    self.kind, name, record.step, r, self.ratio,
                    f"through time: the earliest of its {len(st.get('through_time', ()))} input steps receive {r:.1e} "
                    "times the gradient the last ones get: it grows back through time.",
                    exploding_hint("time", layers, name, ctx), "through_time_ratio")
        spike = self._spike(record, layers)
        if spike is not None:  # the whole model's condition: under the root's name, beside any per-layer one
            out[(spike.layer, spike.metric)] = spike
        return list(out.values())

    def _spike(self, record: StepRecord, layers: list[LayerInfo]) -> Alert | None:
        """The instability check on the whole model; updates the history of norms and losses."""
        norms = layer_grad_norms(record, layers)
        total = global_grad_norm(norms)
        loss = record.info.get("loss")
        loss = loss if _finite(loss) else None
        fired = None
        if _finite(total) and total > 0 and self._norms:
            median = statistics.median(self._norms)
            if total > self.jump * median:
                fired = ("grad_norm_spike", total / median, self.jump,
                         f"the model's gradient norm jumped to {total:.2e}, {total / median:.0f} times its median "
                         f"{median:.2e} over the last {len(self._norms)} collected steps")
        if fired is None and loss is not None and loss > 0 and self._losses:
            median = statistics.median(self._losses)
            # above every loss seen so far too: a loss near zero late in training that moves to 0.05 is no spike
            if median > 0 and loss > self.loss_jump * median and loss > self._loss_max:
                fired = ("loss_spike", loss / median, self.loss_jump,
                         f"the loss jumped to {loss:.3g}, {loss / median:.0f} times its median {median:.3g} over the "
                         f"last {len(self._losses)} collected steps and above any loss so far")
        alert = None
        if fired is not None:
            metric, value, threshold, text = fired
            jumped = sorted(((g / self._layer_norms[n], n) for n, g in norms.items()
                             if self._layer_norms.get(n, 0) > 0), reverse=True)
            if jumped:
                most = ", ".join(f"{n or '(root)'} {x:.0f}x" for x, n in jumped[:3])
                text += f"; the layers whose gradient jumped most: {most}"
            if loss is not None and metric == "grad_norm_spike" and self._losses:
                text += f" (loss {statistics.median(self._losses):.3g} -> {loss:.3g})"
            alert = Alert(self.kind, "", record.step, value, threshold, text + ": the training is unstable.",
                          exploding_hint("spike", layers, "", self.context), metric, tuple(n for _, n in jumped[:3]))
        if _finite(total) and total > 0:
            self._norms.append(total)
            for n, g in norms.items():  # each layer's running geometric mean, to name the layers that jumped
                old = self._layer_norms.get(n)
                if g > 0:
                    self._layer_norms[n] = g if old is None else math.exp(0.7 * math.log(old) + 0.3 * math.log(g))
        if loss is not None:
            self._losses.append(loss)
            self._loss_max = max(self._loss_max, loss)
        return alert


def layer_grad_norms(record: StepRecord, layers: list[LayerInfo]) -> dict[str, float]:
    """``{layer: grad_norm}`` of the parameterised layers with a finite gradient norm this step."""
    get = record.layers.get
    return {e.name: g for e in layers if e.params and _finite(g := get(e.name, _EMPTY).get("grad_norm"))}


def global_grad_norm(norms: dict[str, float]) -> float:
    """The whole model's gradient norm from its layers' (what ``clip_grad_norm_`` returns); nan without layers."""
    return math.sqrt(math.fsum(g * g for g in norms.values())) if norms else math.nan


@dataclass
class Nonfinite:
    """NaN or Inf in a forward output, a backprop signal or a parameter gradient.

    One alert per step, naming where the problem appears: the first module in forward order whose output is
    non-finite (the forward pass made it), else the layer closest to the loss with a non-finite gradient (the backward
    pass made it; everything on the input side of it is contaminated by propagation). No threshold: any NaN/Inf.

    Under an AMP GradScaler a step whose gradients overflowed (``record.info["overflow"]``) is the scaler's to skip,
    not an alert, unless it persists: ``overflow_patience`` overflowed collected steps in a row are one (the scaler's
    default initial scale typically overflows a few times while it settles; ten halvings in a row, a scale 1000x
    lower, is no longer settling). It is the one detector that sees overflowed steps (``sees_overflow``).
    """

    overflow_patience: int = 10
    kind: str = field(default="nonfinite", init=False)
    sees_overflow = True  # the scope runs only such detectors on a step the scaler skips
    _streak: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        _check_positive("overflow_patience", self.overflow_patience, int)

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        if record.info.get("overflow"):
            return self._overflow(record, layers)
        self._streak = 0
        return self._locate(record, layers)

    def _overflow(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        self._streak += 1
        if self._streak < self.overflow_patience:
            return []
        found = self._locate(record, layers)
        return [Alert(
            self.kind, found[0].layer if found else "", record.step, float(self._streak),
            float(self.overflow_patience),
            f"gradients overflowed under the AMP grad scaler on {self._streak} consecutive collected steps (scale now "
            f"{record.info['grad_scale']:.3g}): not a transient overflow the scaler can absorb.",
            "look for values that overflow float16 in the forward pass or the loss (use bfloat16, or compute the loss "
            "in float32), lower the learning rate, check the inputs; torch.autograd.detect_anomaly() names the op.",
            "overflow_streak")]

    def _locate(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        scaled = record.info.get("grad_scale", 1.0) != 1.0  # under a GradScaler, i.e. float16 mixed precision
        loss = record.info.get("loss")
        loss_bad = loss is not None and not math.isfinite(loss)
        sites = [e for e in layers if e.profile]
        backward_bad = None  # asked only of an infinite output
        for depth, e in enumerate(layers):  # all modules: a parameter-free wrapper can be where the NaN is made
            st = record.layers.get(e.name, _EMPTY)
            if not (st.get("output_nonfinite") or st.get("output_nan")):
                continue
            if backward_bad is None:
                backward_bad = any(_backward_nonfinite(record.layers.get(s.name, _EMPTY)) for s in sites)
            # an infinite output with finite gradients and loss is legitimate (a -inf attention mask); NaN never is
            if st.get("output_nan") or backward_bad or loss_bad:
                return [Alert(self.kind, e.name, record.step, math.nan, 0.0,
                              "its forward output contains NaN/Inf, the first module in forward order to produce one.",
                              _forward_hint(e, depth == 0, scaled), "output_nonfinite")]
        for e in reversed(sites) if backward_bad is not False else ():
            st = record.layers.get(e.name, _EMPTY)
            if _backward_nonfinite(st):
                n = st.get("grad_nonfinite") or 0
                what = f"{int(n)} NaN/Inf gradient entries" if n else "a NaN/Inf gradient at its output"
                return [Alert(self.kind, e.name, record.step, float(n), 0.0,
                              f"it has {what}, the closest layer to the loss where NaN/Inf appears in the backward "
                              "pass.",
                              "the backward pass made the NaN/Inf: check the loss for log(0), sqrt(0) or division by "
                              "zero (add an epsilon), lower the learning rate or clip gradients; "
                              "torch.autograd.detect_anomaly() names the op.", "grad_nonfinite")]
        if loss_bad:
            return [Alert(self.kind, "", record.step, loss, 0.0,
                          "the loss is NaN/Inf while every module output is finite: the loss computation made it.",
                          "check the loss for log(0), division by zero or overflow, and the targets for invalid "
                          "values.",
                          "loss")]
        return []


def _forward_hint(entry: LayerInfo, first: bool, scaled: bool) -> str:
    tips = []
    if scaled:
        tips.append("under float16 mixed precision a value above 65504 overflows in the forward pass: use bfloat16 "
                    "autocast, or run this layer in float32, and normalise its inputs")
    if first:
        tips.append("it is the first layer: check the input data for NaN/Inf or huge values")
    if entry.params:
        tips.append("check its parameters for NaN/Inf (torch.isfinite(p).all()): a NaN update or a corrupt checkpoint "
                    "puts them there; lower the learning rate or clip gradients")
    tips.append("torch.autograd.detect_anomaly() names the op")
    return "; ".join(tips) + "."


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
    context: Context = field(default_factory=Context, repr=False, compare=False)

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        if any(st.get("output_nan") for st in record.layers.values()):
            return []  # NaN outputs count as "not fired": a NaN step says nothing about dead units (nonfinite does)
        hint = ("lower the learning rate (a large update pushes biases far negative); use LeakyReLU or GELU, which "
                "keep a gradient for negative inputs; use Kaiming initialisation"
                + ("; add normalisation (BatchNorm) before the ReLU" if self.context.has_norm is False else "") + ".")
        return [Alert(self.kind, name, record.step, frac, self.threshold,
                      f"{int(st['dead_units'])} of {int(st['units'])} units ({100 * frac:.0f}%) have not fired on any "
                      f"of the last samples of the window: they pass no gradient and no longer learn.",
                      hint, "dead_fraction")
                for name, st, frac in _sites_with(record, layers, "dead_fraction")
                if st.get("dead_window_filled") and frac > self.threshold]


@dataclass
class Saturation:
    """Most of a sigmoid/tanh call site's outputs sit at a bound, where its derivative is nearly zero.

    Fires when the saturated fraction (outputs within ``saturation_eps`` of a bound, see :func:`gradscope.watch`)
    exceeds ``threshold``. Default ``0.5``: "most of the layer" -- then most of the gradient through it is scaled by
    8% or less of the activation's maximum derivative. Glorot & Bengio (2010) saw the top hidden sigmoid layer of a
    deep net driven to 0 early in training: this is the alert that catches it. Gates (squeeze-excite, attention or
    LSTM-style sigmoids) are measured but never alert: the layer table marks them with a ``role`` (see
    :func:`gradscope.anatomy.activation_role`). The tanh/sigmoid inside another activation (GELU's tanh approximation,
    SiLU) is not a site at all (:func:`gradscope.anatomy.inside_activation`).
    """

    threshold: float = 0.5
    kind: str = field(default="saturation", init=False)
    context: Context = field(default_factory=Context, repr=False, compare=False)

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        gates = {e.name for e in layers if e.role}
        hint = ("use Xavier/Glorot initialisation for sigmoid/tanh, or smaller initial weights; normalise the inputs"
                + (" and add BatchNorm/LayerNorm before the activation" if self.context.has_norm is False else "")
                + "; prefer ReLU-family activations in hidden layers.")
        return [Alert(self.kind, name, record.step, sat, self.threshold,
                      f"{100 * sat:.0f}% of its outputs are at a bound (mean output "
                      f"{st.get('mean_output', math.nan):.3f}), where the activation's derivative is nearly zero.",
                      hint, "saturation")
                for name, st, sat in _sites_with(record, layers, "saturation")
                if sat > self.threshold and name not in gates]


@dataclass
class ThroughTime:
    """A recurrent layer forgets: its gradient does not reach most of its input steps.

    Fires a ``"vanishing_through_time"`` alert (its own kind, so ``raise_on`` can tell it from depth's
    ``"vanishing"``) when the through-time ratio (the mean gradient norm at the earliest 10% of input
    steps over that at the last 10%) is below ``ratio`` *and* the gradient reaches back (at 1e-3 of the last steps'
    level, see :func:`gradscope.activations.through_time_summary`) over less than ``reach`` of the sequence.
    Defaults: ``ratio=1e-3``, as for depth: the earliest inputs then influence learning a thousand times less than the
    latest. ``reach=0.25``: a layer whose gradient still reaches back over a quarter of the sequence can learn to
    remember -- an LSTM or GRU at initialisation on 32 image rows reaches back ~18 steps and its gates open as it
    trains, whereas a plain RNN on 1,024 pixels reaches back ~20 steps, 2% of the sequence, and cannot fix that.
    """

    ratio: float = 1e-3
    reach: float = 0.25
    kind: str = field(default="vanishing_through_time", init=False)

    def check(self, record: StepRecord, layers: list[LayerInfo]) -> list[Alert]:
        out = []
        for name, st, r in _sites_with(record, layers, "through_time_ratio"):
            steps = len(st.get("through_time", ())) or 1
            reach = int(st.get("through_time_reach", 0))
            if r >= self.ratio or reach >= self.reach * steps:
                continue
            module = _module(layers, name)
            if module in GATED:
                hint = ("initialise the forget-gate bias to 1 (LSTM) so the cell keeps its memory, shorten the "
                        "sequences (truncated backpropagation, or read larger chunks per step), or add attention or "
                        "skip connections through time.")
            else:
                hint = ("use a gated recurrent layer (LSTM/GRU) instead of a plain RNN, or shorten the sequences; "
                        "orthogonal initialisation of the recurrent weights helps a plain RNN.")
            out.append(Alert(self.kind, name, record.step, r, self.ratio,
                             f"through time: the earliest of its {steps} input steps receive {r:.1e} of the gradient "
                             f"the last ones get; it reaches back only {reach} of {steps} steps, so it cannot learn "
                             "from the early ones.", hint, "through_time_ratio"))
        return out


def _backward_nonfinite(stats: dict) -> bool:
    sig = stats.get("backprop_signal")
    return bool(stats.get("grad_nonfinite")) or (sig is not None and not math.isfinite(sig))


def detector_settings(detectors) -> list[dict]:
    """What each detector was set to (``{"detector": class name, field: value}`` for its public number, string and
    bool fields), for the record: figures and summaries draw the thresholds the run used."""
    out = []
    for d in detectors:
        entry = {"detector": type(d).__name__}
        if dataclasses.is_dataclass(d):
            for f in dataclasses.fields(d):
                v = getattr(d, f.name, None)
                if f.init and not f.name.startswith("_") and isinstance(v, (int, float, str, bool)):
                    entry[f.name] = v
        out.append(entry)
    return out


def _positive_float(v) -> float | None:
    """``v`` as a finite float > 0, or None (not a number, a bool, <= 0, infinite, or an int too large for a float,
    as a hand-edited log may hold)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if 0 < v < math.inf else None


def thresholds(meta: dict) -> dict:
    """``{"vanishing": ratio, "exploding": ratio, "output_side": fraction}`` of a run: the settings of its
    ``Vanishing`` and ``Exploding`` detectors from ``meta["detectors"]`` (see :func:`detector_settings`), else these
    detectors' defaults. Rendering reads them here, never from constants of its own."""
    found = {"vanishing": Vanishing.ratio, "exploding": Exploding.ratio, "output_side": Vanishing.output_side}
    entries = meta.get("detectors") if isinstance(meta, dict) else None
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict):
            continue
        for cls, key in ((Vanishing, "vanishing"), (Exploding, "exploding")):
            if e.get("detector") == cls.__name__:
                v = _positive_float(e.get("ratio"))
                if v is not None:
                    found[key] = v
                w = _positive_float(e.get("output_side"))
                if cls is Vanishing and w is not None and w <= 1:
                    found["output_side"] = w
    return found


def default_detectors() -> list:
    """Fresh instances of the default detectors, with their documented default thresholds, in the order their
    alerts are reported within a step (the most specific diagnosis first: a NaN explains an explosion, which explains
    a vanishing ratio)."""
    return [Nonfinite(), Exploding(), Vanishing(), ThroughTime(), DeadUnits(), Saturation()]
