"""Every statistic against values computed here from p.grad and plain autograd, on an unwatched copy of the model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
import gradscope.stats
from gradscope.bench.models import deep_mlp
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


class Boom(RuntimeError):
    pass


def signal_run(batched: tuple, batch_bytes: int, fail: bool):
    """Two accumulated backward passes of small_cnn (and, with ``fail``, one before them that a hook aborts halfway),
    collected with output gradients measured one by one (``batched=()``) or kept and measured together."""
    from gradscope.collect import Collector

    torch.manual_seed(0)
    model = small_cnn()
    xs, ys = torch.randn(2, 4, 3, 8, 8), torch.randint(0, 10, (2, 4))
    old = Collector.BATCHED_DEVICES, Collector.BATCH_BYTES
    Collector.BATCHED_DEVICES, Collector.BATCH_BYTES = batched, batch_bytes
    try:
        scope = gradscope.watch(model)
        kept_after = []
        if fail:
            out = model[:4](xs[0])  # the third module's output: backward raises there, after the later ones' hooks
            out.register_hook(lambda g: (_ for _ in ()).throw(Boom()))
            with pytest.raises(Boom):
                F.cross_entropy(model[4:](out), ys[0]).backward()
        for x, y in zip(xs, ys):
            F.cross_entropy(model(x), y).backward()
            kept_after.append(len(scope._collector._kept))
        scope.step()
        return model, xs, ys, scope.latest(), kept_after
    finally:
        Collector.BATCHED_DEVICES, Collector.BATCH_BYTES = old


@pytest.mark.parametrize("batch_bytes", [32 << 20, 1], ids=["at the end of backward", "over budget: at once"])
def test_output_gradients_kept_and_measured_together_equal_autograd(batch_bytes):
    """CUDA's path (the hooks keep output gradients, one fused norm when backward ends), run here on CPU tensors:
    the same backprop signals as plain autograd, summed over two accumulated passes, nothing kept after each."""
    model, xs, ys, latest, kept_after = signal_run(("cpu",), batch_bytes, fail=False)
    ref = copy.deepcopy(model)
    sig_sq = {}
    for x, y in zip(xs, ys):
        for k, v in reference(ref, x, y)[0].items():
            sig_sq[k] = sig_sq.get(k, 0.0) + v * v
    assert set(sig_sq) <= set(latest) and len(sig_sq) >= 8
    for k, v in sig_sq.items():
        assert rel_close(latest[k]["backprop_signal"], math.sqrt(v)), k
    assert kept_after == [0, 0]


def test_kept_gradients_of_an_aborted_backward_count_as_measured_ones_do():
    """A backward pass a hook aborts never reaches its end: what it kept is measured when the step closes, as the
    one-by-one path measured it in its hooks, and adds to the step's (the passes that did end) signals alike."""
    _, _, _, one_by_one, _ = signal_run((), 32 << 20, fail=True)
    _, _, _, kept, _ = signal_run(("cpu",), 32 << 20, fail=True)
    assert one_by_one.keys() == kept.keys()
    for layer, st in one_by_one.items():
        for key, v in st.items():
            if isinstance(v, float):
                assert kept[layer][key] == pytest.approx(v, rel=1e-12), (layer, key)


class Wraps(nn.Module):
    """Returns its Linear's output as it is, or scaled in place first (``mul_``: the same tensor, a new value)."""

    def __init__(self, scale_in_place):
        super().__init__()
        self.lin, self.scale_in_place = nn.Linear(5, 5), scale_in_place

    def forward(self, x):
        h = self.lin(x)
        return h.mul_(3.0) if self.scale_in_place else h


