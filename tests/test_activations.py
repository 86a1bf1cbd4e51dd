"""Activation diagnostics against values computed here: dead units, saturation, gradient through time, update ratio."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
from conftest import rel_close, train_loop
from gradscope.bench.models import deep_mlp

N_UNITS, DEAD = 16, [2, 5, 11]


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, N_UNITS)

    def forward(self, x):
        return F.relu(self.lin(x))


class Head(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.out = body, nn.Linear(N_UNITS, 3)

    def forward(self, x):
        return self.out(self.body(x))


def killed(body):
    lin = body.lin if hasattr(body, "lin") else body[0]
    with torch.no_grad():
        lin.bias[DEAD] = -1e3
    return Head(body)


@pytest.mark.parametrize("body,site", [
    (lambda: nn.Sequential(nn.Linear(8, N_UNITS), nn.ReLU()), "body.1"),
    (lambda: nn.Sequential(nn.Linear(8, N_UNITS), nn.ReLU(inplace=True)), "body.1"),
    (FunctionalRelu, "body:relu"),
])
def test_dead_units_exact(body, site):
    model = killed(body())
    scope = gradscope.watch(model, dead_window=400)
    for step in range(5):  # 5 x 100 samples: the window fills at step 3
        F.cross_entropy(model(torch.randn(100, 8)), torch.randint(0, 3, (100,))).backward()
        scope.step()
        model.zero_grad()
        st = scope.latest()[site]
        assert st["dead_fraction"] == len(DEAD) / N_UNITS and st["units"] == N_UNITS
        assert st["dead_window_filled"] == (step >= 3)
    assert scope.dead_units()[site].tolist() == DEAD
    rates = scope.firing_rates()[site]
    assert rates[DEAD].eq(0).all() and rates[[i for i in range(N_UNITS) if i not in DEAD]].gt(0.1).all()
    assert list(scope.dead_units()) == [site]  # nn.ReLU's internal F.relu is not a second site
    scope.detach()


def test_fired_counts_kept_and_counted_together_equal_direct_counts():
    """fired_counts() keeps small sites' per-sample totals and count_fired() counts all of a batch at once: the counts
    equal (output > 0 anywhere on a sample) summed over samples, computed here directly, for 2-d float32 and bfloat16,
    4-d and 3-d outputs, a site too large to keep (counted at once), two batch sizes, a NaN channel (not fired); a
    kept 2-d output changed in place afterwards still counts as it was."""
    from gradscope.activations import KEEP_PER_SAMPLE, count_fired, fired_counts

    torch.manual_seed(0)
    outs = [torch.randn(6, 10).relu(), torch.randn(6, 7).relu().bfloat16(), torch.randn(6, 4, 3, 3).relu(),
            torch.randn(6, 5, 9).relu(), torch.randn(6, KEEP_PER_SAMPLE // 6 + 1).relu(), torch.randn(3, 8).relu()]
    outs[0][:, 3] = 0  # a unit that never fires
    outs[2][1, 2] = float("nan")
    dims = [1, 1, 1, 2, 1, 1]
    want = []
    for out, dim in zip(outs, dims):
        per_sample = out.float().movedim(dim, 1).flatten(2) if out.ndim > 2 else out.float()[:, :, None]
        want.append((per_sample > 0).any(2).sum(0).float())
    parts = []
    for k, (out, dim) in enumerate(zip(outs, dims)):
        fired, check, n = fired_counts(out, dim, check=True, keep=True)
        assert n == out.shape[0] and rel_close(float(check), float(out.float().sum())) or k == 2
        assert fired.ndim == (1 if k == 4 else 2)  # the large site counted in the hook, the others kept
        parts.append((f"site{k}", fired, n))
    assert fired_counts(outs[0], 1, keep=False)[0].ndim == 1  # not kept unless asked (the collector: on CUDA)
    outs[0].mul_(-1)  # changed in place after the hook: what was kept is a copy of the signs
    counted = count_fired(parts)
    assert [site for site, _, _ in counted] == [f"site{k}" for k in range(len(outs))]
    for (_, got, n), w in zip(counted, want):
        assert got.dtype == torch.float32 and got.ndim == 1
        assert torch.equal(got, w)


def collect_resnet18(batched: tuple) -> tuple:
    from gradscope.collect import Collector

    old = Collector.BATCHED_DEVICES
    Collector.BATCHED_DEVICES = batched
    try:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        with torch.no_grad():  # dead channels: the stem's ReLU, and one after a residual sum (an in-place ReLU)
            model.bn1.bias[:5] = -100.0
            model.layer4[1].bn2.bias[:7] = -1e4
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scope = gradscope.watch(model, dead_window=16)
        records = []
        for step in range(3):
            model(torch.randn(4, 3, 32, 32))  # an evaluation pass with grad on: reached by no backward pass
            for _ in range(2):  # two accumulated micro-batches
                F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
            records.append(scope.latest())
        return records, {k: v.tolist() for k, v in scope.dead_units().items()}
    finally:
        Collector.BATCHED_DEVICES = old


def test_collection_batched_as_on_cuda_equals_the_op_by_op_one():
    """What the hooks do on CUDA (Collector.BATCHED_DEVICES: output gradients and ReLU totals kept, reduced together),
    run on CPU tensors: resnet18's statistics over 3 steps of two accumulated passes and an evaluation pass equal the
    op-by-op path's (dead-unit counts exactly, norms to float64 rounding)."""
    one_by_one, dead = collect_resnet18(())
    batched, dead_batched = collect_resnet18(("cpu",))
    assert dead_batched == dead and sum(len(v) for v in dead.values()) > 0
    for a, b in zip(one_by_one, batched):
        assert a.keys() == b.keys() and len(a) > 40
        for layer, st in a.items():
            for key, v in st.items():
                if key in ("dead_units", "units", "dead_fraction"):
                    assert b[layer][key] == v, (layer, key)
                elif isinstance(v, float):
                    assert b[layer][key] == pytest.approx(v, rel=1e-9, abs=1e-300), (layer, key)


