"""Wrap an existing training loop with gradscope: two added lines (marked ###).

Trains a deep MLP on real CIFAR-10 images (an image-folder copy: --data-dir, $GRADSCOPE_CIFAR10_DIR or
../shared/data/cifar10-jpg) and prints gradscope's summary. The default, a 20-layer sigmoid MLP at PyTorch's default
initialisation, is the textbook vanishing-gradient case; try --activation relu --init kaiming for the remedy.

    python examples/wrap_training_loop.py --steps 60
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import gradscope
from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset
from gradscope.bench.models import ACTIVATIONS, INITS, deep_mlp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activation", default="sigmoid", choices=sorted(ACTIVATIONS))
    ap.add_argument("--init", default="default", choices=INITS)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--save", default="wrap_training_loop.jsonl", help="where to save the gradscope log")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    root = find_cifar10_folder(args.data_dir)
    n = args.steps * args.batch_size
    if root is not None:
        images, labels = load_cifar10_subset(root, "train", n=min(n, 50_000))
        print(f"data: {len(images)} real CIFAR-10 training images from {root}")
    else:
        images, labels = torch.randn(min(n, 8192), 3, 32, 32), torch.randint(0, 10, (min(n, 8192),))
        print("data: NO CIFAR-10 FOUND (pass --data-dir or set GRADSCOPE_CIFAR10_DIR); "
              "using random CIFAR-shaped SYNTHETIC images", file=sys.stderr)

    model = deep_mlp(args.depth, 256, args.activation, args.init).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    print(f"model: {args.depth}-layer {args.activation} MLP, init={args.init}, device={device}")

    scope = gradscope.watch(model, every=args.every)  ### 1: attach
    start = time.perf_counter()
    for step in range(args.steps):
        i = (step * args.batch_size) % len(images)
        x = images[i:i + args.batch_size].to(device)
        y = labels[i:i + args.batch_size].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        scope.step()  ### 2: close the step (returns the new alerts; they also go to the "gradscope" logger)
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            acc = (logits.argmax(1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.3f}  batch acc {acc:.2f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s\n")
    print(scope.summary())
    scope.save(args.save)
    scope.detach()
    print(f"\ngradscope log saved to {args.save} (gradscope.load() or pandas.read_json(..., lines=True) reads it)")


if __name__ == "__main__":
    main()
