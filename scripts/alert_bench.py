"""The labelled alert benchmark: real training runs, each labelled healthy or broken, scored for gradscope's alerts and
for the rules of the tools people use today, side by side.

    .venv/bin/python scripts/alert_bench.py             # every run (several minutes on 2 CPU cores)
    .venv/bin/python scripts/alert_bench.py --fast      # the subset the default test suite runs
    .venv/bin/python scripts/alert_bench.py --only gpt2 --verbose
    .venv/bin/python scripts/alert_bench.py --write      # every run, then regenerate docs/alert_bench.md and the
                                                         # README's totals from this run

Every run trains a real model for a few dozen steps: images are real CIFAR-10 (``../shared/data/cifar10-jpg`` or
``$GRADSCOPE_CIFAR10_DIR``), text is byte-level tokens of the Python documentation that ships with CPython
(``pydoc_data/topics.py``). Models are built from configs with random init (timm, Hugging Face transformers,
torchvision, gradscope's own zoo): nothing is downloaded. A run is *healthy* (its loss falls; any alert is a false
alert) or *broken* with a label: the cause, the step it starts (onset), the alert kinds that name it, the layers on its
path and the words its remedy must contain.

Scored per run (gradscope): false alerts (on a healthy run, or before the onset of a broken one); detection; steps from
onset to the first correct alert; whether the first alert at or after onset has an expected kind, names a layer on the
cause's path, and gives a remedy that fits (contains the label's words, and recommends nothing the model already has).

The anchors, on the same runs and the same gradients (read in a listener, unscaled):

* ``sm_vanish``: SageMaker Debugger's VanishingGradient rule -- some gradient tensor's mean |g| < 1e-7.
* ``sm_explode``: SageMaker Debugger's ExplodingTensor rule -- NaN or Inf in a gradient.
* ``norm_spike``: the usual clip-norm monitoring -- the global gradient norm above 5x its mean over the previous 20
  collected steps (from the second step on, as gradscope's own spike check), or not finite.

An anchor's "false" count on a healthy run is the number of distinct tensors (or, for the global rule, steps) it fired
on. Anchors have no kinds or layers, so only detection and latency are scored for them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset, text_bytes
from gradscope.bench.host import cpu_label
from gradscope.detectors import global_grad_norm, layer_grad_norms
from gradscope.bench.models import SequenceClassifier, cifar_resnet, deep_mlp

# ----------------------------------------------------------------------------------------------------------------------
# data


_CACHE: dict = {}


def cifar(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real, normalised CIFAR-10 training images and labels (cached)."""
    if "cifar" not in _CACHE:
        root = find_cifar10_folder()
        if root is None:
            raise FileNotFoundError("the alert benchmark trains on real CIFAR-10: put the image-folder copy at "
                                    "../shared/data/cifar10-jpg or set $GRADSCOPE_CIFAR10_DIR")
        _CACHE["cifar"] = load_cifar10_subset(root, "train", n=n, seed=0)
    return _CACHE["cifar"]