class SeenOps(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_users_function_mode_sees_none_of_the_batched_counting(monkeypatch):
    """The kept ReLU totals are counted when the next forward pass starts, inside the user's forward: a user's
    TorchFunctionMode sees the same calls as when they are counted in the hooks (no sign, cat or matmul of ours)."""
    from gradscope.collect import Collector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    for batched in ((), ("cpu",)):
        monkeypatch.setattr(Collector, "BATCHED_DEVICES", batched)
        scope = gradscope.watch(model)
        with SeenOps() as mode:
            for _ in range(2):  # the second pass starts by counting the first's kept totals
                model(torch.randn(3, 4)).sum().backward()
        seen.append(mode.names)
        scope.step()
        assert scope.latest()["1"]["units"] == 8
        scope.detach()
    assert seen[1] == seen[0] and "linear" in seen[0]


def test_float64_outputs_far_below_float32s_range_still_count_as_fired():
    """A kept ReLU output is reduced to its signs before any cast: 1e-50 in float64 fired, not 0 in float32."""
    from gradscope.activations import count_fired, fired_counts

    tiny = torch.full((4, 3), 1e-50, dtype=torch.float64)
    fired, _, n = fired_counts(tiny, 1, check=False, keep=True)
    assert count_fired([("s", fired, n)])[0][1].tolist() == [4.0, 4.0, 4.0]
    assert fired_counts(tiny, 1, check=False, keep=False)[0].tolist() == [4.0, 4.0, 4.0]


def test_dead_units_alert_fires_once_the_window_fills():
    model = killed(nn.Sequential(nn.Linear(8, N_UNITS), nn.ReLU()))
    with torch.no_grad():
        model.body[0].bias[:10] = -1e3  # with DEAD, 11 of 16 dead: above the default threshold of one half
    scope = gradscope.watch(model, dead_window=300)
    fired = []
    for step in range(5):
        model(torch.randn(100, 8)).sum().backward()
        fired.append([(a.kind, a.layer) for a in scope.step()])
    assert fired == [[], [], [("dead_units", "body.1")], [], []]
    alert = scope.alerts[0]
    assert alert.value == 11 / 16 and "11 of 16 units" in alert.message and "LeakyReLU" in alert.hint
    scope.detach()


def test_unit_rule_and_override():
    assert [gradscope.activations.unit_dim(n) for n in (1, 2, 3, 4, 5)] == [0, 1, 2, 1, 1]

    class Conv1dNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x)).mean()

    model = Conv1dNet()
    with torch.no_grad():
        model.conv.bias[[1, 4]] = -1e3
    scope = gradscope.watch(model, unit_dims={":relu": 1})  # (N, C, L): channels, not the last dim
    model(torch.randn(32, 4, 10)).backward()
    scope.step()
    assert scope.dead_units()[":relu"].tolist() == [1, 4] and scope.latest()[":relu"]["units"] == 6
    scope.detach()


