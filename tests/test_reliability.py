"""Issue 12 (reliability): every training dtype, audit after detach, clear errors on bad arguments of
watch()/load()/plot()/decay_factor()/gradient_flow(), crash-safe logs, pickled watched models, evaluation forwards,
interrupted forwards, reentrant checkpointing, assigned parameters, PyTorch private APIs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope


def small(dtype):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def exact_norm(t):
    return math.sqrt(math.fsum(abs(v) ** 2 for v in t.detach().to(torch.complex128 if t.is_complex() else
                                                                   torch.float64).flatten().tolist()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_training_dtype_trains_and_matches_its_own_gradients(dtype):
    torch.manual_seed(0)
    model = small(dtype)
    scope = gradscope.watch(model)
    x, y = torch.randn(5, 6, dtype=dtype), torch.tensor([0, 1, 2, 0, 1])
    loss = F.cross_entropy(model(x).float(), y)  # used to raise in backward for float64 (vector_norm narrowing)
    loss.backward()
    scope.step(loss=loss)
    per_param = scope.latest(per="param")
    for name, p in model.named_parameters():
        assert per_param[name]["grad_norm"] == pytest.approx(exact_norm(p.grad), rel=1e-6), (dtype, name)
    scope.detach()
    report = gradscope.audit(model, x, y, loss_fn=lambda out, t: F.cross_entropy(out.float(), t))
    assert report.alerts == [] and math.isfinite(report.loss)


def test_a_complex_layer_is_watched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64))
    scope = gradscope.watch(model)
    model(torch.randn(3, 4, dtype=torch.complex64)).abs().sum().backward()
    scope.step()
    assert scope.latest(per="param")["0.weight"]["grad_norm"] == pytest.approx(exact_norm(model[0].weight.grad),
                                                                               rel=1e-6)
    scope.detach()


def test_audit_works_on_a_model_that_was_watched_and_detached():
    model = small(torch.float32)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with gradscope.watch(model):
        with pytest.raises(ValueError, match="being watched"):
            gradscope.audit(model, x, y, loss_fn=F.cross_entropy)
    assert gradscope.audit(model, x, y, loss_fn=F.cross_entropy).loss > 0  # used to refuse forever
    scope = gradscope.watch(model)  # and it can be watched again
    scope.detach()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"raise_on": 5}, TypeError, "raise_on must be an alert kind"),
    ({"raise_on": [5]}, TypeError, "raise_on must be an alert kind"),
    ({"detectors": 5}, TypeError, "detectors must be a list"),
    ({"detectors": "Vanishing"}, TypeError, "detectors must be a list"),
    ({"extra_stats": None}, TypeError, "extra_stats must be"),
    ({"update_ratio": "no"}, TypeError, "update_ratio must be True or False"),
    ({"functional": 1}, TypeError, "functional must be True or False"),
    ({"reduce_ranks": "yes"}, TypeError, "reduce_ranks must be"),
])
def test_bad_watch_arguments_name_the_fix(kwargs, error, match):
    model = small(torch.float32)
    with pytest.raises(error, match=match):
        gradscope.watch(model, **kwargs)
    gradscope.watch(model).detach()  # nothing was left attached by the failed calls


@pytest.mark.parametrize("history", ["abc", 1.5, 1, True])
def test_load_rejects_a_bad_history_size(tmp_path, history):
    model = small(torch.float32)
    scope = gradscope.watch(model)
    model(torch.randn(2, 6)).sum().backward()
    scope.step()
    scope.detach()
    scope.save(tmp_path / "run.jsonl")
    with pytest.raises(ValueError, match="history must be None"):
        gradscope.load(tmp_path / "run.jsonl", history=history)
    assert gradscope.load(tmp_path / "run.jsonl", history=2).history.steps == [0]


def test_reading_api_errors_name_the_fix():
    pytest.importorskip("matplotlib")
    from gradscope import figures

    model = small(torch.float32)
    scope = gradscope.watch(model)
    model(torch.randn(2, 6)).sum().backward()
    scope.step()
    scope.detach()
    with pytest.raises(ValueError, match="no collected step 99999 in this run; kept steps run from 0 to 0"):
        figures.gradient_flow(scope, step=99999)
    with pytest.raises(TypeError, match="path must be a file path"):
        scope.plot("flow", path=5)
    for method in (scope.decay_factor, scope.signal_ratio, scope.depth_profile):
        with pytest.raises(TypeError, match="record must be a StepRecord"):
            method(5)
    assert math.isfinite(scope.decay_factor(scope.history[-1]))


def test_a_save_killed_half_way_leaves_the_previous_log_intact(run_file, monkeypatch):
    scope, path = run_file
    tmp_path = path.parent
    before = path.read_bytes()
    calls, real_write = [], gradscope.run._write

    def dying_write(f, obj):
        calls.append(obj["type"])
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process is stopped in the middle of writing
        real_write(f, obj)

    monkeypatch.setattr(gradscope.run, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        scope.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]
    assert gradscope.load(path).history.steps == scope.history.steps


def test_a_cut_log_is_refused_or_recovered_and_says_so(run_file):
    scope, path = run_file
    tmp_path = path.parent
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    assert json.loads(lines[-1]) == {"type": "end", "steps": 3, "alerts": len(scope.alerts)} and scope.alerts
    cuts = {"no end line": "".join(lines[:-1]), "half the lines": "".join(lines[:len(lines) // 2]),
            "cut mid-line": text[:len(text) // 2]}
    for why, cut in cuts.items():
        (tmp_path / "cut.jsonl").write_text(cut)
        with pytest.raises(ValueError, match=r"cut short .* partial=True"):
            gradscope.load(tmp_path / "cut.jsonl")
        with pytest.warns(RuntimeWarning, match="cut short"):
            run = gradscope.load(tmp_path / "cut.jsonl", partial=True)
        assert set(run.history.steps) < set(scope.history.steps), why  # the complete steps, never more
        for rec in run.history:
            assert rec.layers == next(r for r in scope.history if r.step == rec.step).layers
    (tmp_path / "edited.jsonl").write_text(text.replace(
        lines[-1], json.dumps({"type": "end", "steps": 2, "alerts": len(scope.alerts)}) + "\n"))
    with pytest.raises(ValueError, match="end line counts 2 steps"):
        gradscope.load(tmp_path / "edited.jsonl")


# -- item 2: a watched model pickles, and its copy loads unwatched ----------------------------------------------------
def relu_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def train_steps(model, scope, steps, opt=None):
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        if opt is None:
            scope.step()
        else:
            opt.step()
        model.zero_grad()


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
@pytest.mark.parametrize("mode", ["manual", "optimizer+scaler"])
def test_a_watched_model_saves_whole_and_loads_unwatched(tmp_path, how, mode):
    import copy
    import pickle

    from conftest import hook_entries

    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {} if mode == "manual" else {"optimizer": opt, "scaler": torch.amp.GradScaler("cpu")}
    scope = gradscope.watch(model, **kwargs)
    train_steps(model, scope, 2, opt if kwargs else None)
    if how == "pickle":
        copy_ = pickle.loads(pickle.dumps(model))  # used to raise: cannot pickle '_ForwardState' object
    elif how == "torch.save":
        torch.save(model, tmp_path / "model.pt")  # pytorch/examples' word_language_model checkpoint
        copy_ = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        copy_ = copy.deepcopy(model)
    x = torch.randn(4, 6)
    assert torch.equal(copy_(x), model(x))  # the copy computes the same; its first forward drops the inert hooks
    assert hook_entries(copy_) == [] and gradscope.scope.watched_by(copy_) is None
    copy_(x).sum().backward()  # and records nothing anywhere
    train_steps(model, scope, 1, opt if kwargs else None)
    assert scope.history.steps == [0, 1, 2] and scope.attached  # the watched original goes on as before
    second = gradscope.watch(copy_)  # the copy can be watched on its own
    train_steps(copy_, second, 1)
    assert second.history.steps == [0] and second.latest()["0"]["grad_norm"] > 0
    second.detach()
    scope.detach()
    assert hook_entries(model, opt) == []


# -- item 3: forwards with grad enabled and no backward (an evaluation loop without torch.no_grad) -------------------
def test_forwards_no_backward_reaches_hold_bounded_memory_and_count_nowhere():
    torch.manual_seed(0)
    model, clean = relu_mlp(), relu_mlp()
    clean.load_state_dict(model.state_dict())
    scope, reference = gradscope.watch(model), gradscope.watch(clean)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    for x, y in batches:
        model.eval()
        for _ in range(300):  # the evaluation loop that forgot torch.no_grad()
            model(torch.randn(32, 6))
            c = scope._collector
            assert len(c._passes) <= c.MAX_PENDING_PASSES + 1  # bounded, whatever the user does between steps
            assert sum(len(p.handles) for p in c._passes) <= len(model) * (c.MAX_PENDING_PASSES + 1)
        model.train()
        for m, s in ((model, scope), (clean, reference)):
            F.cross_entropy(m(x), y).backward()
            s.step()
            m.zero_grad()
    for got, want in zip(scope.history, reference.history):
        assert got.layers == want.layers  # the statistics describe the training batches only
    assert scope._collector.dead["1"].seen == 3 * 8  # samples: three training batches of 8, no evaluation sample
    scope.detach()
    reference.detach()


def test_a_loss_over_several_forward_passes_counts_each_of_them():
    model = relu_mlp()
    scope = gradscope.watch(model)
    views = [model(torch.randn(8, 6)) for _ in range(3)]  # siamese / contrastive views: one backward for all
    model(torch.randn(8, 6))  # an unrelated forward no backward reaches
    sum(v.square().mean() for v in views).backward()
    scope.step()
    assert scope._collector.dead["1"].seen == 3 * 8
    scope.detach()


# -- item 6: a KeyboardInterrupt inside a forward pass ---------------------------------------------------------------
class Interruptible(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.interrupt = False

    def forward(self, x):
        x = torch.relu(self.inner(x))
        if self.interrupt:
            raise KeyboardInterrupt  # Ctrl-C: PyTorch's always_call hooks do not run for a BaseException
        return x


def test_the_step_after_a_keyboard_interrupt_in_forward_starts_clean():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), Interruptible(), nn.Linear(6, 3))

    model, clean = build(), build()
    scope, reference = gradscope.watch(model), gradscope.watch(clean)
    x = torch.randn(4, 6)
    model[1].interrupt = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model[1].interrupt = False
    torch.sigmoid(torch.randn(3, requires_grad=True))  # the user's own call, outside any forward of the model
    for m, s in ((model, scope), (clean, reference)):
        m(x).sum().backward()
        s.step()
    assert scope.layer_names == reference.layer_names == ["0", "1.inner", "1:relu", "1", "2"]
    assert scope.history[-1].layers == reference.history[-1].layers
    assert torch.overrides._get_current_function_mode_stack() == []  # nothing of gradscope is left entered
    scope.detach()
    reference.detach()


# -- item 7: torch.utils.checkpoint(use_reentrant=True) is said, not silently half-monitored -------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inner, self.out, self.reentrant = nn.Linear(6, 6), nn.Linear(6, 3), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.out(checkpoint(lambda t: F.relu(self.inner(t)), x, use_reentrant=self.reentrant))


def test_reentrant_checkpointing_is_stated_in_a_warning_and_the_record(tmp_path):
    import warnings as w

    model = Checkpointed(reentrant=True)
    scope = gradscope.watch(model)
    with pytest.warns(RuntimeWarning, match=r"\['inner'\] run only inside torch.utils.checkpoint.*use_reentrant=False"):
        model(torch.randn(4, 6, requires_grad=True)).sum().backward()
        scope.step()
    with w.catch_warnings():
        w.simplefilter("error")  # said once
        model(torch.randn(4, 6, requires_grad=True)).sum().backward()
        scope.step()
    assert "backprop_signal" not in scope.latest()["inner"] and scope.latest()["inner"]["grad_norm"] > 0
    scope.detach()
    scope.save(tmp_path / "run.jsonl")
    assert gradscope.load(tmp_path / "run.jsonl").meta["unmonitored"] == ["inner"]

    model = Checkpointed(reentrant=False)  # the recommended checkpointing is monitored fully, with no warning
    scope = gradscope.watch(model)
    with w.catch_warnings():
        w.simplefilter("error")
        model(torch.randn(4, 6)).sum().backward()
        scope.step()
    assert "backprop_signal" in scope.latest()["inner"] and ":relu" in scope.layer_names
    assert "unmonitored" not in scope.meta
    scope.detach()


# -- item 8: parameters replaced while watched -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "attribute"])
def test_replaced_parameters_are_followed(how):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model)
    train_steps(model, scope, 1)
    fresh = relu_mlp()
    if how == "attribute":
        model[0].weight = nn.Parameter(fresh[0].weight.detach().clone())
    else:
        model.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    scope.step()  # used to say "no backward pass" although one ran
    per_param = scope.latest(per="param")
    for name, p in model.named_parameters():
        assert per_param[name]["grad_norm"] == pytest.approx(exact_norm(p.grad), rel=1e-6), name
    assert [p for _, p in scope.named_parameters()] == list(model.parameters())
    scope.detach()
    del opt


# -- item 17: PyTorch's private APIs fail loudly ---------------------------------------------------------------------
def test_private_torch_apis_read_what_the_public_ones_say():
    from gradscope import _torch

    model = small(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert _torch.scale_tensor(scaler) is None and _torch.init_scale(scaler) == 1024.0
    scaler.scale(model(torch.randn(2, 6)).sum()).backward()
    assert _torch.scale_tensor(scaler).item() == scaler.get_scale() == 1024.0
    assert not _torch.grads_already_unscaled(scaler)
    scaler.unscale_(opt)
    assert _torch.grads_already_unscaled(scaler)
    assert not _torch.in_backward()
    seen, order = [], []
    queue = _torch.end_of_backward_callback()  # present in every supported PyTorch (CI would say otherwise)

    def on_weight_grad(g):
        seen.append(_torch.in_backward())
        queue(lambda: order.append("ended"))

    model[0].weight.register_hook(on_weight_grad)
    model[0].bias.register_hook(lambda g: order.append("bias"))
    model(torch.randn(2, 6)).sum().backward()
    assert seen == [True]
    assert order == ["bias", "ended"]  # the callback runs once, after every gradient of the backward pass
    assert _torch.scale_tensor(torch.amp.GradScaler("cpu", enabled=False)) is None


@pytest.mark.parametrize("renamed", ["_per_optimizer_states", "_scale", "_init_scale"])
def test_a_renamed_grad_scaler_internal_stops_gradscope_loudly(renamed):
    """A PyTorch that renames a GradScaler internal must not get gradients divided by the scale twice in silence."""
    import re

    model = small(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    loud = pytest.raises(gradscope._torch.PrivateAPIError,
                         match=f"GradScaler.{renamed}.*PyTorch {re.escape(torch.__version__)}")
    if renamed == "_init_scale":  # read by the optimizer mode when a backward pass had no optimizer step
        scope = gradscope.watch(model, optimizer=opt, scaler=scaler)
        scaler.scale(model(torch.randn(2, 6)).sum()).backward()
        delattr(scaler, renamed)  # what a PyTorch that renamed it would hand us
        with loud:
            model(torch.randn(2, 6))
    else:
        scope = gradscope.watch(model)
        scaler.scale(model(torch.randn(2, 6)).sum()).backward()
        delattr(scaler, renamed)
        with loud:
            scope.step(scaler=scaler)
    scope.detach()


# -- item 4: a run streamed to disk as it trains (watch(..., log_to=path)) -------------------------------------------
class LateBranch(nn.Module):
    """A branch first taken at step 3: the layer table grows mid-run."""

    def __init__(self):
        super().__init__()
        self.body, self.extra, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.use_extra = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(self.extra(h) if self.use_extra else h)


def test_a_streamed_log_equals_the_saved_one_and_follows_the_layer_table(tmp_path):
    model = LateBranch()
    scope = gradscope.watch(model, log_to=tmp_path / "stream.jsonl",
                            detectors=[gradscope.Vanishing(patience=1), gradscope.Nonfinite()])
    for step in range(6):
        model.use_extra = step >= 3
        x = torch.randn(8, 6)
        if step == 5:
            x[0, 0] = float("nan")  # a nonfinite alert, streamed with its step
        F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
        scope.step()
        model.zero_grad()
    assert scope.alerts
    streamed_open = (tmp_path / "stream.jsonl").read_text()
    assert streamed_open.count('"type": "sync"') == 6 and '"type": "end"' not in streamed_open  # flushed per step
    scope.detach()
    scope.save(tmp_path / "saved.jsonl")
    streamed, saved = gradscope.load(tmp_path / "stream.jsonl"), gradscope.load(tmp_path / "saved.jsonl")
    assert "extra" in streamed.layer_names and streamed.meta == saved.meta
    assert [(r.step, r.info, r.layers.keys(), r.params.keys()) for r in streamed.history] == \
        [(r.step, r.info, r.layers.keys(), r.params.keys()) for r in saved.history]
    assert [a.to_dict() for a in streamed.alerts] == [a.to_dict() for a in saved.alerts]


def test_a_streamed_run_killed_mid_way_keeps_its_steps(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "killed.jsonl"
    script = f"""
