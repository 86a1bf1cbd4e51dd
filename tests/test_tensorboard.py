"""TensorBoard logger: event files read back with TensorBoard's own reader hold exactly the scope's values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from conftest import rel_close

pytest.importorskip("tensorboard", reason="the TensorBoard logger needs the tensorboard package")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gradscope.integrations.tensorboard import TensorBoardLogger  # noqa: E402


def read(log_dir):
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    return ea


def model_with_a_dead_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit of "1" dead: a dead_units alert once the window fills
    return model


def test_scalars_equal_the_scope_on_collected_steps_only(tmp_path):
    model = model_with_a_dead_layer()
    scope = gradscope.watch(model, every=2, dead_window=20, update_ratio=True)
    tb = TensorBoardLogger(scope, log_dir=tmp_path)
    for _ in range(5):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(10, 6)), torch.randint(0, 3, (10,))).backward()
        scope.step()
    tb.close()
    ea = read(tmp_path)
    tags = ea.Tags()["scalars"]
    assert tags and all(t.split("/")[0].startswith("gradscope.") for t in tags)
    groups = {t.split("/")[0] for t in tags}  # one group per statistic, not one per value
    assert {"gradscope.grad_norm", "gradscope.backprop_signal", "gradscope.dead_fraction", "gradscope.saturation",
            "gradscope.update_ratio", "gradscope.summary"} <= groups and len(groups) <= 12
    assert [e.step for e in ea.Scalars("gradscope.grad_norm/0")] == scope.history.steps == [0, 2, 4]
    checked = 0
    for record in scope.history:
        for layer, st in record.layers.items():
            for stat in ("grad_norm", "grad_rms", "backprop_signal", "dead_fraction", "saturation", "update_ratio"):
                if stat in st and math.isfinite(st[stat]):
                    event = {e.step: e.value for e in ea.Scalars(f"gradscope.{stat}/{layer}")}
                    assert rel_close(event[record.step], st[stat], 1e-6) or event[record.step] == st[stat] == 0
                    checked += 1
    assert checked > 30
    factors = {e.step: e.value for e in ea.Scalars("gradscope.summary/decay_factor")}
    assert rel_close(factors[4], scope.decay_factor(), 1e-6)
    alert_text = b"".join(t.tensor_proto.string_val[0] for t in ea.Tensors("gradscope.alerts/text_summary"))
    assert b"dead_units" in alert_text and b"Remedy" in alert_text
    assert len(scope.alerts) >= 1 and all(a.step in (0, 2, 4) for a in scope.alerts)
    scope.detach()


def test_histograms_and_a_writer_of_your_own(tmp_path):
    model = model_with_a_dead_layer()
    scope = gradscope.watch(model)
    writer = SummaryWriter(tmp_path)
    tb = TensorBoardLogger(scope, writer, histograms=True, stats=("grad_norm",))
    F.cross_entropy(model(torch.randn(10, 6)), torch.randint(0, 3, (10,))).backward()
    scope.step()
    tb.close()  # flushes; the writer is the caller's and stays open
    writer.add_scalar("mine", 1.0, 0)
    writer.close()
    ea = read(tmp_path)
    assert {t.split("/")[0] for t in ea.Tags()["scalars"]} == {"gradscope.grad_norm", "gradscope.summary", "mine"}
    hist = ea.Histograms("gradscope.grad_hist/2.weight")[0].histogram_value
    g = model[2].weight.grad
    assert hist.num == g.numel() and rel_close(hist.sum, float(g.sum()), 1e-5)
    assert scope._listeners == []
    scope.detach()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="follows a gradscope.Scope"):
        TensorBoardLogger(nn.Linear(2, 2), log_dir=tmp_path)
    scope = gradscope.watch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="either writer= .* or log_dir="):
        TensorBoardLogger(scope, SummaryWriter(tmp_path), log_dir=tmp_path)
    with pytest.raises(TypeError, match="listener must be callable"):
        scope.add_listener("print")
    scope.detach()
