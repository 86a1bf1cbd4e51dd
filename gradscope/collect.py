"""Collection: the hooks that capture tensors during forward and backward, and nothing else.

Why these hooks:

* A **forward hook** per module registers a **tensor hook** on each output that requires grad. This sees
  dLoss/d(output) without ``register_full_backward_hook``, which fails on torchvision's ResNet ("Output 0 of
  BackwardHookFunctionBackward is a view and is being modified inplace") whenever an inplace op follows the module.
  A tensor hook registered before an inplace change still reports the gradient of the value the module produced.
* A **post-accumulate-grad hook** per parameter only notes that a backward pass reached the parameters, so that
  ``step()`` can tell a missing ``loss.backward()`` apart from a real step.
* A **forward pre-hook** on the root module starts a new forward pass: call counters restart, so a module called
  twice per forward (torchvision's ``BasicBlock.relu``) gives two stable call sites, ``name`` and ``name#2``.

On steps that are not collected every hook returns after one attribute check.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import Tensor, nn

from .stats import sq_norm


def site_name(module_name: str, call: int) -> str:
    """Name of the ``call``-th call (1-based) of a module within one forward pass."""
    return module_name if call == 1 else f"{module_name}#{call}"


def _tensors(out) -> list[Tensor]:
    """Distinct tensors in a module output (tensor, tuple/list, dict, nested) that take part in autograd."""
    return list({id(t): t for t in _all_tensors(out)}.values())  # (h, h) outputs: count h once


def _all_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _all_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _all_tensors(o)]
    return []


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread."""
    return _graph_task_id() != -1


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _note_backward(collector_ref, param) -> None:
    collector = collector_ref()
    if collector is not None:
        collector.backward_seen = True


class Collector:
    """Owns every hook it adds to a model and the per-step buffers the hooks fill.

    Buffers (all device tensors, reset by :meth:`reset`):
        signal_sq: call site -> summed squared norm of dLoss/d(output) over this step's backward passes. A site in
            ``hooked`` but not here produced an output that no backward pass reached: its signal is exactly zero.
        output_sum: call site -> sum of the forward output (non-finite iff the output had NaN/Inf, barring overflow).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.active = False
        self.attached = True
        self.backward_seen = False
        self.signal_sq: dict[str, Tensor] = {}
        self.output_sum: dict[str, Tensor] = {}
        self.hooked: set[str] = set()  # call sites whose outputs got a tensor hook this step
        self.order: dict[str, str] = {}  # call site -> module name, in forward order of first call
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self._tensor_handles: list = []
        self._param_hook_dicts_were_none: list[nn.Parameter] = []
        self.profile_modules: set[str] = set()
        self.on_new_forward = None  # called with no argument when a root forward starts (the scope's AMP check)
        try:
            self._register(model, params)
        except BaseException:
            self.remove()  # a module that refuses hooks (e.g. a ScriptModule) must not leave the others behind
            raise

    def _register(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        for name, module in model.named_modules():
            owns = any(p.requires_grad for p in module.parameters(recurse=False))
            leaf = next(iter(module.children()), None) is None
            if module is model and not (owns or leaf):
                continue  # the root container's output is its last child's, or the loss input: nothing new
            if owns or leaf:
                self.profile_modules.add(name)
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
        # Parameter hooks live in C++, out of the garbage collector's sight: a hook holding the collector would make
        # model -> parameter -> hook -> collector -> model an uncollectable cycle for a scope never detached.
        on_accumulate = partial(_note_backward, weakref.ref(self))
        for p in params:
            if getattr(p, "_post_accumulate_grad_hooks", None) is None:
                self._param_hook_dicts_were_none.append(p)
            self._handles.append(p.register_post_accumulate_grad_hook(on_accumulate))

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _new_forward(self, module, args):
        if self.on_new_forward is not None and self.attached:
            self.on_new_forward()
        if self.active:
            self._calls.clear()

    def _on_forward(self, name: str, module, args, output):
        if not self.active or not self.attached or _in_backward():
            return  # _in_backward: activation checkpointing re-runs forwards during backward; not a new call
        call = self._calls.get(name, 0) + 1
        self._calls[name] = call
        site = site_name(name, call)
        if not torch.is_grad_enabled():
            return
        tensors = _tensors(output)
        if not tensors:
            return
        self.order.setdefault(site, name)
        with torch.no_grad():
            s = sum(t.detach().sum(dtype=torch.float32) for t in tensors if t.is_floating_point())
        if isinstance(s, Tensor):
            prev = self.output_sum.get(site)
            self.output_sum[site] = s if prev is None else prev + s
        self.hooked.add(site)
        for t in tensors:
            self._tensor_handles.append(t.register_hook(partial(self._on_grad, site)))

    def _on_grad(self, site: str, grad: Tensor):
        if not self.attached or grad is None:
            return
        sq = sq_norm(grad)
        prev = self.signal_sq.get(site)
        self.signal_sq[site] = sq if prev is None else prev + sq

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new step: drop buffers and the tensor hooks of tensors from the finished step."""
        self.signal_sq = {}
        self.output_sum = {}
        self.hooked = set()
        self._calls.clear()
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def remove(self) -> None:
        """Remove every hook this collector added. Idempotent."""
        self.attached = False
        self.reset()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._param_hook_dicts_were_none:
            if not p._post_accumulate_grad_hooks:
                p._post_accumulate_grad_hooks = None
        self._param_hook_dicts_were_none.clear()
