"""Hugging Face Trainer callback with a real ``transformers.Trainer`` on CPU: a tiny random-init GPT-2 trained on byte
tokens of CPython's documentation text. Statistics of the unclipped, accumulated gradient reach the callbacks that
``report_to`` registers; a NaN stops ``train()``; the run is saved with the Trainer's output; no hooks stay behind."""

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer callback needs the transformers package")
pytest.importorskip("accelerate", reason="transformers.Trainer needs the accelerate package")
import transformers  # noqa: E402
import transformers.trainer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import gradscope  # noqa: E402
from gradscope.bench import data  # noqa: E402
from conftest import hook_entries, rel_close  # noqa: E402
from gradscope.integrations.transformers import GradscopeCallback  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ByteWindows(data.ByteWindows):
    """32 windows of 32 byte tokens of CPython's documentation text (the test skips without it)."""

    def __init__(self, n=32, length=32, seed=0):
        try:
            super().__init__(n, length, seed)
        except FileNotFoundError as e:
            pytest.skip(str(e))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def make_trainer(tmp_path, model, callbacks, **kwargs):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=4, per_device_train_batch_size=4,
                    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, learning_rate=1e-3,
                    seed=0, dataloader_num_workers=0, dataloader_pin_memory=False)
    settings.update(kwargs)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=ByteWindows(),
                   callbacks=callbacks)


def layer_grad_norms(model) -> dict:
    """Each module's gradient norm over its own parameters (a tied one counted at its first module), from .grad."""
    seen, out = set(), {}
    for name, module in model.named_modules():
        grads = [p.grad.detach().double().flatten() for p in module.parameters(recurse=False)
                 if p.requires_grad and id(p) not in seen and p.grad is not None]
        seen.update(id(p) for p in module.parameters(recurse=False))
        if grads:
            out[name] = float(torch.cat(grads).norm())
    return out


