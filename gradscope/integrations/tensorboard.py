"""TensorBoard: a scope's per-layer statistics, alerts and (optionally) gradient histograms, on collected steps.

    scope = gradscope.watch(model)
    tb = gradscope.integrations.tensorboard.TensorBoardLogger(scope, log_dir="runs/exp1")  # or writer=SummaryWriter
    ...  # train as usual: every collected step is written
    tb.close()

Tags are grouped so the TensorBoard UI stays readable: one group per statistic (``gradscope.grad_norm``,
``gradscope.backprop_signal``, ...) holding one chart per layer or call site, a ``gradscope.summary`` group (average
factor per layer, alert count, AMP overflow), alerts as text under ``gradscope.alerts`` and, with
``histograms=True``, one gradient histogram per parameter under ``gradscope.grad_hist``. The scalars of a step go out
as one TensorBoard event (one ``Summary`` holding every value), not one event per value.

Needs the ``tensorboard`` package (``pip install tensorboard`` or ``pip install 'gradscope[tensorboard]'``).
"""

from __future__ import annotations

from ..record import StepRecord, _finite, layer_scalars
from ..statistics import names

DEFAULT_STATS = names(logged=True)
"""Per-layer statistics written when present in a record (the optional ones only when the scope collects them)."""


def _summary_writer(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
        raise ImportError("gradscope's TensorBoard logger needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'gradscope[tensorboard]')") from e
    return SummaryWriter(log_dir)


class TensorBoardLogger:
    """Writes a scope's collected steps to a ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        scope: the :class:`gradscope.Scope` to follow (the logger registers itself with ``scope.add_listener``).
        writer: a ``SummaryWriter`` to write to (it stays open after :meth:`close`); by default one is created in
            ``log_dir`` and closed by :meth:`close`.
        log_dir: where the created writer writes (``SummaryWriter``'s default ``runs/...`` when None).
        stats: per-layer statistics to write (default :data:`DEFAULT_STATS`).
        histograms: also write a histogram of each parameter's gradient (unscaled under AMP). One pass over every
            gradient and a histogram event per parameter on each collected step: slow, off by default.
        prefix: the first part of every tag.
    """

    def __init__(self, scope, writer=None, *, log_dir: str | None = None, stats=DEFAULT_STATS,
                 histograms: bool = False, prefix: str = "gradscope"):
        if not hasattr(scope, "add_listener"):
            raise TypeError(f"TensorBoardLogger follows a gradscope.Scope (gradscope.watch(model)), got "
                            f"{type(scope).__name__}")
        if writer is not None and log_dir is not None:
            raise ValueError("pass either writer= (an open SummaryWriter) or log_dir= (to create one), not both")
        if isinstance(stats, str):
            stats = (stats,)
        self.stats = tuple(stats)
        self.histograms = bool(histograms)
        self.prefix = prefix
        self._owns = writer is None
        self.writer = _summary_writer(log_dir) if writer is None else writer
        self.scope = scope
        scope.add_listener(self)

    def __call__(self, scope, record: StepRecord, alerts) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        p, step = self.prefix, record.step
        values = [Summary.Value(tag=f"{p}.{stat}/{layer}", simple_value=v)
                  for stat, layer, v in layer_scalars(record, self.stats)]
        summary = {"decay_factor": scope.decay_factor(record), "new_alerts": float(len(alerts)),
                   "overflow": float(bool(record.info.get("overflow"))), "grad_scale": record.info.get("grad_scale")}
        values += [Summary.Value(tag=f"{p}.summary/{k}", simple_value=float(v))
                   for k, v in summary.items() if _finite(v)]
        self.writer._get_file_writer().add_summary(Summary(value=values), step)
        if alerts:
            text = "\n\n".join(f"**{a.kind}** in `{a.layer or '(root)'}`: {a.message} *Remedy:* {a.hint}"
                               for a in alerts)
            self.writer.add_text(f"{p}.alerts", text, step)
        if self.histograms:
            scale = scope.grad_divisor
            for pname, param in scope.named_parameters():
                if param.grad is not None:
                    g = param.grad.detach()
                    self.writer.add_histogram(f"{p}.grad_hist/{pname}", g if scale == 1.0 else g / scale, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Stop following the scope; flush, and close the writer if this logger created it."""
        self.scope.remove_listener(self)
        if self._owns:
            self.writer.close()
        else:
            self.writer.flush()