def image_batch(step: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = cifar()
    i = (step * batch) % (len(x) - batch)
    return x[i:i + batch], y[i:i + batch]


def text_batch(step: int, batch: int = 8, length: int = 64) -> torch.Tensor:
    """``(batch, length)`` byte windows at offsets that depend only on ``step``."""
    data = text_bytes()
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------------------------------------
# labels and jobs


@dataclass
class Label:
    """What a run is. ``kinds``: alert kinds that correctly name a broken run's cause (the first alert at or after
    onset must be one); ``layers(name, rel_depth)``: whether a layer is on the cause's path (``rel_depth`` in [0, 1],
    input side 0); ``remedy``: words of which the first alert's hint must contain at least one (case-insensitive);
    ``latency``: collected steps from onset allowed for the first alert of kind ``detect`` (default: any of
    ``kinds``) -- the diagnosis the run must get."""

    healthy: bool = True
    cause: str = ""
    onset: int = 0
    kinds: tuple = ()
    layers: Callable[[str, float], bool] = lambda name, rel: True
    remedy: tuple = ()
    latency: int = 2
    detect: str | None = None


def broken(cause, onset, kinds, layers=None, remedy=(), latency=2, detect=None) -> Label:
    if isinstance(layers, str):
        pattern = re.compile(layers)
        layers_fn = lambda name, rel: bool(pattern.search(name))  # noqa: E731
    else:
        layers_fn = layers or (lambda name, rel: True)
    return Label(False, cause, onset, tuple(kinds), layers_fn, tuple(remedy), latency, detect)


def input_side(name: str, rel: float | None) -> bool:
    """The input-side half of the network: where a vanishing gradient shows (``rel`` None: a name not in the layer
    table, never on this path)."""
    return rel is not None and rel < 0.5


@dataclass
class Job:
    """One training run: the watched models and how one step goes.

    ``step(i)`` runs forward and backward on every model, closes every scope (``scopes[tag].step(loss=...)``) and
    steps the optimizers; it returns the main loss as a float.
    """

    models: dict  # tag -> nn.Module
    step: Callable
    watch_kwargs: dict = field(default_factory=dict)  # tag -> kwargs for gradscope.watch
    scopes: dict = field(default_factory=dict)


def supervised(model, opt, forward, *, events=None, clip=None, optimizer_mode=False, scaler=None, autocast=None,
               schedule=None) -> Job:
    """A single-model job. ``forward(model, i) -> loss``; ``events[i](model)`` runs before step i's forward (to
    corrupt a batch, inject a NaN, change the learning rate); ``optimizer_mode`` closes steps through
    ``watch(model, optimizer=opt)`` instead of ``scope.step()``."""
    events = events or {}
    job = Job({"": model}, None, {"": {"optimizer": opt, "scaler": scaler} if optimizer_mode else {}})

    def step(i):
        scope = job.scopes[""]
        if i in events:
            events[i](model, opt)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            loss = forward(model, i)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if optimizer_mode:
            scope.record_loss(loss)
        else:
            scope.step(scaler=scaler, loss=loss)
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    job.step = step
    return job


def ce_images(batch=32, scale_at=None):
    """``forward`` for an image classifier on CIFAR-10; ``scale_at={step: factor}`` multiplies that step's inputs."""
    scale_at = scale_at or {}

    def forward(model, i):
        x, y = image_batch(i, batch)
        if i in scale_at:
            x = x * scale_at[i]
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(out.float(), y)

    return forward


def sgd(model, lr, momentum=0.9, wd=5e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def adamw(model, lr=1e-3, wd=0.05):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)


def image_job(model, opt, batch=32, **kw) -> Job:
    scale_at = kw.pop("scale_at", None)
    return supervised(model, opt, ce_images(batch, scale_at), **kw)


# ----------------------------------------------------------------------------------------------------------------------
# models


def timm_model(name, **kw):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def lm_job(model, opt, batch=8, length=64, **kw) -> Job:
    def forward(model, i):
        ids = text_batch(i, batch, length)
        return model(input_ids=ids, labels=ids).loss

    return supervised(model, opt, forward, **kw)


def gpt2(**cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    return GPT2LMHeadModel(GPT2Config(**{**base, **cfg}))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def bert_job():
    """BERT sequence classification on padded byte sequences of varying length: the class is which quarter of the
    text a window comes from (its vocabulary differs), the attention mask hides the padding."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=256,
                                                     max_position_embeddings=128, num_labels=4, pad_token_id=0))
    opt = adamw(model, 3e-4, 0.01)
    data = text_bytes()

    def forward(model, i, batch=16, length=64):
        g = torch.Generator().manual_seed(2000 + i)
        labels = torch.randint(0, 4, (batch,), generator=g)
        quarter = (len(data) - length) // 4
        starts = labels * quarter + torch.randint(0, quarter, (batch,), generator=g)
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
        ids = torch.stack([data[s:s + length] for s in starts.tolist()]).clamp(min=1)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return model(input_ids=ids * mask, attention_mask=mask, labels=labels).loss

    return supervised(model, opt, forward)


def t5_job():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=128, d_ff=256, d_kv=32, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0, pad_token_id=0))
    opt = adamw(model, 1e-3, 0.01)

    def forward(model, i):
        ids = text_batch(i, 8, 64)
        return model(input_ids=ids[:, :32], labels=ids[:, 32:].contiguous()).loss

    return supervised(model, opt, forward)


def detection_job():
    """torchvision Faster R-CNN (MobileNetV3-FPN) on CIFAR-10 images: one box around the centred object, its class."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=11,
                                                   min_size=160, max_size=160)
    opt = sgd(model, 0.01, wd=1e-4)

    def forward(model, i):
        x, y = image_batch(i, 4)
        targets = [{"boxes": torch.tensor([[4.0, 4.0, 28.0, 28.0]]), "labels": (c + 1).reshape(1)} for c in y]
        losses = model(list(x), targets)
        return sum(losses.values())

    return supervised(model, opt, forward)


class Generator(nn.Module):
    def __init__(self, z=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z, 256), nn.ReLU(), nn.Linear(256, 3 * 32 * 32), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, 3, 32, 32)


