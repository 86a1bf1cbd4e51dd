import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope

from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset
from gradscope.bench.models import deep_mlp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    gc.collect()


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


def train_watched(model, steps, batch, lr=0.01, **watch_kwargs):
    """``steps`` SGD steps of cross-entropy on ``batch()`` with a scope attached; returns the detached scope."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scope = gradscope.watch(model, **watch_kwargs)
    for _ in range(steps):
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        scope.step()
        opt.step()
        opt.zero_grad()
    scope.detach()
    return scope


@pytest.fixture
def run_file(tmp_path):
    """A saved run: a 10-layer sigmoid MLP collected on steps 0, 2, 4, vanishing alerts, a NaN input at step 4."""
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
    path = tmp_path / "run.jsonl"
    scope.save(path)
    return scope, path