import os, signal, torch, torch.nn.functional as F
from torch import nn
import gradscope
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
scope = gradscope.watch(model, log_to={str(log)!r})
for step in range(40):
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    scope.step()
    model.zero_grad()
os.kill(os.getpid(), signal.SIGKILL)  # no detach(), no atexit, no finaliser: the process just dies
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    with pytest.raises(ValueError, match="cut short .*it has no end line"):
        gradscope.load(log)
    with pytest.warns(RuntimeWarning, match="cut short"):
        run = gradscope.load(log, partial=True)
    assert run.history.steps == list(range(40))  # every step the killed run closed
    text = log.read_text()
    log.write_text(text[:len(text) - 300])  # and a block cut part-way: the steps before it, never a half step
    with pytest.warns(RuntimeWarning, match="cut short"):
        run = gradscope.load(log, partial=True)
    assert run.history.steps == list(range(39))


def test_log_to_never_writes_over_a_log_and_names_the_fix(tmp_path):
    from conftest import hook_entries

    model = small(torch.float32)
    (tmp_path / "old.jsonl").write_text("precious")
    for log_to, error, match in ((tmp_path / "old.jsonl", FileExistsError, "never writes over a log"),
                                 (tmp_path / "no" / "run.jsonl", FileNotFoundError, "does not exist; create it"),
                                 (5, TypeError, "log_to must be a file path")):
        with pytest.raises(error, match=match):
            gradscope.watch(model, log_to=log_to)
        assert hook_entries(model) == []
    assert (tmp_path / "old.jsonl").read_text() == "precious"