def test_functional_calls_are_named_after_their_module_per_call():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.b(torch.relu(F.relu(self.a(x)))))

    model = nn.Sequential(Block(), nn.Linear(4, 1))
    scope = gradscope.watch(model)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        scope.step()
    names = [e["name"] for e in scope.meta["layers"] if e["module"].startswith("F.")]
    assert names == ["0:relu", "0:relu#2", "0:tanh"]
    assert {"dead_fraction"} <= scope.latest()["0:relu#2"].keys() and "saturation" in scope.latest()["0:tanh"]
    scope.detach()


class TanhBlock(nn.Module):  # a layer whose forward applies its activation functionally
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Gelu(nn.Module):  # a tanh-approximated GELU, as GPT-2's NewGELUActivation
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x ** 3)))


def _ops_per_pass(monkeypatch, model, passes=6):
    """The ops each collected forward pass sends through gradscope's functional-call mode, and the scope."""
    seen = []
    real = gradscope.activations.FunctionalCalls.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(gradscope.activations.FunctionalCalls, "__torch_function__", counting)
    scope = gradscope.watch(model)
    per_pass, latest = [], []
    for _ in range(passes):
        seen.clear()
        model(torch.randn(16, 4)).sum().backward()
        scope.step()
        per_pass.append(list(seen))
        latest.append(scope.latest())
    return per_pass, latest, scope


def test_after_the_probes_only_the_modules_that_make_functional_calls_are_watched_op_by_op(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), TanhBlock(8), nn.Linear(8, 8), TanhBlock(8),
                          nn.Linear(8, 1))
    per_pass, latest, scope = _ops_per_pass(monkeypatch, model)  # passes 0-2 watch every op (probes)
    probe, scoped = per_pass[0], per_pass[3]  # 3-5 only inside the two TanhBlock calls
    assert probe.count("linear") == 5 and "layer_norm" in probe  # a probe pass sees every op
    assert scoped.count("linear") == 2 and "layer_norm" not in scoped and scoped.count("tanh") == 2
    assert per_pass[3] == per_pass[4] == per_pass[5]
    assert all(0 <= st[site]["saturation"] <= 1 for st in latest for site in ("2:tanh", "4:tanh"))  # every step
    scope.detach()
    assert not torch.overrides._get_current_function_mode_stack()  # no mode left entered


def test_the_tanh_inside_an_activation_function_is_no_site_and_costs_no_mode(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), Gelu(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8), GELUTanh(),
                          nn.Linear(8, 1))
    per_pass, latest, scope = _ops_per_pass(monkeypatch, model)
    assert per_pass[0].count("tanh") == 2 and "silu" in per_pass[0]  # the probes see them ...
    assert per_pass[3:] == [[], [], []]  # ... then no op goes through the mode
    assert scope.layer_names == ["0", "1", "2", "3", "4", "5", "6"]  # no "1:tanh" site
    assert all("saturation" not in st for record in latest for st in record.values())
    assert not [a for a in scope.alerts if a.kind == "saturation"]
    scope.detach()


class ScaledTanh(nn.Tanh):  # a tanh subclass: the layer's activation
    def forward(self, x):
        return 1.7 * torch.tanh(x)


class GELUTanh(nn.Module):  # named like a tanh, but a GELU (Hugging Face's, with use_gelu_tanh_python=True)
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))


class LazyTanhLayer(nn.Module):  # a layer that creates its weight in its first forward, then applies tanh
    def __init__(self, n):
        super().__init__()
        self.n, self.weight = n, None

    def forward(self, x):
        if self.weight is None:
            self.weight = nn.Parameter(torch.randn(self.n, x.shape[-1]) * 10)
        return torch.tanh(F.linear(x, self.weight))


def test_a_tanh_layer_is_a_site_even_parameter_free_or_given_its_weights_late():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), LazyTanhLayer(8), nn.Linear(8, 8), ScaledTanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(30)
    scope = gradscope.watch(model)
    model(torch.randn(2, 4))  # the lazy layer's weight appears only now, after watch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = F.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 2))
        opt.zero_grad()
        loss.backward()
        scope.step()
        opt.step()
    assert {"1:tanh", "3:tanh"} <= set(scope.layer_names)
    assert {a.layer for a in scope.alerts if a.kind == "saturation"} == {"1:tanh", "3:tanh"}
    scope.detach()


