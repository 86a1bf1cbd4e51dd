"""The Scope: attaches to a model, closes steps, keeps records and alerts. ``gradscope.watch`` creates one.

It orchestrates: the hooks (:mod:`.collect`) fill a step's buffers; at step close they are reduced over ranks
(:mod:`.distributed`), folded into a :class:`~gradscope.record.StepRecord`, judged by the detectors
(:mod:`.detectors`), kept in the history and handed to the listeners. What it knows about the model comes from
:mod:`.anatomy`, its arguments are checked in :mod:`.options`, PyTorch's private APIs are read in :mod:`._torch`.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch
from torch import nn

from . import _torch
from .alerts import Alert, AlertBook
from .anatomy import activation_role, class_name, detector_context, trainable_params, unwrap
from .build import build_record, measure_params
from .collect import Collector, Slots
from .detectors import detector_settings
from .distributed import rank, reduce_buffers, world_size
from .options import check_options, check_scaler
from .record import History, LayerInfo, StepRecord
from .run import FORMAT, FORMAT_VERSION, LogStream, Run
from .sharded import Shards, is_sharded, local, reduce_sums, refuse_unsupported, uses_fsdp2
from .statistics import MEASURES
from .stats import _wide
from .verdict import HOLDING

# Models currently watched, so a second watch() on the same model fails loudly instead of doubling every hook. Values
# are weak too: a scope holds its model, so a strong value would keep a never-detached model alive forever.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def watched_by(model: nn.Module) -> "Scope | None":
    """The attached scope watching ``model``, if any."""
    ref = _WATCHED.get(model)
    scope = ref() if ref is not None else None
    return scope if scope is not None and scope.attached else None


def watch(model: nn.Module, every: int = 1, *, optimizer: torch.optim.Optimizer | None = None, scaler=None,
          detectors: list | None = None, raise_on=(), history: int = 2000, dead_window: int = 1000,
          saturation_eps: float = 0.02, unit_dims: dict | None = None, functional: bool = True,
          update_ratio: bool = False, extra_stats=(), log_all_ranks: bool = False,
          reduce_ranks: bool | None = None, log_to=None) -> "Scope":
    """Attach gradscope to ``model`` and return the :class:`Scope` that monitors it.

    Two ways to close a step:

    * call ``scope.step()`` after ``loss.backward()`` and before ``optimizer.step()``; or
    * pass ``optimizer=opt`` and the scope closes each step from an optimizer step pre-hook (one added line).

    Both give the same records.

    Args:
        model: any ``nn.Module`` with trainable parameters.
        every: collect statistics on every ``every``-th step (steps 0, every, 2*every, ...); other steps cost next to
            nothing.
        optimizer: close steps automatically just before ``optimizer.step()``.
        scaler: a ``torch.amp.GradScaler`` whose scale divides the gradients, so reported values are unscaled (for the
            optimizer mode; in the manual mode pass it to ``scope.step(scaler=...)``).
        detectors: detector instances to run (default: :func:`gradscope.default_detectors`, ``Nonfinite(),
            Exploding(), Vanishing(), ThroughTime(), DeadUnits(), Saturation()`` with their documented thresholds); an
            empty list disables alerts.
        raise_on: alert kinds that raise :class:`gradscope.GradientError` from ``step()``, e.g. ``{"nonfinite"}``.
        history: the most collected steps kept in memory (older ones are thinned, see
            :class:`~gradscope.record.History`).
        dead_window: a ReLU unit is dead when it has not fired on any of the last ``dead_window`` samples (counted on
            collected steps, rounded to whole batches).
        saturation_eps: a sigmoid/tanh output within ``saturation_eps`` of a bound counts as saturated. At 0.02 the
            local derivative is at most 8% of its maximum (sigmoid: 0.0196 of 0.25; tanh: 0.0396 of 1).
        unit_dims: ``{call site: dim}`` overriding which dimension holds the units of an activation (see
            :func:`gradscope.activations.unit_dim`), e.g. ``{"features.2": 1}`` for a Conv1d's ``(N, C, L)``.
        functional: watch functional activations (``F.relu`` in a ``forward``) through a ``TorchFunctionMode`` during
            the forward pass of collected steps. While none has been seen, the mode is entered on the first three
            collected forward passes and on every 50th after that (see ``Collector.FUNCTIONAL_PROBE_EVERY``); once one
            is seen, on every collected forward pass.
        update_ratio: record ||dw|| / ||w|| per layer and parameter: the size of the last optimizer update relative
            to the weights. Keeps one copy of the trainable parameters. Records ``weight_norm`` too.
        extra_stats: descriptive statistics beyond the defaults, a subset of :data:`gradscope.options.EXTRA_STATS`
            (``"grad_max"``, ``"grad_zero_frac"``, ``"weight_norm"``) or ``"all"``. Each costs a full pass over every
            gradient or weight per collected step; the defaults (gradient norms, backprop signal, activation
            statistics) are what the detectors use.
        log_all_ranks: under ``torch.distributed``, log new alerts to the ``"gradscope"`` logger on every rank
            (default: rank 0 only).
        reduce_ranks: sum the activation-side numbers over the ranks of ``torch.distributed`` (one ``all_reduce`` per
            collected step, which every rank must reach), so that every rank holds the same records and alerts.
            Default: when ``model`` is a ``DistributedDataParallel`` wrapper or FSDP2 sharded it (``fully_shard`` on
            it or a submodule). Pass True when you watch the module inside a DDP wrapper yourself; a scope on one rank
            only (an evaluation model on rank 0) must not reduce. Sharded (``DTensor``) parameters' statistics are
            always of the whole parameter, combined over ranks whatever this says (:mod:`gradscope.sharded`).
        log_to: a new file to stream the run to as it trains (see :class:`gradscope.record.LogStream`): every
            collected step is appended and flushed as it closes, and ``detach()`` writes the end line, so a run
            killed at step 90,000 keeps its steps (``gradscope.load(path, partial=True)``). An existing file is
            refused, never written over. Under ``torch.distributed`` only rank 0 writes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or ``optimizer``/``scaler`` are of the wrong type), or it is
            sharded by FSDP1 or DeepSpeed (use FSDP2's ``fully_shard`` or DDP).
        ValueError: no trainable parameters, a bad ``every``/``raise_on``/``history``, or the model is already watched.
    """
    return Scope(model, every=every, optimizer=optimizer, scaler=scaler, detectors=detectors, raise_on=raise_on,
                 history=history, dead_window=dead_window, saturation_eps=saturation_eps, unit_dims=unit_dims,
                 functional=functional, update_ratio=update_ratio, extra_stats=extra_stats,
                 log_all_ranks=log_all_ranks, reduce_ranks=reduce_ranks, log_to=log_to)


class Scope(Run):
    """Monitors one model: owns its hooks, closes steps, keeps history and alerts.

    Reading API (shared with :func:`gradscope.load`): ``latest()``, ``history``, ``alerts``, ``summary()``,
    ``depth_profile()``, ``decay_factor()``, ``save()``.

    Hook mechanics, and what they guarantee:

    * Statistics are read, never written: training is bitwise identical with and without a scope.
    * A module called several times per forward gives one call site per call (``name``, ``name#2``, ...), each with
      its own backprop signal; its parameter statistics are under ``name``.
    * Frozen parameters (``requires_grad=False``) are not tracked. A parameter with no gradient at a step (unused in
      that forward, or ``grad`` set to None) is left out of that step's record; a layer none of whose parameters got a
      gradient has no gradient statistics that step.
    * Gradient accumulation: several forward/backward passes before one ``step()`` are one step. Parameter statistics
      describe the accumulated ``.grad``; backprop signals add the squared norms of every pass (the norm over the
      concatenated micro-batches).
    * Statistics stay on the device; one device-to-host transfer per collected step (a second one only when a
      gradient came back non-finite, to count the NaN/Inf entries).
    """

    def __init__(self, model, every=1, *, optimizer=None, scaler=None, detectors=None, raise_on=(), history=2000,
                 dead_window=1000, saturation_eps=0.02, unit_dims=None, functional=True, update_ratio=False,
                 extra_stats=(), log_all_ranks=False, reduce_ranks=None, log_to=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradscope.watch() expects a torch.nn.Module, got {type(model).__name__}; "
                            "pass the model itself, e.g. gradscope.watch(model)")
        refuse_unsupported(model)
        if reduce_ranks is None:  # data parallel: each rank its own batch
            reduce_ranks = isinstance(unwrap(model, ddp=False), nn.parallel.DistributedDataParallel) or \
                uses_fsdp2(model)
        model = unwrap(model)
        detectors, raise_on, extra = check_options(
            every=every, optimizer=optimizer, scaler=scaler, detectors=detectors, raise_on=raise_on,
            extra_stats=extra_stats, log_to=log_to, functional=functional, update_ratio=update_ratio,
            log_all_ranks=log_all_ranks, reduce_ranks=reduce_ranks, dead_window=dead_window,
            saturation_eps=saturation_eps, unit_dims=unit_dims)
        hist = History(history)

        params, module_info = trainable_params(model)
        seen = {id(p) for _, _, p in params}
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (none with requires_grad=True): "
                             "gradscope monitors gradients, so unfreeze at least one parameter before watch()")
        if watched_by(model) is not None:
            raise ValueError(f"this {type(model).__name__} is already watched by {watched_by(model)!r}; "
                             "call scope.detach() on the first scope (or use `with gradscope.watch(model)`) first")
        if optimizer is not None:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not ids & seen:
                raise ValueError("the optimizer given to watch() updates none of this model's trainable parameters; "
                                 "pass the optimizer that trains this model")

        self.model = model
        self.every = every
        self.detectors = detectors
        self._scaler = scaler
        self._params = params
        self._sharded = any(is_sharded(p) for _, _, p in params)  # FSDP2: DTensor parameters
        self._shards = None  # (the indices of the parameters with gradients, their Shards), see _shards_of
        self._module_info = module_info
        self._param_layers = [m for m in module_info if module_info[m]["params"]]
        for d in detectors:
            owner = getattr(d, "_gradscope_scope", lambda: None)()
            if owner is not None and getattr(owner, "_collector", None) is not None and owner.attached:
                raise ValueError(f"{d!r} already serves {owner!r}: detectors keep per-run state, so give each "
                                 "watch() its own instances (e.g. detectors=[gradscope.Vanishing(), ...] per model)")
        self.context = detector_context(model, optimizer)
        """What the detectors know about the model and its optimizer (:class:`gradscope.detectors.Context`)."""
        for d in detectors:
            if hasattr(d, "context"):
                d.context = self.context
            try:
                d._gradscope_scope = weakref.ref(self)
            except AttributeError:  # a detector with __slots__: it cannot be told apart, and is not refused
                pass
        self._book = AlertBook(raise_on=raise_on, log=log_all_ranks or rank() == 0)  # every rank detects alike
        self._num_steps = 0
        self._layers_seen = -1
        self._warned_no_backward = False
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "every": every, "model": class_name(model),
                "torch_version": torch.__version__, "context": dataclasses.asdict(self.context),
                "detectors": detector_settings(detectors), "layers": []}
        super().__init__(meta, hist, self._book.alerts)

        self._optimizer = optimizer
        self._listeners: list = []
        self._reduce_ranks = bool(reduce_ranks)
        self.grad_divisor = 1.0
        """What this collected step's ``.grad`` values were divided by for the statistics (the AMP loss scale when
        the gradients were still scaled, else 1): listeners that read ``.grad`` themselves divide by it too."""
        self._loss = None  # this step's loss, from record_loss()
        self._scale_at_start = None
        self._opt_handle = None
        self._update_ratio = bool(update_ratio)
        self._extra = extra | {"weight_norm"} if update_ratio else extra
        self._snapshot: list | None = None  # the parameters one step before a collected step (update_ratio)
        self._snapshot_step = -2
        self._collector = Collector(model, [p for _, _, p in params], dead_window=dead_window,
                                    saturation_eps=saturation_eps, unit_dims=unit_dims, functional=functional)
        self._collector.on_params_changed = self._follow_params
        self._stream: LogStream | None = None
        self._stream_close = None
        self._param_slots = None  # see _params_moved
        self._warned_unmonitored: set[str] = set()
        self._warned_local: set[str] = set()  # tensor-parallel sites left out of the reduction (_without_local_sites)
        try:
            self._collector.active = True
            if optimizer is not None:
                self._opt_handle = optimizer.register_step_pre_hook(self._on_optimizer_step)
                if scaler is not None:
                    self._collector.watch_backward()
                    self._collector.on_new_forward = self._check_skipped_step
            self._update_layers()
            if log_to is not None and rank() == 0:
                self._stream = LogStream(log_to)
                # closes the log (its end line) at detach(), when the scope is collected, or at interpreter exit
                self._stream_close = weakref.finalize(self, self._stream.close)
        except BaseException:
            self.detach()
            raise
        _WATCHED[model] = weakref.ref(self)

    # -- public ------------------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._collector.attached

    @property
    def num_steps(self) -> int:
        """How many steps have been closed (collected or not)."""
        return self._num_steps

    def step(self, scaler=None, *, loss=None) -> list[Alert]:
        """Close the current step: gather statistics (on a collected step), run the detectors, return new alerts.

        Call after ``loss.backward()`` (and any gradient accumulation) and before ``optimizer.step()``.

        Args:
            loss: this step's loss (a scalar tensor or number, unscaled; no host sync is added), as
                :meth:`record_loss`: the instability detector then watches it too, and a non-finite loss is a
                ``nonfinite`` alert even under a GradScaler.
            scaler: the ``torch.amp.GradScaler`` that scaled this step's loss; gradients are divided by its scale
                (parameter gradients only if ``scaler.unscale_`` has not run yet). A step whose gradients overflowed
                under a scaler is recorded with ``info["overflow"] = True`` and raises no alert: the scaler skips it.

        Raises:
            RuntimeError: the scope is detached, or no backward pass reached the parameters since the last step.
            GradientError: a new alert of a kind listed in ``raise_on`` (it is recorded first).
        """
        if not self.attached:
            raise RuntimeError("this scope is detached; call gradscope.watch(model) again to keep monitoring")
        check_scaler(scaler)
        if not self._backward_ran():
            raise RuntimeError("scope.step() was called with no backward pass since the last step: call "
                               "loss.backward() before scope.step(), once per optimizer step")
        if loss is not None:
            self.record_loss(loss)
        return self._close_step(scaler if scaler is not None else self._scaler)

    def record_loss(self, loss) -> None:
        """Give the scope this step's loss (what ``step(loss=...)`` does; for the ``optimizer=`` mode, call it before
        ``optimizer.step()``). The loss of several accumulated micro-batches: pass each, they are summed.

        Raises:
            TypeError / ValueError: ``loss`` is not a real number or a one-element tensor.
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1 or loss.is_complex():
                raise ValueError("loss must be the scalar loss (one element), got a tensor of shape "
                                 f"{tuple(loss.shape)}; pass loss.mean() or the value you call backward() on")
            value = loss.detach().reshape(()).to(_wide(loss.device))
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = float(loss)
        else:
            raise TypeError(f"loss must be a scalar tensor or a number, got {type(loss).__name__}")
        self._loss = value if self._loss is None else self._loss + value

    def discard(self) -> None:
        """Forget what was collected since the last step: the forward passes, backprop signals and loss of a batch
        you skip (a backward pass that ran out of memory, a ``KeyboardInterrupt`` in backward), so they do not count
        into the next step. The gradients are yours: zero them as you would. The next ``step()`` needs a new backward
        pass."""
        c = self._collector
        c.reset()
        c.mark_grads()
        self._loss = None

    def __reduce__(self):
        raise TypeError("a gradscope Scope cannot be pickled (it holds hooks on a live model): save its records with "
                        "scope.save(path) and read them with gradscope.load(path); a watched model itself pickles")

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The tracked parameters ``(qualified name, parameter)``: trainable ones, each once, in module order."""
        return [(name, p) for name, _, p in self._params]

    def add_listener(self, listener) -> None:
        """Call ``listener(scope, record, new_alerts)`` after every collected step (after the detectors ran, before a
        ``raise_on`` alert is raised), while ``.grad`` still holds that step's gradients. Loggers such as
        :class:`gradscope.integrations.tensorboard.TensorBoardLogger` use it."""
        if not callable(listener):
            raise TypeError(f"a listener must be callable as listener(scope, record, new_alerts), got {listener!r}")
        self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def dead_units(self) -> dict[str, torch.Tensor]:
        """``{ReLU call site: indices of its dead units}`` (CPU tensors; one transfer, at your call).

        A unit is dead when it fired on none of the last ``dead_window`` samples seen on collected steps.
        """
        return {site: torch.nonzero(t.dead_mask()).flatten().cpu() for site, t in self._collector.dead.items()}

    def firing_rates(self) -> dict[str, torch.Tensor]:
        """``{ReLU call site: per-unit fraction of samples on which it fires}`` (moving average over the window)."""
        return {site: t.rate.detach().cpu() for site, t in self._collector.dead.items()}

    def detach(self) -> None:
        """Remove every hook this scope added (module, tensor, parameter and optimizer hooks). Idempotent.

        The records stay readable after detaching.
        """
        self._collector.remove()
        if self._stream is not None and not self._stream.closed:
            self._stream_close.detach()
            self._stream.close(self.meta)
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        ref = _WATCHED.get(self.model)
        if ref is not None and ref() in (self, None):  # this scope's entry (or a dead one): the model is free again
            del _WATCHED[self.model]

    def __del__(self):
        # nobody can read a scope that is garbage: stop its hooks from filling buffers forever
        try:
            self._collector.remove()
        except Exception:  # interpreter shutdown, or __init__ failed before the collector existed
            pass

    def __enter__(self) -> "Scope":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"<gradscope.Scope {state} to {class_name(self.model)}: {len(self.meta['layers'])} layers, "
                f"every={self.every}, {self._num_steps} steps, {len(self._book.alerts)} alerts>")

    # -- internals ---------------------------------------------------------------------------------------------------
    def _params_moved(self) -> bool:
        """Whether a tracked parameter is no longer its module's (a parameter attribute set anew): a loop over the
        tracked parameters, run on collected steps only."""
        slots = self._param_slots
        if slots is None:
            slots = self._param_slots = Slots([(self.model.get_submodule(lname)._parameters, pname.rsplit(".", 1)[-1],
                                                p) for pname, lname, p in self._params])
        return slots.changed()

    def _backward_ran(self) -> bool:
        """Whether a backward pass reached the parameters since the last step; when none seems to have, the model's
        parameters may have been replaced (then they are followed and asked again)."""
        c = self._collector
        return c.backward_seen or (self._follow_params() and c.backward_seen)

    def _follow_params(self) -> bool:
        """Follow the model's parameters if they were replaced (``load_state_dict(..., assign=True)`` or a parameter
        attribute set anew): the scope tracks the new objects from now on. Returns whether they were."""
        self._param_slots = None
        params, module_info = trainable_params(self.model)
        if not self._collector.params_replaced([p for _, _, p in params]):
            return False
        if not params:
            raise RuntimeError(f"the watched {type(self.model).__name__} has no trainable parameters any more; "
                               "detach the scope (scope.detach()) or unfreeze a parameter")
        self._params, self._module_info = params, module_info
        self._sharded = any(is_sharded(p) for _, _, p in params)
        self._shards = None
        self._param_layers = [m for m in module_info if module_info[m]["params"]]
        self._collector.set_params([p for _, _, p in params])
        self._snapshot, self._snapshot_step = None, -2  # an update ratio across a load would measure the load
        self._layers_seen = -1
        self._update_layers()
        return True

    def _on_optimizer_step(self, optimizer, args, kwargs):
        if not self._backward_ran():
            if not self._warned_no_backward:
                warnings.warn("gradscope: optimizer.step() ran with no backward pass since the last step; that step is "
                              "not recorded", RuntimeWarning, stacklevel=3)
                self._warned_no_backward = True
            return
        self._close_step(self._scaler)

    def _check_skipped_step(self) -> None:
        """Optimizer mode with a GradScaler: close a step whose optimizer step the scaler skipped (overflow).

        Called when a root forward starts. A backward pass with no optimizer step since is either gradient
        accumulation (scale unchanged) or an overflowed step that ``scaler.step`` skipped and ``scaler.update`` answered
        by lowering the scale. Telling them apart costs one host sync, only on this path.
        """
        c = self._collector
        scale = _torch.scale_tensor(self._scaler)
        if not c.backward_seen:
            self._scale_at_start = None if scale is None else scale.detach().clone()  # the scale this backward uses
            return
        start = self._scale_at_start
        if start is None and scale is not None:  # GradScaler creates its scale tensor at its first scale() call
            start = torch.full_like(scale, _torch.init_scale(self._scaler))
        if scale is not None and bool(scale < start):
            self._close_step(self._scaler, scale_t=start, skipped=True)
            self._scale_at_start = scale.detach().clone()

    def _close_step(self, scaler, scale_t=None, skipped: bool = False) -> list[Alert]:
        c = self._collector
        step = self._num_steps
        if c.active:
            if c.tree_changed():  # model.head = nn.Linear(...): hooks on the new modules, statistics of its params
                c.rebuild()
                self._follow_params()
            elif self._params_moved():
                self._follow_params()
            try:
                self._update_layers()
                record = self._collect(step, scaler, scale_t, skipped)
            except BaseException:
                c.reset()  # the step is lost, but counters and buffers stay consistent
                c.mark_grads()
                raise
            c.reset()
        c.mark_grads()
        self._loss = None
        self._num_steps += 1
        collected, c.active = c.active, self._num_steps % self.every == 0
        if c.active:
            c.arm()
        elif self.every > 1:
            c.disarm()
        if self._update_ratio and c.active:
            self._take_snapshot(step)
        if not collected:
            return []
        # the scaler skips an overflowed step, so its gradients are not the model's: only the detectors that judge
        # overflows (Nonfinite: a persistent one) see it, and the other conditions keep their state
        overflow = record.info["overflow"]
        detectors = [d for d in self.detectors if getattr(d, "sees_overflow", False)] if overflow else self.detectors
        new = self._book.update([a for d in detectors for a in d.check(record, self.meta["layers"])], partial=overflow)
        record.info.update({HOLDING + kind: n for kind, n in self._book.holding().items()})
        self.history.append(record)
        if self._stream is not None and not self._stream.closed:
            self._write_stream(record, new)
        for listener in list(self._listeners):
            listener(self, record, new)
        self._book.raise_if_needed(new)
        return new

    def _write_stream(self, record: StepRecord, new: list[Alert]) -> None:
        try:
            self._stream.write(self.meta, record, new)
        except (OSError, ValueError) as e:  # a full disk must not stop the training: say so, keep the records
            self._stream_close.detach()
            self._stream.abandon()
            warnings.warn(f"gradscope: writing to log_to={self._stream.path!r} failed at step {record.step} ({e}); "
                          "streaming stopped there. The records stay in memory: scope.save(path) writes them.",
                          RuntimeWarning, stacklevel=4)

    def _note_unmonitored(self) -> None:
        """Say once which modules run only inside reentrant activation checkpointing, and list them in the record
        (``meta["unmonitored"]``): their outputs exist only while autograd is off, so they get no tensor hooks."""
        new = self._collector.unmonitored - self._warned_unmonitored
        if not new:
            return
        self._warned_unmonitored |= new
        self.meta["unmonitored"] = sorted(self._warned_unmonitored)
        warnings.warn(f"gradscope: {sorted(new)} run only inside torch.utils.checkpoint(..., use_reentrant=True), "
                      "whose forward pass runs without autograd: their backprop signals and activation statistics "
                      "(functional ones inside too) are not recorded, only their parameter gradients. Pass "
                      "use_reentrant=False to checkpoint() to monitor them fully.", RuntimeWarning, stacklevel=4)

    def _without_local_sites(self, b):
        """The buffers without what tensor parallelism leaves on each rank (``Collector.local_sites``): ReLU units
        and output gradients of ``DTensor`` outputs, measured on this rank's part. Summed over all ranks they would add
        different units index by index and scale shards as data-parallel copies (and shards of uneven size cannot be
        summed at all), so under ``reduce_ranks`` (DDP or FSDP2 beside tensor parallelism) those sites get no dead
        units and no backprop signal; their output checks and saturation counts add up correctly and stay. Said once."""
        local_sites = self._collector.local_sites
        new = local_sites - self._warned_local
        if new:
            self._warned_local |= new
            warnings.warn(f"gradscope: {sorted(new)} output DTensors (tensor parallelism), whose parts differ by rank; "
                          "with reduce_ranks on (DDP or FSDP2 beside it) their dead units and backprop signals are not "
                          "recorded, since summing them over ranks would mix the ranks' units. Without DDP/FSDP2, or "
                          "with watch(..., reduce_ranks=False), each rank records its own part.",
                          RuntimeWarning, stacklevel=5)
        return dataclasses.replace(
            b, signal_parts=[x for x in b.signal_parts if x[0] not in local_sites],
            dead_parts=[x for x in b.dead_parts if x[0] not in local_sites], hooked=b.hooked - local_sites)

    def _shards_of(self, key: tuple, params: list):
        """The :class:`gradscope.sharded.Shards` of this set of parameters with gradients (kept while it holds), or
        None when none of them is sharded."""
        if self._shards is None or self._shards[0] != key:
            shards = Shards([p for _, _, p in params], [p.grad for _, _, p in params])
            self._shards = (key, shards if shards.any else None)
        return self._shards[1]

    def _take_snapshot(self, step: int) -> None:
        """Copy the parameters before this step's optimizer update; the next (collected) step reports ||dw|| / ||w||."""
        current = [local(p.detach()) for _, _, p in self._params]
        if self._snapshot is None:
            self._snapshot = [w.clone() for w in current]
        else:
            torch._foreach_copy_(self._snapshot, current)
        self._snapshot_step = step

    def _update_layers(self) -> None:
        order = self._collector.order
        if len(order) == self._layers_seen:
            return
        self._layers_seen = len(order)
        entries = []
        c = self._collector
        for site, mname in order.items():
            info = self._module_info[mname]
            if site in c.functional_sites:  # "block:relu": a functional call inside block.forward
                kind = c.functional_sites[site]
                module, params, profile = f"F.{kind}", 0, False
            else:
                kind = c.module_kinds.get(mname)
                module, params, profile = info["module"], info["params"] if site == mname else 0, \
                    mname in c.profile_modules
            role = activation_role(site, self.model.get_submodule(mname), kind, site in c.broadcast_sites)
            entries.append(LayerInfo(site, module, params, profile, role))
        for mname in self._param_layers:
            if mname in order:
                continue
            # a parameterised module whose forward never runs (MultiheadAttention.out_proj: its weights are used
            # functionally by the parent) goes just before its closest called ancestor, which completes after it
            entry = LayerInfo(mname, self._module_info[mname]["module"], self._module_info[mname]["params"], True)
            parents = [i for i, e in enumerate(entries) if mname.startswith(order.get(e.name, "\0") + ".")]
            if parents:
                deepest = max(parents, key=lambda i: len(order[entries[i].name]))
                entries.insert(deepest, entry)
            else:
                entries.append(entry)
        self.meta["layers"] = [dataclasses.replace(e, depth=depth) for depth, e in enumerate(entries)]

    def _collect(self, step: int, scaler, scale_t=None, skipped: bool = False) -> StepRecord:
        c = self._collector
        b = c.gather()
        self._note_unmonitored()
        if c.evicted_reached and self.meta.get("uncounted_passes") != c.evicted_reached:
            if "uncounted_passes" not in self.meta:
                warnings.warn(f"gradscope: a backward pass reached forward passes that had waited beyond the "
                              f"{c.MAX_PENDING_PASSES} kept for one (gradscope.collect.Collector.MAX_PENDING_PASSES): "
                              "their activation statistics (dead units, saturation) are not counted; their gradient "
                              "statistics and backprop signals are. meta['uncounted_passes'] counts them.",
                              RuntimeWarning, stacklevel=5)
            self.meta["uncounted_passes"] = c.evicted_reached
        have = c.changed_grads()
        params = [self._params[i] for i, _ in have]
        grads = [local(g) for _, g in have]  # a sharded (FSDP2) parameter's: this rank's shard
        scale_t = _torch.scale_tensor(scaler) if scale_t is None else scale_t
        use_snapshot = self._snapshot is not None and self._snapshot_step == step - 1
        wanted, measured = measure_params(grads, [local(p) for _, _, p in params], self._extra,  # (measures detach)
                                          [self._snapshot[i] for i, _ in have] if use_snapshot else None)
        shards = self._shards_of(tuple(i for i, _ in have), params) if self._sharded else None
        kinds = {m: MEASURES[m].across_shards for m in measured}
        sums = shards.summands(measured, kinds) if shards else {}
        if self._reduce_ranks and world_size() > 1:
            if c.local_sites:
                b = self._without_local_sites(b)
            b, self._loss, sums = reduce_buffers(b, self._loss, sums)  # one all_reduce for both
        elif sums:
            sums = reduce_sums(sums)
        if shards:
            measured = shards.combine(measured, kinds, sums)

        dead = c.dead_bank.fold(b.dead_parts)
        record, self.grad_divisor = build_record(
            step, params, grads, b, c.dead_bank, dead, self.meta["layers"], wanted, measured, scale_t=scale_t,
            grads_unscaled=scale_t is not None and _torch.grads_already_unscaled(scaler), loss=self._loss,
            skipped=skipped, count_nonfinite=shards.nonfinite_counts if shards else None)
        return record
