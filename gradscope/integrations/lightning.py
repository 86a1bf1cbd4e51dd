"""Lightning: a ``lightning.pytorch.Callback`` that watches the LightningModule for the whole ``fit``.

    from gradscope.integrations.lightning import GradscopeCallback
    trainer = Trainer(callbacks=[GradscopeCallback(every=10)])

It attaches when fit starts, closes each step in ``on_before_optimizer_step`` (after the backward passes of all
accumulated batches and, under 16-bit AMP, after Lightning unscaled the gradients), sends its statistics to the
trainer's loggers from global rank 0, and detaches when fit ends or fails. Needs the ``lightning`` package.
"""

from __future__ import annotations


import torch

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("gradscope.integrations.lightning needs Lightning: pip install lightning") from e

from .. import _torch
from ..options import refuse_step_options
from ._common import step_metrics, warn_alerts
from ..scope import watch
from ..statistics import names

DEFAULT_LOG_STATS = names(headline=True)


class GradscopeCallback(Callback):
    """Watch the LightningModule during ``trainer.fit``.

    Args:
        every: collect on every ``every``-th optimizer step (see :func:`gradscope.watch`).
        raise_on: alert kinds that stop training with :class:`gradscope.GradientError` (e.g. ``{"nonfinite"}``).
        warn: also issue each new alert as a Python warning (from global rank 0), besides the ``"gradscope"`` logger.
        log_stats: per-layer statistics sent to the trainer's loggers as ``gradscope/<stat>/<layer>``, with
            ``gradscope/decay_factor`` and ``gradscope/alerts``; ``()`` sends only those two.
        save_to: write the scope's JSON Lines log there when fit ends (global rank 0).
        **watch_kwargs: any other :func:`gradscope.watch` argument (``dead_window``, ``extra_stats``, ...).

    After fit, ``callback.scope`` stays readable (``summary()``, ``history``, ``alerts``, ``plot()``).
    """

    def __init__(self, every: int = 1, *, raise_on=(), warn: bool = True, log_stats=DEFAULT_LOG_STATS,
                 save_to=None, **watch_kwargs):
        refuse_step_options(watch_kwargs, "trainer")
        self.every, self.raise_on, self.warn = every, raise_on, warn
        self.log_stats = (log_stats,) if isinstance(log_stats, str) else tuple(log_stats)
        self.save_to = save_to
        self.watch_kwargs = watch_kwargs
        self.scope = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._detach()
        kwargs = {"reduce_ranks": trainer.world_size > 1, **self.watch_kwargs}  # DDP strategies: one scope per rank
        self.scope = watch(pl_module, every=self.every, raise_on=self.raise_on, **kwargs)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the loss of each micro-batch, as Lightning divides it for accumulation: they add up to the step's loss.
        # Under 16-bit AMP Lightning has already multiplied it by the loss scale: divide it back (no sync)
        if self.scope is not None and self.scope.attached and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            scale = _torch.scale_tensor(getattr(trainer.precision_plugin, "scaler", None))
            self.scope.record_loss(loss if scale is None else loss.detach() / scale)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scope = self.scope
        if scope is None or not scope.attached or not scope._collector.backward_seen:
            return  # no backward pass reached the parameters (a skipped training_step): nothing to close
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        collected = scope.num_steps % scope.every == 0
        new = scope.step(scaler=scaler)
        if collected and trainer.is_global_zero:
            self._log(trainer, scope, new)

    def _log(self, trainer, scope, new) -> None:
        record = scope.history.last
        metrics = {"gradscope/alerts": float(len(new)), **step_metrics(scope, record, self.log_stats)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.warn:
            warn_alerts(new, stacklevel=2)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.scope is not None and self.save_to is not None and trainer.is_global_zero:
            self.scope.save(self.save_to)
        self._detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.scope is not None:
            self.scope.detach()
