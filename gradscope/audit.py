"""``gradscope.audit``: one forward/backward pass at initialisation, reported without touching the model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .run import Run
from .detectors import Vanishing, default_detectors
from .scope import watch, watched_by


class AuditReport(Run):
    """What one batch says about a model: the layer table, depth profile and alerts (``print(report)``)."""

    def __init__(self, scope, loss: float):
        super().__init__(scope.meta, scope.history, scope.alerts)
        self.loss = loss

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<gradscope.AuditReport {self.meta.get('model')}: loss {self.loss:.4g}, {len(self.alerts)} alerts>"


def audit(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *, detectors=None) -> AuditReport:
    """Run one forward/backward pass and diagnose the gradients, leaving the model exactly as it was.

    Parameter ``.grad``s, buffers (e.g. BatchNorm running statistics), the training mode and the global RNG states are
    restored afterwards, so an audit before training changes nothing about the training that follows.

    Args:
        model: the model (not currently watched).
        inputs: a tensor, or a tuple/list of positional arguments, for ``model(...)``.
        targets: passed to ``loss_fn(output, targets)``.
        loss_fn: e.g. ``torch.nn.functional.cross_entropy``; without it the model output must be a scalar loss.
        detectors: as in :func:`gradscope.watch`.

    Returns:
        An :class:`AuditReport`; ``print(report)`` shows the table, the depth profile and its decay factor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradscope.audit() expects a torch.nn.Module, got {type(model).__name__}")
    if watched_by(model) is not None:
        raise ValueError("this model is being watched; audit it before gradscope.watch() or after scope.detach()")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, e.g. torch.nn.functional.cross_entropy; got {loss_fn!r}")
    if targets is not None and loss_fn is None:
        raise ValueError("targets were given without loss_fn; "
                         "pass loss_fn=torch.nn.functional.cross_entropy (or yours)")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    saved_grads = {p: p.grad for p in model.parameters()}
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    if detectors is None:  # an audit sees one step: a vanishing condition needs no persistence there
        detectors = default_detectors()
        for d in detectors:
            if isinstance(d, Vanishing):
                d.patience = 1
    scope = watch(model, detectors=detectors)
    try:
        for p in saved_grads:
            p.grad = None
        with torch.random.fork_rng(devices=cuda):
            out = model(*args)
            loss = loss_fn(out, targets) if loss_fn is not None else out
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError("audit() needs a scalar loss: pass loss_fn (and targets), or a model that returns one")
            loss.backward()
        scope.step()
    finally:
        scope.detach()
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in saved_grads.items():
            p.grad = g
    return AuditReport(scope, float(loss.detach()))
