"""Small reference models used by the examples and tests."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
INITS = ("default", "xavier", "kaiming")


def deep_mlp(depth: int = 20, width: int = 256, activation: str = "relu", init: str = "default",
             in_features: int = 3 * 32 * 32, classes: int = 10) -> nn.Sequential:
    """A plain MLP with ``depth`` Linear layers (``depth - 1`` hidden), e.g. for CIFAR-10 images flattened.

    Args:
        activation: one of ``sigmoid, tanh, relu, leaky_relu, gelu``.
        init: ``default`` (PyTorch's), ``xavier`` (Glorot normal) or ``kaiming`` (He normal, for ReLU-family).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for i in range(depth):
        last = i == depth - 1
        lin = nn.Linear(d, classes if last else width)
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        elif init == "kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu" if activation != "leaky_relu" else "leaky_relu")
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(ACTIVATIONS[activation]())
        d = width
    return nn.Sequential(*layers)
