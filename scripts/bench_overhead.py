"""Overhead of monitoring, measured side by side: median step time of each monitor relative to plain training.

    python scripts/bench_overhead.py [--models resnet18 resnet20 mlp20 lstm] [--steps 20] [--rounds 3] [--device cpu]

The mean ratio is the amortised cost (with every=10 one step in ten does the collecting); the median is the typical
step. Monitors run interleaved (plain, gradscope every=1, every=10, every=1 with all optional extra_stats (max |g|,
zero fraction, weight norms), a per-parameter .item() loop, TensorBoard add_histogram per parameter, wandb.watch
offline), each for --steps timed steps per round after a warm-up, on the same model and batches. Peers that are not installed are skipped with a note; they are never dependencies of gradscope.
Memory: the process RSS after each monitor's block on CPU (max_memory_allocated on CUDA).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import gradscope
from gradscope.models import build_model, deep_mlp

MODELS = {  # name: (builder, batch size, input shape)
    "resnet18": (lambda: __import__("torchvision").models.resnet18(num_classes=10), 64, (3, 32, 32)),
    "resnet20": (lambda: build_model("resnet20"), 128, (3, 32, 32)),
    "mlp20": (lambda: deep_mlp(20, 256, "relu", "kaiming"), 128, (3, 32, 32)),
    "lstm": (lambda: build_model("lstm-rows"), 128, (3, 32, 32)),
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


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
    def __init__(self, every, extra_stats=()):
        self.every, self.extra_stats = every, extra_stats
        self.name = f"gradscope every={every}" + (f", extra_stats={extra_stats!r}" if extra_stats else "")

    def attach(self, model, opt):
        self.scope = gradscope.watch(model, every=self.every, extra_stats=self.extra_stats)

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


def available_monitors():
    monitors, notes = [Monitor(), Gradscope(1), Gradscope(10), Gradscope(1, "all"), ItemLoop()], []
    for cls, module in ((TensorBoardHistograms, "tensorboard"), (WandbWatch, "wandb")):
        try:
            __import__(module)
            monitors.append(cls())
        except ImportError:
            notes.append(f"{cls.name}: skipped, {module} is not installed")
    return monitors, notes


def step_times(model, opt, monitor, batches, steps, warmup, device):
    monitor.attach(model, opt)
    times = []
    try:
        for i in range(warmup + steps):
            x, y = batches[i % len(batches)]
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
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        monitor.detach()
    return times


def bench(name, args, device, monitors):
    make, batch, shape = MODELS[name]
    batch = args.batch_size or batch
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device))
               for _ in range(4)]
    times = {m.name: [] for m in monitors}
    memory = {}
    for _ in range(args.rounds):  # interleaved: A B C ... A B C ...
        for m in monitors:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[m.name] += step_times(model, opt, m, batches, args.steps, args.warmup, device)
            memory[m.name] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else rss_mib())
    plain, plain_mean = statistics.median(times["plain"]), statistics.mean(times["plain"])
    return [(m.name, statistics.median(times[m.name]) * 1000, statistics.median(times[m.name]) / plain,
             statistics.mean(times[m.name]) / plain_mean, memory[m.name]) for m in monitors]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per monitor and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, help="override every model's batch size (e.g. tiny for a smoke test)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    logging.getLogger("gradscope").setLevel(logging.ERROR)  # random batches raise alerts; timing only here
    monitors, notes = available_monitors()
    mem = "peak MiB (CUDA)" if device.type == "cuda" else "RSS MiB after"
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up), median step time")
    for name in args.models:
        print(f"\n{name}\n| monitor | median step ms | x plain (median) | x plain (mean) | {mem} |\n"
              "|---|---|---|---|---|")
        for monitor, ms, ratio, mean_ratio, memory in bench(name, args, device, monitors):
            print(f"| {monitor} | {ms:.1f} | {ratio:.3f} | {mean_ratio:.3f} | {memory:.0f} |")
    for note in notes:
        print(f"\nnote: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