def test_a_branch_first_taken_after_the_probe_passes_is_watched_from_its_first_run():
    class Gate(nn.Module):
        def forward(self, x):
            return F.relu(x)

    class Net(nn.Module):  # g2: an expert or a curriculum stage, first used at step 4
        def __init__(self):
            super().__init__()
            self.a, self.g1, self.g2, self.h = nn.Linear(4, 8), Gate(), Gate(), nn.Linear(8, 1)
            self.use2 = False

        def forward(self, x):
            x = self.g1(self.a(x))
            return self.h(self.g2(x) if self.use2 else x)

    model = Net()
    scope = gradscope.watch(model)
    seen = []
    for step in range(7):
        model.use2 = step >= 4
        model(torch.randn(8, 4)).sum().backward()
        scope.step()
        seen.append(sorted(k for k in scope.latest() if ":" in k))
    assert seen == [["g1:relu"]] * 4 + [["g1:relu", "g2:relu"]] * 3
    scope.detach()


def test_resnet18_has_a_dead_fraction_for_all_17_relu_call_sites_with_stable_names():
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model)
    seen = []
    for _ in range(2):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        scope.step()
        opt.step()
        opt.zero_grad()
        seen.append([n for n, st in scope.latest().items() if "dead_fraction" in st])
    assert seen[0] == seen[1] and len(seen[0]) == 17
    assert seen[0][:3] == ["relu", "layer1.0.relu", "layer1.0.relu#2"]
    assert scope.latest()["layer1.0.relu#2"]["units"] == 64 and scope.latest()["layer4.1.relu"]["units"] == 512
    scope.detach()


def test_saturated_sigmoid_layers_are_reported_and_alerted():
    model = deep_mlp(4, 64, "sigmoid", in_features=32)
    with torch.no_grad():
        for lin in model[1::2]:
            lin.weight.mul_(30.0)  # large weights: pre-activations far from 0
    scope = gradscope.watch(model)
    x = torch.randn(256, 32)
    F.cross_entropy(model(x), torch.randint(0, 10, (256,))).backward()
    scope.step()
    ref = copy.deepcopy(model)
    outs = []
    for m in ref:
        if isinstance(m, nn.Sigmoid):
            m.register_forward_hook(lambda mod, a, o: outs.append(o.detach()))
    ref(x)
    for site, y in zip(["2", "4", "6"], outs):
        expected = ((y <= 0.02) | (y >= 0.98)).float().mean().item()  # within eps of a bound
        assert scope.latest()[site]["saturation"] == pytest.approx(expected, abs=2 / y.numel()) and expected > 0.6
        assert scope.latest()[site]["mean_output"] == pytest.approx(y.mean().item(), rel=1e-5)
    assert {a.layer for a in scope.alerts if a.kind == "saturation"} == {"2", "4", "6"}
    scope.detach()


def test_well_initialised_tanh_net_is_not_saturated():
    model = deep_mlp(6, 128, "tanh", "xavier", in_features=32)
    scope = gradscope.watch(model)
    F.cross_entropy(model(torch.randn(256, 32)), torch.randint(0, 10, (256,))).backward()
    scope.step()
    sats = [st["saturation"] for st in scope.latest().values() if "saturation" in st]
    assert len(sats) == 5 and max(sats) < 0.1
    assert not [a for a in scope.alerts if a.kind == "saturation"]
    scope.detach()


class SeqClassifier(nn.Module):
    def __init__(self, cell, batch_first=True, layers=1, bidirectional=False, embed=False):
        super().__init__()
        self.embed = nn.Linear(6, 6) if embed else None
        self.rnn = cell(6, 12, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(12 * (2 if bidirectional else 1), 2)
        self.batch_first = batch_first

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


def through_time_reference(model, x, y):
    """dLoss/d(input at step t), norm over features, mean over the batch: by plain autograd on a copy."""
    model = copy.deepcopy(model)
    inputs = []
    model.rnn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    if model.embed is None:
        x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, inputs[0])[0]
    return g.norm(dim=-1).mean(dim=0 if model.batch_first else 1)


