"""Every statistic against values computed here from p.grad and plain autograd, on an unwatched copy of the model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.models import deep_mlp
from conftest import hook_entries, rel_close


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.Sigmoid(), nn.Linear(32, 10))


def reference(model, x, y, loss_fn=F.cross_entropy):
    """Param grads and dLoss/d(output) of every leaf module, from a plain forward + torch.autograd.grad."""
    outs, names = [], []

    def keep(name):
        def hook(module, args, output):
            if not output.requires_grad:
                return
            outs.append(output)
            names.append(name)
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n and not list(m.children())]
    loss = loss_fn(model(x), y)
    for h in hooks:
        h.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, outs + params)
    signal = {n: float(g.norm()) for n, g in zip(names, grads[:len(outs)])}
    return signal, dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads[len(outs):]))


EXTRAS = ("grad_max", "grad_zero_frac", "weight_norm")


def check_param_stats(scope, ref_grads, model, extras=True):
    per_param = scope.latest(per="param")
    named = dict(model.named_parameters())
    assert set(per_param) == set(ref_grads)
    for name, g in ref_grads.items():
        st = per_param[name]
        assert rel_close(st["grad_norm"], float(g.norm()))
        assert rel_close(st["grad_rms"], float(g.pow(2).mean().sqrt()), 1e-5)
        assert st["grad_nonfinite"] == 0
        if not extras:
            assert not set(EXTRAS) & st.keys()  # opt-in only
            continue
        assert rel_close(st["grad_max"], float(g.abs().max()))
        assert st["grad_zero_frac"] == pytest.approx(float((g == 0).float().mean()), abs=1e-7)
        assert rel_close(st["weight_norm"], float(named[name].detach().norm()))


@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("make", [small_cnn, lambda: deep_mlp(6, 32, "tanh", in_features=3 * 8 * 8)])
def test_statistics_match_autograd(make, extras):
    model = make()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    ref_model = copy.deepcopy(model)
    signal, ref_grads = reference(ref_model, x, y)

    scope = gradscope.watch(model, extra_stats="all" if extras else ())
    F.cross_entropy(model(x), y).backward()
    scope.step()
    check_param_stats(scope, ref_grads, model, extras)

    latest = scope.latest()
    for name, s in signal.items():
        assert rel_close(latest[name]["backprop_signal"], s), name
    # layer aggregates: the norm over all of a layer's parameter gradients
    for lname, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        gs = [ref_grads[f"{lname}.{n}"] for n in own]
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
        numel = sum(g.numel() for g in gs)
        assert rel_close(latest[lname]["grad_norm"], total)
        assert rel_close(latest[lname]["grad_rms"], total / math.sqrt(numel))
        if not extras:
            assert not set(EXTRAS) & latest[lname].keys()
            continue
        assert rel_close(latest[lname]["weight_norm"], math.sqrt(sum(float(p.detach().norm()) ** 2 for p in module.parameters(
            recurse=False))))
        assert rel_close(latest[lname]["grad_max"], max(float(g.abs().max()) for g in gs))
        zeros = sum(int((g == 0).sum()) for g in gs)
        assert latest[lname]["grad_zero_frac"] == pytest.approx(zeros / numel, abs=1e-7)
    scope.detach()


def test_zero_fraction_counts_exact_zeros():
    lin = nn.Linear(4, 3)
    scope = gradscope.watch(lin, extra_stats="grad_zero_frac")
    x = torch.randn(5, 4)
    x[:, 1] = 0  # column 1 of the weight gradient is exactly zero
    lin(x).sum().backward()
    scope.step()
    assert scope.latest(per="param")["weight"]["grad_zero_frac"] == pytest.approx(3 / 12)
    assert scope.latest()[""]["grad_zero_frac"] == pytest.approx(3 / 15)  # root owns the params: named ""


def test_gradient_accumulation_sums_signal_and_reads_accumulated_grads():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    ys = [torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,))]
    sig_sq = {}
    for x, y in zip(xs, ys):
        s, _ = reference(ref, x, y)
        for k, v in s.items():
            sig_sq[k] = sig_sq.get(k, 0.0) + v * v
        F.cross_entropy(ref(x), y).backward()

    scope = gradscope.watch(model)
    for x, y in zip(xs, ys):
        F.cross_entropy(model(x), y).backward()
    scope.step()
    for k, v in sig_sq.items():
        assert rel_close(scope.latest()[k]["backprop_signal"], math.sqrt(v))
    for name, p in ref.named_parameters():
        assert rel_close(scope.latest(per="param")[name]["grad_norm"], float(p.grad.norm()))
    scope.detach()


class Shared(nn.Module):
    """One Linear used twice per forward, one frozen layer, one branch unused on odd steps."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.act = nn.Tanh()
        self.branch = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)
        self.use_branch = True

    def forward(self, x):
        h = self.act(self.lin(x))
        h = self.act(self.lin(self.frozen(h)))
        if self.use_branch:
            h = h + self.branch(h)
        return self.head(h)


