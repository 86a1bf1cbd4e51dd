"""Audit several architectures at initialisation on one real CIFAR-10 batch: one line per model.

    python scripts/audit_models.py [--batch-size 128] [--data-dir DIR] [--depth 20]

For each model: gradscope.audit() runs one forward/backward pass (the model is left untouched) and the table shows the
average backprop-signal factor per parameterised layer (1 is healthy, well below 1 vanishing, above 1 exploding), the
smallest signal relative to the output-side reference (the vanishing detector's), and the alerts raised.
"""

import argparse
import logging
import math
import sys

import torch
import torch.nn.functional as F

import gradscope
from gradscope.detectors import output_side_reference, signal_profile
from gradscope.bench.data import find_cifar10_folder, load_cifar10_subset
from gradscope.bench.models import deep_mlp


def models(depth: int):
    import torchvision

    for act in ("sigmoid", "tanh", "relu"):
        for init in ("default", "xavier", "kaiming"):
            yield f"mlp{depth}-{act}-{init}", lambda a=act, i=init: deep_mlp(depth, 256, a, i)
    yield "resnet18", lambda: torchvision.models.resnet18(num_classes=10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    logging.getLogger("gradscope").setLevel(logging.ERROR)  # the table lists the alerts

    root = find_cifar10_folder(args.data_dir)
    if root is None:
        print("NO CIFAR-10 FOUND: auditing on random CIFAR-shaped SYNTHETIC data", file=sys.stderr)
        x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    else:
        x, y = load_cifar10_subset(root, "train", n=args.batch_size, seed=0)
        print(f"one batch of {len(x)} real CIFAR-10 images from {root}")
    print(f"{'model':<24} {'params':>11} {'factor/layer':>12} {'min sig/out':>11}  alerts")
    for name, make in models(args.depth):
        torch.manual_seed(0)
        model = make()
        report = gradscope.audit(model, x, y, loss_fn=F.cross_entropy)
        profile = signal_profile(report.history.last, report.meta["layers"])
        ref = output_side_reference(profile, 0.25) if profile else math.nan
        worst = min(s for _, s in profile) / ref if profile and ref > 0 else math.nan
        kinds = {}
        for a in report.alerts:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        alerts = ", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none"
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<24} {params:>11,} {report.decay_factor():>12.3g} {worst:>11.1e}  {alerts}")


if __name__ == "__main__":
    main()
