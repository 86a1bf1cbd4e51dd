"""Rendering reads the run: a golden summary() (a changed column fails here), a deep net's summary folded to fit a
screen without hiding an alerting layer, and the thresholds drawn in figures are the ones the run's detectors used,
from the saved meta, never constants of the renderer's own."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.alerts import Alert
from gradscope.bench.models import build_model, deep_mlp
from gradscope.detectors import thresholds
from gradscope.record import History, StepRecord
from gradscope.run import Run

GOLDEN = """\
gradscope summary: Net, step 7 (collected every 1), 3 layers/call sites, 1 alerts
verdict: flagged: vanishing from step 7
layer                          module            params grad_norm  grad_rms    signal  sig/out   dead%
------------------------------------------------------------------------------------------------------
fc1                            Linear                80  2.00e-03  2.50e-04  1.00e-03  4.0e-03       - !
act                            ReLU                   0         -         -  5.00e-03        -    25.0
fc2                            Linear                33  5.00e-01  8.70e-02  2.50e-01  1.0e+00       -

backprop signal, input -> output over 2 parameterised layers: 1.00e-03 (fc1) ... 2.50e-01 (fc2); average factor \
per layer 0.004 (input side gets 4.0e-03 of the output side's: shrinks towards the input)
alerts: 1 (each fired when its condition started; scope.alerts has them all)
  vanishing x1 (step 7) on 1 layer: fc1
    e.g. fc1 at step 7: the signal is small.
    remedy: use ReLU."""


def hand_made_run() -> Run:
    """A run written out by hand (no training): every number in the summary is known."""
    meta = {"format": "gradscope", "version": 2, "every": 1, "model": "Net", "layers": [
        {"name": "fc1", "module": "Linear", "params": 80, "profile": True, "depth": 0},
        {"name": "act", "module": "ReLU", "params": 0, "profile": True, "depth": 1},
        {"name": "fc2", "module": "Linear", "params": 33, "profile": True, "depth": 2}]}
    layers = {"fc1": {"grad_norm": 2e-3, "grad_rms": 2.5e-4, "backprop_signal": 1e-3, "grad_nonfinite": 0},
              "act": {"backprop_signal": 5e-3, "dead_fraction": 0.25, "dead_units": 4, "units": 16,
                      "fire_rate": 0.5, "dead_window_filled": 1.0},
              "fc2": {"grad_norm": 0.5, "grad_rms": 0.087, "backprop_signal": 0.25, "grad_nonfinite": 0}}
    hist = History(10)
    hist.append(StepRecord(7, layers, {}, {"grad_scale": 1.0, "overflow": False, "loss": 2.5}))
    return Run(meta, hist, [Alert("vanishing", "fc1", 7, 4e-3, 1e-3, "the signal is small.", "use ReLU.",
                                  "backprop_signal_ratio")])


def test_summary_matches_the_golden_text():
    assert hand_made_run().summary() == GOLDEN


def test_the_summary_reference_follows_the_runs_output_side_setting():
    run = hand_made_run()
    run.history.last.layers["fc2"]["backprop_signal"] = 1e-4  # the output layer gets less than the input layer
    assert run.summary().splitlines()[4].split()[6] == "1.0e+01"  # default: the last quarter (fc2) is the reference
    run.meta["detectors"] = [{"detector": "Vanishing", "ratio": 1e-3, "output_side": 1.0}]
    assert run.summary().splitlines()[4].split()[6] == "1.0e+00"  # every layer is the output side: max is fc1's


FOLD = re.compile(r"  (\S+) - (\S+): (\d+) rows folded, signal (.+), grad_rms (.+) \(summary\(full=True\) shows them\)")


def table(text: str) -> list[str]:
    """The lines of the layer table: after the dashed rule, up to the blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) == {"-"}) + 1
    return lines[start:lines.index("", start)]


def expected_range(values) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    lo, hi = f"{min(finite):.1e}", f"{max(finite):.1e}"
    return lo if lo == hi else f"{lo}..{hi}"


def check_folded(run) -> tuple[list[str], list[str]]:
    """The default summary of ``run`` against its full one: the shown rows and the folded lines cover the full table
    row for row, in order, and every folded line's ranges are those of its rows in ``run.latest()``. Returns the names
    of the rows shown by default, and the folded lines."""
    full = table(run.summary(full=True))
    assert not any(FOLD.fullmatch(line) for line in full)
    full_names = [line.split()[0] for line in full]
    latest, shown, folds, i = run.latest(), [], [], 0
    for line in table(run.summary()):
        m = FOLD.fullmatch(line)
        if m is None:
            assert line == full[i]  # a shown row is the full table's row, unchanged
            shown.append(full_names[i])
            i += 1
            continue
        folds.append(line)
        first, last, count = m[1], m[2], int(m[3])
        names = full_names[i:i + count]
        assert count >= 3 and names[0] == first and names[-1] == last  # a line for fewer rows saves nothing
        assert m[4] == expected_range(latest[n].get("backprop_signal") for n in names)
        assert m[5] == expected_range(latest[n].get("grad_rms") for n in names)
        i += count
    assert i == len(full)  # rows shown + rows folded == rows of the full table
    return shown, folds


@pytest.fixture(scope="module")
def plain56():
    torch.manual_seed(0)
    model = build_model("plain56")
    scope = gradscope.watch(model)
    F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    scope.step()
    scope.detach()
    return scope


