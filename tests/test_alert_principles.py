"""The principles the detectors follow on real models, each on a small model that isolates it.

Small-by-design branches are not vanishing; Adam's update is judged, not its gradient; instability is a jump of the
whole model against its own history; tiny gradients are tiny, not zero; a remedy fits the layer that fired; gates and
activations inside activations are not saturation sites. The alert benchmark (scripts/alert_bench.py,
tests/test_alert_bench.py) checks the same on real models and real data.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
import gradscope.alerts
from gradscope.detectors import Context, Exploding, output_side_reference
from gradscope.bench.models import cifar_resnet, deep_mlp
from gradscope.record import LayerInfo, StepRecord, signal_profile
from gradscope.anatomy import has_norm, has_residual


class Branch(nn.Module):
    """x + gamma * f(x), gamma initialised to ``scale`` (0: a zero-init residual branch; 1e-6: layer scale)."""

    def __init__(self, d, scale):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.full((d,), float(scale)))

    def forward(self, x):
        return x + self.gamma * self.fc2(self.act(self.fc1(x)))


def residual_mlp(scale, depth=8, d=64):
    return nn.Sequential(nn.Linear(32, d), *[Branch(d, scale) for _ in range(depth)], nn.LayerNorm(d), nn.Linear(d, 10))


def fit(model, opt, steps, scope, batch=lambda i: (torch.randn(32, 32), torch.randint(0, 10, (32,)))):
    for i in range(steps):
        x, y = batch(i)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        scope.step(loss=loss)
        opt.step()
        opt.zero_grad()
    return scope


@pytest.mark.parametrize("scale", [0.0, 1e-6])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_small_by_design_branches_are_not_vanishing_and_collapse_no_reference(scale, optim):
    torch.manual_seed(0)
    model = residual_mlp(scale)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optim == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    scope = gradscope.watch(model)
    fit(model, opt, 12, scope)
    first = scope.history[0]
    profile = dict(signal_profile(first, scope.meta["layers"]))
    ref = output_side_reference(list(profile.items()))
    # the case: the branches' layers get (almost) nothing at step 0, the stream beside them carries the gradient
    assert max(profile["1.fc1"], profile["1.fc2"]) <= 1e-5 * ref and profile["0"] > 0.1 * ref
    assert scope.alerts == []
    scope.detach()


def chain(gain=0.3, depth=8, d=64):
    """Linear layers without activation, weights ``gain`` x orthogonal: the signal shrinks by ``gain`` per layer."""
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(depth)])
    for lin in model:
        nn.init.orthogonal_(lin.weight, gain=gain)
    return model


def test_under_a_known_adam_a_small_gradient_that_adam_rescales_is_not_vanishing():
    x_y = lambda i: (torch.randn(32, 64), torch.randint(0, 64, (32,)))  # noqa: E731
    torch.manual_seed(0)
    sgd_model = chain()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)
    sgd_scope = gradscope.watch(sgd_model, optimizer=sgd)
    torch.manual_seed(0)
    adam_model = chain()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    adam_scope = gradscope.watch(adam_model, optimizer=adam)
    for model, opt in ((sgd_model, sgd), (adam_model, adam)):
        for i in range(6):
            x, y = x_y(i)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    # 0.3**7 = 2e-4 of the output side's signal at the first layer, with gradients far above Adam's eps
    rec = adam_scope.history[0]
    ratio = rec.layers["0"]["backprop_signal"] / rec.layers["7"]["backprop_signal"]
    assert ratio < 1e-3 and rec.layers["0"]["grad_rms"] > 10 * adam.defaults["eps"]
    assert "0" in {a.layer for a in sgd_scope.alerts if a.kind == "vanishing"}
    assert adam_scope.alerts == []
    assert adam_scope.context.adaptive is True and adam_scope.context.eps == 1e-8
    assert sgd_scope.context.adaptive is False
    for s in (sgd_scope, adam_scope):
        s.detach()


@pytest.mark.parametrize("optim, fires", [("sgd", True), ("adam", False)])
def test_with_update_ratio_the_update_decides_whether_a_layer_learns(optim, fires):
    # 10 sigmoid layers: the first gets ~1e-5 of the output side's signal, with gradients far above Adam's eps
    torch.manual_seed(0)
    model = deep_mlp(10, 64, "sigmoid", in_features=64)
    opt = (torch.optim.SGD(model.parameters(), lr=1e-2) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    scope = fit(model, opt, 7, gradscope.watch(model, update_ratio=True),
                lambda i: (torch.randn(32, 64), torch.randint(0, 10, (32,))))
    rec = scope.history.last
    assert scope.context.optimizer is None  # the scope was not told the optimizer: it reads the update itself
    assert rec.layers["1"]["backprop_signal"] < 1e-3 * rec.layers["17"]["backprop_signal"]
    u = rec.layers["1"]["update_ratio"] / max(rec.layers[n]["update_ratio"] for n in ("15", "17"))
    assert (u < 1e-3) is fires
    assert ("1" in {a.layer for a in scope.alerts if a.kind == "vanishing"}) is fires
    scope.detach()


def test_with_the_optimizer_unknown_the_hint_says_what_the_alert_cannot_know():
    torch.manual_seed(0)
    model = chain()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = fit(model, opt, 6, gradscope.watch(model), lambda i: (torch.randn(32, 64), torch.randint(0, 64, (32,))))
    first = next(a for a in scope.alerts if a.layer == "0")
    assert first.kind == "vanishing" and "pass optimizer=" in first.hint and "Adam" in first.hint
    scope.detach()


def test_thirty_sigmoid_layers_tiny_gradient_is_vanishing_not_exactly_zero():
    torch.manual_seed(0)
    model = deep_mlp(30, 32, "sigmoid", in_features=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = fit(model, opt, 5, gradscope.watch(model), lambda i: (torch.randn(8, 16), torch.randint(0, 10, (8,))))
    first = [a for a in scope.alerts if a.layer == "1"]
    assert len(first) == 1 and first[0].metric == "backprop_signal_ratio" and first[0].step == 4
    assert "exactly zero" not in first[0].message and 0 < first[0].value < 1e-6
    assert "sigmoid" in first[0].hint and "dead" not in first[0].hint
    assert scope.latest()["1"]["backprop_signal"] > 0
    scope.detach()


def test_sudden_growth_fires_and_smooth_growth_does_not():
    layers = [LayerInfo("a", "Linear", 10, True), LayerInfo("b", "Linear", 10, True)]

    def rec(step, a, b, loss=None):
        info = {} if loss is None else {"loss": loss}
        return StepRecord(step, {"a": {"grad_norm": a}, "b": {"grad_norm": b}}, info=info)

    # AdamW growing a layer scale from 1e-6 by ~lr per step: the branch gradient grows linearly, 150x in 30 steps;
    # a network leaving its initialisation: 1.2x per step. Neither is 10x its median over the last 20 steps.
    for growth in (lambda t: 1 + 5 * t, lambda t: 1.2 ** t):
        smooth = Exploding()
        assert [a for t in range(30) for a in smooth.check(rec(t, growth(t), 1.0), layers)] == []
    spike = Exploding()
    for t in range(8):
        assert spike.check(rec(t, 1.0, 2.0, loss=2.3), layers) == []
    new = spike.check(rec(8, 300.0, 2.5, loss=2.4), layers)
    # the whole model's condition, on the root; the layer that jumped most is named in the message
    assert [(a.kind, a.layer, a.metric) for a in new] == [("exploding", "", "grad_norm_spike")]
    assert new[0].value == pytest.approx(math.hypot(300, 2.5) / math.hypot(1, 2), rel=1e-9)
    assert "jumped most: a 300x" in new[0].message and new[0].related == ("a", "b")
    loss_spike = Exploding()
    for t in range(5):
        loss_spike.check(rec(t, 1.0, 1.0, loss=2.3 - 0.01 * t), layers)
    new = loss_spike.check(rec(5, 1.2, 1.0, loss=61.0), layers)
    assert [a.metric for a in new] == ["loss_spike"] and "61" in new[0].message
    # near convergence: a loss of 0.002 moving to 0.05 is 25x its median but below the run's early losses
    calm = Exploding()
    for t, loss in enumerate([2.3] + [0.002] * 19):
        calm.check(rec(t, 1.0, 1.0, loss=loss), layers)
    assert calm.check(rec(20, 1.0, 1.0, loss=0.05), layers) == []


def test_a_spike_is_reported_beside_a_layer_that_already_explodes_with_depth():
    layers = [LayerInfo(n, "Linear", 10, True) for n in "abcd"]

    def rec(step, scale):  # a, b, c get > 1e3x the output side's signal (d): a depth condition on every step
        sig = {"a": 1e4, "b": 1e4, "c": 1e4, "d": 1.0}
        return StepRecord(step, {n: {"grad_norm": scale, "backprop_signal": sig[n]} for n in "abcd"})

    book = gradscope.alerts.AlertBook(log=False)
    detector = Exploding()
    fired = [book.update(detector.check(rec(t, 1e4 if t == 6 else 1.0), layers)) for t in range(8)]
    assert {(a.layer, a.metric) for a in fired[0]} == {("a", "backprop_signal_ratio"), ("b", "backprop_signal_ratio"),
                                                      ("c", "backprop_signal_ratio")}
    assert [(a.step, a.layer, a.metric) for a in fired[6]] == [(6, "", "grad_norm_spike")]


def test_a_non_finite_loss_under_a_grad_scaler_is_an_alert_not_an_overflow():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for loss_given, want in ((False, []), (True, ["nonfinite"])):
        scope = gradscope.watch(model)
        loss = F.cross_entropy(model(torch.randn(4, 4)), torch.tensor([0, 1, 0, 1])) * float("inf")
        scaler.scale(loss).backward()
        new = scope.step(scaler=scaler, loss=loss if loss_given else None)
        assert [a.kind for a in new] == want
        assert scope.history.last.info["overflow"] is (not loss_given)
        model.zero_grad()
        scope.detach()


def test_record_loss_rejects_what_is_not_a_scalar_loss():
    model = nn.Linear(3, 1)
    scope = gradscope.watch(model)
    with pytest.raises(ValueError, match="scalar loss"):
        scope.record_loss(torch.ones(3))
    with pytest.raises(TypeError, match="scalar tensor or a number"):
        scope.record_loss("2.3")
    model(torch.randn(2, 3)).sum().backward()
    scope.record_loss(torch.tensor(1.5))
    scope.step(loss=0.5)  # accumulated micro-batches add up
    assert scope.history.last.info["loss"] == pytest.approx(2.0)
    scope.detach()


class TanhGELU(nn.Module):
    """GPT-2's NewGELU: a parameter-free activation module with a functional tanh inside."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc, self.gate = nn.Conv2d(c, c, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