def test_call_sites_frozen_and_missing_grads():
    model = Shared()
    x, y = torch.randn(7, 5), torch.randint(0, 2, (7,))
    outs = {}

    def keep(name):
        return lambda m, a, o: outs.setdefault(name, []).append(o)

    ref = copy.deepcopy(model)
    hs = [getattr(ref, n).register_forward_hook(keep(n)) for n in ("lin", "act", "frozen")]
    loss = F.cross_entropy(ref(x), y)
    for h in hs:
        h.remove()
    g_lin = torch.autograd.grad(loss, outs["lin"] + outs["act"] + outs["frozen"])

    scope = gradscope.watch(model)
    F.cross_entropy(model(x), y).backward()
    scope.step()
    latest = scope.latest()
    assert rel_close(latest["lin"]["backprop_signal"], float(g_lin[0].norm()))
    assert rel_close(latest["lin#2"]["backprop_signal"], float(g_lin[1].norm()))
    assert rel_close(latest["act#2"]["backprop_signal"], float(g_lin[3].norm()))
    assert rel_close(latest["frozen"]["backprop_signal"], float(g_lin[4].norm()))
    assert "grad_norm" not in latest["frozen"]  # frozen: not tracked
    assert not any(k.startswith("frozen.") for k in scope.latest(per="param"))
    assert "grad_norm" not in latest["lin#2"]  # parameter statistics live under the module's own name
    assert "branch.weight" in scope.latest(per="param")

    model.use_branch = False
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    scope.step()
    assert "branch.weight" not in scope.latest(per="param")  # no gradient this step: left out, not zero
    assert "branch" not in scope.latest()
    scope.detach()


def test_sparse_embedding_gradients():
    emb = nn.Embedding(50, 4, sparse=True)
    scope = gradscope.watch(emb, extra_stats="all")
    idx = torch.tensor([1, 2, 2, 7])
    emb(idx).pow(2).sum().backward()
    scope.step()
    dense = emb.weight.grad.to_dense()
    st = scope.latest(per="param")["weight"]
    assert rel_close(st["grad_norm"], float(dense.norm()))
    assert rel_close(st["grad_max"], float(dense.abs().max()))
    assert st["grad_zero_frac"] == pytest.approx(float((dense == 0).float().mean()))
    scope.detach()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_amp_grad_scaler_reports_unscaled_values(unscale_first):
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    signal, ref_grads = reference(ref, x, y)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scope = gradscope.watch(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if unscale_first:
        scaler.unscale_(opt)
    scope.step(scaler=scaler)
    for name, g in ref_grads.items():
        assert rel_close(scope.latest(per="param")[name]["grad_norm"], float(g.norm()), 1e-5)
    for name, s in signal.items():
        assert rel_close(scope.latest()[name]["backprop_signal"], s, 1e-5)
    assert scope.history.last.info == {"grad_scale": 1024.0, "overflow": False}
    scaler.step(opt)
    scaler.update()
    scope.detach()


def test_amp_overflow_is_a_skipped_step_not_an_alert():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scope = gradscope.watch(model)
    x = torch.randn(3, 4)
    x[0, 0] = float("inf")
    scaler.scale(model(x).sum()).backward()
    assert scope.step(scaler=scaler) == []
    assert scope.history.last.info["overflow"] is True
    assert scope.alerts == []
    scope.detach()


def test_every_n_collects_only_every_nth_step_and_registers_nothing_between():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    scope = gradscope.watch(model, every=3)
    seen, module_hooks = [], []
    model[0].register_forward_hook(lambda m, a, o: seen.append(bool(o._backward_hooks)))  # runs after gradscope's
    for step in range(7):
        module_hooks.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model))
        out = model(torch.randn(2, 3)).sum()
        out.backward()
        scope.step()
    assert scope.history.steps == [0, 3, 6]
    assert seen == [True, False, False, True, False, False, True]  # a tensor hook on collected steps only
    # per-module hooks only around collected steps: 1 (the test's own) + 2 per child (forward and pre-hook)
    assert module_hooks == [7, 1, 1, 7, 1, 1, 7]
    assert scope.num_steps == 7
    scope.detach()
    assert hook_entries(model) == ["0._forward_hooks"]
