"""Overhead of monitoring, measured side by side: median step time of each monitor relative to plain training.

    python scripts/bench_overhead.py [--models resnet18 resnet20 mlp20 lstm gpt2] [--steps 20] [--rounds 3]
                                     [--device cpu] [--phases] [--floor] [--no-peers] [--history 200]
                                     [--growth 10000] [--against REVISION]

Models: torchvision resnet18 and gradscope's CIFAR ResNet-20 on 32x32 images, a 20-layer ReLU MLP of width 256, an
LSTM over 32 image rows, and a GPT-2-style transformer (Hugging Face GPT2LMHeadModel from a config: 4 layers, 128
wide, tied embeddings; batch 8 x 64 byte tokens; needs transformers, the bench extra).

Monitors: plain training, gradscope every=1, every=10, every=1 with all optional extra_stats (max |g|, zero
fraction, weight norms), a per-parameter .item() loop, TensorBoard add_histogram per parameter, wandb.watch offline;
with --floor, three floors under gradscope every=1 (see HookFloor): no-op hooks, + the core numbers' kernels, + the
other default statistics' kernels, none with records; with --against REVISION, gradscope every=1 as of that git
revision beside the current one (a change's cost, measured in the same cycles).
Each trains its own copy of the model (same weights, same batches); the script runs one step of each in turn, in a
new random order every cycle, for --steps x --rounds cycles after --warmup, so a slow phase of a shared machine hits
all monitors alike. "x plain (median)" is the median over cycles of the step time over plain's step time in the same
cycle: the typical step. "x plain (mean)" is the ratio of mean step times: the amortised cost, which is what every=10
changes; one slow step of a shared machine moves it, so "x plain (10-step windows)" is the median over consecutive
windows of 10 cycles of (the monitor's total time / plain's): amortised over every=10's period, robust to outliers. Peers that are not installed are skipped with a note; they are never dependencies of gradscope.
Memory: the peak working memory of 3 steps of each monitor alone, above what was in use before them (CUDA:
max_memory_allocated; CPU: the peak resident set size, VmHWM, with glibc returning large blocks to the OS).
--growth N trains the 20-layer MLP N steps with gradscope and prints the memory in use ten times along the way.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import importlib
import io
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.bench.host import cpu_label
from gradscope.bench.models import build_model, deep_mlp

def images(n: int, device) -> tuple:
    """A CIFAR-shaped batch: ``n`` random 3x32x32 images and class labels."""
    return torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)


SEQUENCE, VOCAB = 64, 256  # the transformer's context and its byte-level vocabulary


def tokens(n: int, device) -> tuple:
    """``n`` random byte sequences and their next-byte targets, flattened as the model's logits are."""
    ids = torch.randint(0, VOCAB, (n, SEQUENCE + 1), device=device)
    return ids[:, :-1].contiguous(), ids[:, 1:].reshape(-1)


class CausalLM(nn.Module):
    """A Hugging Face GPT-2 (attention, LayerNorm, GELU, tied input/output embeddings) built from a config, random
    init, whose forward returns the next-token logits flattened to ``(batch * positions, vocab)``."""

    def __init__(self, layers: int = 4, width: int = 128, heads: int = 4):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQUENCE, n_embd=width, n_layer=layers, n_head=heads,
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.gpt(input_ids=ids).logits.reshape(-1, VOCAB)


MODELS = {  # name: (builder, batch size, batch maker)
    "resnet18": (lambda: __import__("torchvision").models.resnet18(num_classes=10), 64, images),
    "resnet20": (lambda: build_model("resnet20"), 128, images),
    "mlp20": (lambda: deep_mlp(20, 256, "relu", "kaiming"), 128, images),
    "lstm": (lambda: build_model("lstm-rows"), 128, images),
    "gpt2": (CausalLM, 8, tokens),
}


class Monitor:
    """One way of watching training: attach, per-step work, detach."""

    name = "plain"

    def attach(self, model, opt):
        pass

    def after_backward(self, model, step):
        pass

    def detach(self):
        pass


