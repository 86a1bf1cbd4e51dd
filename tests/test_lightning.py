"""Lightning callback with a real Trainer on CPU: attach at fit start, one record per optimizer step, loggers fed."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning", reason="the Lightning callback needs the lightning package")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import gradscope  # noqa: E402
from conftest import hook_entries, rel_close  # noqa: E402
from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, poison_at=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        self.poison_at = poison_at
        self.grads = []  # the first layer's gradient norm (weight and bias) at each optimizer step, from .grad

    def training_step(self, batch, i):
        x, y = batch
        if self.poison_at is not None and self.global_step >= self.poison_at:
            x = x * float("nan")
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook of the same name
        layer = self.net[0]
        self.grads.append(float(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch)


def trainer(tmp_path, callback, **kwargs):
    return pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run"),
                      callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_record_per_optimizer_step_and_metrics_in_the_loggers(tmp_path, accumulate):
    model = Classifier()
    callback = GradscopeCallback(every=2, save_to=tmp_path / "gradscope.jsonl")
    trainer(tmp_path, callback, accumulate_grad_batches=accumulate, log_every_n_steps=1).fit(model, loader())
    scope = callback.scope
    assert not scope.attached and hook_entries(model) == []  # detached at fit end
    assert scope.num_steps == 6 and scope.history.steps == [0, 2, 4]
    for step, record in zip(scope.history.steps, scope.history):  # the statistics of that optimizer step
        assert rel_close(record.layers["net.0"]["grad_norm"], model.grads[step], 1e-5)
    with open(next(tmp_path.glob("run/*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradscope/grad_norm/net.0")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # trainer.global_step of the optimizer step being taken
    for r, record in zip(rows, scope.history):
        assert rel_close(float(r["gradscope/grad_norm/net.0"]), record.layers["net.0"]["grad_norm"], 1e-6)
        assert rel_close(float(r["gradscope/backprop_signal/net.2"]), record.layers["net.2"]["backprop_signal"], 1e-6)
        assert math.isfinite(float(r["gradscope/decay_factor"])) and "gradscope/dead_fraction/net.1" in r
    assert gradscope.load(tmp_path / "gradscope.jsonl").history.steps == [0, 2, 4]


def test_raise_on_stops_fit_and_detaches(tmp_path):
    model = Classifier(poison_at=3)
    callback = GradscopeCallback(raise_on={"nonfinite"}, warn=False)
    with pytest.raises(gradscope.GradientError, match="nonfinite"):
        trainer(tmp_path, callback).fit(model, loader())
    assert callback.scope.history.steps == [0, 1, 2, 3] and not callback.scope.attached
    assert hook_entries(model) == []


def test_alerts_warn_from_rank_zero(tmp_path):
    model = Classifier()
    with torch.no_grad():
        model.net[0].bias.fill_(-100.0)  # every ReLU unit dead
    callback = GradscopeCallback(dead_window=16)
    with pytest.warns(RuntimeWarning, match="gradscope: dead_units in net.1"):
        trainer(tmp_path, callback).fit(model, loader())


def test_bad_arguments():
    with pytest.raises(TypeError, match="do not pass optimizer="):
        GradscopeCallback(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))


def test_mixed_precision_trainer(tmp_path):
    # on CPU Lightning runs bf16 autocast (fp16 with a GradScaler needs CUDA): statistics of the fp32 master grads
    model = Classifier()
    callback = GradscopeCallback(warn=False)
    trainer(tmp_path, callback, precision="bf16-mixed").fit(model, loader())
    assert callback.scope.num_steps == 6 and all(not r.info["overflow"] for r in callback.scope.history)
    for step, record in enumerate(callback.scope.history):
        assert rel_close(record.layers["net.0"]["grad_norm"], model.grads[step], 1e-5)
        assert record.layers["net.1"]["units"] == 16 and math.isfinite(record.layers["net.3"]["saturation"])