def test_a_full_disk_stops_the_stream_not_the_training(tmp_path):
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to fail writes as a full disk does")
    model = small(torch.float32)
    scope = gradscope.watch(model, log_to=tmp_path / "run.jsonl")
    model(torch.randn(2, 6)).sum().backward()
    scope.step()
    scope._stream._f.close()
    scope._stream._f = open("/dev/full", "w")  # every write fails with ENOSPC, as on a full disk
    model(torch.randn(2, 6)).sum().backward()
    with pytest.warns(RuntimeWarning, match="streaming stopped there.*scope.save"):
        scope.step()
    model(torch.randn(2, 6)).sum().backward()
    scope.step()  # training goes on, records in memory
    assert scope.history.steps == [0, 1, 2]
    scope.detach()
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert gradscope.load(tmp_path / "run.jsonl", partial=True).history.steps == [0]


# -- second round of attacks on the above ----------------------------------------------------------------------------
def relu_net():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def test_an_interrupted_forward_never_switches_off_the_users_own_mode():
    model = nn.Sequential(nn.Linear(4, 8), Interruptible2(), nn.Linear(8, 2))
    scope = gradscope.watch(model)
    x = torch.randn(3, 4)
    model(x).sum().backward()
    scope.step()
    model[1].interrupt = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model[1].interrupt = False
    with torch.device("meta"):  # a TorchFunctionMode of the user's, entered above gradscope's stale one
        model(x)
        assert torch.empty(2).device.type == "meta"  # used to be cpu: gradscope popped the user's mode
    assert torch.empty(2).device.type == "cpu" and torch.overrides._get_current_function_mode_stack() == []
    scope.detach()