class Gradscope(Monitor):
    def __init__(self, every, extra_stats=(), package=gradscope, at: str = ""):
        self.every, self.extra_stats, self.package = every, extra_stats, package
        self.name = f"gradscope every={every}" + (f", extra_stats={extra_stats!r}" if extra_stats else "") \
            + (f", at {at}" if at else "")

    def attach(self, model, opt):
        self.scope = self.package.watch(model, every=self.every, extra_stats=self.extra_stats)

    def after_backward(self, model, step):
        self.scope.step()

    def detach(self):
        self.scope.detach()


class ItemLoop(Monitor):
    name = "per-parameter .item() loop"

    def after_backward(self, model, step):
        self.norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]


class TensorBoardHistograms(Monitor):
    name = "TensorBoard add_histogram"

    def attach(self, model, opt):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tempfile.TemporaryDirectory()
        self.writer = SummaryWriter(self.dir.name)

    def after_backward(self, model, step):
        for name, p in model.named_parameters():
            if p.grad is not None:
                self.writer.add_histogram(name, p.grad, step)

    def detach(self):
        self.writer.close()
        self.dir.cleanup()


class WandbWatch(Monitor):
    name = "wandb.watch(log=gradients, log_freq=1)"

    def attach(self, model, opt):
        import wandb

        self.run = wandb.init(mode="offline", dir=tempfile.mkdtemp(), reinit=True)
        wandb.watch(model, log="gradients", log_freq=1)
        self.model = model

    def after_backward(self, model, step):
        import wandb

        wandb.log({"step": step})

    def detach(self):
        import wandb

        wandb.unwatch(self.model)
        self.run.finish()