@pytest.mark.parametrize("cell,batch_first,layers,bidirectional,embed", [
    (nn.RNN, True, 1, False, False),
    (nn.LSTM, False, 2, False, False),
    (nn.GRU, True, 1, True, False),
    (nn.LSTM, True, 1, False, True),
])
def test_gradient_through_time_matches_autograd(cell, batch_first, layers, bidirectional, embed):
    torch.manual_seed(0)
    model = SeqClassifier(cell, batch_first, layers, bidirectional, embed)
    x = torch.randn(5, 20, 6) if batch_first else torch.randn(20, 5, 6)
    y = torch.randint(0, 2, (5,))
    expected = through_time_reference(model, x, y)
    twin = copy.deepcopy(model)
    scope = gradscope.watch(model)
    F.cross_entropy(model(x), y).backward()
    scope.step()
    profile = scope.latest()["rnn"]["through_time"]
    assert len(profile) == 20
    assert torch.allclose(torch.tensor(list(profile)), expected, rtol=1e-5, atol=0)
    # the scope gave the recurrent layer an input to differentiate: parameter gradients are unchanged, bitwise
    F.cross_entropy(twin(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    scope.detach()


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e20])
def test_through_time_norms_survive_float32_range(scale):
    """On CPU a float32 input gradient is measured in float32 first; steps whose squares would underflow (a plain
    RNN's first steps: 1e-25) or overflow in float32 are measured in float64, as the reference is."""
    from gradscope.activations import TimeProfile

    torch.manual_seed(0)
    g = torch.randn(4, 10, 6)
    g[:, :3] *= scale  # the first three steps at another scale
    tracker = TimeProfile()
    tracker.observe_grad(g, 0)
    want = g.double().norm(dim=-1).mean(dim=0)
    assert tracker.profile.dtype == torch.float64
    assert torch.allclose(tracker.profile, want, rtol=1e-6, atol=0)
    assert (tracker.profile > 0).all() and torch.isfinite(tracker.profile).all()


def test_an_empty_batch_through_a_recurrent_layer_trains_on():
    """A batch of no samples (the empty last shard of a split, say) gives the recurrent layer an empty input
    gradient: its hook must not raise inside backward (aminmax of nothing does), and the step closes."""
    torch.manual_seed(0)
    model = SeqClassifier(nn.LSTM)
    scope = gradscope.watch(model)
    for batch in (4, 0, 4):
        model(torch.randn(batch, 20, 6)).sum().backward()
        scope.step()
    assert len(scope.latest()["rnn"]["through_time"]) == 20
    scope.detach()


def test_vanilla_rnn_forgets_early_steps_and_is_flagged():
    torch.manual_seed(0)
    model = SeqClassifier(nn.RNN)
    scope = gradscope.watch(model)
    x, y = torch.randn(16, 100, 6), torch.randint(0, 2, (16,))
    F.cross_entropy(model(x), y).backward()
    new = scope.step()
    st = scope.latest()["rnn"]
    assert st["through_time_ratio"] < 1e-6 and st["through_time_reach"] < 30
    alert = next(a for a in new if a.metric == "through_time_ratio")
    assert alert.kind == "vanishing_through_time" and alert.layer == "rnn" and "through time" in alert.message
    assert "LSTM" in alert.hint
    assert "gradient through time, rnn (100 steps)" in scope.summary()
    scope.detach()


def test_update_to_weight_ratio_matches_the_optimizer_step():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, update_ratio=True)
    before = None
    for step in range(3):
        F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 0, 1])).backward()
        now = [p.detach().clone() for p in model.parameters()]
        scope.step()
        if step == 0:
            assert "update_ratio" not in scope.latest()["0"]  # no previous update yet
        else:
            w0, b0 = now[0], now[1]
            dw0, db0 = w0 - before[0], b0 - before[1]
            expected = ((dw0.norm() ** 2 + db0.norm() ** 2).sqrt() / (w0.norm() ** 2 + b0.norm() ** 2).sqrt()).item()
            assert rel_close(scope.latest()["0"]["update_ratio"], expected, 1e-5)
            assert rel_close(scope.latest(per="param")["2.weight"]["update_ratio"],
                             ((now[2] - before[2]).norm() / now[2].norm()).item(), 1e-5)
        before = now
        opt.step()
        opt.zero_grad()
    scope.detach()


def images(n):
    return lambda: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))


