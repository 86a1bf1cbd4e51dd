import copy

import torch
import torch.nn.functional as F
import torchvision

import gradscope
from conftest import hook_entries
from gradscope.bench.models import deep_mlp


def test_audit_reports_the_depth_profile_and_leaves_the_model_untouched():
    model = torchvision.models.resnet18(num_classes=10)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # a gradient the user already had
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rng = torch.get_rng_state()
    report = gradscope.audit(model, x, y, loss_fn=F.cross_entropy)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats restored too
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv1.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert hook_entries(model) == [] and model.training
    profile = report.depth_profile()
    assert profile[0][0] == "conv1" and profile[-1][0] == "fc" and len(profile) == 60
    assert report.alerts == [] and 0.5 < report.decay_factor() < 2
    assert "average factor per layer" in str(report)


def test_audit_flags_a_deep_sigmoid_mlp_at_init():
    model = torch.nn.Sequential(deep_mlp(20, 64, "sigmoid"), torch.nn.Dropout(0.5))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    rng = torch.get_rng_state()
    report = gradscope.audit(model, x, y, loss_fn=F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's random draws do not shift the user's RNG stream
    assert "0.1" in {a.layer for a in report.alerts if a.kind == "vanishing"}
    assert report.decay_factor() < 0.3
    assert "vanishing" in report.summary()