class HookFloor(Monitor):
    """The least a monitor built on per-module hooks pays, with none of gradscope's bookkeeping: the floor under
    gradscope every=1 (``--floor``).

    Level 1: a no-op forward pre-hook and forward hook on every module, as gradscope places them (none on the root's
    pre-hook). Level 2 adds the numbers the core statistics are made of, with gradscope's own kernels: the float32 sum
    of every module output (its NaN/Inf check), a tensor hook on every output taking the squared norm of its gradient
    (the backprop signal), and the parameters' gradient norms, all read with one transfer per step. Level 3 adds what
    gradscope's other default statistics compute, with its own kernels: a ReLU output's per-unit fired counts (dead
    units; in place of its sum, as gradscope checks a ReLU of the output just checked by that check), a sigmoid/tanh
    output's saturation count (its sum included), and a recurrent layer's input gradient per step (its input passed on
    as a new autograd node, the gradient through time). No records, dead-unit state, detectors or history.
    """

    NAMES = {1: "floor: no-op hooks on every module", 2: "floor: + output sums, gradient norms (no records)",
             3: "floor: + ReLU counts, saturation, gradient through time (no records)"}

    def __init__(self, level: int):
        self.level = level
        self.name = self.NAMES[level]

    def attach(self, model, opt):
        from gradscope.activations import TimeProfile, fired_counts, module_kind, saturation_counts, unit_dim
        from gradscope.stats import sq_norm

        self.handles, self.sums, self.signals, self.counts, self.times = [], [], [], [], []
        self.ones: dict = {}
        grad_hook = (lambda g: self.signals.append(sq_norm(g)))

        def post(kind, module, args, out):
            if self.level == 1:
                return
            for t in (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else ():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    if self.level == 3 and kind == "relu" and t.requires_grad:
                        self.counts.append(fired_counts(t, unit_dim(t.ndim), False, self.ones)[0])
                    elif self.level == 3 and kind in ("sigmoid", "tanh"):
                        saturated, total, _ = saturation_counts(t, kind, 0.02)
                        self.counts.append(saturated.reshape(1))
                        self.sums.append(total)
                    else:
                        self.sums.append(t.detach().sum(dtype=torch.float32))
                    if t.requires_grad:
                        t.register_hook(grad_hook)

        def through_time(module, args, kwargs):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not torch.is_grad_enabled():
                return None
            x2 = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
            batch_dim = None if x.ndim == 2 else (0 if module.batch_first else 1)

            def per_step_norms(g):
                profile = TimeProfile()
                profile.observe_grad(g, batch_dim)
                self.times.append(profile.profile)

            x2.register_hook(per_step_norms)
            return (x2,) + tuple(args[1:]), kwargs

        for name, m in model.named_modules():
            kind = module_kind(m)
            if m is not model:
                self.handles.append(m.register_forward_pre_hook(lambda module, args: None))
            if self.level == 3 and kind == "recurrent":
                self.handles.append(m.register_forward_pre_hook(through_time, with_kwargs=True))
            self.handles.append(m.register_forward_hook(partial(post, kind)))

    def after_backward(self, model, step):
        if self.level == 1:
            return
        from gradscope.stats import norms

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        parts = [norms(grads)] + [torch.stack(x).double() for x in (self.sums, self.signals) if x]
        parts += [t.reshape(-1).double() for t in self.counts + self.times]  # (units,) counts, per-step profiles
        self.values = torch.cat(parts).tolist()
        for x in (self.sums, self.signals, self.counts, self.times):
            x.clear()

    def detach(self):
        for h in self.handles:
            h.remove()


def package_at(revision: str):
    """The ``gradscope`` package as of git ``revision`` of this repository, imported beside the current one under
    another name (its modules import each other relatively), for ``--against``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", sha, "gradscope"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--against {revision}: cannot read that revision's gradscope/ with git in {root} ({e}); pass "
                         "a commit of this repository, e.g. --against HEAD~1") from None
    folder = tempfile.mkdtemp(prefix="gradscope-at-")
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    name = f"gradscope_at_{sha}"
    os.rename(os.path.join(folder, "gradscope"), os.path.join(folder, name))
    sys.path.insert(0, folder)
    return importlib.import_module(name), sha


def available_monitors(floor: bool = False, peers: bool = True, against: str | None = None):
    monitors, notes = [Monitor(), Gradscope(1), Gradscope(10), Gradscope(1, "all"), ItemLoop()], []
    if against:
        package, sha = package_at(against)
        monitors.insert(2, Gradscope(1, package=package, at=sha))
    if floor:
        at = 3 if against else 2  # after gradscope every=1 (and the revision's)
        monitors[at:at] = [HookFloor(1), HookFloor(2), HookFloor(3)]
    if not peers:
        return monitors, ["TensorBoard and wandb: not run (--no-peers)"]
    for cls, module in ((TensorBoardHistograms, "tensorboard"), (WandbWatch, "wandb")):
        try:
            __import__(module)
            monitors.append(cls())
        except ImportError:
            notes.append(f"{cls.name}: skipped, {module} is not installed")
    return monitors, notes


def train_step(model, opt, monitor, batch, i, device) -> float:
    """One timed training step (forward, backward, the monitor's work, optimizer step), in seconds."""
    x, y = batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    monitor.after_backward(model, i)
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reset_peak() -> float:
    """Reset the peak memory counter; return the memory in use now (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM, the peak resident set size
        f.write("5")
    return _status_mib("VmRSS")


def peak() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def copy_of(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights; on CUDA an RNN's copied weights are put back into cuDNN's one block
    (a deep copy scatters them, and cuDNN would then compact them at every call: slower, and a warning)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.flatten_parameters()
    return model


def bench(name, args, device, monitors):
    """Each monitor trains its own copy of the model (same weights, same batches); one step of each in turn, in a new
    random order every cycle, so slow phases of a shared machine hit every monitor alike. Ratios are per cycle."""
    make, batch, make_batch = MODELS[name]
    batch = args.batch_size or batch
    torch.manual_seed(0)
    base = make().to(device)
    batches = [make_batch(batch, device) for _ in range(4)]
    runs = []
    for m in monitors:
        model = copy_of(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs.append((m, model, opt))
    for m, model, opt in runs:
        m.attach(model, opt)
    times = {m.name: [] for m in monitors}
    try:
        cycles = 0 if args.memory_only else args.warmup + args.steps * args.rounds
        order = random.Random(0)
        for i in range(cycles):
            # a fresh random order each cycle: no monitor always runs right after the same one (TensorBoard's writer
            # thread, say, slows whichever step comes next)
            for m, model, opt in order.sample(runs, len(runs)):
                t = train_step(model, opt, m, batches[i % len(batches)], i, device)
                if i >= args.warmup:
                    times[m.name].append(t)
        memory = peak_memory(runs, batches, device) if args.memory_only or device.type == "cuda" else {}
    finally:
        for m, _, _ in runs:
            m.detach()
    if args.memory_only:
        return memory
    if not memory:
        memory = memory_in_child(name, args)
    plain = times["plain"]
    rows = []
    for m in monitors:
        t = times[m.name]
        rows.append((m.name, statistics.median(t) * 1000, statistics.median(a / b for a, b in zip(t, plain)),
                     statistics.mean(t) / statistics.mean(plain), windowed(t, plain), memory[m.name],
                     memory[m.name] / memory["plain"] if memory["plain"] > 0 else math.nan))
    return rows


def windowed(t: list, plain: list, size: int = 10) -> float:
    """Median over consecutive windows of ``size`` cycles of sum(t) / sum(plain) (the last partial window dropped;
    the plain ratio when there is no whole window)."""
    ratios = [sum(t[i:i + size]) / sum(plain[i:i + size]) for i in range(0, len(t) - size + 1, size)]
    return statistics.median(ratios) if ratios else statistics.mean(t) / statistics.mean(plain)


def peak_memory(runs, batches, device) -> dict:
    """The peak working memory of 3 steps of each monitor alone, above the memory in use before them (MiB)."""
    memory = {}
    for i in range(2):  # first steps allocate for good (optimizer state, thread pools): not working memory
        for m, model, opt in runs:
            train_step(model, opt, m, batches[i % len(batches)], i, device)
    for m, model, opt in runs:
        before = reset_peak()
        for i in range(3):
            train_step(model, opt, m, batches[i % len(batches)], i, device)
        memory[m.name] = peak() - before
    return memory


def memory_in_child(name: str, args) -> dict:
    """CPU: measure peak memory in a child process whose glibc returns every large block to the OS when it is freed
    (a fixed mmap threshold), so that the peak resident size of a few steps is their working memory. The timings stay
    in this process: a fixed threshold makes every large allocation an mmap and would slow the steps being timed."""
    cmd = [sys.executable, __file__, "--models", name, "--memory-only", "--steps", "0", "--warmup", "0"]
    if args.floor:
        cmd.append("--floor")
    if not args.peers:
        cmd.append("--no-peers")
    if args.against:
        cmd += ["--against", args.against]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


PHASES = ("forward", "backward", "gradscope step()", "optimizer step")
STEP_PARTS = {  # the parts of a collected scope.step() that --phases times apart
    "parameter norms (measure_params; the floor computes the same)": "measure",
    "the record: fold per layer, one transfer (build_record)": "record",
    "dead units: fold the step's counts (DeadUnitBank.fold)": "dead",
    "detectors (check)": "detectors",
    "history (append)": "history",
}


class StepParts:
    """Times the parts of ``scope.step()`` (:data:`STEP_PARTS`) by wrapping the functions it calls, for one scope;
    :meth:`close` puts them back. The rest of step() is its own bookkeeping (buffers reset, gradient marks, the layer
    table's checks)."""

    def __init__(self, scope):
        import gradscope.activations as activations
        import gradscope.scope as scope_module

        self.times: dict = {key: 0.0 for key in STEP_PARTS.values()}
        self.undo = []
        self._wrap(scope_module, "measure_params", "measure")
        self._wrap(scope_module, "build_record", "record")
        self._wrap(scope.history, "append", "history")
        for d in scope.detectors:
            self._wrap(d, "check", "detectors")
        self._wrap(activations.DeadUnitBank, "fold", "dead")

    def _wrap(self, owner, attr, key) -> None:
        fn = getattr(owner, attr)
        had = attr in vars(owner)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[key] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, fn if had else None))

    def take(self) -> dict:
        """The parts' seconds since the last take."""
        out, self.times = self.times, {key: 0.0 for key in STEP_PARTS.values()}
        return out

    def close(self) -> None:
        for owner, attr, fn in reversed(self.undo):
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)