def test_gates_and_activations_inside_activations_are_not_saturation_sites():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SqueezeExcite(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), TanhGELU(),
                          nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    with torch.no_grad():
        for m in (model[0], model[1].fc, model[3], model[5]):
            m.weight.mul_(50)  # every sigmoid/tanh here is driven to its bounds
    scope = gradscope.watch(model)
    model(torch.randn(16, 3, 8, 8)).sum().backward()
    scope.step()
    roles = {e["name"]: e.get("role") for e in scope.meta["layers"]}
    assert roles["1.gate"] == "gate" and roles["6"] is None
    assert "4:tanh" not in roles and "4" in roles  # GELU's tanh is part of the activation function: no site
    latest = scope.latest()
    assert latest["1.gate"]["saturation"] > 0.5  # measured all the same
    assert [a.layer for a in scope.alerts if a.kind == "saturation"] == ["6"]
    scope.detach()


class ConvBlock(nn.Module):  # a plain block: its name ends in "Block", it has no shortcut
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class MistralRMSNorm(nn.Module):  # a norm class of another library, by its name only
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_remedies_never_recommend_what_the_model_already_has():
    assert has_residual(torchvision.models.resnet18()) and has_residual(cifar_resnet(20))
    assert has_residual(nn.TransformerEncoderLayer(8, 2))
    assert not has_residual(cifar_resnet(20, shortcuts=False)) and not has_residual(deep_mlp(4, 8))
    assert not has_residual(nn.Sequential(ConvBlock(), ConvBlock()))
    assert has_norm(nn.Sequential(nn.Linear(4, 4), MistralRMSNorm(4))) and has_norm(nn.InstanceNorm2d(3))
    assert not has_norm(deep_mlp(4, 8))
    # a detector on its own (no scope) does not know what the model has, so it recommends neither
    assert Context().has_norm is None
    lone = [LayerInfo("0", "Linear", 4, True)]
    hint = gradscope.detectors.vanishing_hint(lone, "0", Context())
    assert "normalisation" not in hint and "residual" not in hint
    torch.manual_seed(0)
    bn = deep_mlp(20, 64, "sigmoid", in_features=16).append(nn.LayerNorm(10))  # has a norm, still vanishes
    opt = torch.optim.SGD(bn.parameters(), lr=0.01)
    plain = deep_mlp(20, 64, "sigmoid", in_features=16)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    batch = lambda i: (torch.randn(16, 16), torch.randint(0, 10, (16,)))  # noqa: E731
    scopes = [fit(m, o, 6, gradscope.watch(m), batch) for m, o in ((bn, opt), (plain, plain_opt))]
    hints = [[a.hint for a in s.alerts if a.kind == "vanishing"] for s in scopes]
    assert all(hints) and all("normalisation" not in h for h in hints[0])
    assert all("add normalisation" in h and "residual" in h for h in hints[1])
    for s in scopes:
        s.detach()
    # a residual model with norms is told neither; a tanh inside a GELU after a layer is not "the sigmoid/tanh after it"
    resnet = gradscope.watch(cifar_resnet(20))
    hint = gradscope.detectors.vanishing_hint(resnet.meta["layers"], "conv1", resnet.context)
    assert resnet.context.has_norm and resnet.context.has_residual
    assert "normalisation" not in hint and "residual" not in hint
    resnet.detach()
    gelu = nn.Sequential(nn.Linear(16, 16), TanhGELU(), nn.Linear(16, 10))
    scope = gradscope.watch(gelu)
    gelu(torch.randn(4, 16)).sum().backward()
    scope.step()
    assert [e["name"] for e in scope.meta["layers"]] == ["0", "1", "2"]  # no "1:tanh" site
    assert gradscope.detectors.activation_after(scope.meta["layers"], "0") is None
    assert "replace the sigmoid/tanh" not in gradscope.detectors.vanishing_hint(scope.meta["layers"], "0",
                                                                               scope.context)
    scope.detach()