class Interruptible2(nn.Module):
    interrupt = False

    def forward(self, x):
        x = F.relu(x)  # a functional call: the forward runs inside gradscope's function mode
        if self.interrupt:
            raise KeyboardInterrupt
        return x


def test_no_grad_forwards_take_no_waiting_slot():
    model = relu_net()
    scope = gradscope.watch(model)
    loss = model(torch.randn(8, 4)).sum()
    with torch.no_grad():
        for _ in range(70):
            model(torch.randn(8, 4))
    loss.backward()
    scope.step()
    assert scope._collector.dead["1"].seen == 8 and "backprop_signal" in scope.latest()["0"]
    scope.detach()


def test_passes_beyond_the_waiting_cap_keep_their_signal_and_are_said(tmp_path):
    def run(one_backward):
        torch.manual_seed(0)
        model = relu_net()
        scope = gradscope.watch(model)
        x = torch.randn(8, 4)
        if one_backward:
            sum(model(x).sum() for _ in range(100)).backward()
        else:
            for _ in range(100):
                model(x).sum().backward()
        scope.step()
        scope.detach()
        return scope

    each = run(False)
    cap = gradscope.collect.Collector.MAX_PENDING_PASSES
    with pytest.warns(RuntimeWarning, match="beyond the 64 kept for one"):
        once = run(True)
    assert once.latest()["0"]["backprop_signal"] == pytest.approx(each.latest()["0"]["backprop_signal"], rel=1e-5)
    assert once.latest()["0"]["grad_norm"] == pytest.approx(each.latest()["0"]["grad_norm"], rel=1e-5)
    assert once._collector.dead["1"].seen == cap * 8 and each._collector.dead["1"].seen == 100 * 8
    assert once.meta["uncounted_passes"] == 100 - cap