BITWISE_MODELS = {  # name: (model, batch)
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), images(4)),  # BN, in-place ReLUs called twice
    "mlp-dropout": (lambda: nn.Sequential(deep_mlp(8, 64, "relu"), nn.Dropout(0.3)), images(8)),  # RNG stream
    "lstm": (lambda: SeqClassifier(nn.LSTM), lambda: (torch.randn(4, 15, 6), torch.randint(0, 2, (4,)))),
    "functional": (lambda: nn.Sequential(FunctionalRelu(), nn.Tanh(), nn.Linear(N_UNITS, 3)),
                   lambda: (torch.randn(8, 8), torch.randint(0, 3, (8,)))),
}


@pytest.mark.parametrize("options", [{}, {"update_ratio": True, "dead_window": 8}], ids=["default", "full"])
@pytest.mark.parametrize("name", list(BITWISE_MODELS))
def test_observing_changes_nothing_bitwise(name, options):
    """The same seeded run twice, once watched: the losses and the final parameters are bitwise equal."""
    make, batch = BITWISE_MODELS[name]
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, seed=1)
    plain = train_loop(model, batch, 6, **kw)
    seen = train_loop(twin, batch, 6, watch=options, **kw)
    assert len(seen.scope.history) == 6
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, seen.losses))
    assert all(torch.equal(a, b) for a, b in zip(plain.params, seen.params))


def test_activation_state_is_O_units_and_profiles_round_trip(tmp_path):
    model = SeqClassifier(nn.GRU, embed=True)
    model = nn.Sequential(nn.Flatten(0, 0), model)
    scope = gradscope.watch(model)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(64, 30, 6)), torch.randint(0, 2, (64,))).backward()
        scope.step()
    path = tmp_path / "rnn.jsonl"
    scope.save(path)
    run = gradscope.load(path)
    assert list(run.latest()["1.rnn"]["through_time"]) == list(scope.latest()["1.rnn"]["through_time"])
    assert run.summary() == scope.summary()
    scope.detach()

    relu = nn.Sequential(nn.Linear(4, 7), nn.ReLU())
    scope = gradscope.watch(relu)
    for _ in range(3):
        relu(torch.randn(500, 4)).sum().backward()
        scope.step()
    tracker = scope._collector.dead["1"]
    assert tracker.since.shape == (7,) and tracker.rate.shape == (7,)  # no batch kept
    scope.detach()


def test_view_output_of_an_input_with_other_consumers_reports_its_own_signal():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.flat = nn.Conv2d(3, 4, 3, padding=1), nn.Flatten()
            self.head, self.aux = nn.Linear(4 * 8 * 8, 2), nn.Conv2d(4, 1, 1)

        def forward(self, x):
            h = self.conv(x)
            return self.head(self.flat(h)).sum() + 100 * self.aux(h).sum()

    model = TwoHeads()
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(model)
    outs = []
    ref.flat.register_forward_hook(lambda m, a, o: outs.append(o))
    expected = torch.autograd.grad(ref(x), outs)[0].norm().item()
    scope = gradscope.watch(model)
    model(x).backward()
    scope.step()
    assert rel_close(scope.latest()["flat"]["backprop_signal"], expected, 1e-5)
    scope.detach()


def test_frozen_recurrent_layer_on_data_gets_no_graph():
    model = SeqClassifier(nn.LSTM)
    model.rnn.requires_grad_(False)
    seen = []
    model.rnn.register_forward_hook(lambda m, a, o: seen.append(o[0].requires_grad))
    scope = gradscope.watch(model)
    F.cross_entropy(model(torch.randn(3, 7, 6)), torch.tensor([0, 1, 0])).backward()
    scope.step()
    assert seen == [False] and "through_time" not in scope.latest().get("rnn", {})
    scope.detach()


def test_recurrent_input_passed_by_keyword_and_root_calling_itself():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(input=x)[0][:, -1])

    model = Keyword()
    scope = gradscope.watch(model)
    model(torch.randn(3, 9, 6)).sum().backward()
    scope.step()
    assert len(scope.latest()["rnn"]["through_time"]) == 9
    scope.detach()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, again=True):
            h = torch.tanh(F.relu(self.lin(x)))
            return self(h, again=False) if again else h

    model = Twice()
    scope = gradscope.watch(model)
    model(torch.randn(3, 4)).sum().backward()
    scope.step()
    assert [n for n in scope.layer_names if ":" in n or n.startswith("lin")] == \
        ["lin", ":relu", ":tanh", "lin#2", ":relu#2", ":tanh#2"]
    scope.detach()