class Reader(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(3, 16, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM])
def test_through_time_hint_fits_the_recurrent_layer_it_names(cell):
    torch.manual_seed(0)
    model = Reader(cell)
    scope = gradscope.watch(model)
    F.cross_entropy(model(torch.randn(8, 400, 3)), torch.randint(0, 2, (8,))).backward()
    new = [a for a in scope.step() if a.metric == "through_time_ratio"]
    st = scope.latest()["rnn"]
    assert st["through_time_reach"] < 0.25 * 400 and st["through_time_ratio"] < 1e-3
    assert len(new) == 1 and new[0].kind == "vanishing_through_time"
    if cell is nn.RNN:
        assert "LSTM/GRU" in new[0].hint
    else:
        assert "LSTM/GRU" not in new[0].hint and "forget-gate bias" in new[0].hint
    scope.detach()


def test_context_is_shared_with_the_detectors_that_ask_for_it():
    model = cifar_resnet(20)
    opt = torch.optim.AdamW(model.parameters(), eps=1e-6)
    scope = gradscope.watch(model, optimizer=opt)
    assert scope.context == Context(has_norm=True, has_residual=True, optimizer="AdamW", adaptive=True, eps=1e-6)
    assert all(d.context is scope.context for d in scope.detectors if hasattr(d, "context"))
    scope.detach()


def test_after_a_nan_only_the_nan_is_reported_not_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    scope = gradscope.watch(model, dead_window=16)
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))  # every output of layer 0 is NaN from here on
    for _ in range(6):
        F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 2, (8,))).backward()
        scope.step()
        model.zero_grad()
    assert scope.latest()["1"]["dead_fraction"] == 1.0  # measured: NaN never "fires"
    assert [(a.kind, a.layer, a.step) for a in scope.alerts] == [("nonfinite", "0", 0)]
    scope.detach()


def test_a_spike_alert_round_trips_with_the_layers_it_names(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    scope = gradscope.watch(model)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for step in range(4):
        (F.cross_entropy(model(x), y) * (1e4 if step == 3 else 1.0)).backward()
        scope.step()
        model.zero_grad()
    scope.detach()
    spike = scope.alerts[-1]
    assert spike.metric == "grad_norm_spike" and set(spike.related) == {"0", "2"}
    scope.save(tmp_path / "run.jsonl")
    assert gradscope.load(tmp_path / "run.jsonl").alerts == scope.alerts
    text = (tmp_path / "run.jsonl").read_text().replace('"related": ["', '"related": [5, "')
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(ValueError, match="related"):
        gradscope.load(tmp_path / "bad.jsonl")
