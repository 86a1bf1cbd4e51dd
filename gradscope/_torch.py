"""Every private PyTorch API gradscope reads, in one place, each failing loudly when PyTorch changes it.

A private name that moves must never turn into a silently wrong number (gradients divided by the loss scale twice
are off by ~65,536x), so nothing here falls back quietly where a fallback would change a result: a missing API raises
:class:`PrivateAPIError` naming it and the PyTorch version. Fallbacks remain only where they cost speed, not truth
(``DisableTorchFunction``, ``_is_torch_function_mode_enabled``). ``tests/test_torch_compat.py`` checks each entry
against the installed PyTorch, so a rename fails CI before it reaches a user.
"""

from __future__ import annotations

import contextlib

import torch


class PrivateAPIError(RuntimeError):
    """A private PyTorch API gradscope relies on is missing or changed in the installed PyTorch."""


def _missing(what: str, used_for: str) -> PrivateAPIError:
    return PrivateAPIError(
        f"gradscope reads {what}, which PyTorch {torch.__version__} does not have ({used_for}); without it gradscope "
        "would report wrong numbers, so it stops instead. Use a PyTorch version gradscope supports (see "
        "pyproject.toml) or upgrade gradscope; please report this at the gradscope issue tracker")


# -- autograd: is a backward pass running? (activation checkpointing re-runs forwards inside one) --------------------
graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
"""-1 outside a backward pass, else the id of the one running on this thread (called on every hooked module call:
the hot path reads it directly, after :func:`check` made sure it exists)."""


def check() -> None:
    """Raise :class:`PrivateAPIError` if an API every scope needs is missing (called by ``watch()``)."""
    if graph_task_id is None:
        raise _missing("torch._C._current_graph_task_id", "to tell a forward re-run by activation checkpointing "
                       "during backward from a new call")


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (never while Dynamo traces: the id is not traceable,
    and a compiled forward is not re-run by checkpointing in eager hooks)."""
    return not is_compiling() and graph_task_id() != -1


def end_of_backward_callback():
    """``queue_callback(fn)`` of the autograd engine: ``fn`` runs once the backward pass in progress on this thread
    has finished (DDP's reducer uses it the same way), or None where PyTorch lacks it. Speed only: without it output
    gradients are measured one by one as they arrive (see :attr:`gradscope.collect.Collector.BATCHED_DEVICES`)."""
    engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
    return getattr(engine, "queue_callback", None)


# -- torch function modes: gradscope's own ops bypass them (speed only, so these may fall back) ----------------------
no_function_mode = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)
function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: True)
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


# -- torch.amp.GradScaler -------------------------------------------------------------------------------------------
def scale_tensor(scaler):
    """The loss scale of the backward pass just run (a device tensor, no sync), or None without scaling (a disabled
    scaler, or one that has not scaled a loss yet)."""
    if scaler is None or not scaler.is_enabled():
        return None
    if not hasattr(scaler, "_scale"):
        raise _missing("GradScaler._scale", "the loss scale as a device tensor, read without a host sync")
    return scaler._scale


def init_scale(scaler) -> float:
    """The scale a GradScaler starts from (its scale tensor exists only after the first ``scale()`` call)."""
    if not hasattr(scaler, "_init_scale"):
        raise _missing("GradScaler._init_scale", "the scale of the first scaled backward pass")
    return float(scaler._init_scale)


def grads_already_unscaled(scaler) -> bool:
    """True once ``scaler.unscale_(opt)`` ran this step (as ``scaler.step`` does before an optimizer hook fires): the
    ``.grad`` values are then true gradients and must not be divided by the scale again."""
    try:
        from torch.amp.grad_scaler import OptState
    except ImportError:
        raise _missing("torch.amp.grad_scaler.OptState", "whether the gradients were already unscaled") from None
    states = getattr(scaler, "_per_optimizer_states", None)
    if not hasattr(OptState, "UNSCALED") or not hasattr(states, "values"):
        raise _missing("GradScaler._per_optimizer_states / OptState.UNSCALED",
                       "whether the gradients were already unscaled")
    return any(st.get("stage") is OptState.UNSCALED for st in states.values())


# -- torch function modes: leave ours even when the user entered one above it ---------------------------------------
def leave_function_mode(mode) -> None:
    """Take ``mode`` off the torch function mode stack, leaving every other mode where it is.

    ``mode.__exit__`` pops whatever is on top; after a ``KeyboardInterrupt`` cut a forward pass short the user may
    have entered a mode of their own above ours (``with torch.device("meta")``), and popping it would switch it off.
    """
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(m is mode for m in stack):
        return
    if stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    pop = getattr(torch._C, "_pop_torch_function_stack", None)
    push = getattr(torch._C, "_push_on_torch_function_stack", None)
    if pop is None or push is None:
        raise _missing("torch._C._pop_torch_function_stack / _push_on_torch_function_stack",
                       "to leave gradscope's function mode from under one the user entered")
    above = []
    while (top := pop()) is not mode:
        above.append(top)
    for m in reversed(above):
        push(m)


# -- hook handles ----------------------------------------------------------------------------------------------------
def handle_alive(handle) -> bool:
    """Whether the tensor a hook handle belongs to still exists (its hook dict is alive); True when unknown."""
    ref = getattr(handle, "hooks_dict_ref", None)
    return ref is None or ref() is not None