def phases(name: str, args, device) -> None:
    """Where gradscope every=1 spends its time: each phase of a step, plain vs watched, one step of each in turn."""
    make, batch, make_batch = MODELS[name]
    batch = args.batch_size or batch
    torch.manual_seed(0)
    base = make().to(device)
    x, y = make_batch(batch, device)
    runs = []
    for watched in (False, True):
        model = copy_of(base)
        runs.append((model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                     gradscope.watch(model) if watched else None))
    times = [[[] for _ in PHASES] for _ in runs]
    parts, part_times = StepParts(runs[1][2]), {key: [] for key in STEP_PARTS.values()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps * args.rounds):
        for k in (0, 1) if i % 2 else (1, 0):
            model, opt, scope = runs[k]
            stamps = [time.perf_counter()]
            loss = F.cross_entropy(model(x), y)
            sync()
            stamps.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            stamps.append(time.perf_counter())
            if scope is not None:
                scope.step()
            sync()
            stamps.append(time.perf_counter())
            opt.step()
            sync()
            stamps.append(time.perf_counter())
            taken = parts.take() if scope is not None else {}
            if i >= args.warmup:
                for j in range(len(PHASES)):
                    times[k][j].append(stamps[j + 1] - stamps[j])
                for key, seconds in taken.items():
                    part_times[key].append(seconds)
    parts.close()
    runs[1][2].detach()
    print(f"\n{name}: median ms per phase\n| phase | plain | gradscope every=1 | difference |\n|---|---|---|---|")
    for j, phase in enumerate(PHASES):
        a, b = statistics.median(times[0][j]) * 1000, statistics.median(times[1][j]) * 1000
        print(f"| {phase} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    step_ms = statistics.median(times[1][PHASES.index("gradscope step()")]) * 1000
    print(f"\n{name}: inside gradscope step(), median ms per collected step\n| part | ms |\n|---|---|")
    medians = {label: statistics.median(part_times[key]) * 1000 for label, key in STEP_PARTS.items()}
    for label, ms in medians.items():
        print(f"| {label} | {ms:.2f} |")
    print(f"| the rest: buffers reset, gradient marks, the layer table's checks (step() minus the parts) | "
          f"{step_ms - sum(medians.values()):.2f} |\n| step() in all | {step_ms:.2f} |")


def _deep_size(obj) -> int:
    """Bytes of ``obj`` and everything it holds (dicts, lists, tuples, arrays, numbers, strings counted once)."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            todo.append(o.__dict__)
    return total


HISTORY_MODELS = {  # name: (builder, batch, batch maker)
    "resnet50": (lambda: __import__("torchvision").models.resnet50(num_classes=10), 2, images),
    "gpt2": (CausalLM, 2, tokens),
}


def history_memory(steps: int, device) -> None:
    """Memory of the in-memory history per collected step: gradscope's packed records against the same records as
    plain dicts of Python floats (what a record is when read, and what history held before it was packed)."""
    print(f"\nhistory memory after {steps} collected steps (every=1, default statistics)\n"
          "| model | layers | parameters | values per record | packed bytes per record | bytes per value | "
          "as dicts: bytes per record | bytes per value |\n|---|---|---|---|---|---|---|---|")
    for name, (make, batch, make_batch) in HISTORY_MODELS.items():
        torch.manual_seed(0)
        model = make().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        scope = gradscope.watch(model)
        for _ in range(steps):
            x, y = make_batch(batch, device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            scope.step()
            opt.step()
        h = scope.history
        values = sum(len(st) for part in (h.last.layers, h.last.params) for st in part.values())
        packed = h.nbytes() / len(h)
        as_dicts = sum(_deep_size(r.layers) + _deep_size(r.params) + _deep_size(r.info) for r in h) / len(h)
        print(f"| {name} | {len(h.last.layers)} | {len(h.last.params)} | {values} | {packed:,.0f} | "
              f"{packed / values:.1f} | {as_dicts:,.0f} | {as_dicts / values:.1f} |", flush=True)
        scope.detach()


def growth(args, device) -> None:
    """RSS (CUDA: memory allocated) over a long run of the 20-layer MLP with gradscope every=1: it must stay flat."""
    torch.manual_seed(0)
    model = deep_mlp(20, 256, "relu", "kaiming").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scope = gradscope.watch(model)
    batches = [(torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device))
               for _ in range(4)]
    mon = Gradscope(1)
    mon.scope = scope
    print(f"\nmemory over {args.growth} steps of mlp20 with gradscope every=1 (history={scope.history.max_records})")
    print("| step | MiB in use | records kept |\n|---|---|---|")
    for i in range(args.growth):
        train_step(model, opt, mon, batches[i % 4], i, device)
        if (i + 1) % max(1, args.growth // 10) == 0 or i == 0:
            used = (torch.cuda.memory_allocated() / 2 ** 20 if device.type == "cuda" else _status_mib("VmRSS"))
            print(f"| {i + 1} | {used:.1f} | {len(scope.history)} |", flush=True)
    scope.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per monitor and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, help="override every model's batch size (e.g. tiny for a smoke test)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--phases", action="store_true",
                    help="also print where gradscope every=1 spends its time (forward, backward, step(), optimizer), "
                         "and the parts of step() (parameter norms, the record, dead units, detectors, history)")
    ap.add_argument("--floor", action="store_true",
                    help="also time three floor monitors: no-op hooks on every module; those hooks computing the "
                         "core numbers (output sums, gradient norms) without records: what any per-module-hook "
                         "monitor pays at least; and adding the other default statistics' kernels (ReLU fired counts, "
                         "saturation counts, the gradient through time): what gradscope's statistics cost without "
                         "its bookkeeping")
    ap.add_argument("--against", metavar="REVISION",
                    help="also time gradscope every=1 as of this git revision (e.g. HEAD~1, a commit), its package "
                         "imported beside the current one, in the same cycles: what a change did to the cost, measured "
                         "side by side")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out TensorBoard and wandb: their writer threads run beside the other monitors' steps "
                         "and add noise to every ratio")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the child of memory_in_child
    ap.add_argument("--history", type=int, default=0, metavar="STEPS",
                    help="also print the history's memory per record after this many steps of resnet50 and the "
                         "GPT-2-style model (e.g. 200)")
    ap.add_argument("--growth", type=int, default=0, metavar="STEPS",
                    help="also train the MLP this many steps with gradscope and print the memory in use (e.g. 10000)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    logging.getLogger("gradscope").setLevel(logging.ERROR)  # random batches raise alerts; timing only here
    monitors, notes = available_monitors(args.floor, args.peers, args.against)
    if args.memory_only:
        print(json.dumps(bench(args.models[0], args, device, monitors)))
        return 0
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"cpu ({cpu_label()})"
    print(f"torch {torch.__version__}, device {where}, {torch.get_num_threads()} threads, {args.steps * args.rounds} "
          f"timed steps per monitor (+{args.warmup} warm-up), one step of each monitor in turn")
    for name in args.models:
        print(f"\n{name}\n| monitor | median step ms | x plain (median) | x plain (mean) | x plain (10-step windows) "
              f"| peak MiB | x plain peak |\n"
              "|---|---|---|---|---|---|---|")
        for monitor, ms, ratio, mean_ratio, window_ratio, memory, mem_ratio in bench(name, args, device, monitors):
            print(f"| {monitor} | {ms:.1f} | {ratio:.3f} | {mean_ratio:.3f} | {window_ratio:.3f} | {memory:.1f} | "
                  f"{mem_ratio:.3f} |", flush=True)
    if args.phases:
        for name in args.models:
            phases(name, args, device)
    if args.history:
        history_memory(args.history, device)
    if args.growth:
        growth(args, device)
    for note in notes:
        print(f"\nnote: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
