"""Rendering reads the run: a golden summary() (a changed column fails here), and the thresholds drawn in figures are
the ones the run's detectors used, from the saved meta, never constants of the renderer's own."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.alerts import Alert
from gradscope.detectors import thresholds
from gradscope.record import History, StepRecord
from gradscope.run import Run

GOLDEN = """\
gradscope summary: Net, step 7 (collected every 1), 3 layers/call sites, 1 alerts
layer                          module            params grad_norm  grad_rms    signal  sig/out   dead%
------------------------------------------------------------------------------------------------------
fc1                            Linear                80  2.00e-03  2.50e-04  1.00e-03  4.0e-03       - !
act                            ReLU                   0         -         -  5.00e-03        -    25.0
fc2                            Linear                33  5.00e-01  8.70e-02  2.50e-01  1.0e+00       -

backprop signal, input -> output over 2 parameterised layers: 1.00e-03 (fc1) ... 2.50e-01 (fc2); average factor \
per layer 0.004 (input side gets 4.0e-03 of the output side's: shrinks towards the input)
alerts: 1 (each fired when its condition started; scope.alerts has them all)
  vanishing: 1 alerts on 1 layers from step 7: fc1
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
    assert run.summary().splitlines()[3].split()[6] == "1.0e+01"  # default: the last quarter (fc2) is the reference
    run.meta["detectors"] = [{"detector": "Vanishing", "ratio": 1e-3, "output_side": 1.0}]
    assert run.summary().splitlines()[3].split()[6] == "1.0e+00"  # every layer is the output side: max is fc1's


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