@pytest.mark.parametrize("scale_in_place", [False, True])
def test_a_container_returning_its_child_output_shares_the_hook_only_while_unchanged(scale_in_place):
    """An output a container returns unchanged gets one gradient hook that reports for both sites; changed in place
    after its module returned it, it is a different value with its own gradient and hook. Both against autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(Wraps(scale_in_place), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
    h = model[0].lin(x)
    h2 = h * 3.0 if scale_in_place else h
    gh, gh2 = torch.autograd.grad(F.cross_entropy(model[2](model[1](h2)), y), [h, h2])
    scope = gradscope.watch(model)
    F.cross_entropy(model(x), y).backward()
    hooks = len(scope._collector._passes[-1].handles)
    scope.step()
    latest = scope.latest()
    assert rel_close(latest["0.lin"]["backprop_signal"], float(gh.norm()))
    assert rel_close(latest["0"]["backprop_signal"], float(gh2.norm()))
    assert hooks == (4 if scale_in_place else 3)  # 0.lin, 0, 1, 2 (the root adds none); 0 shares 0.lin's if unchanged
    if scale_in_place:
        assert latest["0.lin"]["backprop_signal"] == pytest.approx(3 * latest["0"]["backprop_signal"])
    scope.detach()


def test_a_kept_gradient_changed_in_place_by_a_later_hook_is_said_and_then_measured_in_the_hook(monkeypatch):
    """CUDA's kept gradients (run here on CPU tensors): a user's tensor hook that clamps dLoss/d(output) in place
    after gradscope's hook (PyTorch asks hooks not to) is caught by the version counter: a warning naming the site,
    and from the next step that site is measured inside gradscope's hook, as without keeping."""
    from gradscope.collect import Collector

    def run(batched, steps):
        monkeypatch.setattr(Collector, "BATCHED_DEVICES", batched)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
        def clamp_later(module, args, out):
            out.register_hook(lambda g: g.clamp_(-1e-3, 1e-3))

        model[0].register_forward_hook(clamp_later)
        scope = gradscope.watch(model)  # its forward hooks run first: its tensor hook sees the unclamped gradient
        x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
        values = []
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            scope.step()
            values.append(scope.latest()["0"]["backprop_signal"])
        scope.detach()
        return values

    measured_in_hook = run((), 2)
    with pytest.warns(UserWarning, match=r"dLoss/d\(output\) of 0 was changed in place"):
        kept = run(("cpu",), 2)
    assert kept[0] < measured_in_hook[0] / 10  # the clamped value, that once
    assert kept[1] == pytest.approx(measured_in_hook[1], rel=1e-9)


class FlattenHead(nn.Module):
    """Returns nn.Flatten's output: a view of the conv's output, which came into the Flatten as its input."""

    def __init__(self):
        super().__init__()
        self.conv, self.flat = nn.Conv2d(2, 3, 3, padding=1), nn.Flatten()

    def forward(self, x):
        return self.flat(self.conv(x))


def test_a_container_returning_a_view_hooked_by_its_child_keeps_its_signal_after_an_inplace_op():
    """The child hooked the view (its base was the child's input); an in-place ReLU then rebases the view and that
    hook never fires. The container, for which the base was made inside it, hooks the base: its signal survives."""
    torch.manual_seed(0)
    model = nn.Sequential(FlattenHead(), nn.ReLU(inplace=True), nn.Linear(3 * 16, 2))
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 2, (4,))
    f = model[0](x)
    (g,) = torch.autograd.grad(F.cross_entropy(model[2](torch.relu(f)), y), [f])
    scope = gradscope.watch(model)
    F.cross_entropy(model(x), y).backward()
    scope.step()
    assert rel_close(scope.latest()["0"]["backprop_signal"], float(g.norm())) and float(g.norm()) > 0
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


# -- float64 statistics: no underflow or overflow of squared norms (gradscope.stats) ---------------------------------

