"""Hugging Face ``Trainer``: a ``transformers.TrainerCallback`` that watches the model for the whole ``train()``.

    from gradscope.integrations.transformers import GradscopeCallback
    callback = GradscopeCallback(raise_on={"nonfinite"})
    trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=[callback])
    trainer.train(); print(callback.scope.summary())

What it does, and where:

* **Attach**: ``gradscope.watch(trainer.model)`` when training begins (``reduce_ranks=True`` when
  ``args.world_size > 1``, so every rank holds the same records and alerts).
* **Close each optimizer step** once the gradients are final (after the backward pass of the last accumulated
  micro-batch) and *before* the Trainer clips them: the callback wraps the ``clip_grad_norm_`` of the Trainer's
  ``accelerator`` for the length of the run, and the Trainer calls that once per optimizer step, with
  ``max_grad_norm`` and (as ``clip_grad_norm_(params, inf)``, to log ``grad_norm``) without it. The statistics are of
  the unclipped gradients: clipping would hide an exploding gradient. Under fp16 the gradients are still scaled at
  that point; the scope divides them by the Trainer's ``GradScaler`` scale. Where the Trainer does not go through
  ``accelerator.clip_grad_norm_`` (gradients on several device meshes, SageMaker model parallel) the step is closed
  in ``on_pre_optimizer_step`` instead, after clipping, and a warning says so once.
* **The loss** of each micro-batch (from ``accelerator.backward``, wrapped alike) goes to ``scope.record_loss``: a
  non-finite loss is a ``nonfinite`` alert.
* **Log**: the numbers of the latest collected step are merged into the next log the Trainer writes, as
  ``gradscope/<stat>/<layer>``, ``gradscope/decay_factor`` and ``gradscope/alerts`` (new alerts since the previous
  log), so they reach every ``report_to`` integration (wandb, TensorBoard, ...), the console and
  ``trainer.state.log_history``. The Trainer hands one ``logs`` dict to its callbacks in order and registers the
  ``report_to`` callbacks before yours, so this callback puts itself first in ``trainer.callback_handler``.
* **Save**: ``<args.output_dir>/gradscope.jsonl`` when training ends or a ``raise_on`` alert stops it, and a copy in
  each ``checkpoint-<step>`` folder the Trainer saves (main process only).
* **Detach** when training ends or a ``raise_on`` alert stops it. ``callback.scope`` stays readable.

DeepSpeed is refused: its engine keeps gradients in its own partitioned buffers and steps the optimizer inside
``backward``. Needs the ``transformers`` and ``accelerate`` packages.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("gradscope.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers accelerate") from e

from ..alerts import GradientError
from ..options import refuse_step_options
from ._common import step_metrics, warn_alerts
from ..scope import watch
from ..statistics import names

DEFAULT_LOG_STATS = names(headline=True)
"""Per-layer statistics merged into the Trainer's logs by default."""

RUN_FILE = "gradscope.jsonl"
"""The file name of the saved run, in ``args.output_dir`` and in each checkpoint folder."""


