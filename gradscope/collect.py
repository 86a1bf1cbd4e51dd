"""Collection: the hooks that capture tensors during forward and backward, and nothing else.

Why these hooks:

* A **forward hook** per module registers a **tensor hook** on each output that requires grad. This sees
  dLoss/d(output) without ``register_full_backward_hook``, which fails on torchvision's ResNet ("Output 0 of
  BackwardHookFunctionBackward is a view and is being modified inplace") whenever an inplace op follows the module.
  A tensor hook registered before an inplace change still reports the gradient of the value the module produced.
* No hook on parameters: ``step()`` tells a missing ``loss.backward()`` from a real step by comparing each ``.grad``
  with a mark taken when the last step closed (a new tensor, or a moved version counter). Only the optimizer mode with
  a GradScaler, which must learn of a skipped step after ``zero_grad()`` wiped that evidence, adds a
  post-accumulate-grad hook per parameter.
* A **forward pre-hook** on the root module starts a new forward pass: call counters restart, so a module called
  twice per forward (torchvision's ``BasicBlock.relu``) gives two stable call sites, ``name`` and ``name#2``. It also
  enters a ``TorchFunctionMode`` that sees functional activations (``F.relu`` in a ``forward``); forward pre-hooks on
  every module keep the stack of modules running, so such a call is named after the innermost one.
* A **forward pre-hook** on each ``nn.RNN``/``nn.LSTM``/``nn.GRU`` passes its input on as a new autograd node (a view,
  or a detached copy that requires grad when the input needs none) and hooks it: dLoss/d(input at step t), the
  gradient through time, without changing any parameter gradient or the graph upstream.

With ``every > 1`` the per-module hooks exist only around collected steps (:meth:`Collector.arm` /
:meth:`Collector.disarm`): a module with any hook takes PyTorch's slower call path even when the hook does nothing.
On collected steps a hook does the least device work it can (one or two reductions per output, one per output
gradient) and appends the 0-d or (units,) results to a list; the scope folds them per site with a few batched ops
when the step closes. On CUDA an output gradient is not reduced in its hook: the hook keeps a reference, and the
gradients kept are measured together when the backward pass ends (one fused kernel, see
:attr:`Collector.BATCHED_DEVICES`): per output, that is a list append instead of three kernel launches.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from . import _torch
from .anatomy import inside_activation
from .activations import (DeadUnitBank, DeadUnitState, FunctionalCalls, TimeProfile, count_fired, fired_counts,
                          finite_from_finite, module_kind, saturation_counts, unit_dim)
from .sharded import _PLAIN, local
from .stats import norms, sq_norm


def site_name(module_name: str, call: int) -> str:
    """Name of the ``call``-th call (1-based) of a module within one forward pass."""
    return module_name if call == 1 else f"{module_name}#{call}"


def _tensors(out) -> list[Tensor]:
    """Distinct tensors in a module output (tensor, tuple/list, dict, nested) that take part in autograd."""
    if isinstance(out, Tensor):
        return [out] if out.requires_grad else []
    return list({id(t): t for t in _all_tensors(out)}.values())  # (h, h) outputs: count h once


def _all_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _all_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _all_tensors(o)]
    return []


def _hook_target(t: Tensor, args) -> Tensor:
    """The tensor to hook for dLoss/d(t), an output of a module called with ``args``.

    An inplace op on a *view* (nn.Linear on a 3-d input returns one, then ``ReLU(inplace=True)``) rebases the view's
    history, and a hook already on the view never fires. Its base keeps its place in the graph; when the view spans
    the whole base and the base was made inside this module call, the base's gradient is the view's, reshaped. A base
    that came in as an input (``nn.Flatten`` returns a view of its input) may have other consumers: hook the view.
    """
    base = t._base
    if base is None or base.is_leaf or not base.requires_grad or base.numel() != t.numel():
        return t
    if any(base is a or base is a._base for a in _all_tensors(args)):
        return t
    return base


@dataclass
class StepBuffers:
    """One step's collected parts, what the record builder reads (see :meth:`Collector.gather`). Lists of
    ``(site, device tensors...)`` in the order the hooks ran:

    signal_parts: ``(site, squared norm of dLoss/d(output))``, one per output per backward pass.
    output_parts: ``(site, sum of the forward output)``: non-finite iff the output had NaN/Inf (barring overflow).
    dead_parts: ``(site, fired counts, samples)`` of ReLU sites; saturation_parts: ``(site, saturated count, output
        sum, numel)`` of sigmoid/tanh sites.
    hooked: call sites whose outputs got a tensor hook: one with no signal part produced an output no backward pass
        reached (its signal is exactly zero).
    through_time: ``{recurrent site: per-step gradient-norm profile}``.
    """

    signal_parts: list = field(default_factory=list)
    output_parts: list = field(default_factory=list)
    dead_parts: list = field(default_factory=list)
    saturation_parts: list = field(default_factory=list)
    hooked: set = field(default_factory=set)
    through_time: dict = field(default_factory=dict)


class _Pass:
    """The activation-side parts of one forward pass (see :attr:`Collector.MAX_PENDING_PASSES`).

    They count into a step only once a backward pass reaches one of the pass's outputs (``reached``): the forward
    passes of an evaluation loop run with grad enabled, or of a generation, are not training batches.
    """

    __slots__ = ("output_parts", "dead_parts", "saturation_parts", "hooked", "handles", "hooks", "reached", "evicted")

    def __init__(self):
        self.output_parts: list = []
        self.dead_parts: list = []  # (site, fired, n): fired_counts(), counted by count_fired() when the pass ends
        self.saturation_parts: list = []
        self.hooked: set[str] = set()  # call sites whose outputs got a tensor hook in this pass
        self.handles: list = []  # those tensor hooks (and the recurrent layers' input hooks)
        self.hooks = False  # whether it has any (a flag: torch.compile cannot look into a list of handles)
        self.reached = False
        self.evicted = False  # its parts were dropped while it waited (see Collector.MAX_PENDING_PASSES)

    def evict(self) -> None:
        """Drop the activation-side parts; keep the gradient hooks (they go with the graph), so a backward pass that
        still reaches this pass adds its backprop signal like every other's."""
        self.evicted = True
        self.output_parts, self.dead_parts, self.saturation_parts = [], [], []

    def alive(self) -> bool:
        """Whether any tensor this pass hooked still exists."""
        return any(_torch.handle_alive(h) for h in self.handles)

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _ForwardState(threading.local):
    """Per-thread state of the forward pass in progress (nn.DataParallel runs replicas in threads)."""

    def __init__(self):
        self.calls: dict[str, int] = {}  # call counts per module (or functional base name) in this forward
        self.stack: list[str] = []  # modules whose forward is running, innermost last
        self.depth = 0  # nesting of root forward calls (a root that calls itself is one forward pass)
        self.mode = None  # the FunctionalCalls mode this thread entered
        self.scoped = False  # this pass enters the mode only inside the modules that make functional calls
        self.scope_at = 0  # the module stack's depth at which the scoped mode was entered (0: not entered)
        self.checked = None  # the last output whose NaN/Inf check was recorded (see Collector._needs_check)
        self.checked_version = 0  # its version counter then: an inplace change since shows in it
        self.check = None  # and its check (the float32 sum of its entries)
        self.hooked = None  # the last output that got a gradient hook, its version counter then, and the call sites
        self.hooked_version = 0  # that hook reports for (a container returning it unchanged shares the hook)
        self.hooked_sites: list = []
        self.hooked_target = None  # the tensor its hook is on (the output, or its base: see _hook_target)
        self.cur: _Pass | None = None  # the forward pass whose parts the hooks record
        self.frame = None  # the frame of the root module's call in progress (see Collector._stale)
        self.sub_frame = None  # the outermost submodule call in progress when the root is not running

    def forget_outputs(self) -> None:
        """Drop the last checked and hooked outputs held here: once a forward pass ends, a graph that no backward pass
        reaches must be freed, and the next pass must not match its outputs."""
        self.checked = self.check = self.hooked = self.hooked_target = None


