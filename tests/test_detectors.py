"""Detectors on the textbook cases: flagged where the theory says so, silent on healthy networks."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
from conftest import train_loop
from gradscope.alerts import Alert, AlertBook
from gradscope.bench.models import deep_mlp


def train(model, steps, batch=lambda: (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), lr=0.01, **kw):
    return train_loop(model, batch, steps, lr=lr, watch=kw).scope


def test_deep_sigmoid_mlp_at_default_init_is_flagged_vanishing_on_early_layers():
    scope = train(deep_mlp(20, 128, "sigmoid"), 7)
    vanishing = [a for a in scope.alerts if a.kind == "vanishing"]
    layers = {a.layer for a in vanishing}
    assert "1" in layers and "3" in layers  # the first two Linear layers (Sequential index 0 is Flatten)
    assert "39" not in layers  # the output layer is the reference, not flagged
    first = next(a for a in vanishing if a.layer == "1")
    assert first.value < 1e-6 and first.threshold == 1e-3 and first.metric == "backprop_signal_ratio"
    assert "sigmoid" in first.hint and "Kaiming" in first.hint
    assert scope.decay_factor() < 0.3
    # fired once the condition had held on patience=5 collected steps (steps 0-4), not again on steps 5 and 6
    assert all(a.step == 4 for a in vanishing)


def test_relu_kaiming_mlp_and_resnets_raise_no_alert():
    scope = train(deep_mlp(20, 128, "relu", "kaiming"), 5)
    assert scope.alerts == []
    assert 0.5 < scope.decay_factor() < 2
    scope = train(torchvision.models.resnet18(num_classes=10), 3,
                  lambda: (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))))
    assert scope.alerts == []


def test_weights_above_identity_are_flagged_exploding():
    depth, n = 30, 32
    model = nn.Sequential(*[nn.Linear(n, n, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(1.5 * torch.eye(n))
    scope = gradscope.watch(model)
    x = torch.randn(16, n)
    F.mse_loss(model(x), torch.zeros(16, n)).backward()
    new = scope.step()
    exploding = {a.layer: a for a in new if a.kind == "exploding"}
    assert "0" in exploding and "1" in exploding
    assert exploding["0"].metric == "backprop_signal_ratio"
    output_side = max(1.5 ** k for k in range(8))  # signal 1.5**k at the last quarter (8 layers): the largest
    assert exploding["0"].value == pytest.approx(1.5 ** (depth - 1) / output_side, rel=1e-3)
    # every layer from the input up to i gets > 1e3 x the output side: 1.5**(29 - i) > 1e3 * 1.5**7, i.e. i <= 4
    assert set(exploding) == {str(i) for i in range(5)}
    assert "clip" in exploding["0"].hint
    assert not [a for a in new if a.kind == "vanishing"]
    assert scope.decay_factor() == pytest.approx(1.5, rel=1e-4)
    scope.detach()


class Poison(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.poison = False

    def forward(self, x):
        out = self.inner(x)
        if self.poison:
            out = out.clone()
            out[0, 0] = float("nan")
        return out


def nan_model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Poison(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 4))


def test_nan_injected_in_a_layer_forward_is_flagged_naming_that_layer():
    model = nan_model()
    scope = gradscope.watch(model)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    F.cross_entropy(model(x), y).backward()
    assert scope.step() == []
    model[2].poison = True
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    new = scope.step()
    # "2" (the wrapper) makes the NaN; "2.inner" before it is finite, the ReLU "3" after it only inherits it
    assert [(a.kind, a.layer) for a in new if a.kind == "nonfinite"] == [("nonfinite", "2")]
    assert "forward output" in new[0].message


class InplaceNan(nn.Module):
    """A NaN written in place between a checked module and its ReLU (by an op no hook sees)."""

    def __init__(self, relu):
        super().__init__()
        self.lin, self.relu, self.out = nn.Linear(4, 4), relu, nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        h[:, 0] = float("nan")
        return self.out(self.relu(h))


@pytest.mark.parametrize("relu", [nn.ReLU(), nn.ReLU(inplace=True), nn.Sigmoid()])
def test_activation_after_an_unseen_inplace_nan_is_named(relu):
    # an activation whose input is the output just checked skips its own check, unless that tensor changed since
    model = InplaceNan(relu)
    scope = gradscope.watch(model)
    F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    assert [(a.kind, a.layer) for a in scope.step() if a.kind == "nonfinite"] == [("nonfinite", "relu")]
    assert scope.latest()["lin"]["output_nonfinite"] == 0.0
    scope.detach()


class Block(nn.Module):
    """Returns its last module's output: as it is, or with a NaN written into it in place."""

    def __init__(self, last):
        super().__init__()
        self.lin, self.last, self.write_nan = nn.Linear(4, 4), last, False

    def forward(self, x):
        out = self.last(self.lin(x))
        if self.write_nan:
            out[0, 0] = float("nan")  # in place, by an op no hook sees: the output's version moves
        return out


