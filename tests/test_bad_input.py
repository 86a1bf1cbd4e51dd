"""Bad input gets a clear exception naming the fix, and leaves no hook behind."""

import pytest
import torch
from torch import nn

import gradscope
from conftest import hook_entries
from gradscope.bench.models import deep_mlp


@pytest.fixture
def model():
    return deep_mlp(3, 8, "relu", in_features=4)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"every": 0}, ValueError, "every must be a positive int"),
    ({"every": -3}, ValueError, "every must be a positive int"),
    ({"every": 1.5}, ValueError, "every must be a positive int"),
    ({"every": True}, ValueError, "every must be a positive int"),
    ({"raise_on": {"nonfinit"}}, ValueError, "unknown alert kinds"),
    ({"optimizer": "sgd"}, TypeError, "torch.optim.Optimizer"),
    ({"scaler": object()}, TypeError, "GradScaler"),
    ({"detectors": [object()]}, TypeError, "not a detector"),
    ({"history": 1}, ValueError, "history size"),
    ({"extra_stats": "grad_min"}, ValueError, r"unknown extra_stats \['grad_min'\]; choose from"),
    ({"extra_stats": ("grad_max", "weights")}, ValueError, r"unknown extra_stats \['weights'\]"),
])
def test_bad_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gradscope.watch(model, **kwargs)
    assert hook_entries(model) == []
    gradscope.watch(model).detach()  # nothing half-registered blocks a correct call


def test_not_a_module():
    with pytest.raises(TypeError, match=r"expects a torch.nn.Module.*gradscope.watch\(model\)"):
        gradscope.watch(lambda x: x)


def test_no_trainable_parameters():
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*unfreeze"):
        gradscope.watch(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradscope.watch(nn.ReLU())
    assert hook_entries(frozen) == []


def test_optimizer_of_another_model(model):
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="updates none of this model"):
        gradscope.watch(model, optimizer=other)
    assert hook_entries(model) == []


def test_watch_twice(model):
    scope = gradscope.watch(model)
    with pytest.raises(ValueError, match="already watched.*detach"):
        gradscope.watch(model)
    scope.detach()
    assert hook_entries(model) == []
    gradscope.watch(model).detach()


def test_step_without_backward(model):
    scope = gradscope.watch(model)
    with pytest.raises(RuntimeError, match="no backward pass.*loss.backward"):
        scope.step()
    model(torch.randn(2, 4)).sum().backward()
    scope.step()
    with pytest.raises(RuntimeError, match="no backward pass"):
        scope.step()  # the same backward cannot close two steps
    assert len(scope.history) == 1 and scope.num_steps == 1  # failed calls corrupt nothing
    scope.detach()


def test_optimizer_step_without_backward_warns_and_records_nothing(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt)
    with pytest.warns(RuntimeWarning, match="no backward pass"):
        opt.step()
    assert scope.num_steps == 0
    scope.detach()


def test_latest_per_must_be_layer_or_param(model):
    scope = gradscope.watch(model)
    with pytest.raises(ValueError, match="'layer' or 'param'"):
        scope.latest(per="module")
    assert scope.latest() == {}
    assert "no step collected yet" in scope.summary()
    scope.detach()


def test_audit_bad_input(model):
    with pytest.raises(TypeError, match="nn.Module"):
        gradscope.audit("model", torch.randn(2, 4))
    with pytest.raises(ValueError, match="loss_fn"):
        gradscope.audit(model, torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scalar loss"):
        gradscope.audit(model, torch.randn(2, 4))
    assert hook_entries(model) == [] and all(p.grad is None for p in model.parameters())
    scope = gradscope.watch(model)
    with pytest.raises(ValueError, match="being watched"):
        gradscope.audit(model, torch.randn(2, 4), torch.tensor([0, 1]), loss_fn=torch.nn.functional.cross_entropy)
    scope.detach()