# Gradscope's own tensor work inside a forward hook must not go through its (or anyone's) TorchFunctionMode: that
# dispatch cost more than the work itself (measured: 7 ms of a 17 ms MLP step) and would show our ops to user modes.
_no_function_mode = _torch.no_function_mode
_function_mode_on = _torch.function_mode_on
_in_backward = _torch.in_backward
_graph_task_id = _torch.graph_task_id
_is_compiling = _torch.is_compiling


def _owner(fn):
    """The object whose method ``fn`` (or ``partial(method, ...)``) is."""
    return getattr(getattr(fn, "func", fn), "__self__", None)


def _note_backward(collector_ref, param) -> None:
    collector = collector_ref()
    if collector is not None:
        collector._backward_flag = True


class Slots:
    """Objects and where they hang, ``[(dict, key, object)]`` (a module's ``_modules`` or ``_parameters`` entries):
    :meth:`changed` says whether any slot now holds another object, in C loops (it runs on every collected step)."""

    __slots__ = ("tables", "keys", "objects", "_get")

    def __init__(self, slots: list):
        self.tables, self.keys, self.objects = (list(x) for x in zip(*slots)) if slots else ([], [], [])
        # dict.get in C unless a table's own get differs (a dict subclass overriding it)
        self._get = dict.get if all(isinstance(t, dict) and type(t).get is dict.get for t in self.tables) \
            else (lambda table, key: table.get(key))

    def __len__(self) -> int:
        return len(self.objects)

    def changed(self) -> bool:
        return any(map(operator.is_not, map(self._get, self.tables, self.keys), self.objects))


def _grad_moved(g, mark) -> bool:
    """Whether ``.grad`` ``g`` is new or changed since ``mark`` (see :meth:`Collector.mark_grads`) was taken."""
    return g is not None and (mark is None or mark[0]() is not g or mark[1] != local(g)._version)


def _inert_collector() -> "Collector":
    """A collector attached to nothing, whose hooks do nothing: what a copy of a watched model gets."""
    inert = Collector.__new__(Collector)
    inert.active = inert.attached = inert.functional = False
    inert.on_new_forward = inert.on_params_changed = None
    inert._fwd = _ForwardState()
    return inert