@pytest.mark.parametrize("last", [nn.Linear(4, 4), nn.Tanh()])
def test_a_block_returning_its_last_output_shares_its_check_unless_changed_in_place(last):
    # a container whose output is the tensor its last module returned, unchanged, reuses that module's NaN/Inf check
    model = nn.Sequential(Block(last), nn.Linear(4, 2))
    scope = gradscope.watch(model)

    def step(x):
        model.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 0])).backward()
        return [a.layer for a in scope.step() if a.kind == "nonfinite"], scope.latest()

    flagged, latest = step(torch.randn(3, 4))
    assert flagged == [] and latest["0"]["output_nonfinite"] == 0.0
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")  # the first layer passes it on; the block returns it unchanged
    flagged, latest = step(x)
    assert flagged == ["0.lin"] and latest["0"]["output_nan"] == latest["0.last"]["output_nan"] == 1.0
    if isinstance(last, nn.Linear):  # (tanh keeps its output for its backward: no inplace change allowed there)
        model[0].write_nan = True
        flagged, latest = step(torch.randn(3, 4))
        assert latest["0.last"]["output_nonfinite"] == 0.0 and latest["0"]["output_nan"] == 1.0
        assert flagged == ["0"]
    scope.detach()


class DropoutBlock(nn.Module):
    """Linear -> Dropout, returned in an ``(output, None)`` tuple; optionally a NaN written into the dropout's output
    in place (by an op no hook sees)."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop, self.write_nan = nn.Linear(4, 4), nn.Dropout(0.5), False

    def forward(self, x):
        h = self.drop(self.lin(x))
        if self.write_nan:
            h[0, 0] = float("nan")
        return h, None


class TakeFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = DropoutBlock(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_and_a_tuple_of_a_checked_output_reuse_its_check_and_the_true_source_is_named(dtype):
    """A dropout of the output just checked and a tuple returning it unchanged add no NaN/Inf check of their own (the
    same check tensor; float16, whose range dropout's 1/(1-p) can leave, checks again), yet every site reports what
    it output: a NaN from the input names the first layer, one written after the dropout names the block."""
    torch.manual_seed(0)
    model = TakeFirst().to(dtype)
    scope = gradscope.watch(model)

    def step(x):
        model.zero_grad()
        model(x.to(dtype)).float().sum().backward()
        parts = dict(scope._collector._passes[-1].output_parts)
        return [a.layer for a in scope.step() if a.kind == "nonfinite"], scope.latest(), parts

    flagged, latest, parts = step(torch.randn(3, 4))
    assert flagged == [] and all(latest[k]["output_nonfinite"] == 0.0 for k in ("block.lin", "block.drop", "block"))
    assert (parts["block.drop"] is parts["block.lin"]) == (dtype is torch.float32)
    assert parts["block"] is parts["block.drop"]
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    flagged, latest, _ = step(x)
    assert flagged == ["block.lin"] and latest["block.drop"]["output_nan"] == latest["block"]["output_nan"] == 1.0
    model.block.write_nan = True
    flagged, latest, parts = step(torch.randn(3, 4))
    assert flagged == ["block"] and latest["block.drop"]["output_nonfinite"] == 0.0
    assert parts["block"] is not parts["block.drop"]
    scope.detach()


class InplaceDropoutAfterUnseenNan(nn.Module):
    """A NaN written in place into a checked output, then an in-place dropout that changes nothing (p=0, or eval):
    its version counter does not move, so the dropout cannot count as the one change since the check."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop, self.head = nn.Linear(4, 4), nn.Dropout(0.0, inplace=True), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        h[0, 1] = float("nan")
        return self.head(self.drop(h))


def test_an_inplace_dropout_that_changes_nothing_does_not_hide_an_unseen_nan():
    model = InplaceDropoutAfterUnseenNan()
    scope = gradscope.watch(model)
    model(torch.randn(3, 4)).sum().backward()
    assert [a.layer for a in scope.step() if a.kind == "nonfinite"] == ["drop"]
    assert scope.latest()["lin"]["output_nonfinite"] == 0.0
    scope.detach()


def test_nan_from_the_loss_names_the_layer_closest_to_the_loss():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    scope = gradscope.watch(model)
    out = model(torch.randn(4, 8))
    (out.sum() * torch.tensor(float("nan"))).backward()
    new = scope.step()
    assert [(a.kind, a.layer) for a in new] == [("nonfinite", "2")]
    assert scope.latest(per="param")["2.weight"]["grad_nonfinite"] == 64
    assert math.isnan(scope.latest()["2"]["grad_norm"])


def test_raise_on_nonfinite_raises_gradient_error_after_recording():
    model = nan_model()
    model[2].poison = True
    scope = gradscope.watch(model, raise_on={"nonfinite"})
    F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 3])).backward()
    with pytest.raises(gradscope.GradientError, match="nonfinite in 2:") as err:
        scope.step()
    assert err.value.alerts[0].kind == "nonfinite"
    assert scope.alerts == err.value.alerts and len(scope.history) == 1
    scope.detach()


