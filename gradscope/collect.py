"""Collection: the hooks that capture tensors during forward and backward, and nothing else.

Why these hooks:

* A **forward hook** per module registers a **tensor hook** on each output that requires grad. This sees
  dLoss/d(output) without ``register_full_backward_hook``, which fails on torchvision's ResNet ("Output 0 of
  BackwardHookFunctionBackward is a view and is being modified inplace") whenever an inplace op follows the module.
  A tensor hook registered before an inplace change still reports the gradient of the value the module produced.
* A **post-accumulate-grad hook** per parameter only notes that a backward pass reached the parameters, so that
  ``step()`` can tell a missing ``loss.backward()`` apart from a real step.
* A **forward pre-hook** on the root module starts a new forward pass: call counters restart, so a module called
  twice per forward (torchvision's ``BasicBlock.relu``) gives two stable call sites, ``name`` and ``name#2``. It also
  enters a ``TorchFunctionMode`` that sees functional activations (``F.relu`` in a ``forward``); forward pre-hooks on
  every module keep the stack of modules running, so such a call is named after the innermost one.
* A **forward pre-hook** on each ``nn.RNN``/``nn.LSTM``/``nn.GRU`` passes its input on as a new autograd node (a view,
  or a detached copy that requires grad when the input needs none) and hooks it: dLoss/d(input at step t), the
  gradient through time, without changing any parameter gradient or the graph upstream.

On steps that are not collected every hook returns after one attribute check.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import Tensor, nn

from .activations import BOUNDS, DeadUnits, FunctionalCalls, Saturation, ThroughTime, module_kind, unit_dim
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


def _hook_target(t: Tensor) -> Tensor:
    """The tensor to hook for dLoss/d(t).

    An inplace op on a *view* (nn.Linear on a 3-d input returns one, then ``ReLU(inplace=True)``) rebases the view's
    history, and a hook already on the view never fires. Its base keeps its place in the graph; when the view spans
    the whole base, the base's gradient is the view's, reshaped, with the same norm.
    """
    base = t._base
    if base is not None and base.requires_grad and base.numel() == t.numel():
        return base
    return t


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
        saturation, through_time: per-step activation trackers of sigmoid/tanh and recurrent sites.
    Kept across steps: ``dead`` (the rolling dead-unit state of each ReLU site) and ``order``.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], *, dead_window: int = 1000,
                 saturation_eps: float = 0.02, unit_dims: dict | None = None, functional: bool = True):
        self.active = False
        self.attached = True
        self.backward_seen = False
        self.signal_sq: dict[str, Tensor] = {}
        self.output_sum: dict[str, Tensor] = {}
        self.hooked: set[str] = set()  # call sites whose outputs got a tensor hook this step
        self.order: dict[str, str] = {}  # call site -> module name, in forward order of first call
        self.functional_sites: dict[str, str] = {}  # functional call site -> activation kind
        self.dead: dict[str, DeadUnits] = {}
        self.saturation: dict[str, Saturation] = {}
        self.through_time: dict[str, ThroughTime] = {}
        self.observed: set[str] = set()  # activation sites seen this step
        self.dead_window, self.saturation_eps = dead_window, saturation_eps
        self.unit_dims = dict(unit_dims or {})
        self.module_kinds: dict[str, str] = {}
        self._calls: dict[str, int] = {}
        self._stack: list[str] = []
        self._mode = FunctionalCalls(self._on_function) if functional else None
        self._mode_entered = False
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
        self._root = next(n for n, m in model.named_modules() if m is model)
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        self._handles.append(model.register_forward_hook(self._end_forward, always_call=True))
        for name, module in model.named_modules():
            kind = module_kind(module)
            if kind is not None:
                self.module_kinds[name] = kind
            if module is not model:
                self._handles.append(module.register_forward_pre_hook(partial(self._enter_module, name)))
            if kind == "recurrent":
                self._handles.append(module.register_forward_pre_hook(partial(self._recurrent_input, name)))
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

    def _live(self) -> bool:
        # _in_backward: activation checkpointing re-runs forwards during backward; those are not new calls
        return self.active and self.attached and not _in_backward()

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _new_forward(self, module, args):
        if self.on_new_forward is not None and self.attached:
            self.on_new_forward()
        if not self._live():
            return
        self._calls.clear()
        self._stack = [self._root]
        if self._mode is not None and not self._mode_entered and torch.is_grad_enabled():
            self._mode.__enter__()
            self._mode_entered = True

    def _end_forward(self, module, args, output):
        if self._mode_entered:
            self._mode_entered = False
            self._mode.__exit__(None, None, None)
        self._stack = []

    def _enter_module(self, name: str, module, args):
        if self._live():
            self._stack.append(name)

    def _next_site(self, base: str) -> str:
        call = self._calls.get(base, 0) + 1
        self._calls[base] = call
        return site_name(base, call)

    def _on_forward(self, name: str, module, args, output):
        if not self._live():
            return
        if self._stack and self._stack[-1] == name:
            self._stack.pop()
        site = self._next_site(name)
        if not torch.is_grad_enabled():
            return
        kind = self.module_kinds.get(name)
        if kind in ("relu", "sigmoid", "tanh") and isinstance(output, Tensor):
            self._observe(site, kind, output)
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
            self._tensor_handles.append(_hook_target(t).register_hook(partial(self._on_grad, site)))

    def _on_function(self, kind: str, out: Tensor) -> None:
        if not self._live() or not torch.is_grad_enabled():
            return
        owner = self._stack[-1] if self._stack else self._root
        if self.module_kinds.get(owner) in ("relu", "sigmoid", "tanh"):
            return  # nn.ReLU's own F.relu: the module is the site
        site = self._next_site(f"{owner}:{kind}")
        self.order.setdefault(site, owner)
        self.functional_sites[site] = kind
        self._observe(site, kind, out)

    def _observe(self, site: str, kind: str, out: Tensor) -> None:
        self.observed.add(site)
        if kind == "relu":
            tracker = self.dead.get(site)
            if tracker is None:
                tracker = self.dead[site] = DeadUnits(self.dead_window)
            tracker.observe(out, self.unit_dims.get(site, unit_dim(out.ndim)))
        elif kind in BOUNDS:
            tracker = self.saturation.get(site)
            if tracker is None:
                tracker = self.saturation[site] = Saturation(kind, self.saturation_eps)
            tracker.observe(out)

    def _recurrent_input(self, name: str, module, args):
        if not self._live() or not torch.is_grad_enabled() or not args:
            return None
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None  # a PackedSequence: no per-step layout to read
        site = site_name(name, self._calls.get(name, 0) + 1)  # the call the forward hook will name
        x2 = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
        batch_dim = None if x.ndim == 2 else (0 if getattr(module, "batch_first", False) else 1)
        self._tensor_handles.append(x2.register_hook(partial(self._on_time_grad, site, batch_dim)))
        return (x2,) + tuple(args[1:])

    def _on_time_grad(self, site: str, batch_dim, grad: Tensor):
        if not self.attached or grad is None:
            return
        tracker = self.through_time.get(site)
        if tracker is None:
            tracker = self.through_time[site] = ThroughTime()
        tracker.observe_grad(grad, batch_dim)

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
        self.observed = set()
        self.saturation = {}
        self.through_time = {}
        self._calls.clear()
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def remove(self) -> None:
        """Remove every hook this collector added. Idempotent."""
        self.attached = False
        if self._mode_entered:
            self._end_forward(None, None, None)
        self.reset()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._param_hook_dicts_were_none:
            if not p._post_accumulate_grad_hooks:
                p._post_accumulate_grad_hooks = None
        self._param_hook_dicts_were_none.clear()