def test_interrupted_forward_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack

    class Interrupt(nn.Module):
        def __init__(self):
            super().__init__()
            self.interrupt = True

        def forward(self, x):
            x = F.relu(x)
            if self.interrupt:
                raise KeyboardInterrupt  # not an Exception: torch's always_call hooks do not run
            return x

    model = nn.Sequential(nn.Linear(3, 3), Interrupt())
    scope = gradscope.watch(model)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 3))
    model[1].interrupt = False
    model.zero_grad()
    model(torch.randn(2, 3)).sum().backward()
    scope.step()  # closing the step leaves any stale mode
    assert _get_current_function_mode_stack() == []
    model(torch.randn(2, 3)).sum().backward()
    scope.step()
    assert [n for n in scope.latest() if ":" in n] == ["1:relu"]  # normal names again
    scope.detach()


def test_forwards_in_threads_keep_their_own_state():
    import threading

    from torch.overrides import _get_current_function_mode_stack

    model = nn.Sequential(nn.Linear(4, 8), FunctionalRelu(), nn.ReLU())
    scope = gradscope.watch(model)
    errors, stacks = [], []

    def work():
        try:
            for _ in range(20):
                model(torch.randn(2, 4)).sum()
            stacks.append(len(_get_current_function_mode_stack()))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and stacks == [0, 0, 0]
    scope.detach()


def test_empty_batches_leave_firing_rates_finite():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    scope = gradscope.watch(model)
    for n in (8, 0, 8):
        model(torch.randn(n, 4)).sum().backward()
        scope.step()
    assert torch.isfinite(scope.firing_rates()["1"]).all()
    scope.detach()


def test_saturation_counts_stay_exact_beyond_float32_integers():
    # a float32 sum of 0/1 values stops counting at 2**24: bigger outputs are summed in float64
    from gradscope.activations import saturation_counts

    n = 2**24 + 3
    y = torch.full((n,), 0.999)
    y[:2] = 0.0  # 2**24 + 1 saturated: odd, not a float32
    saturated, total, numel = saturation_counts(y, "tanh", 0.02)
    assert numel == n and int(saturated) == n - 2 and saturated.dtype == torch.float64
    small = saturation_counts(torch.tensor([0.1, -0.995, 0.99, float("nan")]), "tanh", 0.02)
    assert small[0].item() == 2 and small[1].isnan()  # NaN is not saturated; the sum shows it
    assert saturation_counts(torch.tensor([0.001, 0.5, 0.999]), "sigmoid", 0.02)[0].item() == 2


def test_saturation_under_bfloat16_autocast_is_counted_in_float32():
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.mul_(8)
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    scope = gradscope.watch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(256, 16)).float().sum().backward()
    scope.step()
    y = outs[0].float()
    assert outs[0].dtype == torch.bfloat16
    expected = ((y <= -0.98) | (y >= 0.98)).float().mean().item()
    assert scope.latest()["1"]["saturation"] == pytest.approx(expected, abs=1e-6)
    scope.detach()