def test_alerts_go_to_the_gradscope_logger(caplog):
    with caplog.at_level(logging.WARNING, logger="gradscope"):
        train(deep_mlp(12, 64, "sigmoid"), 6)
    assert any(r.name == "gradscope" and "vanishing" in r.getMessage() for r in caplog.records)


def cond(step, layers):
    return [Alert("vanishing", n, step, 0.0, 1e-3, "m", "h") for n in layers]


def test_alert_fires_when_a_condition_starts_and_again_when_it_returns():
    book = AlertBook(rearm_after=1)
    assert [a.layer for a in book.update(cond(0, ["a"]))] == ["a"]
    assert book.update(cond(1, ["a"])) == []  # still holds: silent
    assert [a.layer for a in book.update(cond(2, ["a", "b"]))] == ["b"]
    assert book.update(cond(3, ["b"])) == []  # a cleared
    assert [(a.layer, a.step) for a in book.update(cond(4, ["a", "b"]))] == [("a", 4)]  # a returned
    assert [(a.layer, a.step) for a in book.alerts] == [("a", 0), ("b", 2), ("a", 4)]


def test_a_wobbling_condition_is_one_episode_until_it_stays_clear():
    book = AlertBook()  # rearm_after=10
    fired = [len(book.update(cond(step, ["a"] if step % 2 == 0 else [])))for step in range(40)]
    assert sum(fired) == 1  # on, off, on, off ...: one alert
    for step in range(40, 50):
        book.update(cond(step, []))  # clear for 10 collected steps: the episode is over
    assert [a.step for a in book.update(cond(50, ["a"]))] == [50]


def test_sudden_jump_is_flagged_exploding():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    scope = gradscope.watch(model)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for step in range(10):
        scale = 1e4 if step == 8 else 1.0
        (scale * F.cross_entropy(model(x), y)).backward()
        new = scope.step()
        model.zero_grad()
        if step < 8:
            assert new == []
        elif step == 8:
            # one alert for the whole model (the root, ""), naming the layers that jumped most (both 1e4x)
            assert [(a.metric, a.layer) for a in new] == [("grad_norm_spike", "")]
            assert "jumped most: 0 10000x, 2 10000x" in new[0].message or "jumped most: 2 10000x, 0 10000x" in new[0].message
            assert new[0].value == pytest.approx(1e4, rel=0.05) and "lower the learning rate" in new[0].hint
    scope.detach()


def test_thresholds_are_configurable_and_detectors_replaceable():
    model = deep_mlp(6, 32, "sigmoid", in_features=3 * 32 * 32)
    strict = train(model, 1, detectors=[gradscope.Vanishing(ratio=0.5, patience=1)])
    lax = train(deep_mlp(6, 32, "sigmoid"), 1, detectors=[gradscope.Vanishing(ratio=1e-30, patience=1)])
    assert strict.alerts and not lax.alerts
    silent = train(deep_mlp(20, 32, "sigmoid"), 1, detectors=[])
    assert silent.alerts == []


def test_thresholds_of_a_hand_edited_log_fall_back_to_the_defaults():
    """A saved meta's detector settings are read leniently: a value that is no usable threshold (an int too large
    for a float, found by the load fuzz test, a bool, a string, 0, inf) leaves the detector's default."""
    from gradscope.detectors import Exploding, Vanishing, thresholds

    for bad in (10**400, True, "1e3", 0, -1.0, float("inf"), float("nan"), None):
        got = thresholds({"detectors": [{"detector": "Exploding", "ratio": bad},
                                        {"detector": "Vanishing", "ratio": bad, "output_side": bad}]})
        assert got == {"vanishing": Vanishing.ratio, "exploding": Exploding.ratio,
                       "output_side": Vanishing.output_side}, bad
    assert thresholds({"detectors": [{"detector": "Vanishing", "ratio": 1e-4, "output_side": 0.5}]}) == \
        {"vanishing": 1e-4, "exploding": Exploding.ratio, "output_side": 0.5}