def test_a_deep_nets_summary_folds_to_fit_a_screen(plain56):
    text = plain56.summary()
    assert len(text.splitlines()) <= 60
    assert text.splitlines()[1] == f"verdict: {gradscope.verdict.verdict(plain56)}"
    shown, folds = check_folded(plain56)
    assert folds and len(shown) + sum(int(FOLD.fullmatch(f)[3]) for f in folds) == len(table(plain56.summary(full=True)))
    profile = [e.name for e in plain56.meta["layers"] if e.profile]
    assert len(profile) > 150  # one row each, in the full table
    assert [line.split()[0] for line in table(plain56.summary(full=True))] == profile
    assert shown[:4] == profile[:4] and shown[-4:] == profile[-4:]  # input and output sides
    stages = [(m[1].split(".")[0], m[2].split(".")[0]) for m in map(FOLD.fullmatch, folds)]
    assert len(stages) >= 2 and all(a == b for a, b in stages)  # one folded line per stage: layer1, layer2, ...
    assert plain56.summary(full=True) == gradscope.render.format_summary(plain56, full=True)


def test_a_small_net_prints_every_row_either_way():
    run = hand_made_run()
    assert run.summary() == run.summary(full=True) == GOLDEN


def rows_with_alert_mark(text: str) -> set[str]:
    return {line.split()[0] for line in table(text) if line.endswith(" !")}


def test_alerting_layers_of_a_deep_sigmoid_mlp_are_never_folded():
    torch.manual_seed(0)
    model = deep_mlp(60, 32, "sigmoid", in_features=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt)
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 16)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    scope.detach()
    alerting = {a.layer for a in scope.alerts if a.kind == "vanishing"}
    assert len(alerting) > 20  # deep into the middle of the net
    shown, _ = check_folded(scope)
    assert alerting <= set(shown)
    assert rows_with_alert_mark(scope.summary()) == alerting


def test_alerts_in_the_middle_of_a_deep_net_are_shown_with_their_neighbours():
    torch.manual_seed(0)
    model = deep_mlp(60, 32, "relu", init="kaiming", in_features=16)
    with torch.no_grad():
        model[61].bias[:24] = -1e3  # 24 of the 32 units of ReLU "62", half-way through 120 rows, never fire
    scope = gradscope.watch(model, dead_window=16)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(16, 16)), torch.randint(0, 10, (16,))).backward()
        scope.step()
    scope.detach()
    alerting = {a.layer for a in scope.alerts}
    assert "62" in alerting
    shown, folds = check_folded(scope)
    assert folds and len(table(scope.summary())) < 80
    assert rows_with_alert_mark(scope.summary()) == alerting
    for name in alerting:
        assert {name, str(int(name) - 1), str(int(name) + 1)} <= set(shown)


@pytest.mark.parametrize("ratio,words", [
    (0.365, "shrinks somewhat towards the input"), (0.597, "shrinks somewhat towards the input"),
    (0.05, "shrinks towards the input"), (0.9, "roughly steady with depth"), (1.3, "roughly steady with depth"),
    (3.0, "grows somewhat towards the input"), (20.0, "grows towards the input")])
def test_the_depth_trend_says_how_far_the_input_side_is_from_the_output_side(ratio, words):
    run = hand_made_run()
    run.history.last.layers["fc1"]["backprop_signal"] = ratio * 0.25  # fc2, the output side, gets 0.25
    line = next(line for line in run.summary().splitlines() if line.startswith("backprop signal"))
    trend = line[line.rindex("(") + 1:-1]
    assert trend.endswith(": " + words)
    assert trend.startswith(f"input side gets {ratio:.1e}")
    if ratio < 1 / 1.5 or ratio > 1.5:
        assert "steady" not in trend


def test_each_kind_says_whether_it_is_active_and_each_remedy_is_printed_once():
    made = hand_made_run()
    run = Run(made.meta, made.history, made.alerts + [
        Alert("saturation", "act", 7, 0.9, 0.5, "most outputs at a bound.", "use ReLU.", "saturation"),
        Alert("dead_units", "act", 7, 0.9, 0.5, "many dead.", "use LeakyReLU.", "dead_fraction")])
    run.history.last.info.update({"holding.vanishing": 1, "holding.saturation": 0, "holding.dead_units": 1})
    alerts = run.summary().split("\nalerts: ")[1].splitlines()
    assert alerts[1:] == [
        "  vanishing x1 (step 7, active) on 1 layer: fc1",
        "    e.g. fc1 at step 7: the signal is small.",
        "    remedy: use ReLU.",
        "  saturation x1 (step 7, cleared) on 1 layer: act",
        "    e.g. act at step 7: most outputs at a bound.",
        "    remedy: as for vanishing above",
        "  dead_units x1 (step 7, active) on 1 layer: act",
        "    e.g. act at step 7: many dead.",
        "    remedy: use LeakyReLU."]


def test_figures_draw_the_thresholds_the_run_used(tmp_path):
    pytest.importorskip("matplotlib")
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    scope = gradscope.watch(model, detectors=[gradscope.Vanishing(ratio=1e-4), gradscope.Exploding(ratio=1e2),
                                              gradscope.Nonfinite()])
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    scope.step()
    scope.detach()
    assert thresholds(scope.meta) == {"vanishing": 1e-4, "exploding": 1e2, "output_side": 0.25}
    scope.save(tmp_path / "run.jsonl")
    run = gradscope.load(tmp_path / "run.jsonl")
    assert thresholds(run.meta) == thresholds(scope.meta)  # the saved meta keeps them
    fig = run.plot("flow")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "vanishing threshold (0.0001 x output side)" in labels
    assert "exploding threshold (100 x output side)" in labels
    assert thresholds({}) == {"vanishing": gradscope.Vanishing().ratio, "exploding": gradscope.Exploding().ratio,
                              "output_side": gradscope.Vanishing().output_side}  # an older log: the defaults
