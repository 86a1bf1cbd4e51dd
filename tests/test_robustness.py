"""Cases found in review: AMP overflow paths, leaks, partial failures, zero-initialised models, odd outputs."""

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
from conftest import hook_entries, rel_close


def amp_run(optimizer_mode: bool, steps=4, bad_steps=(0,)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scope = gradscope.watch(model, optimizer=opt, scaler=scaler) if optimizer_mode else gradscope.watch(model)
    for i in range(steps):
        x = torch.randn(3, 4)
        if i in bad_steps:
            x[0, 0] = float("inf")  # the scaled backward overflows
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        if not optimizer_mode:
            scope.step(scaler=scaler)
        scaler.step(opt)
        scaler.update()
    model(torch.randn(3, 4))  # optimizer mode learns of the last skipped step only at the next forward
    return scope


def test_overflow_skipped_by_the_scaler_is_its_own_step_in_optimizer_mode():
    manual, auto = amp_run(False), amp_run(True)
    assert [r.info for r in auto.history] == [r.info for r in manual.history]
    assert [r.info["overflow"] for r in auto.history] == [True, False, False, False]
    assert auto.history[0].info["grad_scale"] == 2.0 ** 16 and auto.history[1].info["grad_scale"] == 2.0 ** 15
    assert auto.alerts == manual.alerts == []
    for a, b in zip(manual.history, auto.history):
        if not a.info["overflow"]:
            assert a.layers == b.layers


def test_persistent_overflow_raises_one_nonfinite_alert():
    scope = amp_run(False, steps=14, bad_steps=range(14))
    assert all(r.info["overflow"] for r in scope.history)
    assert [(a.kind, a.step, a.metric) for a in scope.alerts] == [("nonfinite", 9, "overflow_streak")]


def test_nan_made_in_the_forward_pass_is_a_fault_even_under_a_scaler():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    scaler = torch.amp.GradScaler("cpu")
    scope = gradscope.watch(model, raise_on={"nonfinite"})
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    with pytest.raises(gradscope.GradientError, match="nonfinite in layer 0|nonfinite in 0"):
        scope.step(scaler=scaler)
    assert scope.history.last.info["overflow"] is False


def test_infinite_output_with_finite_gradients_is_not_an_alert():
    class Masked(nn.Module):  # an attention-style -inf mask, softmaxed away
        def forward(self, scores):
            return scores.masked_fill(torch.triu(torch.ones_like(scores, dtype=torch.bool), 1), float("-inf"))

    model = nn.Sequential(nn.Linear(4, 4), Masked(), nn.Softmax(-1), nn.Linear(4, 1))
    scope = gradscope.watch(model)
    model(torch.randn(4, 4)).sum().backward()
    assert scope.step() == []
    assert scope.latest()["1"]["output_nonfinite"] == 1.0 and scope.latest()["1"]["output_nan"] == 0.0
    scope.detach()


def test_gradient_norm_overflowing_float32_is_exploding():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    scope = gradscope.watch(model)
    (model(torch.randn(4, 8)).sum() * 1e19).backward()
    new = scope.step()
    want = math.sqrt(math.fsum(v * v for v in model[0].weight.grad.double().flatten().tolist()) +
                     math.fsum(v * v for v in model[0].bias.grad.double().flatten().tolist()))
    # measured in float64: finite and exact, although its float32 sum of squares overflows
    assert scope.latest()["0"]["grad_norm"] == pytest.approx(want, rel=1e-9) and want > 1.8e19
    assert scope.latest()["0"]["grad_nonfinite"] == 0
    assert {(a.kind, a.layer) for a in new} >= {("exploding", "0")}
    scope.detach()


def test_a_scope_never_detached_does_not_keep_its_model_alive():
    def run():
        model = nn.Linear(50, 50)
        scope = gradscope.watch(model)
        model(torch.randn(2, 50)).sum().backward()
        scope.step()
        return weakref.ref(model)

    refs = [run() for _ in range(3)]
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_module_that_refuses_hooks_leaves_no_hook_behind():
    model = nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Linear(3, 3)))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="ScriptModule"):
            gradscope.watch(model)
    assert hook_entries(model[0]) == [] and not model._forward_pre_hooks