def test_a_deep_copy_of_a_watched_model_is_not_watched():
    model = SeqClassifier(nn.LSTM)
    scope = gradscope.watch(model)
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    twin(torch.randn(2, 5, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="no backward pass"):
        scope.step()  # the copy's backward is not the watched model's
    model(torch.randn(2, 5, 6)).sum().backward()
    scope.step()
    assert "through_time" in scope.latest()["rnn"]
    scope.detach()


class MixedSites(nn.Module):
    """ReLU sites with (N, C, H, W), (N, T, F) and (N, F) outputs, and a sigmoid and a tanh site."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.seq, self.relu2 = nn.Linear(6, 5), nn.ReLU(inplace=True)
        self.fc, self.relu3 = nn.Linear(5, 7), nn.ReLU()
        self.head, self.sig, self.out, self.tanh = nn.Linear(7, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Tanh()
        with torch.no_grad():
            self.conv.bias[2] = -100.0  # a dead channel
            self.seq.bias[1] = -100.0  # a dead feature of the sequence layer
            self.head.weight.mul_(6)  # some sigmoid saturation

    def forward(self, x):
        h = self.relu1(self.conv(x))  # (N, 6, 4, 4): units = channels
        t = self.relu2(self.seq(h.flatten(2).transpose(1, 2)))  # (N, 16, 5): units = last dim
        v = self.relu3(self.fc(t.mean(1)))  # (N, 7)
        return self.tanh(self.out(self.sig(self.head(v))))


def test_batched_activation_statistics_equal_a_plain_computation():
    """The fast path (per-site counts in the forward, one flat update per step) against the definitions, computed
    here from the raw outputs: dead = fired on none of the batches that make up the last `window` samples."""
    window, eps = 30, 0.02
    model = MixedSites()
    sites = {"relu1": 1, "relu2": 2, "relu3": 1}
    raw = {name: [] for name in [*sites, "sig", "tanh"]}  # per site: the outputs of every forward, in order
    for name in raw:
        getattr(model, name).register_forward_hook(lambda m, a, o, name=name: raw[name].append(o.detach().clone()))
    scope = gradscope.watch(model, dead_window=window, saturation_eps=eps)
    rates = {s: None for s in sites}
    history = {s: [] for s in sites}  # per forward: (fired per unit as bool, samples)
    for step, batches in enumerate([[8], [12], [5, 7], [9], [16], [3, 3, 3], [10]]):  # lists: gradient accumulation
        for v in raw.values():
            v.clear()
        for n in batches:
            F.cross_entropy(model(torch.randn(n, 3, 4, 4)), torch.randint(0, 3, (n,))).backward()
        scope.step()
        model.zero_grad()
        latest = scope.latest()
        for s, dim in sites.items():
            for out in raw[s]:
                fired = (out > 0).movedim(dim, 1).reshape(out.shape[0], out.shape[dim], -1).any(2)  # (N, units)
                n = fired.shape[0]
                history[s].append((fired.any(0), n))
                frac = fired.float().mean(0)
                alpha = 1.0 if rates[s] is None else min(1.0, n / window)
                rates[s] = frac if rates[s] is None else rates[s] + alpha * (frac - rates[s])
            seen = sum(n for _, n in history[s])
            recent, total = [], 0
            for f, n in reversed(history[s]):  # the smallest suffix of batches holding `window` samples
                if total >= window:
                    break
                recent.append(f)
                total += n
            dead = ~torch.stack(recent).any(0) if seen >= window else ~torch.stack([f for f, _ in history[s]]).any(0)
            st = latest[s]
            assert st["dead_units"] == int(dead.sum()) and st["units"] == dead.numel(), (step, s)
            assert st["dead_window_filled"] == float(seen >= window)
            assert rel_close(st["fire_rate"], float(rates[s].mean()), 1e-5), (step, s)
            assert scope.dead_units()[s].tolist() == torch.nonzero(dead).flatten().tolist()
            assert torch.allclose(scope.firing_rates()[s], rates[s], atol=1e-6)
        for s, (lo, hi) in (("sig", (0.0, 1.0)), ("tanh", (-1.0, 1.0))):
            ys = torch.cat([o.flatten() for o in raw[s]])
            expected = ((ys <= lo + eps) | (ys >= hi - eps)).float().mean()
            assert latest[s]["saturation"] == pytest.approx(float(expected), abs=1e-6)
            assert latest[s]["mean_output"] == pytest.approx(float(ys.mean()), abs=1e-6)
    assert scope.dead_units()["relu1"].tolist() == [2] and 1 in scope.dead_units()["relu2"].tolist()
    scope.detach()


def test_hugging_face_gelu_variants_named_as_finite_from_finite_exist_and_reuse_the_check():
    """FINITE_FROM_FINITE_NAMES names classes of transformers.activations by string: each must exist there (a rename
    would quietly cost a check again), and a GELU of a Linear's output shares its check."""
    activations = pytest.importorskip("transformers.activations")
    from gradscope.activations import FINITE_FROM_FINITE_NAMES, finite_from_finite

    for qualified in FINITE_FROM_FINITE_NAMES:
        cls = getattr(activations, qualified.rsplit(".", 1)[1])  # (an old name may be an alias of a new one)
        assert f"{cls.__module__}.{cls.__qualname__}" in FINITE_FROM_FINITE_NAMES, qualified
    assert not finite_from_finite(activations.ReLUSquaredActivation())
    model = nn.Sequential(nn.Linear(4, 8), activations.NewGELUActivation(), nn.Linear(8, 2))
    scope = gradscope.watch(model)
    model(torch.randn(3, 4)).sum().backward()
    parts = dict(scope._collector._passes[-1].output_parts)
    assert parts["1"] is parts["0"] and parts["2"] is not parts["0"]
    scope.step()
    assert scope.latest()["1"]["output_nonfinite"] == 0.0
    scope.detach()