def test_discard_forgets_a_batch_whose_backward_failed():
    def run(fail_first):
        torch.manual_seed(0)
        model = relu_net()
        scope = gradscope.watch(model)
        x = torch.randn(8, 4)
        if fail_first:
            def out_of_memory(grad):
                raise RuntimeError("out of memory (a real backward that fails part-way)")

            hook = model[0].register_forward_hook(lambda mod, args, out: out.register_hook(out_of_memory) and None)
            try:
                model(x).sum().backward()
            except RuntimeError:
                model.zero_grad()
                scope.discard()  # the documented way to skip a batch
            hook.remove()
        model(x).sum().backward()
        scope.step()
        scope.detach()
        return scope

    clean, skipped = run(False), run(True)
    assert skipped.history[-1].layers == clean.history[-1].layers


class Composite(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_a_model_trained_through_its_submodules_keeps_one_site_per_module():
    model = Composite()  # a Lightning training_step calling self.encoder(x), never self(x)
    scope = gradscope.watch(model)
    for _ in range(2):
        for _ in range(4):  # gradient accumulation over four micro-batches
            model.head(model.encoder(torch.randn(8, 4))).sum().backward()
        scope.step()
        model.zero_grad()
    assert scope.layer_names == ["encoder.0", "encoder.1", "encoder", "head"]  # used to grow by four per step
    assert scope._collector.dead["encoder.1"].seen == 2 * 4 * 8
    scope.detach()


def test_a_replaced_submodule_is_followed_and_never_reported_from_stale_gradients():
    from conftest import hook_entries

    model = Composite()
    scope = gradscope.watch(model)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    scope.step()
    old = model.head
    model.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    for _ in range(2):
        model.zero_grad()
        model(x).sum().backward()
        scope.step()
    latest = scope.latest(per="param")
    for name, p in model.named_parameters():
        assert latest[name]["grad_norm"] == pytest.approx(exact_norm(p.grad), rel=1e-6), name
    assert "head" not in latest and "head.1" in scope.latest()  # the new head's ReLU is hooked: dead units
    assert hook_entries(old) == []  # the old one is not
    scope.detach()
    assert hook_entries(model) == []


def test_a_gradient_no_backward_pass_touched_is_left_out():
    model = Composite()
    scope = gradscope.watch(model)
    model(torch.randn(8, 4)).sum().backward()
    scope.step()
    model.encoder(torch.randn(8, 4)).sum().backward()  # the head takes no part: its .grad is last step's
    scope.step()
    assert "head" not in scope.latest() and "head.weight" not in scope.latest(per="param")
    scope.detach()


def test_recurrent_evaluation_forwards_hold_bounded_memory():
    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 1)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    model = Rec()
    scope = gradscope.watch(model)
    x = torch.randn(4, 5, 8)
    model(x).sum().backward()
    scope.step()
    for _ in range(2000):
        model(x)
    c = scope._collector
    handles = sum(len(p.handles) for p in c._passes + c._evicted)
    per_pass = len(c._passes[-1].handles)  # the LSTM's out, h and c, the head's output, the LSTM's input
    assert per_pass == 5 and handles <= 6 * c.MAX_PENDING_PASSES * per_pass < 2000 * per_pass  # bounded, not per forward
    scope.detach()