class Collector:
    """Owns every hook it adds to a model and the per-step buffers the hooks fill (see :class:`StepBuffers`).

    The backward side (``signal_parts``, ``through_time``) is kept per step, the forward side per forward pass
    (:class:`_Pass`); :meth:`gather` hands the step's :class:`StepBuffers` to the record builder, :meth:`reset` drops
    them. Kept across steps: ``dead`` (the rolling dead-unit state of each ReLU site, updated at step close) and
    ``order``.
    """

    MAX_PENDING_PASSES = 64
    """Forward passes that no backward pass has reached yet (the one running included), kept waiting for one: a loss
    over several forward passes (siamese or contrastive views, micro-batch losses summed before one backward) counts
    the activations of all of them up to this many. Beyond it the oldest waiting pass loses its activation parts (its
    gradient hooks stay, so backprop signals still add up every pass; :attr:`evicted_reached` counts the passes a
    backward pass reached after that), so an evaluation loop run with grad enabled holds bounded memory."""

    BATCHED_DEVICES: tuple = ("cuda",)
    """Device types where hooks leave their reductions to be done together, where each op is a kernel launch (~20 us
    of host time on an H200 host). Output gradients are kept by their hooks and measured together when the backward
    pass ends (one fused ``_foreach_norm``, float64 as :func:`~gradscope.stats.sq_norm`) instead of three launches
    each, ~3 ms of a resnet18 step. Autograd reuses a gradient buffer in place only when nothing else holds it, so a
    kept one keeps its value, unless a later tensor hook or a custom Function's backward changes it in place (which
    PyTorch asks hooks not to do): its version counter tells, gradscope warns, and measures that site in its hook
    from then on (:meth:`_changed_in_place`). ReLU sites keep their per-sample totals, counted for
    the whole forward pass with one matmul (:func:`~gradscope.activations.count_fired`). On CPU ops are cheap and the
    extra copies are not: it measures at once."""

    BATCH_BYTES = 32 << 20
    """Output gradients are kept until more than this many bytes of them wait, then measured there and then: the peak
    memory keeping may add is this plus one gradient (and the sums autograd then makes out of place)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], *, dead_window: int = 1000,
                 saturation_eps: float = 0.02, unit_dims: dict | None = None, functional: bool = True):
        self.active = False
        self.attached = True
        self.signal_parts: list[tuple[str, Tensor]] = []  # (site, squared norm of dLoss/d(output)), this step
        self._kept: list[tuple] = []  # (sites, dLoss/d(output), its version) kept to be measured together (CUDA)
        self.changed_in_place: set[str] = set()  # sites whose kept gradient was changed after the hook: not kept
        self.unsummed: set[str] = set()  # sites whose gradient was a Partial DTensor this step: no signal (_local_grad)
        self.unsummed_seen: set[str] = set()  # those ever seen (said once each)
        self.local_sites: set[str] = set()  # ReLU sites and output gradients measured on a DTensor's local part
        self._kept_bytes = 0
        self._kept_stream = None  # the CUDA stream the kept gradients were made on
        self._kept_task = None  # the backward pass whose end is set to measure them
        self._kept_lock = threading.Lock()  # each device's backward runs on its own thread
        self._end_of_backward = _torch.end_of_backward_callback()
        self.functional_forwards = 0  # forward passes watched for functional activations (see _watch_functional)
        self._passes: list[_Pass] = []  # this step's forward passes, in order
        self._waiting: list[_Pass] = []  # those no backward pass had reached when the last pass started
        self._evicted: list[_Pass] = []  # passes whose parts were dropped while they waited: their hooks stay
        self.evicted_reached = 0  # evicted passes a backward pass reached later (gather() counts them), all steps
        self._step_modules: set[str] = set()  # modules whose outputs got a tensor hook this step
        self.unmonitored: set[str] = set()  # modules run only by reentrant activation checkpointing (see _on_forward)
        self.order: dict[str, str] = {}  # call site -> module name, in forward order of first call
        self.functional_sites: dict[str, str] = {}  # functional call site -> activation kind
        self.function_owners: set[str] = set()  # the modules whose own forward makes those calls
        self._probed: set[str] = set()  # the modules that ran with the mode on (see _watch_functional)
        self.dead_bank = DeadUnitBank(dead_window)
        self.dead: dict[str, DeadUnitState] = self.dead_bank.sites
        self.through_time: dict[str, TimeProfile] = {}
        self.broadcast_sites: set[str] = set()  # sigmoid/tanh sites whose output broadcasts over positions: gates
        self.saturation_eps = saturation_eps
        self._ones: dict = {}  # rows of ones fired_counts() reuses, by (batch size, device)
        self.unit_dims = dict(unit_dims or {})
        self.module_kinds: dict[str, str] = {}
        self.inplace_modules: set[str] = set()
        self._fwd = _ForwardState()
        self.functional = functional
        self._handles: list = []
        self._params = params
        self._grad_marks = [None] * len(params)
        self._backward_flag = False  # set by parameter hooks, when watch_backward() added them
        self._param_hook_dicts_were_none: list[nn.Parameter] = []
        self._module_handles: list = []  # per-module hooks, removed between collected steps when every > 1
        self._hook_specs: list | None = None  # (module, kind, hook function), made once
        self._model = model
        self.profile_modules: set[str] = set()
        self.on_new_forward = None  # called with no argument when a root forward starts (the scope's AMP check)
        self.on_params_changed = None  # called with no argument after model.load_state_dict() (it may assign)
        _torch.check()
        try:
            self._register(model, params)
        except BaseException:
            self.remove()  # a module that refuses hooks (e.g. a ScriptModule) must not leave the others behind
            raise

    def _register(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self._root = next(n for n, m in model.named_modules() if m is model)
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        self._handles.append(model.register_forward_hook(self._end_forward, always_call=True))
        self._handles.append(model.register_load_state_dict_post_hook(self._after_load_state_dict))
        self._read_tree(model)
        self.arm()

    def _read_tree(self, model: nn.Module) -> None:
        """What each module is (activation kind, inplace, profiled) and where it hangs (see :meth:`tree_changed`)."""
        self.module_kinds, self.inplace_modules, self.profile_modules = {}, set(), set()
        self.finite_modules: set[str] = set()  # finite_from_finite(): their input's NaN/Inf check covers them
        self.activation_functions: dict[str, bool] = {}  # module -> inside_activation(), at its first functional call
        for name, module in model.named_modules():
            kind = module_kind(module)
            if kind is not None:
                self.module_kinds[name] = kind
                if getattr(module, "inplace", False) is True:
                    self.inplace_modules.add(name)
            elif finite_from_finite(module):
                self.finite_modules.add(name)
            owns = any(p.requires_grad for p in module.parameters(recurse=False))
            if owns or next(iter(module.children()), None) is None:
                self.profile_modules.add(name)
        self._tree = Slots([(m._modules, key, child) for m in model.modules() for key, child in m._modules.items()])
        self._tables = list({id(t): t for t in self._tree.tables}.values())

    def tree_changed(self) -> bool:
        """Whether a submodule was replaced, added or removed since the hooks were placed (``model.head = ...``): one
        identity check per module."""
        return self._tree.changed() or sum(map(len, self._tables)) != len(self._tree)

    def rebuild(self) -> None:
        """Place the per-module hooks anew after the module tree changed: on the new modules, none on the old."""
        armed = self.armed
        self.disarm()
        self._hook_specs = None
        self._read_tree(self._model)
        self._probed.clear()  # a replaced module keeps its name: watch it op by op once again
        if armed:
            self.arm()

    def changed_grads(self) -> list[tuple[int, Tensor]]:
        """``(index, .grad)`` of the tracked parameters whose ``.grad`` is new or changed since the last step closed (a
        ``.grad`` no backward pass touched is last step's, left unzeroed, or an orphaned module's)."""
        return [(i, g) for i, (p, mark) in enumerate(zip(self._params, self._grad_marks))
                if _grad_moved(g := p.grad, mark)]

    @property
    def armed(self) -> bool:
        return bool(self._module_handles)

    def arm(self) -> None:
        """Register the per-module hooks (idempotent). Between collected steps they are removed (:meth:`disarm`):
        a module with any hook takes PyTorch's slower call path, ~5 us per call on CPU even when the hook returns at
        once, which is ~2% of a 20-layer MLP step. The hook functions are made once and re-registered as the same
        objects, so a ``torch.compile``-d model sees two hook states, not a new one per collected step."""
        if self._module_handles or not self.attached:
            return
        if self._hook_specs is None:
            self._hook_specs = self._make_hook_specs()
        try:
            for module, kind, fn in self._hook_specs:
                if kind == "enter":
                    handle = module.register_forward_pre_hook(fn, prepend=True)
                elif kind == "recurrent":
                    handle = module.register_forward_pre_hook(fn, with_kwargs=True)
                else:
                    handle = module.register_forward_hook(fn, prepend=True)
                self._module_handles.append(handle)
        except BaseException:
            self.disarm()
            raise

    def _make_hook_specs(self) -> list:
        # forward hooks first (prepend): they see what the module produced, whatever the user's hooks do to it after
        # and whenever those were added; the recurrent input swap last, on the final input
        specs, model = [], self._model
        for name, module in model.named_modules():
            if module is not model:
                specs.append((module, "enter", partial(self._enter_module, name)))
            if self.module_kinds.get(name) == "recurrent":
                specs.append((module, "recurrent", partial(self._recurrent_input, name)))
            if module is model and name not in self.profile_modules:
                continue  # the root container's output is its last child's, or the loss input: nothing new
            specs.append((module, "output", partial(self._on_forward, name)))
        return specs

    def disarm(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    # -- did a backward pass run? ------------------------------------------------------------------------------------
    # Parameter hooks would tell, but each costs a Python call per parameter per backward on every step (~4 us: 1%
    # of a 20-layer MLP step). A backward pass that reaches a parameter either creates its .grad (a new tensor) or
    # accumulates into it in place (its version counter moves); comparing with marks taken when the last step closed
    # tells the same at step close, for a Python loop over the parameters once per step.
    def watch_backward(self) -> None:
        """Add a post-accumulate-grad hook per parameter that flags each backward pass as it happens.

        Needed where a backward pass must be known about after ``optimizer.zero_grad()`` wiped the ``.grad`` evidence:
        the optimizer mode with a GradScaler, which learns of a skipped step at the next forward pass.
        """
        # Parameter hooks live in C++, out of the garbage collector's sight: a hook holding the collector would make
        # model -> parameter -> hook -> collector -> model an uncollectable cycle for a scope never detached.
        self._watching_backward = True
        self._hook_params(self._params)

    def _hook_params(self, params) -> None:
        on_accumulate = partial(_note_backward, weakref.ref(self))
        for p in params:
            if getattr(p, "_post_accumulate_grad_hooks", None) is None:
                self._param_hook_dicts_were_none.append(p)
            self._handles.append(p.register_post_accumulate_grad_hook(on_accumulate))

    _watching_backward = False

    def set_params(self, params: list[nn.Parameter]) -> None:
        """Follow a new list of tracked parameters (the model's were replaced: ``load_state_dict(..., assign=True)``,
        or a parameter attribute set anew). Parameters not seen before count as reached by a backward pass if they
        hold a ``.grad``."""
        old = {id(p) for p in self._params}
        marks = dict(zip(map(id, self._params), self._grad_marks))
        self._grad_marks = [marks.get(id(p)) for p in params]
        self._params = list(params)
        if self._watching_backward:
            self._hook_params([p for p in params if id(p) not in old])

    def params_replaced(self, params: list[nn.Parameter]) -> bool:
        return len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params))

    def _after_load_state_dict(self, module, incompatible_keys) -> None:
        if not self._inert(module) and self.on_params_changed is not None:
            self.on_params_changed()

    @property
    def backward_seen(self) -> bool:
        if self._backward_flag:
            return True
        return any(_grad_moved(p.grad, mark) for p, mark in zip(self._params, self._grad_marks))

    def mark_grads(self) -> None:
        """Remember every parameter's ``.grad`` as it is now: the next :attr:`backward_seen` compares with this. A mark
        is a weak reference to the tensor and its version counter (or None; a sharded gradient's: its local shard's,
        which FSDP2 accumulates into). One comprehension: it runs on every step, collected or not."""
        ref, plain = weakref.ref, _PLAIN
        self._grad_marks = [None if (g := p.grad) is None else (ref(g), (g if type(g) in plain else local(g))._version)
                            for p in self._params]
        self._backward_flag = False

    def __deepcopy__(self, memo):
        """A deep copy of a watched model (an EMA copy, say) gets hooks that do nothing: it is not the watched model."""
        memo[id(self)] = inert = _inert_collector()
        return inert

    def __reduce__(self):
        """A pickled watched model (``torch.save(model)``, a checkpoint) loads as an unwatched one: its copies of these
        hooks do nothing and remove themselves at its first forward pass (see :meth:`_purge`)."""
        return _inert_collector, ()

    def _purge(self, model: nn.Module) -> None:
        """Remove every hook of this (inert) collector from ``model`` and its submodules."""
        for m in model.modules():
            for table in ("_forward_pre_hooks", "_forward_hooks", "_load_state_dict_post_hooks"):
                hooks = getattr(m, table, None) or {}
                for hid in [hid for hid, fn in hooks.items() if _owner(fn) is self]:
                    del hooks[hid]
                    for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                                  "_forward_hooks_always_called"):
                        getattr(m, extra, {}).pop(hid, None)

    def _live(self) -> bool:
        # _in_backward: activation checkpointing re-runs forwards during backward; those are not new calls
        return self.active and self.attached and not _in_backward()

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _inert(self, module) -> bool:
        """True for a collector that is not attached; an inert copy's (a pickled or deep-copied watched model, or
        submodule) hooks remove themselves from ``module`` and below on their first call."""
        if self.attached:
            return False
        if not hasattr(self, "_handles"):
            self._purge(module)
        return True

    def _new_forward(self, module, args):
        if self._inert(module):
            return
        st = self._fwd
        if st.depth > 0 and st.frame is not None and self._stale(st, sys._getframe(1).f_back):
            self._leave_forward()  # a forward pass cut short by a KeyboardInterrupt: no hook saw it end
        if st.depth == 0 and self.on_new_forward is not None:
            self.on_new_forward()
        st.depth += 1
        if st.depth > 1 or not self._live():
            return
        st.calls.clear()
        st.stack = [self._root]
        # the frame that runs the root's hooks and forward (nn.Module._call_impl's); not under torch.compile
        st.frame = sys._getframe(1) if self._frames_ok and not _is_compiling() else None
        if torch.is_grad_enabled():  # a pass under no_grad can never be reached by a backward pass
            self._open_pass(st)
        if self.functional and torch.is_grad_enabled() and not _is_compiling():  # (compiled: no mode is traced)
            watch = self._watch_functional()
            if watch == "pass":
                st.mode = FunctionalCalls(self._on_function)
                st.mode.__enter__()
            elif watch == "owners":
                st.scoped = True

    FUNCTIONAL_PROBE_EVERY = 50
    """The mode is entered for the whole forward pass on the first 3 collected forward passes and then on every 50th
    (its Python dispatch of every op costs ~2% of a resnet18 step on CPU); on the others, only inside the modules
    whose own forward made a functional activation call (a block's ``F.relu``) and inside any module running for the
    first time with the mode on (a branch first taken later: an expert, a new head), so that a model with a few such
    calls does not pay for every op of its forward (~2 ms of a 25 ms GPT-2 forward). Functional calls the root module
    makes itself keep the mode on for the whole pass. The sigmoid/tanh inside an activation function (GPT-2's
    ``NewGELUActivation``) is no site (:func:`gradscope.anatomy.inside_activation`), so its module is no owner."""

    def _watch_functional(self) -> str:
        """How this collected forward pass watches functional calls: ``"pass"`` (the whole pass) or ``"owners"``
        (inside :attr:`function_owners` and modules not yet watched)."""
        n = self.functional_forwards
        self.functional_forwards += 1
        if n < 3 or n % self.FUNCTIONAL_PROBE_EVERY == 0 or self._root in self.function_owners:
            return "pass"
        return "owners"

    def _open_pass(self, st) -> _Pass:
        """Start recording a new forward pass on this thread; drop the oldest pass still waiting for a backward pass
        beyond :attr:`MAX_PENDING_PASSES`."""
        waiting, passes = self._waiting, self._passes
        prev = st.cur  # this thread's pass just finished (nn.DataParallel: other threads' may still run)
        if prev is not None and prev.dead_parts:  # count what its ReLU sites kept, and let it go
            with _no_function_mode():
                prev.dead_parts = count_fired(prev.dead_parts, self._ones)
        if passes and not passes[-1].reached:  # the pass just finished
            if passes[-1].hooks:
                waiting.append(passes[-1])
            else:
                passes.pop()  # nothing in it can be reached by a backward pass (no output needed grad)
        if len(waiting) >= self.MAX_PENDING_PASSES:
            self._waiting = waiting = [p for p in waiting if not p.reached]
            if len(waiting) >= self.MAX_PENDING_PASSES:
                evicted = waiting[:len(waiting) - self.MAX_PENDING_PASSES + 1]
                del waiting[:len(evicted)]
                for p in evicted:
                    p.evict()
                gone = set(map(id, evicted))
                self._passes = [p for p in passes if id(p) not in gone]
                if len(self._evicted) > 4 * self.MAX_PENDING_PASSES:  # their tensors die with the evaluation outputs
                    self._evicted = [p for p in self._evicted if p.alive()]
                self._evicted += evicted
        st.cur = p = _Pass()
        self._passes.append(p)
        return p

    @staticmethod
    def _stale(st, frame) -> bool:
        """Whether the root forward pass this thread's state says is running has in fact ended: its frame is not on
        the stack above ``frame`` (PyTorch's ``always_call`` forward hooks run after an ``Exception``, not after a
        ``KeyboardInterrupt`` or another ``BaseException``). Without a frame (under torch.compile) it cannot tell."""
        return st.frame is not None and Collector._stale_frame(st.frame, frame)

    @staticmethod
    def _stale_frame(target, frame) -> bool:
        """Whether ``target`` is not on the stack from ``frame`` up (its call has ended)."""
        while frame is not None:
            if frame is target:
                return False
            frame = frame.f_back
        return True

    _frames_ok = True  # the root's pre-hook and forward hook run in one frame, which runs its forward (see _stale)

    def _end_forward(self, module, args, output):
        st = self._fwd
        st.depth = max(0, st.depth - 1)
        if st.depth == 0:
            if st.frame is not None and sys._getframe(1) is not st.frame:
                self._frames_ok = False  # a PyTorch that calls hooks otherwise: stop judging staleness by frames
            self._leave_forward()

    def _leave_forward(self) -> None:
        st = self._fwd
        if st.mode is not None:
            mode, st.mode = st.mode, None
            _torch.leave_function_mode(mode)
        st.scoped, st.scope_at = False, 0
        st.stack = []
        st.depth = 0
        st.forget_outputs()
        st.frame = None

    def _enter_module(self, name: str, module, args):
        st = self._fwd
        if st.depth == 0:
            self._enter_rootless(module)
        elif st.mode is not None:  # the stack only names functional calls
            if self._live():
                st.stack.append(name)
                self._probed.add(name)
        elif st.scoped and (name in self.function_owners or name not in self._probed) and self._live() \
                and not _is_compiling():
            self._probed.add(name)
            st.stack.append(name)
            st.scope_at = len(st.stack)  # left when this call's forward hook pops it
            st.mode = FunctionalCalls(self._on_function)
            st.mode.__enter__()

    def _enter_rootless(self, module) -> None:
        """A submodule called while the root is not running (``self.encoder(x)`` in a Lightning ``training_step``):
        its outermost call starts a forward pass, as the root's would, so call sites do not multiply per call."""
        if self._inert(module) or not self._live() or _is_compiling():
            return
        st = self._fwd
        caller = sys._getframe(2)  # the frame that runs this module's hooks and forward
        outer = st.sub_frame
        if outer is not None and not self._stale_frame(outer, caller.f_back):
            return  # inside the outermost call
        st.sub_frame = caller
        st.calls.clear()
        st.forget_outputs()
        if torch.is_grad_enabled():
            self._open_pass(st)

    def _next_site(self, base: str) -> str:
        calls = self._fwd.calls
        call = calls.get(base, 0) + 1
        calls[base] = call
        return site_name(base, call)

    def _on_forward(self, name: str, module, args, output):
        # the hot path of every module call on a collected step: _live() and _next_site() inlined
        if not (self.active and self.attached):
            self._inert(module)
            return
        if not _is_compiling() and _graph_task_id() != -1:
            # a forward re-run by activation checkpointing. A module whose output got no tensor hook this step ran
            # its forward without autograd: torch.utils.checkpoint(..., use_reentrant=True). It gets none now either.
            if name not in self._step_modules and torch.is_grad_enabled():
                self.unmonitored.add(name)
            return
        st = self._fwd
        if st.stack and st.stack[-1] == name:
            if st.scope_at == len(st.stack):  # the module the scoped mode was entered for ends
                mode, st.mode, st.scope_at = st.mode, None, 0
                _torch.leave_function_mode(mode)
            st.stack.pop()
        elif st.depth == 0 and st.sub_frame is not None and sys._getframe(1) is st.sub_frame:
            st.sub_frame = None  # the outermost call of a submodule (see _enter_rootless) ends: drop its frame
            st.forget_outputs()
        call = st.calls.get(name, 0) + 1
        st.calls[name] = call
        site = name if call == 1 else site_name(name, call)
        if not torch.is_grad_enabled():
            return
        if st.mode is None and not _function_mode_on():
            self._record_output(name, site, args, output)
        else:
            with _no_function_mode():
                self._record_output(name, site, args, output)

    def _needs_check(self, args, inplace: bool = False) -> bool:
        """Whether an activation site's output needs its own NaN/Inf check.

        ReLU, sigmoid and tanh make NaN/Inf only from NaN/Inf inputs, so when the input is the output just checked,
        unchanged since (``Linear -> ReLU``, ``BatchNorm -> ReLU(inplace=True)``, whose own change is the one allowed),
        that check already names the first module producing it.
        """
        st = self._fwd
        if not args or args[0] is not st.checked or st.checked is None:
            return True
        return args[0]._version != st.checked_version + (1 if inplace else 0)

    def _set_checked(self, t, check) -> None:
        st = self._fwd
        st.checked = t if isinstance(t, Tensor) else None
        st.checked_version = t._version if st.checked is not None else 0
        st.check = check

    def _record_output(self, name: str, site: str, args, output) -> None:
        kind = self.module_kinds.get(name)
        st = self._fwd
        cur = st.cur or self._open_pass(st)
        check = None
        activation = kind in ("relu", "sigmoid", "tanh")
        if activation and isinstance(output, Tensor):
            check = self._observe(cur, site, kind, output, self._needs_check(args, name in self.inplace_modules))
            if check is None:  # a ReLU of the output just checked: that check covers this one (see _needs_check)
                self._set_checked(output, st.check)
        tensors = _tensors(output)
        if not tensors:
            return
        if site not in self.order:
            self.order[site] = name
        one = tensors[0] if len(tensors) == 1 else None
        if check is None and not activation:
            if one is not None and one is st.checked and one._version == st.checked_version:
                # a block, a Sequential or an (output, None) tuple returning what its last module returned, unchanged
                check = st.check
            elif one is not None and name in self.finite_modules and one.dtype is not torch.float16 \
                    and not self._needs_check(args):
                # dropout, flatten, max-pool, GELU of the output just checked, unchanged: finite whenever its input
                # is, so that check stands for both (an in-place dropout counts as changed: in eval mode it is not)
                check = st.check
            else:
                floats = [local(t).detach().sum(dtype=torch.float32) for t in tensors if t.is_floating_point()]
                check = floats[0] if len(floats) == 1 else torch.stack(floats).sum() if floats else None
        if check is not None:
            cur.output_parts.append((site, check))
            self._set_checked(one if one is not None else output, check)
        cur.hooked.add(site)
        cur.hooks = True
        self._step_modules.add(name)
        if one is not None and one is st.hooked and one._version == st.hooked_version and (
                one._base is None or _hook_target(one, args) is st.hooked_target):
            st.hooked_sites.append(site)  # the tensor a submodule returned, unchanged: its hook reports for both
            return
        sites = [site]
        hook = partial(self._on_grad, sites, cur)
        for t in tensors:
            target = t if t._base is None else _hook_target(t, args)
            cur.handles.append(target.register_hook(hook))
        if one is not None:
            st.hooked, st.hooked_version, st.hooked_sites, st.hooked_target = one, one._version, sites, target

    def _on_function(self, kind: str, out: Tensor, inp) -> None:
        # outputs that need no grad (masks, metrics) take no part in learning; a stale state: a mode left entered by
        # a forward pass a KeyboardInterrupt cut short, seeing the user's own calls
        st = self._fwd
        if not self._live() or not out.requires_grad or st.depth == 0 or (
                st.frame is not None and self._stale(st, sys._getframe(1))):
            return
        owner = st.stack[-1] if st.stack else self._root
        if self.module_kinds.get(owner) in ("relu", "sigmoid", "tanh"):
            return  # nn.ReLU's own F.relu: the module is the site
        if kind != "relu":
            inside = self.activation_functions.get(owner)
            if inside is None:  # decided now, not at watch(): a lazy layer creates its parameters in its first forward
                inside = self.activation_functions[owner] = inside_activation(self._model.get_submodule(owner))
            if inside:
                return  # GELU's tanh, SiLU's sigmoid: part of an activation function, not a site (inside_activation)
        cur = st.cur or self._open_pass(st)
        site = self._next_site(f"{owner}:{kind}")
        if site not in self.order:
            self.order[site] = owner
        self.functional_sites[site] = kind
        self.function_owners.add(owner)
        with _no_function_mode():
            check = self._observe(cur, site, kind, out, self._needs_check((inp,), out is inp))
        if check is not None:
            cur.output_parts.append((site, check))
            self._set_checked(out, check)

    def _observe(self, cur: _Pass, site: str, kind: str, out: Tensor, check: bool = True) -> Tensor | None:
        """Record a ReLU/sigmoid/tanh output in the pass ``cur``; return the sum of the outputs (the site's forward
        NaN/Inf check), or None for a ReLU whose input was just checked. A ``DTensor`` output (tensor parallelism) is
        measured on this rank's local part (see :func:`gradscope.sharded.local`)."""
        if type(out) not in _PLAIN:
            out = local(out)
            if kind == "relu":
                self.local_sites.add(site)  # its units are this rank's (see Scope._collect under reduce_ranks)
        if kind == "relu":
            counts, total, n = fired_counts(out, self.unit_dims.get(site, unit_dim(out.ndim)), check, self._ones,
                                            out.device.type in self.BATCHED_DEVICES)
            cur.dead_parts.append((site, counts, n))
            return total
        if out.ndim >= 4 and all(d == 1 for d in out.shape[2:]):
            self.broadcast_sites.add(site)  # (N, C, 1, 1): a squeeze-excite style gate
        saturated, check, numel = saturation_counts(out, kind, self.saturation_eps)
        cur.saturation_parts.append((site, saturated, check, numel))
        return check

    def _recurrent_input(self, name: str, module, args, kwargs):
        if self._inert(module) or not self._live() or not torch.is_grad_enabled():
            return None
        keyword = not args
        x = kwargs.get("input") if keyword else args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None  # a PackedSequence: its packed layout has no per-step axis to read
        if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
            return None  # a frozen layer on data: giving it a differentiable input would build a graph through it
        site = site_name(name, self._fwd.calls.get(name, 0) + 1)  # the call the forward hook will name
        with _no_function_mode():
            x2 = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
        batch_dim = None if x.ndim == 2 else (0 if getattr(module, "batch_first", False) else 1)
        st = self._fwd
        cur = st.cur or self._open_pass(st)
        cur.hooks = True
        cur.handles.append(x2.register_hook(partial(self._on_time_grad, site, batch_dim)))
        if keyword:
            return args, {**kwargs, "input": x2}
        return (x2,) + tuple(args[1:]), kwargs

    def _on_time_grad(self, site: str, batch_dim, grad: Tensor):
        if not self.attached or grad is None:
            return
        tracker = self.through_time.get(site)
        if tracker is None:
            tracker = self.through_time[site] = TimeProfile()
        tracker.observe_grad(local(grad), batch_dim)

    def _on_grad(self, sites: list, cur: _Pass, grad: Tensor):
        if not self.attached or grad is None:
            return
        cur.reached = True
        if type(grad) not in _PLAIN and (grad := self._local_grad(sites, grad)) is None:
            return
        if grad.device.type in self.BATCHED_DEVICES and self._end_of_backward is not None and not _is_compiling() \
                and sites[0] not in self.changed_in_place:
            self._keep(sites, grad)
        elif len(sites) == 1:
            self.signal_parts.append((sites[0], sq_norm(grad)))
        else:
            sq = sq_norm(grad)
            self.signal_parts.extend((site, sq) for site in sites)

    def _local_grad(self, sites: list, grad: Tensor) -> Tensor | None:
        """The part of a ``DTensor`` output's gradient (tensor parallelism) this rank measures: its local shard (a
        sharded output's units on this rank; a replicated one's whole), or None for a ``Partial`` gradient, whose local
        tensor is one rank's summand of it (a column-parallel layer's input gradient before the all-reduce): no norm of
        it can be had without gathering, so these sites get no backprop signal this step (not a zero one), said once."""
        partial = any(p.is_partial() for p in getattr(grad, "placements", ()))
        with self._kept_lock:
            self.local_sites.update(sites)
            if not partial:
                return local(grad)
            self.unsummed.update(sites)
            new = [site for site in sites if site not in self.unsummed_seen]
            self.unsummed_seen.update(new)
        if new:
            warnings.warn(
                f"gradscope: dLoss/d(output) of {', '.join(new)} is a Partial DTensor (each rank holds a summand; "
                "tensor parallelism sums them later): its backprop signal is not recorded, since measuring it would "
                "mean gathering the gradient. Its activation statistics are of this rank's part.", stacklevel=2)
        return None

    def _keep(self, sites: list, grad: Tensor) -> None:
        """Keep ``grad`` to be measured with the others of this backward pass (see :attr:`BATCHED_DEVICES`)."""
        stream = torch.cuda.current_stream(grad.device) if grad.is_cuda else None
        task = _graph_task_id()
        with self._kept_lock:
            if self._kept and stream != self._kept_stream:
                self._measure_kept()  # another device or stream: those made so far are measured on theirs
            self._kept.append((sites, grad, grad._version))
            self._kept_stream = stream
            self._kept_bytes += grad.numel() * grad.element_size()
            if self._kept_bytes > self.BATCH_BYTES:
                self._measure_kept()
            if task != self._kept_task:  # the first gradient kept in this backward pass: measure at its end
                self._kept_task = task
                self._end_of_backward(self._backward_ended)

    def _backward_ended(self) -> None:
        with self._kept_lock:
            self._kept_task = None
            self._measure_kept()

    def _measure_kept(self) -> None:
        """Squared norms of the kept gradients, appended to ``signal_parts``; the caller holds ``_kept_lock``."""
        kept, stream = self._kept, self._kept_stream
        self._kept, self._kept_bytes = [], 0
        if not kept:
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            squares = norms([g for _, g, _ in kept]).square()  # float64, one fused kernel per dtype
        changed = [sites for sites, g, version in kept if g._version != version]
        if changed:
            self._changed_in_place(changed)
        if stream is not None:
            current = torch.cuda.current_stream(stream.device)
            if current != stream:
                current.wait_stream(stream)  # the step reads them on the stream it runs on
        self.signal_parts.extend((site, sq) for (sites, _, _), sq in zip(kept, squares.unbind()) for site in sites)

    def _changed_in_place(self, changed: list) -> None:
        """Kept gradients that something changed in place after gradscope's hook saw them: a later tensor hook (which
        PyTorch asks not to modify its argument) or a custom autograd Function's backward. Their value this step is
        the changed one; from now on these sites are measured in their hook, as on CPU. Said once per site."""
        new = [site for sites in changed for site in sites if site not in self.changed_in_place]
        self.changed_in_place.update(new)
        if new:
            warnings.warn(
                f"gradscope: dLoss/d(output) of {', '.join(new)} was changed in place after gradscope's gradient hook "
                "saw it (by a later tensor hook or a custom autograd Function's backward; PyTorch asks hooks not to "
                "modify their argument). Its backprop signal this step is of the changed gradient; from the next "
                "step on gradscope measures it inside its hook, before the change", stacklevel=2)

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def gather(self) -> StepBuffers:
        """This step's buffers: the forward-side parts of the forward passes that a backward pass reached, in order
        (a pass no backward pass reached is an evaluation or a generation, not a training batch), and the
        backward-side parts."""
        with self._kept_lock:  # a backward pass that raised never reached its end
            self._measure_kept()
        reached = [p for p in self._passes if p.reached]
        self.evicted_reached += sum(p.reached for p in self._evicted)
        with _no_function_mode():
            dead_parts = count_fired([x for p in reached for x in p.dead_parts], self._ones)
        unsummed = self.unsummed  # a signal that is partly a Partial DTensor's is no signal (see _local_grad)
        return StepBuffers(signal_parts=[x for x in self.signal_parts if x[0] not in unsummed] if unsummed
                           else list(self.signal_parts),
                           output_parts=[x for p in reached for x in p.output_parts],
                           dead_parts=dead_parts,
                           saturation_parts=[x for p in reached for x in p.saturation_parts],
                           hooked=set().union(*(p.hooked for p in reached)) - unsummed,
                           through_time={site: t.profile for site, t in self.through_time.items()})

    def reset(self) -> None:
        """Start a new step: drop buffers and the tensor hooks of tensors from the finished step."""
        self.signal_parts = []
        self.unsummed = set()
        with self._kept_lock:
            self._kept, self._kept_bytes, self._kept_task = [], 0, None
        self.through_time = {}
        self._leave_forward()  # steps close outside forward passes: a mode still entered was left by an interrupt
        self._fwd.calls.clear()
        self._fwd.cur = None
        self._fwd.sub_frame = None
        for p in self._passes + self._evicted:
            p.release()
        self._passes, self._waiting, self._evicted = [], [], []
        self._step_modules = set()

    def remove(self) -> None:
        """Remove every hook this collector added. Idempotent."""
        self.attached = False
        self.reset()
        self.disarm()
        self._ones.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._param_hook_dicts_were_none:
            if not p._post_accumulate_grad_hooks:
                p._post_accumulate_grad_hooks = None
        self._param_hook_dicts_were_none.clear()