def exact_sq(t) -> float:
    """Sum of squares of t's entries (as stored: float32, bfloat16, ...) in plain Python float64, correctly rounded."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    wide = t.resolve_conj().to(torch.complex128 if t.is_complex() else torch.float64)
    return math.fsum(abs(v) ** 2 for v in wide.flatten().tolist())


def spread(n, lo, hi, dtype=torch.float32):
    """n entries of alternating sign whose magnitudes run log-uniformly from 10**lo to 10**hi."""
    mags = torch.logspace(lo, hi, n, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat((n + 1) // 2)[:n]
    return (mags * signs).to(dtype)


TINY_AND_HUGE = {
    "float32 1e-25": lambda: torch.full((64, 32), 1e-25),  # float32: sum of squares 0
    "float32 1e-30": lambda: torch.full((7, 5, 3), 1e-30),
    "float32 subnormal": lambda: torch.tensor([1e-40, -3e-42, 1.4e-45, 0.0]),
    "float32 1e30": lambda: torch.full((100,), 1e30),  # float32: sum of squares inf
    "float32 1e-30..1e30": lambda: spread(1000, -30, 30),
    "float32 max": lambda: torch.tensor([3.4e38, -3.4e38, 1e-45]),
    "float64 1e-100": lambda: torch.full((10, 10), 1e-100, dtype=torch.float64),
    "float64 1e-120..1e120": lambda: spread(500, -120, 120, torch.float64),
    "bfloat16 1e-25": lambda: torch.full((300,), 1e-25, dtype=torch.bfloat16),
    "bfloat16 1e-30..1e30": lambda: spread(400, -30, 30, torch.bfloat16),
    "float16 6e-8..6e4": lambda: spread(400, -7.2, 4.8, torch.float16),
    "float16 subnormal": lambda: torch.full((50,), 6e-8, dtype=torch.float16),
    "complex64 1e-25": lambda: torch.full((20,), 1e-25 - 3e-26j, dtype=torch.complex64),
    "complex64 conj": lambda: torch.randn(6, 4, dtype=torch.complex64).conj(),
    "transposed": lambda: spread(600, -30, 30).reshape(20, 30).t(),
    "channels_last": lambda: spread(2 * 3 * 4 * 5, -28, 28).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "expanded": lambda: torch.tensor([1e-25, 2e-25]).expand(3, 2),
    "0-d": lambda: torch.tensor(-1e-30),
    "empty": lambda: torch.zeros(0, 3),
}


@pytest.mark.parametrize("name", list(TINY_AND_HUGE))
def test_sq_norm_is_exact_for_tiny_and_huge_entries(name):
    t = TINY_AND_HUGE[name]()
    want = exact_sq(t)
    got = gradscope.stats.sq_norm(t)
    # float64 unless the float32 pass was in range (then float32 holds it to its own rounding)
    assert got.dim() == 0 and (got.dtype == torch.float64 or gradscope.stats.TINY_SQ <= float(got) < 3.4e38)
    # float16 accumulates in float32 (its squares cannot leave float32's range); the others in float64
    assert math.isclose(float(got), want, rel_tol=1e-6 if t.dtype == torch.float16 else 1e-12, abs_tol=0.0), (
        float(got), want)
    if name in ("float32 1e-25", "float32 1e-30", "float32 1e30"):
        assert float(torch.dot(t.flatten(), t.flatten())) in (0.0, math.inf)  # what float32 reported before
    n = gradscope.stats.norms([t])
    assert n.dtype == torch.float64 and math.isclose(float(n[0]), math.sqrt(want), rel_tol=1e-6, abs_tol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sq_norm_of_large_tensors_block_by_block(monkeypatch, dtype):
    monkeypatch.setattr(gradscope.stats, "_CHUNK", 1000)  # > _CHUNK entries: converted block by block
    for t in (spread(4321, -7, 4, dtype), spread(3000, -7, 4, dtype).reshape(30, 100).t()):
        got = gradscope.stats.exact_sq_norm(t)
        assert got.dtype == torch.float64
        assert math.isclose(float(got), exact_sq(t), rel_tol=1e-6 if dtype == torch.float16 else 1e-12)


def test_sq_norm_and_max_of_sparse_gradients():
    idx = torch.tensor([[1, 4, 1, 9]])
    g = torch.sparse_coo_tensor(idx, torch.tensor([[1e-25, 3e-26], [2e-25, -1e-30], [1e-25, 0.0], [0.0, 0.0]]),
                                (12, 2), check_invariants=True)  # uncoalesced: row 1 twice
    want = exact_sq(g.coalesce())
    assert want > 0
    assert math.isclose(float(gradscope.stats.sq_norm(g)), want, rel_tol=1e-12, abs_tol=0.0)
    assert math.isclose(float(gradscope.stats.norms([g])[0]), math.sqrt(want), rel_tol=1e-12, abs_tol=0.0)
    dense = g.to_dense()
    assert float(gradscope.stats.max_abs([g])[0]) == float(dense.abs().max())
    assert float(gradscope.stats.nonzero_counts([g])[0]) == int((dense != 0).sum())


def mixed_list():
    return [torch.full((64, 32), 1e-25), spread(1000, -30, 30), torch.full((9,), 1e-100, dtype=torch.float64),
            spread(40, -30, 30, torch.bfloat16), spread(40, -7, 4, torch.float16), torch.zeros(0),
            torch.full((5,), 1e-25 + 1e-25j, dtype=torch.complex64), torch.randn(4, 4).t()]


def test_norms_of_a_mixed_list():
    ts = mixed_list()
    n = gradscope.stats.norms(ts)
    assert n.dtype == torch.float64 and n.shape == (len(ts),)
    for got, t in zip(n.tolist(), ts):
        assert math.isclose(got, math.sqrt(exact_sq(t)), rel_tol=1e-6, abs_tol=0.0), (got, t.dtype)
    assert gradscope.stats.norms([]).dtype == torch.float64


@pytest.mark.parametrize("takes_dtype", [True, False])
def test_fused_norms_path_on_cpu_tensors(monkeypatch, takes_dtype):
    """The non-CPU path of norms() (one _foreach_norm per dtype; torch < 2.4: vector_norm per tensor), run on CPU."""
    monkeypatch.setattr(gradscope.stats, "_foreach_norm_takes_dtype", lambda: takes_dtype)
    ts = [gradscope.stats._real(t) for t in mixed_list()]
    n = gradscope.stats._fused_norms(ts)
    assert n.dtype == torch.float64
    for got, t in zip(n.tolist(), ts):
        assert math.isclose(got, math.sqrt(exact_sq(t)), rel_tol=1e-6, abs_tol=0.0), (got, t.dtype)
    same = [torch.full((3,), 1e-25), torch.full((2, 2), 1e30)]  # one dtype: one fused call
    assert gradscope.stats._fused_norms(same).tolist() == pytest.approx([math.sqrt(3) * 1e-25, 2e30], rel=1e-6)


def test_foreach_norm_takes_dtype_on_recent_torch():
    takes = gradscope.stats._foreach_norm_takes_dtype()
    assert isinstance(takes, bool)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5):  # added in 2.4 (pytorch#125665)
        assert takes  # CUDA norms: one fused float64 _foreach_norm, not vector_norm per tensor


def test_max_abs_and_nonzero_counts_any_float_dtype():
    ts = [torch.tensor([1e-50, -3e-50], dtype=torch.float64), torch.tensor([1e-30, -2e-45, 0.0]),
          torch.tensor([-1e30, 5.0], dtype=torch.bfloat16), torch.tensor([6e-8, 0.0, -0.5], dtype=torch.float16),
          torch.tensor([3e-25 + 4e-25j], dtype=torch.complex64), torch.zeros(0)]
    m = gradscope.stats.max_abs(ts)
    assert m.dtype == torch.float64
    assert m.tolist() == [3e-50, float(torch.tensor(1e-30)), float(torch.tensor(1e30, dtype=torch.bfloat16)),
                          0.5, pytest.approx(5e-25, rel=1e-6), 0.0]
    assert math.isnan(float(gradscope.stats.max_abs([torch.tensor([1.0, float("nan")])])[0]))
    c = gradscope.stats.nonzero_counts(ts)
    assert c.dtype == torch.float64 and c.tolist() == [2, 2, 2, 2, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_norms_of_other_dtypes_are_taken_in_float64(dtype):
    t = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    got = gradscope.stats.norms([t, torch.randn(5)])
    assert got.dtype == torch.float64 and got[0].item() == math.sqrt(float(gradscope.stats.sq_norm(t)))


def test_float32_squared_norms_add_up_in_float64():
    big = gradscope.stats.sq_norm(torch.full((4,), 8e18))  # 2.56e38: the float32 pass is in range
    assert big.dtype == torch.float32 and math.isclose(float(big), 4 * 8e18 ** 2, rel_tol=1e-6)
    keys, sums = gradscope.stats.sum_by_key([("a", big), ("b", big), ("a", big)])  # a: 5.1e38, beyond float32
    assert keys == ["a", "b"] and math.isclose(float(sums[0]), 8 * 8e18 ** 2, rel_tol=1e-6) and sums.dtype == torch.float64


def test_transfer_and_sum_by_key_keep_float64():
    sq = gradscope.stats.sq_norm(torch.full((100,), 1e-25))  # 1e-48
    f64 = torch.float64
    parts = [("a", torch.tensor(1e-50, dtype=f64)), ("b", sq), ("a", torch.tensor(2e-50, dtype=f64))]
    keys, sums = gradscope.stats.sum_by_key(parts)
    assert keys == ["a", "b"] and sums.dtype == torch.float64
    tr = gradscope.stats.Transfer()
    tr.add("tiny", torch.tensor(1e-50, dtype=torch.float64))
    tr.add("sums", sums)
    tr.add("f32", torch.tensor([1e-30, 3.0]))
    tr.add("int", torch.tensor([3, 2 ** 40]))
    got = tr.fetch()
    assert got["tiny"] == [1e-50]
    assert got["sums"] == [pytest.approx(3e-50, rel=1e-15, abs=0), float(sq)]
    assert got["sums"][1] == pytest.approx(exact_sq(torch.full((100,), 1e-25)), rel=1e-12, abs=0)
    assert got["f32"] == [float(torch.tensor(1e-30)), 3.0]
    assert got["int"] == [3.0, 2.0 ** 40]


def test_float64_model_statistics_match_autograd():
    model = small_cnn().double()  # used to fail: vector_norm(dtype=float32) of a float64 gradient
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    signal, ref_grads = reference(copy.deepcopy(model), x, y)
    scope = gradscope.watch(model, extra_stats="all")
    F.cross_entropy(model(x), y).backward()
    scope.step()
    check_param_stats(scope, ref_grads, model)
    for name, s in signal.items():
        assert rel_close(scope.latest()[name]["backprop_signal"], s, 1e-9), name
    scope.detach()


def test_deep_sigmoid_mlp_tiny_gradients_are_not_reported_as_zero():
    """30 sigmoid layers: the first layers' gradient entries are ~1e-25, whose float32 sum of squares is exactly 0."""
    model = deep_mlp(30, 32, "sigmoid", in_features=16)
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    ref = copy.deepcopy(model)
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
             for n, m in ref.named_modules() if n and not list(m.children()) and not isinstance(m, nn.Flatten)]
    loss = F.cross_entropy(ref(x), y)
    for h in hooks:
        h.remove()
    out_grads = dict(zip(outs, torch.autograd.grad(loss, list(outs.values()))))

    scope = gradscope.watch(model)
    F.cross_entropy(model(x), y).backward()
    scope.step()
    per_param, latest = scope.latest(per="param"), scope.latest()
    first = model[1].weight.grad
    assert 0 < first.abs().max() < 1e-19 and float(first.norm()) == 0.0  # the case: float32 norm underflows
    for name, p in model.named_parameters():
        want = math.sqrt(exact_sq(p.grad))
        assert want > 0
        # float32 accuracy where float32 holds the sum, float64 where it underflows
        assert math.isclose(per_param[name]["grad_norm"], want, rel_tol=1e-6, abs_tol=0.0), name
        assert math.isclose(per_param[name]["grad_rms"], want / math.sqrt(p.numel()), rel_tol=1e-6, abs_tol=0.0)
    for name, g in out_grads.items():
        want = math.sqrt(exact_sq(g))
        assert want > 0
        assert math.isclose(latest[name]["backprop_signal"], want, rel_tol=1e-6, abs_tol=0.0), name
    scope.detach()


def test_sq_norm_takes_the_float32_path_for_ordinary_gradients_and_float64_for_tiny_ones(monkeypatch):
    calls = []
    exact = gradscope.stats.exact_sq_norm
    monkeypatch.setattr(gradscope.stats, "exact_sq_norm", lambda t: calls.append(t) or exact(t))
    ordinary = torch.randn(64, 32)
    got = gradscope.stats.sq_norm(ordinary)
    assert calls == [] and math.isclose(float(got), exact_sq(ordinary), rel_tol=1e-6)
    tiny = torch.full((64, 32), 3e-24)
    assert math.isclose(float(gradscope.stats.sq_norm(tiny)), exact_sq(tiny), rel_tol=1e-12) and len(calls) == 1
