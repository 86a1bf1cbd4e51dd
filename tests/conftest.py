import gc
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope

from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset
from gradscope.bench.models import deep_mlp


def pytest_configure(config):
    # Under pytest-xdist (the README's ``-n 2``) each worker gets its share of the cores: two workers with two torch
    # threads each would oversubscribe a 2-core machine.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    # Collect what the test left (scopes, hooks, models in cycles), then freeze the survivors: they are long-lived
    # (imported modules, caches, larger-scoped fixtures), and a full collection over the ~500k objects of torch,
    # Lightning, matplotlib and transformers took ~0.3 s per test, a third of the suite. Objects created later are
    # still collected as before.
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def cifar_root():
    root = find_cifar10_folder()
    if root is None:
        pytest.skip("real CIFAR-10 image folder not found (../shared/data/cifar10-jpg or $GRADSCOPE_CIFAR10_DIR)")
    return root


@pytest.fixture(scope="session")
def cifar_train(cifar_root):
    """3,840 real CIFAR-10 training images (30 batches of 128), normalised."""
    return load_cifar10_subset(cifar_root, "train", n=3840, seed=0)


def hook_entries(model: nn.Module, optimizer=None) -> list[str]:
    """Every hook registered anywhere on the model (and optimizer): empty when nothing is left behind."""
    found = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                     "_load_state_dict_post_hooks"):
            if getattr(m, attr, None):
                found.append(f"{name}.{attr}")
    for name, p in model.named_parameters():
        if getattr(p, "_post_accumulate_grad_hooks", None) is not None:
            found.append(f"{name}._post_accumulate_grad_hooks")
        if p._backward_hooks:
            found.append(f"{name}._backward_hooks")
    if optimizer is not None:
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if getattr(optimizer, attr, None):
                found.append(f"optimizer.{attr}")
    return found


def rel_close(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


class Trained(NamedTuple):
    losses: list  # every step's loss (detached copies)
    params: list  # the parameters after the last step (detached copies)
    scope: object  # the detached scope, None for an unwatched run


def train_loop(model, batch, steps, *, lr=0.01, momentum=0.0, seed=None, watch=None, optimizer_mode=False,
               loss_fn=F.cross_entropy) -> Trained:
    """The tests' training loop: ``steps`` SGD steps of ``loss_fn`` on ``batch() -> (x, y)``.

    ``watch``: ``gradscope.watch`` keyword arguments, or None for an unwatched run; ``optimizer_mode``: steps are closed
    by the optimizer (``watch(..., optimizer=opt)``) instead of ``scope.step()``; ``seed``: reseed torch first (a run
    repeated bitwise, with and without a scope)."""
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    scope = None
    if watch is not None:
        scope = gradscope.watch(model, **watch, **({"optimizer": opt} if optimizer_mode else {}))
    losses = []
    for _ in range(steps):
        x, y = batch()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if scope is not None and not optimizer_mode:
            scope.step()
        opt.step()
        losses.append(loss.detach().clone())
    if scope is not None:
        scope.detach()
    return Trained(losses, [p.detach().clone() for p in model.parameters()], scope)


@pytest.fixture(scope="session")
def _saved_run(tmp_path_factory):
    """Trained once per session: a 10-layer sigmoid MLP collected on steps 0, 2, 4, vanishing alerts, a NaN input at
    step 4. Returns the detached scope and the bytes of its saved log."""
    torch.manual_seed(0)
    model = deep_mlp(10, 32, "sigmoid", in_features=12)
    scope = gradscope.watch(model, every=2, detectors=[gradscope.Vanishing(patience=1), gradscope.Nonfinite()])
    for step in range(5):
        x = torch.randn(8, 12)
        if step == 4:
            x[0, 0] = float("nan")
        F.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
        scope.step()
        model.zero_grad()
    scope.detach()
    path = tmp_path_factory.mktemp("saved-run") / "run.jsonl"
    scope.save(path)
    return scope, path.read_bytes()


@pytest.fixture
def run_file(_saved_run, tmp_path):
    """The saved run of ``_saved_run``, written to this test's own ``tmp_path/run.jsonl``: (scope, path)."""
    scope, data = _saved_run
    path = tmp_path / "run.jsonl"
    path.write_bytes(data)
    return scope, path