class GradscopeCallback(TrainerCallback):
    """Watch the model during ``Trainer.train()`` (see the module docstring for the hooks it uses).

    Pass it in ``Trainer(callbacks=[...])`` or with ``trainer.add_callback``; when training begins it finds its
    Trainer and puts itself first among the Trainer's callbacks. Where it cannot find it (a Trainer that calls its
    callbacks from outside its own methods), call :meth:`add_to` before ``train()``.

    Args:
        every: collect on every ``every``-th optimizer step (see :func:`gradscope.watch`).
        raise_on: alert kinds that stop training with :class:`gradscope.GradientError` (e.g. ``{"nonfinite"}``),
            raised from ``trainer.train()`` after the run is saved and the hooks removed.
        warn: also issue each new alert as a Python warning (main process), besides the ``"gradscope"`` logger.
        log_stats: per-layer statistics merged into the Trainer's logs as ``gradscope/<stat>/<layer>``, besides
            ``gradscope/decay_factor`` and ``gradscope/alerts``; ``()`` sends only those two.
        save_to: where to save the run (JSON Lines, :func:`gradscope.load` reads it) when training ends; default
            ``<args.output_dir>/gradscope.jsonl``; ``False`` saves nothing.
        save_with_checkpoints: also write ``gradscope.jsonl`` into each ``checkpoint-<step>`` folder the Trainer
            saves (the run up to that step).
        **watch_kwargs: any other :func:`gradscope.watch` argument (``dead_window``, ``extra_stats``, ``log_to``, ...).

    After training, ``callback.scope`` stays readable (``summary()``, ``history``, ``alerts``, ``plot()``).

    If ``train()`` fails for another reason than a ``raise_on`` alert (out of memory, ``KeyboardInterrupt``), the
    Trainer calls no callback, so the hooks stay on the model: call :meth:`detach` (the next ``train()`` with this
    callback also starts by detaching).
    """

    def __init__(self, every: int = 1, *, raise_on=(), warn: bool = True, log_stats=DEFAULT_LOG_STATS,
                 save_to=None, save_with_checkpoints: bool = True, **watch_kwargs):
        refuse_step_options(watch_kwargs, "Trainer")
        self.every, self.raise_on, self.warn = every, raise_on, warn
        self.log_stats = (log_stats,) if isinstance(log_stats, str) else tuple(log_stats)
        self.save_to = save_to
        self.save_with_checkpoints = bool(save_with_checkpoints)
        self.watch_kwargs = watch_kwargs
        self.scope = None
        """The :class:`gradscope.Scope` of the current (or last) ``train()``; None before the first."""
        self._trainer = None
        self._patches: list = []
        self._pending: dict | None = None  # the latest collected step's numbers, until a log takes them
        self._new_alerts = 0  # new alerts since the last log
        self._warned_late = self._warned_unclosed = False
        self._saw_backward = False  # accelerator.backward ran in this optimizer step
        self._closed_at = None  # the Trainer's global_step of the optimizer step last closed

    # -- registration ------------------------------------------------------------------------------------------------
    def add_to(self, trainer) -> "GradscopeCallback":
        """Register with ``trainer``, first among its callbacks (so its numbers are in the logs the ``report_to``
        callbacks receive). Only needed where the callback cannot find its Trainer by itself. Returns ``self``."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"add_to() expects a transformers.Trainer, got {type(trainer).__name__}")
        self._put_first(trainer)
        self._trainer = trainer
        return self

    def _put_first(self, trainer) -> None:
        handler = trainer.callback_handler
        # a new list: the handler may be iterating the old one right now (this runs inside on_train_begin)
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]

    def _running_trainer(self):
        """The Trainer whose ``on_train_begin`` is calling this callback: the nearest ``self`` up the call stack that
        is a Trainer holding this callback (the Trainer calls ``callback_handler.on_train_begin`` from its training
        loop; callbacks are not given the Trainer)."""
        frame = sys._getframe(1)
        for _ in range(16):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and any(cb is self for cb in obj.callback_handler.callbacks):
                return obj
            frame = frame.f_back
        trainer = self._trainer
        if trainer is not None and any(cb is self for cb in trainer.callback_handler.callbacks):
            return trainer
        return None

    # -- Trainer events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        """Attach: watch the Trainer's model, wrap its accelerator's ``clip_grad_norm_`` and ``backward``, and put
        this callback first among the Trainer's callbacks."""
        self.detach()  # a previous train() that failed, or auto_find_batch_size starting over
        trainer = self._running_trainer()
        if trainer is None:
            raise RuntimeError("GradscopeCallback could not find the Trainer it runs in; register it with "
                               "GradscopeCallback(...).add_to(trainer) before trainer.train()")
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError("GradscopeCallback does not support DeepSpeed: the DeepSpeed engine keeps the gradients "
                             "in its own (partitioned) buffers and steps the optimizer inside backward, so .grad is "
                             "not the gradient the step uses. Train without DeepSpeed (DDP, or FSDP) to watch it.")
        self._trainer = trainer
        self._put_first(trainer)
        self._pending, self._new_alerts, self._closed_at, self._saw_backward = None, 0, None, False
        options = {"reduce_ranks": args.world_size > 1, **self.watch_kwargs}  # DDP: every rank reduces alike
        self.scope = watch(trainer.model, every=self.every, raise_on=self.raise_on, **options)
        try:
            self._patch(trainer)
        except BaseException:
            self.detach()
            raise

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Fallback: close a step the accelerator's ``clip_grad_norm_`` did not (after clipping, which is said)."""
        scope = self.scope
        if scope is None or not scope.attached or self._closed_at == state.global_step:
            return  # closed before clipping (which changed .grad in place: it looks like a new backward pass)
        if not scope._collector.backward_seen:
            return  # no backward pass reached the parameters
        if not self._warned_late:
            self._warned_late = True
            warnings.warn("gradscope: the Trainer did not call accelerator.clip_grad_norm_ before this optimizer step "
                          "(gradients on several device meshes, or SageMaker model parallel); gradscope closes its "
                          "steps in on_pre_optimizer_step, so its statistics are of the gradients after clipping",
                          RuntimeWarning, stacklevel=2)
        self._close(self._trainer)

    def on_step_end(self, args, state, control, **kwargs):
        """Guard: an optimizer step that neither hook closed (a Trainer that calls neither ``clip_grad_norm_`` nor
        ``on_pre_optimizer_step``) is dropped with a warning, so it does not run into the next step."""
        scope, saw_backward, self._saw_backward = self.scope, self._saw_backward, False
        if scope is None or not scope.attached or self._closed_at == state.global_step - 1:
            return
        if saw_backward:  # (zero_grad has set .grad to None by now: it cannot tell)
            if not self._warned_unclosed:
                self._warned_unclosed = True
                warnings.warn("gradscope: this Trainer ran an optimizer step without calling "
                              "accelerator.clip_grad_norm_ or the on_pre_optimizer_step callbacks (an older "
                              "transformers, or a custom training loop), so gradscope could not see its gradients: "
                              "such steps are not recorded",
                              RuntimeWarning, stacklevel=2)
            scope.discard()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the latest collected step's numbers into ``logs`` (this callback runs first, so every later one,
        ``report_to`` integrations included, sees them) and into the matching ``state.log_history`` entry."""
        if self._pending is None or logs is None:
            return
        numbers = {"gradscope/alerts": float(self._new_alerts), **self._pending}
        logs.update(numbers)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(numbers)  # the Trainer appended a copy of logs just before on_log
        self._pending, self._new_alerts = None, 0

    def on_save(self, args, state, control, **kwargs):
        """Write the run so far into the checkpoint folder the Trainer just saved (main process)."""
        if not (self.save_with_checkpoints and self.scope is not None and state.is_world_process_zero):
            return
        folder = os.path.join(args.output_dir or "", f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.scope.save(os.path.join(folder, RUN_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        """Save the run (main process) and detach."""
        try:
            self._save(args, state)
        finally:
            self.detach()

    def detach(self) -> None:
        """Remove gradscope's hooks from the model and unwrap the accelerator's methods. Idempotent; the records stay
        readable in :attr:`scope`."""
        for obj, name, had, previous, wrapper in reversed(self._patches):
            if obj.__dict__.get(name) is wrapper:
                if had:
                    setattr(obj, name, previous)
                else:
                    delattr(obj, name)
        self._patches = []
        if self.scope is not None:
            self.scope.detach()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _patch(self, trainer) -> None:
        acc = trainer.accelerator
        callback = self

        def clip_grad_norm_(parameters, *args, **kwargs):
            # the Trainer calls this once per optimizer step, after the last micro-batch's backward pass: the
            # gradients are final, not yet clipped (nor unscaled under fp16)
            if acc.sync_gradients:
                callback._close(trainer)
            return clip(parameters, *args, **kwargs)

        def backward(loss, *args, **kwargs):
            scope = callback.scope
            callback._saw_backward = True
            if scope is not None and scope.attached and isinstance(loss, torch.Tensor) and loss.numel() == 1:
                scope.record_loss(loss)  # as the Trainer divided it for accumulation, before the loss scale
            return back(loss, *args, **kwargs)

        clip, back = acc.clip_grad_norm_, acc.backward
        for name, wrapper in (("clip_grad_norm_", clip_grad_norm_), ("backward", backward)):
            had = name in acc.__dict__
            self._patches.append((acc, name, had, acc.__dict__.get(name), wrapper))
            setattr(acc, name, wrapper)

    def _close(self, trainer) -> None:
        scope = self.scope
        if scope is None or not scope.attached or self._closed_at == trainer.state.global_step:
            return  # a second clip_grad_norm_ in the same optimizer step
        self._closed_at = trainer.state.global_step
        if not scope._collector.backward_seen:
            return  # no backward pass reached the parameters: nothing to close, here or after clipping
        collected = scope.num_steps % scope.every == 0
        try:
            new = scope.step(scaler=getattr(trainer.accelerator, "scaler", None))
        except GradientError as e:
            self._collected(trainer.state, scope, e.alerts)
            try:
                self._save(trainer.args, trainer.state)
            finally:
                self.detach()
            raise
        except BaseException:
            self.detach()
            raise
        if collected:
            self._collected(trainer.state, scope, new)

    def _collected(self, state, scope, new) -> None:
        record = scope.history.last
        self._pending = step_metrics(scope, record, self.log_stats)
        self._new_alerts += len(new)
        if self.warn and state.is_world_process_zero:
            warn_alerts(new, stacklevel=3)

    def _save(self, args, state) -> None:
        if self.scope is None or self.save_to is False or not state.is_world_process_zero:
            return
        path = self.save_to if self.save_to is not None else os.path.join(args.output_dir or ".", RUN_FILE)
        directory = os.path.dirname(os.path.abspath(os.fspath(path)))
        os.makedirs(directory, exist_ok=True)
        self.scope.save(path)
