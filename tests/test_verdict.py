"""The verdict and per-kind alert summary a person reads first, from real runs and from the AlertBook's episodes."""

import torch

import gradscope
from conftest import train_loop
from gradscope.alerts import Alert
from gradscope.bench.models import deep_mlp
from gradscope.record import History, StepRecord
from gradscope.run import Run
from gradscope.verdict import alert_summary, verdict


def _batch(features=32):
    x, y = torch.randn(64, features), torch.randint(0, 10, (64,))
    return lambda: (x, y)


def test_a_vanishing_sigmoid_mlp_is_flagged_and_a_healthy_one_is_not(tmp_path):
    sick = train_loop(deep_mlp(20, 64, "sigmoid", in_features=32), _batch(), 8, watch={}).scope
    kinds = alert_summary(sick)
    assert [k.kind for k in kinds] == ["vanishing"]
    v = kinds[0]
    assert v.active and v.last_held == 7 and v.first_step == 4 and v.alerts == v.layers > 1
    assert verdict(sick) == "flagged: vanishing from step 4"
    assert v.describe() == f"vanishing x{v.alerts} (from step 4, active)"
    sick.save(tmp_path / "sick.jsonl")  # the counts survive a save
    assert alert_summary(gradscope.load(tmp_path / "sick.jsonl")) == kinds

    well = train_loop(deep_mlp(4, 64, "relu", init="kaiming", in_features=32), _batch(), 8, watch={}).scope
    assert well.alerts == [] and verdict(well) == "healthy" and alert_summary(well) == []


def _run(holding: dict, alerts: list[Alert], steps=range(0, 50, 10)) -> Run:
    h = History(100)
    for s in steps:
        h.append(StepRecord(s, {}, {}, {f"holding.{k}": n for k, n in holding.get(s, {}).items()}))
    return Run({"layers": []}, h, alerts)


def _alert(kind, layer, step):
    return Alert(kind, layer, step, 1.0, 1.0, "m", "h")


def test_a_condition_that_cleared_says_when():
    run = _run({0: {"exploding": 1}, 10: {"exploding": 1}}, [_alert("exploding", "", 0)])
    (k,) = alert_summary(run)
    assert (k.active, k.last_held, k.cleared_by) == (False, 10, 20)
    assert k.describe() == "exploding x1 (step 0, cleared by step 20)"
    assert verdict(run) == "cleared: exploding from step 0; none active since step 20"


def test_two_active_kinds_are_both_named_and_an_old_log_is_not_called_cleared():
    run = _run({40: {"vanishing": 3, "dead_units": 1}},
               [_alert("dead_units", "r", 0), _alert("vanishing", "a", 30), _alert("vanishing", "b", 30)])
    assert verdict(run) == "flagged: dead_units from step 0 and vanishing from step 30"
    old = _run({}, [_alert("vanishing", "a", 30)])  # no holding counts: written before they existed
    (k,) = alert_summary(old)
    assert k.active is None and k.describe() == "vanishing x1 (step 30)"
    assert verdict(old) == "flagged: vanishing from step 30"
    assert verdict(_run({}, [], steps=[])) == "no steps collected"