def test_zero_initialised_downstream_layers_are_not_vanishing():
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert gradscope.audit(model, x, y, loss_fn=F.cross_entropy).alerts == []
    head_zero = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.zeros_(head_zero[2].weight)
    opt = torch.optim.SGD(head_zero.parameters(), lr=0.1)
    scope = gradscope.watch(head_zero)
    for _ in range(3):
        F.cross_entropy(head_zero(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        scope.step()
        opt.step()
        opt.zero_grad()
    assert scope.alerts == []
    scope.detach()


def test_persistent_exactly_zero_gradient_is_vanishing_on_the_second_step():
    class Cut(nn.Module):
        def forward(self, x):
            return x.detach() * 0  # nothing flows back past here

    model = nn.Sequential(nn.Linear(4, 4), Cut(), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias.zero_()
    scope = gradscope.watch(model)
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # a zero .grad, as zero_grad(set_to_none=False) leaves
    model[0].bias.grad = torch.zeros_like(model[0].bias)
    news = []
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        news.append(scope.step())
    assert news[0] == []
    assert scope.latest()["0"]["backprop_signal"] == 0.0  # its output never reached the loss
    assert [(a.kind, a.layer, a.metric) for a in news[1]] == [("vanishing", "0", "backprop_signal_ratio")]
    assert "exactly zero gradient" in news[1][0].message and "detach" in news[1][0].hint
    scope.detach()


def test_a_tensor_appearing_twice_in_an_output_counts_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return h, h

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = Twice(), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.enc(x)[0])

    model = Model()
    scope = gradscope.watch(model)
    model(torch.randn(3, 4)).sum().backward()
    scope.step()
    assert rel_close(scope.latest()["enc"]["backprop_signal"], scope.latest()["enc.lin"]["backprop_signal"])
    scope.detach()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_element_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 0))
    scope = gradscope.watch(model)
    model(torch.randn(2, 4)).sum().backward()
    scope.step()
    assert "1.weight" not in scope.latest(per="param") and "0.weight" in scope.latest(per="param")
    scope.detach()


def test_parameterised_module_never_called_is_placed_before_its_parent():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Flatten(), nn.Linear(16 * 5, 3))
    scope = gradscope.watch(model)
    model(torch.randn(2, 5, 8)).sum().backward()
    scope.step()
    names = scope.layer_names
    assert names.index("1.self_attn.out_proj") == names.index("1.self_attn") - 1
    assert names[-1] == "3"
    scope.detach()


@pytest.mark.parametrize("order", ["watch, then compile", "compile, then watch"])
@pytest.mark.parametrize("every", [1, 2])
def test_torch_compile_gives_the_eager_statistics(order, every):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    eager, model = make(), make()
    model.load_state_dict(eager.state_dict())
    batches = [(torch.randn(32, 8), torch.randint(0, 4, (32,))) for _ in range(4)]
    ref = gradscope.watch(eager, every=every)
    if order == "watch, then compile":
        scope = gradscope.watch(model, every=every)
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model)
        scope = gradscope.watch(compiled, every=every)  # the compiled wrapper: its inner module is watched
    assert scope.model is model
    for x, y in batches:
        for m, s in ((eager, ref), (compiled, scope)):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            s.step()
    assert scope.history.steps == ref.history.steps == list(range(0, 4, every))
    got, want = scope.latest(), ref.latest()
    assert got.keys() == want.keys() == {"0", "1", "2", "3", "4"}
    for layer, st in want.items():
        for key, v in st.items():
            assert got[layer][key] == pytest.approx(v, rel=1e-4, abs=1e-9), (layer, key)
    scope.detach()
    ref.detach()


def test_a_compiled_model_with_functional_calls_is_left_with_no_function_mode_entered():
    class Gelu(nn.Module):  # a functional tanh inside a module: watched op by op in eager mode
        def forward(self, x):
            return x * (1 + torch.tanh(x)) / 2

    model = nn.Sequential(nn.Linear(4, 8), Gelu(), nn.Linear(8, 1))
    scope = gradscope.watch(model)
    compiled = torch.compile(model, backend="eager")
    for _ in range(4):  # probe passes and the passes after them
        compiled(torch.randn(8, 4)).sum().backward()
        scope.step()
        assert not torch.overrides._get_current_function_mode_stack()  # nothing left on for the user's code
    assert "0" in scope.latest() and "2" in scope.latest()  # the modules' statistics, as in eager mode
    scope.detach()