def test_copies_of_a_watched_submodule_drop_their_inert_hooks():
    import copy
    import pickle

    from conftest import hook_entries

    model = nn.Sequential(nn.Linear(4, 16), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 1))
    scope = gradscope.watch(model)
    for block in (copy.deepcopy(model[1]), pickle.loads(pickle.dumps(model[1]))):
        block(torch.randn(2, 16))
        assert hook_entries(block) == []
    assert hook_entries(model) != []  # the watched model keeps its own
    scope.detach()


def test_reentrant_checkpointing_turned_on_mid_run_is_said():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.blk, self.b = nn.Linear(4, 16), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 1)
            self.ckpt = False

        def forward(self, x):
            from torch.utils.checkpoint import checkpoint

            h = self.a(x)
            return self.b(checkpoint(self.blk, h, use_reentrant=True) if self.ckpt else self.blk(h))

    model = Net()
    scope = gradscope.watch(model)
    model(torch.randn(8, 4)).sum().backward()
    scope.step()
    model.ckpt = True
    model.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"\['blk', 'blk.0', 'blk.1'\] run only inside"):
        model(torch.randn(8, 4)).sum().backward()
        scope.step()
    assert scope.meta["unmonitored"] == ["blk", "blk.0", "blk.1"]
    scope.detach()


def test_a_scope_says_how_to_keep_its_records_instead_of_pickling():
    import pickle

    scope = gradscope.watch(relu_net())
    with pytest.raises(TypeError, match=r"scope.save\(path\)"):
        pickle.dumps(scope)
    scope.detach()


def test_a_streamed_log_keeps_meta_items_that_change_mid_run(tmp_path):
    model = relu_net()
    scope = gradscope.watch(model, log_to=tmp_path / "run.jsonl")
    x = torch.randn(8, 4)
    model(x).sum().backward()
    scope.step()  # the first meta line: no uncounted passes yet
    with pytest.warns(RuntimeWarning, match="beyond the 64 kept for one"):
        sum(model(x).sum() for _ in range(70)).backward()
        scope.step()
    scope.detach()
    assert gradscope.load(tmp_path / "run.jsonl").meta["uncounted_passes"] == 70 - 64
