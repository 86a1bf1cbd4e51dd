"""Issue 12 (reliability), the items done so far: every training dtype, audit after detach, clear errors on bad
arguments of watch()/load()/plot()/decay_factor()/gradient_flow()."""

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
    calls = []

    def dying_write(f, obj):
        calls.append(obj["type"])
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process is stopped in the middle of writing
        f.write(json.dumps(obj) + "\n")

    monkeypatch.setattr(gradscope.record, "_write", dying_write)
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