def gan_job():
    """A two-model GAN loop (non-saturating loss, Adam): both models watched, each closed on its own loss."""
    gen = Generator()
    disc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    job = Job({"G": gen, "D": disc}, None)

    def step(i):
        real, _ = image_batch(i, 32)
        real = real / 2.5  # roughly into tanh's range
        z = torch.randn(32, 64)
        fake = gen(z)
        d_loss = (F.binary_cross_entropy_with_logits(disc(real), torch.ones(32, 1)) +
                  F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(32, 1)))
        d_loss.backward()
        job.scopes["D"].step(loss=d_loss)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        g_loss = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(32, 1))
        g_loss.backward()
        disc.zero_grad(set_to_none=True)  # the generator's step: D's gradients from it are discarded
        job.scopes["G"].step(loss=g_loss)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        return float(g_loss)

    job.step = step
    return job


def nan_weight(layer: str):
    def inject(model, opt):
        with torch.no_grad():
            model.get_parameter(layer).view(-1)[0] = float("nan")

    return inject


def set_lr(lr):
    def change(model, opt):
        for g in opt.param_groups:
            g["lr"] = lr

    return change


def exploding_rnn():
    """A ReLU RNN reading image rows, recurrent weights 1.5x orthogonal: the gradient grows through time."""
    model = SequenceClassifier("rnn", "rows")
    model.rnn = nn.RNN(96, 128, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=1.5)
    return model


def fp16_job():
    """A ReLU MLP trained under float16 autocast with a GradScaler; from step 12 the inputs are 1e4x too large and the
    first layer's output overflows float16 in the forward pass, every step."""
    model = deep_mlp(6, 256, "relu", "kaiming")
    opt = sgd(model, 0.01)
    scaler = torch.amp.GradScaler("cpu")
    return image_job(model, opt, scaler=scaler, autocast=torch.float16, scale_at={i: 1e4 for i in range(12, 40)})


# ----------------------------------------------------------------------------------------------------------------------
# the runs


@dataclass
class Case:
    name: str
    make: Callable[[], Job]
    steps: int
    label: Label
    fast: bool = False
    needs: tuple = ()
    note: str = ""


HEALTHY = Label()
LR = ("learning rate",)


