"""Dead ReLUs and gradient through time on real CIFAR-10, seen with gradscope.

Part 1 kills ReLU units on purpose: the same 8-layer ReLU MLP trained with a sane and with a far too large learning
rate; gradscope reports the dead fraction of every ReLU call site as training goes.
Part 2 reads CIFAR-10 images as sequences (rows: 32 steps x 96 features; --pixels: 1,024 steps x 3) and shows how far
back the gradient reaches in a vanilla RNN, an LSTM (PyTorch's init, and with a forget-gate bias of 1) and a GRU.

    python examples/activation_diagnostics.py [--steps 40] [--pixels] [--data-dir DIR]
"""

import argparse
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset
from gradscope.bench.models import deep_mlp


def load(args, n):
    root = find_cifar10_folder(args.data_dir)
    if root is None:
        print("NO CIFAR-10 FOUND: using random CIFAR-shaped SYNTHETIC images", file=sys.stderr)
        return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    print(f"data: {n} real CIFAR-10 training images from {root}")
    return load_cifar10_subset(root, "train", n=n, seed=0)


def train(model, opt, scope, images, labels, steps, batch, clip=None):
    """A plain training loop with the scope closing each step; yields (step, loss) after each optimizer step."""
    for step in range(steps):
        i = (step * batch) % len(images)
        loss = F.cross_entropy(model(images[i:i + batch]), labels[i:i + batch])
        opt.zero_grad()
        loss.backward()
        scope.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        yield step, loss


def dead_relus(images, labels, steps, batch, lr):
    torch.manual_seed(0)
    model = deep_mlp(8, 256, "relu", "kaiming")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scope = gradscope.watch(model, dead_window=1000)
    sites = None
    print(f"\n8-layer ReLU MLP, SGD lr={lr}: dead fraction (%) per ReLU call site (window: 1,000 samples)")
    for step, loss in train(model, opt, scope, images, labels, steps, batch):
        latest = scope.latest()
        if sites is None:
            sites = [n for n, st in latest.items() if "dead_fraction" in st]
            print(f"{'step':>5} {'loss':>7} " + " ".join(f"{'relu ' + s:>8}" for s in sites))
        if step % 10 == 0 or step == steps - 1:
            print(f"{step:>5} {loss.item():>7.3f} " + " ".join(f"{100 * latest[s]['dead_fraction']:>8.1f}" for s in sites))
    dead = scope.dead_units()
    print("dead unit indices, last site:", dead[sites[-1]].tolist()[:20], "..." if len(dead[sites[-1]]) > 20 else "")
    print("alerts:", sorted({(a.kind, a.layer) for a in scope.alerts}) or "none")
    scope.detach()


class Reader(nn.Module):
    """Reads an image as a sequence and classifies it from the last hidden state."""

    def __init__(self, cell, pixels, forget_bias=None):
        super().__init__()
        self.pixels = pixels
        self.rnn = cell(3 if pixels else 96, 128, batch_first=True)
        self.head = nn.Linear(128, 10)
        if forget_bias is not None:  # PyTorch's LSTM gate order is input, forget, cell, output
            with torch.no_grad():
                self.rnn.bias_ih_l0[128:256] = forget_bias
                self.rnn.bias_hh_l0[128:256] = 0.0

    def forward(self, x):  # x: (N, 3, 32, 32)
        seq = x.flatten(2).transpose(1, 2) if self.pixels else x.permute(0, 2, 1, 3).flatten(2)  # (N, T, F)
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


def through_time(images, labels, steps, batch, pixels):
    t = 1024 if pixels else 32
    print(f"\ngradient through time, CIFAR-10 as {t}-step sequences, after {steps} Adam steps (lr 1e-3):")
    print(f"{'model':<8} {'loss':>6} {'t=0':>9} {'t=T/4':>9} {'t=T/2':>9} {'t=3T/4':>9} {'t=T-1':>9} {'first/last':>10} "
          f"{'reach':>6}")
    for name, cell, forget_bias in (("RNN", nn.RNN, None), ("LSTM", nn.LSTM, None), ("LSTM-fb1", nn.LSTM, 1.0),
                                     ("GRU", nn.GRU, None)):
        torch.manual_seed(0)
        model = Reader(cell, pixels, forget_bias)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scope = gradscope.watch(model)
        for _, loss in train(model, opt, scope, images, labels, steps, batch, clip=1.0):
            pass
        st = scope.latest()["rnn"]
        p = list(st["through_time"])
        print(f"{name:<8} {loss.item():>6.3f} " + " ".join(f"{p[k]:>9.2e}" for k in
                                                                 (0, t // 4, t // 2, 3 * t // 4, t - 1))
              + f" {st['through_time_ratio']:>10.1e} {int(st['through_time_reach']):>6}")
        scope.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pixels", action="store_true", help="1,024-step pixel sequences instead of 32 rows")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    logging.getLogger("gradscope").setLevel(logging.ERROR)  # the tables show what the alerts would say
    images, labels = load(args, min(args.steps * args.batch_size, 50_000))
    for lr in (0.01, 0.1):
        dead_relus(images, labels, args.steps, args.batch_size, lr)
    through_time(images, labels, args.steps, args.batch_size, args.pixels)


if __name__ == "__main__":
    main()