class Reporter(TrainerCallback):
    """Stands in for a report_to integration (wandb, TensorBoard): keeps what on_log hands it; also reads .grad just
    before each optimizer step (after the Trainer clipped it)."""

    def __init__(self, model):
        self.model, self.logs, self.grads = model, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(layer_grad_norms(self.model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("accumulate,max_norm", [(2, 1e-3), (1, 0.0)])
def test_unclipped_accumulated_statistics_reach_the_report_to_callbacks(tmp_path, monkeypatch, accumulate, max_norm):
    model = tiny_gpt2()
    reporter = Reporter(model)
    # registered exactly where the Trainer puts report_to integrations: before DefaultFlowCallback's successors and
    # before every user callback
    monkeypatch.setattr(transformers.trainer, "get_reporting_integration_callbacks", lambda report_to: [reporter])
    callback = GradscopeCallback()
    trainer = make_trainer(tmp_path, model, [callback], gradient_accumulation_steps=accumulate,
                           max_grad_norm=max_norm)
    assert trainer.callback_handler.callbacks.index(reporter) < trainer.callback_handler.callbacks.index(callback)
    trainer.train()

    assert trainer.callback_handler.callbacks[0] is callback
    scope = callback.scope
    assert scope.num_steps == 4 and len(scope.history) == 4  # one record per optimizer step, not per micro-batch
    step_logs = [logs for logs in reporter.logs if "loss" in logs]
    assert len(step_logs) == 4 and len(reporter.grads) == 4
    for i, (logs, after_clip) in enumerate(zip(step_logs, reporter.grads)):
        logged = {k.split("/", 2)[2]: v for k, v in logs.items() if k.startswith("gradscope/grad_norm/")}
        assert set(logged) == set(after_clip), i  # every layer with parameters, under its module name
        assert "gradscope/alerts" in logs and "gradscope/backprop_signal/transformer.h.1.mlp.c_fc" in logs
        total = math.sqrt(sum(v * v for v in logged.values()))
        assert rel_close(total, logs["grad_norm"], 1e-4), (i, total, logs["grad_norm"])  # the Trainer's pre-clip norm
        # the Trainer clips by one factor, max_norm / (total + 1e-6): undo it on what .grad held at the optimizer step
        factor = max_norm / (logs["grad_norm"] + 1e-6) if max_norm > 0 else 1.0
        assert factor < 0.01 if max_norm > 0 else factor == 1.0
        for layer, value in logged.items():
            assert rel_close(value, after_clip[layer] / factor, 1e-4), (i, layer, value, after_clip[layer] / factor)
        record = scope.history.records()[i]
        assert all(rel_close(v, record.layers[layer]["grad_norm"]) for layer, v in logged.items())
    if max_norm > 0:
        assert min(logs["grad_norm"] for logs in step_logs) > 100 * max_norm  # unclipped: far above the threshold
    # the Trainer's own log_history holds the same numbers; alerts since the previous log add up to all alerts
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["gradscope/grad_norm/transformer.wte"] == logs["gradscope/grad_norm/transformer.wte"]
               for h, logs in zip(history, step_logs))
    assert sum(logs.get("gradscope/alerts", 0) for logs in reporter.logs) == len(scope.alerts)
    assert hook_entries(model) == [] and not scope.attached
    assert "clip_grad_norm_" not in vars(trainer.accelerator) and "backward" not in vars(trainer.accelerator)


def test_a_nan_stops_training_before_the_optimizer_step_with_the_alert_and_leaves_no_hooks(tmp_path):
    model = tiny_gpt2()
    calls = []

    def poison(module, inputs, output):  # the MLP of the second block turns NaN from the third forward pass on
        calls.append(1)
        return output * float("nan") if len(calls) >= 3 else output

    handle = model.transformer.h[1].mlp.register_forward_hook(poison)
    callback = GradscopeCallback(raise_on={"nonfinite"}, warn=False)
    trainer = make_trainer(tmp_path, model, [callback], max_steps=6, max_grad_norm=1.0)
    with pytest.raises(gradscope.GradientError) as err:
        trainer.train()
    handle.remove()

    alerts = err.value.alerts
    assert alerts and {a.kind for a in alerts} == {"nonfinite"} and alerts[0].step == 2
    assert alerts[0].message in str(err.value) and "nonfinite" in str(err.value)
    assert trainer.state.global_step == 2  # stopped inside the third step ...
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # ... before its optimizer step
    assert hook_entries(model) == [] and not callback.scope.attached
    assert "clip_grad_norm_" not in vars(trainer.accelerator) and "backward" not in vars(trainer.accelerator)
    saved = gradscope.load(tmp_path / "gradscope.jsonl")  # the run up to the alert, saved before raising
    assert len(saved.history) == 3 and [a.kind for a in saved.alerts] == [a.kind for a in callback.scope.alerts]


def test_the_run_is_saved_with_the_trainer_output_and_its_checkpoints(tmp_path):
    model = tiny_gpt2()
    trainer = make_trainer(tmp_path, model, None, save_strategy="steps", save_steps=3, logging_steps=2)
    callback = GradscopeCallback(every=1, warn=False).add_to(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    run = gradscope.load(tmp_path / "gradscope.jsonl")
    assert len(run.history) == 4 and run.history.last.step == 3
    assert len(gradscope.load(tmp_path / "checkpoint-3" / "gradscope.jsonl").history) == 3
    assert hook_entries(model) == [] and not callback.scope.attached
    assert "transformer.h.1.mlp.c_fc" in callback.scope.summary()
    # logging every 2 steps: each log carries the latest collected step (the 2nd and the 4th)
    logged = [h["gradscope/grad_norm/transformer.ln_f"] for h in trainer.state.log_history if "loss" in h]
    steps = run.history.records()
    assert logged == [steps[i].layers["transformer.ln_f"]["grad_norm"] for i in (1, 3)]


def test_under_a_grad_scaler_the_statistics_are_of_the_unscaled_gradients(tmp_path):
    # fp16 needs a GPU. On CPU the Trainer's accelerator gets a GradScaler: its backward scales the loss and the
    # optimizer step unscales, as under fp16 (where clip_grad_norm_ unscales first: after gradscope closed the step)
    norms, trainer_norms = {}, {}
    for scale in (None, 2.0 ** 10):
        model = tiny_gpt2()
        callback = GradscopeCallback(warn=False)
        trainer = make_trainer(tmp_path / str(scale), model, [callback], max_grad_norm=0.0)
        if scale is not None:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.train()
        records = callback.scope.history.records()
        assert len(records) == 4 and all(r.info["grad_scale"] == (scale or 1.0) for r in records)
        norms[scale] = [r.layers["transformer.h.0.mlp.c_fc"]["grad_norm"] for r in records]
        trainer_norms[scale] = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    # the Trainer's own grad_norm is of the scaled gradients; gradscope's are those of the run without a scaler
    assert all(rel_close(a, b / 2.0 ** 10, 1e-5) for a, b in zip(trainer_norms[None], trainer_norms[2.0 ** 10]))
    assert all(rel_close(a, b, 1e-6) for a, b in zip(norms[None], norms[2.0 ** 10])), norms


@pytest.mark.parametrize("hooks", ["pre_optimizer_step", "none"])
def test_a_trainer_that_does_not_call_clip_grad_norm_is_watched_after_clipping_or_said_unwatched(tmp_path, hooks):
    # as the Trainer does with gradients on several device meshes: no accelerator.clip_grad_norm_ call (and, for
    # "none", no on_pre_optimizer_step either, as in a transformers that predates it)
    model = tiny_gpt2()
    probe = Reporter(model)
    callback = GradscopeCallback(warn=False)
    trainer = make_trainer(tmp_path, model, [callback, probe], max_grad_norm=0.0)
    trainer._get_grad_norm = lambda model, grad_norm=None: 0.0
    if hooks == "none":
        trainer.callback_handler.on_pre_optimizer_step = lambda args, state, control: control
        with pytest.warns(RuntimeWarning, match="could not see its gradients"):
            trainer.train()
        assert len(callback.scope.history) == 0 and callback.scope.num_steps == 0
    else:
        with pytest.warns(RuntimeWarning, match="after clipping"):
            trainer.train()
        records = callback.scope.history.records()
        assert len(records) == 4 and len(probe.grads) == 4
        assert all(rel_close(r.layers[k]["grad_norm"], g[k], 1e-5) for r, g in zip(records, probe.grads) for k in g)
    assert hook_entries(model) == []


def test_watch_arguments_the_trainer_owns_are_refused():
    for key in ("optimizer", "scaler"):
        with pytest.raises(TypeError, match=f"do not pass {key}="):
            GradscopeCallback(**{key: object()})


def test_importing_without_transformers_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "gradscope.integrations.transformers")
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("gradscope.integrations.transformers")


def test_the_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples/hf_trainer.py"), "--steps", "3", "--batch-size", "4",
                           "--length", "32", "--output-dir", str(tmp_path), "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gradscope summary: GPT2LMHeadModel" in done.stdout and "transformer.h.1.mlp.c_fc" in done.stdout
    assert "gradscope values in the last training log" in done.stdout
    assert len(gradscope.load(tmp_path / "gradscope.jsonl").history) == 3