def cases() -> list[Case]:
    T, HF = ("timm",), ("transformers",)
    return [
        # -- healthy: modern models as people train them
        Case("timm-resnet50-adamw", lambda: image_job(m := timm_model("resnet50"), adamw(m, 3e-4)), 30,
             HEALTHY, needs=T, note="zero_init_last=True: every residual branch starts at zero"),
        Case("timm-resnet18-sgd", lambda: image_job(m := timm_model("resnet18"), sgd(m, 0.05, momentum=0)), 30,
             HEALTHY, False, T, "zero_init_last=True, plain SGD"),
        Case("timm-convnext_atto-adamw", lambda: image_job(m := timm_model("convnext_atto"), adamw(m)), 30, HEALTHY,
             True, T, "layer scale 1e-6 on every branch"),
        Case("timm-vit_tiny-ls-adamw", lambda: image_job(
            m := timm_model("vit_tiny_patch16_224", img_size=32, patch_size=4, init_values=1e-5), adamw(m, 5e-4)),
             30, HEALTHY, False, T, "ViT with layer scale 1e-5 (DeiT-III style)"),
        Case("timm-efficientnet_b0-adamw", lambda: image_job(m := timm_model("efficientnet_b0"), adamw(m, 3e-4)), 30,
             HEALTHY, False, T, "SiLU, squeeze-excite sigmoid gates"),
        Case("timm-mobilenetv3_small-adamw", lambda: image_job(m := timm_model("mobilenetv3_small_100"),
                                                              adamw(m, 3e-4)), 30, HEALTHY, False, T,
             "hardswish, hard-sigmoid SE gates"),
        Case("tv-resnet18-adamw", lambda: image_job(m := __import__("torchvision").models.resnet18(num_classes=10),
                                                   adamw(m, 1e-3)), 30, HEALTHY,
             note="inplace ReLUs, called twice per block"),
        Case("tv-fasterrcnn-mnv3-sgd", detection_job, 12, HEALTHY, note="multi-head detection model"),
        Case("hf-gpt2-adamw", lambda: lm_job(m := gpt2(), adamw(m, 1e-3, 0.01)), 30, HEALTHY, True, HF,
             "NewGELU (tanh inside), tied embeddings"),
        Case("hf-bert-padded-adamw", bert_job, 30, HEALTHY, False, HF, "padding masks, sequence classification"),
        Case("hf-t5-adamw", t5_job, 30, HEALTHY, False, HF, "encoder-decoder, relative attention, RMS-style norm"),
        Case("hf-llama-adamw", lambda: lm_job(m := llama(), adamw(m, 1e-3, 0.01), optimizer_mode=True), 30, HEALTHY,
             False, HF, "RMSNorm, SwiGLU, rotary; watched with optimizer="),
        Case("mlp20-relu-kaiming-sgd", lambda: image_job(m := deep_mlp(20, 256, "relu", "kaiming"), sgd(m, 0.01, wd=0),
                                                        128), 30, HEALTHY, True),
        Case("mlp10-tanh-xavier-sgd", lambda: image_job(m := deep_mlp(10, 256, "tanh", "xavier"), sgd(m, 0.01, wd=0),
                                                       128), 30, HEALTHY),
        Case("resnet20-sgd", lambda: image_job(m := cifar_resnet(20), sgd(m, 0.1)), 30, HEALTHY, True),
        Case("resnet56-sgd", lambda: image_job(m := cifar_resnet(56), sgd(m, 0.1)), 30, HEALTHY),
        Case("lstm-rows-adam", lambda: image_job(m := SequenceClassifier("lstm", "rows"),
                                                torch.optim.Adam(m.parameters(), 1e-3), 64), 30, HEALTHY, True),
        Case("gru-rows-sgd", lambda: image_job(m := SequenceClassifier("gru", "rows"), sgd(m, 0.05, wd=0), 64), 30,
             HEALTHY),
        Case("gan-mlp-adam", gan_job, 30, HEALTHY, note="two models, two scopes"),
        # -- broken
        Case("mlp20-sigmoid-default", lambda: image_job(m := deep_mlp(20, 256, "sigmoid"), sgd(m, 0.01, wd=0), 128),
             20, broken("sigmoid derivatives (<= 0.25) multiply over 20 layers", 0, ["vanishing"], input_side,
                        ["ReLU"], latency=20), True),
        Case("mlp20-relu-default-init", lambda: image_job(m := deep_mlp(20, 256, "relu"), sgd(m, 0.01, wd=0), 128), 20,
             broken("PyTorch's default Linear init shrinks the signal ~0.4x per ReLU layer", 0, ["vanishing"],
                    input_side, ["Kaiming"], latency=20)),
        Case("plain56-sgd", lambda: image_job(m := cifar_resnet(56, shortcuts=False), sgd(m, 0.1)), 30,
             broken("56 conv-BN layers without shortcuts: BatchNorm amplifies the gradient towards the input at init "
                    "(Yang et al. 2019)", 0, ["exploding"], input_side, ["residual"])),
        Case("rnn-pixels", lambda: image_job(m := SequenceClassifier("rnn", "pixels"), sgd(m, 0.05, wd=0), 32), 12,
             broken("a plain RNN over 1,024 pixel steps forgets the early ones", 0, ["vanishing_through_time"], "rnn",
                    ["LSTM"], latency=20), True),
        Case("timm-resnet18-lr10", lambda: image_job(m := timm_model("resnet18"), sgd(m, 10.0)), 12,
             broken("learning rate 10: the loss diverges from the first update", 1, ["exploding"], None, LR), True, T),
        Case("mlp-corrupt-batch", lambda: image_job(m := deep_mlp(8, 256, "relu", "kaiming"), sgd(m, 0.01, wd=0), 128,
                                                    scale_at={15: 1e3}), 25,
             broken("one batch with inputs x1e3 at step 15", 15, ["exploding"], None, ("input", "data", "clip"))),
        Case("mlp-dying-relu-adam", lambda: image_job(m := deep_mlp(8, 256, "relu", "kaiming"),
                                                      torch.optim.Adam(m.parameters(), 1e-3), 128,
                                                      events={10: set_lr(0.03)}), 40,
             broken("Adam's learning rate raised 30x at step 10: a loss spike, then most ReLUs of several layers die "
                    "for good (the loss does not diverge)", 10, ["exploding", "dead_units"], None, LR, latency=20,
                    detect="dead_units")),
        Case("gpt2-huge-init", lambda: lm_job(m := gpt2(initializer_range=10.0), adamw(m, 1e-3, 0.01)), 20,
             broken("initializer_range 10 (500x GPT-2's 0.02): broken from the start (loss ~300 against 5.5 at "
                    "chance), the gradient norm jumps 20-60x within the first dozen steps; no event marks an onset, "
                    "so the label allows 10 steps", 0, ["exploding"], None, ("learning rate", "clip", "initiali"),
                    latency=10), False, HF),
        Case("resnet20-nan-weight", lambda: image_job(m := cifar_resnet(20), sgd(m, 0.1),
                                                      events={12: nan_weight("layer2.0.conv1.weight")}), 16,
             broken("NaN written into layer2.0.conv1.weight at step 12", 12, ["nonfinite"], r"^layer2\.0\.conv1$",
                    ("NaN",)), True),
        Case("rnn-relu-explodes", lambda: image_job(m := exploding_rnn(), sgd(m, 0.01, wd=0), 64), 12,
             broken("ReLU RNN with recurrent gain 1.5: the gradient grows through time", 0, ["exploding"], "rnn",
                    ("clip",))),
        Case("fp16-overflow-gradscaler", fp16_job, 20,
             broken("float16 forward overflow from step 12 (inputs x1e4) under a GradScaler", 12, ["nonfinite"],
                    r"^1$", ("float16", "bfloat16")), True),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# anchors


class Anchors:
    """The baseline rules, fed from a listener with the same unscaled gradients gradscope sees."""

    def __init__(self):
        self.fired: dict[str, list] = {"sm_vanish": [], "sm_explode": [], "norm_spike": []}
        self._norms: list[float] = []

    def __call__(self, scope, record, new):
        step, div = record.step, scope.grad_divisor
        grads = [(n, p.grad) for n, p in scope.named_parameters() if p.grad is not None]
        for name, g in grads:
            g = g.detach().double() / div
            if not torch.isfinite(g).all():
                self.fired["sm_explode"].append((step, name))
            elif g.abs().mean() < 1e-7:
                self.fired["sm_vanish"].append((step, name))
        total = math.sqrt(sum(float(g.detach().double().square().sum()) for _, g in grads)) / div
        window = self._norms[-20:]
        if window and (not math.isfinite(total) or total > 5 * (sum(window) / len(window))):
            self.fired["norm_spike"].append((step, ""))
        if math.isfinite(total):
            self._norms.append(total)


# ----------------------------------------------------------------------------------------------------------------------
# scoring


@dataclass
class Score:
    false: int = 0
    detected: bool | None = None
    latency: int | None = None
    kind_ok: bool | None = None
    layer_ok: bool | None = None
    remedy_ok: bool | None = None
    first: str = ""

    @property
    def passed(self) -> bool:
        if self.detected is None:
            return self.false == 0
        return (self.false == 0 and self.detected and self.kind_ok and self.layer_ok and self.remedy_ok
                and self.latency is not None)


@dataclass
class Result:
    case: Case
    score: Score
    anchors: dict
    alerts: list
    losses: list
    seconds: float
    error: str = ""
    jump: float = math.nan  # see max_jump

    @property
    def _third(self) -> int:
        return max(1, len(self.losses) // 3)

    @property
    def loss_start(self) -> float:
        return sum(self.losses[:self._third]) / self._third

    @property
    def loss_end(self) -> float:
        return sum(self.losses[-self._third:]) / self._third

    @property
    def loss_falls(self) -> bool:
        """A healthy run's label holds: the mean loss of its last third of steps is below that of its first third."""
        return bool(self.losses) and self.loss_end < self.loss_start


def model_has(models, names) -> bool:
    return any(type(m).__name__ in names for model in models for m in model.modules())


# the benchmark's own list of the norm classes in its models, kept apart from gradscope's detection on purpose: the
# scoring must not take gradscope's word for what a model has
NORM_TYPES = {"BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm",
              "LayerNorm2d", "BatchNormAct2d", "FrozenBatchNorm2d"}


def remedy_fits(alert, label: Label, models) -> bool:
    """The hint contains one of the label's words and recommends nothing the model already has."""
    hint = alert.hint.lower()
    if label.remedy and not any(w.lower() in hint for w in label.remedy):
        return False
    if model_has(models, NORM_TYPES) and "add normalisation" in hint:
        return False
    if model_has(models, {"LSTM", "GRU"}) and ("lstm/gru" in hint and "instead" in hint or "gated recurrent" in hint):
        return False
    return True


def score_gradscope(label: Label, alerts, layer_depth, models, label_layers_ok=None) -> Score:
    s = Score()
    if label.healthy:
        s.false = len(alerts)
        return s
    s.false = sum(a.step < label.onset for a in alerts)
    after = [a for a in alerts if a.step >= label.onset]
    correct = [a for a in after if (a.kind == label.detect if label.detect else a.kind in label.kinds)]
    s.detected = bool(correct)
    if correct and correct[0].step - label.onset <= label.latency:
        s.latency = correct[0].step - label.onset
    if after:
        first = after[0]
        where = first.layer if first.layer.rpartition("/")[2] else f"{first.layer}(root)"
        s.first = f"{first.kind}@{first.step} {where}" + (f": {first.related[0]} most" if first.related else "")
        s.kind_ok = first.kind in label.kinds
        named = first.layer
        if not named.rpartition("/")[2] and first.related:  # a whole-model alert: the layer it names first
            named = f"{named}{first.related[0]}" if named.endswith("/") else first.related[0]
        s.layer_ok = label.layers(named.rpartition("/")[2], layer_depth.get(named))
        s.remedy_ok = remedy_fits(first, label, models)
    return s


def score_anchor(label: Label, fired) -> dict:
    if label.healthy:
        return {"false": len({name for _, name in fired}) if fired and fired[0][1] else len(fired)}
    before = [f for f in fired if f[0] < label.onset]
    after = [f[0] for f in fired if f[0] >= label.onset]
    latency = after[0] - label.onset if after else None
    return {"false": len({n for _, n in before}) if before and before[0][1] else len(before),
            "detected": bool(after), "latency": latency}


def run_case(case: Case, verbose: bool = False) -> Result:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    job = case.make()
    anchors: dict = {}
    losses: list = []
    error = ""
    try:
        for tag, model in job.models.items():
            model.train()
            job.scopes[tag] = gradscope.watch(model, **job.watch_kwargs.get(tag, {}))
            anchors[tag] = Anchors()
            job.scopes[tag].add_listener(anchors[tag])
        bad = 0
        for i in range(case.steps):
            loss = job.step(i)
            losses.append(loss)
            if verbose:
                print(f"  step {i:3d} loss {loss:.4g}", file=sys.stderr)
            bad = bad + 1 if not math.isfinite(loss) else 0
            if bad >= 3:  # NaN everywhere from here on: nothing new to learn
                break
    except Exception as e:  # a run that crashes is reported, not hidden
        error = f"{type(e).__name__}: {e}"
    finally:
        for scope in job.scopes.values():
            scope.detach()
    alerts, depth = [], {}
    for tag, scope in job.scopes.items():
        names = scope.layer_names
        for k, name in enumerate(names):
            depth[f"{tag}/{name}" if tag else name] = k / max(1, len(names) - 1)
        for a in scope.alerts:
            alerts.append(a if not tag else type(a)(**{**a.to_dict(), "layer": f"{tag}/{a.layer}"}))  # related: no tag
    alerts.sort(key=lambda a: a.step)  # stable: detector order within a step is kept
    jump = max((max_jump(scope) for scope in job.scopes.values()), default=math.nan)
    score = score_gradscope(case.label, alerts, depth, list(job.models.values()))
    merged: dict = {}
    for a in anchors.values():
        for k, v in a.fired.items():
            merged.setdefault(k, []).extend(v)
    anchor_scores = {k: score_anchor(case.label, sorted(v)) for k, v in merged.items()}
    if error:  # a run that crashed scores nothing: it is counted in its own column
        score = Score(false=score.false, detected=None if case.label.healthy else False)
    return Result(case, score, anchor_scores, alerts, losses, time.perf_counter() - t0, error, jump)


def max_jump(scope) -> float:
    """The largest ratio of the model's gradient norm to its median over the previous (up to 20) collected steps:
    how close a run came to the instability threshold (``Exploding.jump``)."""
    norms, worst = [], 0.0
    for rec in scope.history.records():
        g = global_grad_norm(layer_grad_norms(rec, scope.meta["layers"]))
        if not math.isfinite(g) or g <= 0:
            continue
        if norms:
            worst = max(worst, g / statistics.median(norms[-20:]))
        norms.append(g)
    return worst


# ----------------------------------------------------------------------------------------------------------------------
# report


def _yn(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _anchor_cell(label: Label, a: dict) -> str:
    if label.healthy:
        return str(a["false"]) if a["false"] else "0"
    if not a["detected"]:
        return "missed" + (f" ({a['false']} early)" if a["false"] else "")
    return f"+{a['latency']}" + (f" ({a['false']} early)" if a["false"] else "")


def format_results(results: list[Result]) -> str:
    lines = ["| run | label | loss, mean of first third -> last third of steps | max grad-norm jump | gradscope: false / first alert | "
             "latency | kind | layer | remedy | SageMaker vanish | SageMaker explode | norm spike x5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lab, s = r.case.label, r.score
        label = "healthy" if lab.healthy else f"broken @{lab.onset}: {'/'.join(lab.kinds)}"
        fl = lambda v: f"{v:.3g}"  # noqa: E731
        loss = f"{fl(r.loss_start)} -> {fl(r.loss_end)}" if r.losses else "-"
        if lab.healthy and not r.loss_falls:
            loss += " (LABEL? loss does not fall)"
        first = s.first or "none"
        lat = "-" if lab.healthy else (f"+{s.latency}" if s.latency is not None else ("late" if s.detected else "MISSED"))
        err = f" ERROR {r.error}" if r.error else ""
        lines.append(f"| {r.case.name} | {label} | {loss} | {r.jump:.3g}x | {s.false} / {first}{err} | {lat} | {_yn(s.kind_ok)} | "
                     f"{_yn(s.layer_ok)} | {_yn(s.remedy_ok)} | "
                     + " | ".join(_anchor_cell(lab, r.anchors.get(k, {"false": 0, "detected": False}))
                                  for k in ("sm_vanish", "sm_explode", "norm_spike")) + " |")
    lines.append("")
    lines.append(format_totals(results))
    return "\n".join(lines)


def totals(results: list[Result]) -> dict:
    healthy = [r for r in results if r.case.label.healthy]
    broken_ = [r for r in results if not r.case.label.healthy]
    out = {"runs": len(results), "healthy": len(healthy), "broken": len(broken_),
           "gradscope": {"false_alerts": sum(r.score.false for r in results),
                         "healthy_with_false": sum(r.score.false > 0 for r in healthy),
                         "detected": sum(bool(r.score.detected) for r in broken_),
                         "in_time": sum(r.score.latency is not None for r in broken_),
                         "kind_ok": sum(bool(r.score.kind_ok) for r in broken_),
                         "layer_ok": sum(bool(r.score.layer_ok) for r in broken_),
                         "remedy_ok": sum(bool(r.score.remedy_ok) for r in broken_),
                         "passed": sum(r.score.passed for r in results)}}
    for k in ("sm_vanish", "sm_explode", "norm_spike"):
        a = [r.anchors.get(k, {"false": 0, "detected": False, "latency": None}) for r in results]
        out[k] = {"healthy_with_false": sum(x["false"] > 0 for x, r in zip(a, results) if r.case.label.healthy),
                  "false_alerts": sum(x["false"] for x in a),
                  "detected": sum(bool(x.get("detected")) for x, r in zip(a, results) if not r.case.label.healthy),
                  "in_time": sum(x.get("latency") is not None and x["latency"] <= r.case.label.latency
                                 for x, r in zip(a, results) if not r.case.label.healthy)}
    return out


def format_totals(results: list[Result], brief: bool = False) -> str:
    """The totals table with the sentence above it; ``brief`` (the README's): the latencies per run are left to
    docs/alert_bench.md."""
    t = totals(results)
    g = t["gradscope"]
    h, b = t["healthy"], t["broken"]
    falls = sum(r.loss_falls for r in results if r.case.label.healthy)
    allowed = sorted({r.case.label.latency for r in results if not r.case.label.healthy})
    by = {n: ", ".join(r.case.name for r in results if not r.case.label.healthy and r.case.label.latency == n)
          for n in allowed}
    when = "; ".join(f"{n} for {by[n]}" for n in allowed)
    rows = [f"Totals over {t['runs']} runs ({h} healthy, {b} broken); the loss falls on {falls} of the {h} healthy runs. "
            + ("\"In time\": within each run's labelled latency ([docs/alert_bench.md](docs/alert_bench.md)). "
               if brief else f"\"In time\": within the label's latency, in collected steps from onset ({when}). ")
            + f"Runs that crashed: {sum(bool(r.error) for r in results)}.", "",
            "| rule | healthy runs with a false alert | false alerts | broken runs detected | detected in time | "
            "first alert: kind / layer / remedy right |", "|---|---|---|---|---|---|",
            f"| gradscope | {g['healthy_with_false']} of {h} | {g['false_alerts']} | {g['detected']} of {b} | "
            f"{g['in_time']} of {b} | {g['kind_ok']} / {g['layer_ok']} / {g['remedy_ok']} of {b} |"]
    names = {"sm_vanish": "SageMaker VanishingGradient (mean abs < 1e-7)", "sm_explode": "SageMaker ExplodingTensor "
             "(NaN/Inf)", "norm_spike": "global grad norm > 5x its recent mean"}
    for k, title in names.items():
        a = t[k]
        rows.append(f"| {title} | {a['healthy_with_false']} of {h} | {a['false_alerts']} | {a['detected']} of {b} | "
                    f"{a['in_time']} of {b} | - |")
    return "\n".join(rows)


def select(fast: bool = False, only: str | None = None) -> tuple[list[Case], list[str]]:
    chosen, skipped = [], []
    for c in cases():
        if fast and not c.fast:
            continue
        if only and not re.search(only, c.name):
            continue
        missing = [m for m in c.needs if not have(m)]
        if missing:
            skipped.append(f"{c.name} (needs {', '.join(missing)}: pip install -e '.[bench]')")
            continue
        chosen.append(c)
    return chosen, skipped


DOC = Path(__file__).resolve().parent.parent / "docs" / "alert_bench.md"
README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- alert-bench:start -->", "<!-- alert-bench:end -->")


def provenance(threads: int, seconds: float) -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = [f"torch {torch.__version__}"] + [f"{m} {__import__(m).__version__}" for m in ("timm", "transformers")
                                                 if have(m)]
    return (f"Generated by `.venv/bin/python scripts/alert_bench.py --write` at commit {commit}, "
            f"{', '.join(versions)}, CPU ({cpu_label()}), {threads} threads, {seconds:.0f} s in all.")


def write_docs(results: list[Result], threads: int, seconds: float) -> None:
    """docs/alert_bench.md (every run) and the totals between the README's markers, from this run."""
    said = provenance(threads, seconds)  # before writing: the first file written would count as a change
    notes = "\n".join(f"* `{r.case.name}`: {r.case.label.cause or r.case.note}" for r in results
                       if r.case.label.cause or r.case.note)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(f"# The labelled alert benchmark\n\n{said}\n\n"
                   f"What it runs and how it scores: the docstring of `scripts/alert_bench.py`. Latency is in "
                   f"collected steps from the labelled onset; \"max grad-norm jump\" is the largest ratio of the "
                   f"model's gradient norm to its median over the previous 20 steps (the `exploding` spike threshold "
                   f"is 10).\n\n{format_totals(results)}\n\n{format_results(results)}\n\n## The runs\n\n{notes}\n")
    text = README.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    block = f"\n{said}\n\n{format_totals(results, brief=True)}\n\n"
    README.write_text(text[:start] + block + text[end:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fast", action="store_true", help="only the subset the default test suite runs")
    p.add_argument("--only", help="regular expression on run names")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--verbose", action="store_true", help="print each step's loss and every alert")
    p.add_argument("--write", action="store_true", help="regenerate docs/alert_bench.md and the README's totals "
                   "(needs every run: no --fast or --only)")
    args = p.parse_args(argv)
    if args.write and (args.fast or args.only):
        p.error("--write regenerates the documented results from every run: drop --fast/--only")
    torch.set_num_threads(args.threads)
    logging.getLogger("gradscope").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    chosen, skipped = select(args.fast, args.only)
    results = []
    t0 = time.perf_counter()
    for case in chosen:
        r = run_case(case, args.verbose)
        results.append(r)
        print(f"{case.name}: {r.seconds:.1f}s, {len(r.alerts)} alerts, "
              f"{'PASS' if r.score.passed else 'FAIL'}{' ' + r.error if r.error else ''}", file=sys.stderr, flush=True)
        if args.verbose:
            for a in r.alerts[:12]:
                print(f"    {a}", file=sys.stderr)
    wall = time.perf_counter() - t0
    print(f"gradscope {gradscope.__version__}, torch {torch.__version__}, {args.threads} threads, {wall:.0f} s\n")
    print(format_results(results))
    for s in skipped:
        print(f"skipped: {s}")
    if args.write:
        if skipped:
            print("not written: some runs were skipped (install the bench extra)", file=sys.stderr)
            return 1
        write_docs(results, args.threads, wall)
        print(f"wrote {DOC} and the totals in {README}")
    ok = all(r.score.passed and not r.error and (r.loss_falls or not r.case.label.healthy) for r in results)
    return 0 if ok and results else 1


if __name__ == "__main__":
    sys.exit(main())
