"""Reference models for the CIFAR-10 comparisons, the examples and the tests.

Names understood by :func:`build_model` (one table, :data:`MODEL_PATTERNS`):

* ``mlp{depth}-{activation}-{init}[-bn]`` -- :func:`deep_mlp`, e.g. ``mlp20-sigmoid-default``, ``mlp10-relu-kaiming-bn``
* ``resnet{depth}`` / ``plain{depth}`` -- :func:`cifar_resnet` with / without shortcuts, depth = 6n + 2
* ``{rnn|lstm|gru}-{rows|pixels}`` -- :class:`SequenceClassifier` reading an image row by row or pixel by pixel
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
INITS = ("default", "xavier", "kaiming")
MODEL_PATTERNS = {
    rf"mlp(\d+)-({'|'.join(ACTIVATIONS)})-({'|'.join(INITS)})(-bn)?": "deep MLP mlp{depth}-{activation}-{init}[-bn], "
                                                                  "e.g. mlp20-sigmoid-default",
    r"(resnet|plain)(\d+)": "CIFAR ResNet / plain CNN of depth 6n+2, e.g. resnet20, plain56",
    r"(rnn|lstm|gru)-(rows|pixels)": "recurrent reader of an image, e.g. lstm-rows, rnn-pixels",
}


def deep_mlp(depth: int = 20, width: int = 256, activation: str = "relu", init: str = "default",
             in_features: int = 3 * 32 * 32, classes: int = 10, batch_norm: bool = False) -> nn.Sequential:
    """A plain MLP with ``depth`` Linear layers (``depth - 1`` hidden), e.g. for CIFAR-10 images flattened.

    Args:
        activation: one of ``sigmoid, tanh, relu, leaky_relu, gelu``.
        init: ``default`` (PyTorch's), ``xavier`` (Glorot normal) or ``kaiming`` (He normal, for ReLU-family).
        batch_norm: a BatchNorm1d after every hidden Linear layer, before the activation.
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
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation]())
        d = width
    return nn.Sequential(*layers)


class ShortcutA(nn.Module):
    """He et al.'s option A: identity, or subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, out_channels - in_channels

    def forward(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; with ``shortcut`` the input is added before the second ReLU (a residual block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = ShortcutA(in_channels, out_channels, stride) if shortcut else None
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """The CIFAR-10 network of He et al. (2015), section 4.2: depth 6n + 2, three stages of n blocks (16/32/64 filters),
    global average pooling and a 10-way linear layer; ``shortcuts=False`` gives the "plain" net of the same layout."""

    def __init__(self, depth: int = 20, shortcuts: bool = True, classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1, shortcuts))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):  # (N, 3, 32, 32)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int = 20, shortcuts: bool = True) -> CifarResNet:
    """ResNet-``depth`` (``shortcuts=True``) or plain-``depth`` for CIFAR-10."""
    return CifarResNet(depth, shortcuts)


class SequenceClassifier(nn.Module):
    """Reads a CIFAR image as a sequence and classifies it from the last output.

    ``rows``: 32 steps of 96 features (a row of 32 RGB pixels); ``pixels``: 1,024 steps of 3 features.
    """

    CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, cell: str = "lstm", mode: str = "rows", hidden: int = 128, classes: int = 10):
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"cell must be one of {sorted(self.CELLS)}, got {cell!r}")
        if mode not in ("rows", "pixels"):
            raise ValueError(f"mode must be 'rows' or 'pixels', got {mode!r}")
        self.mode = mode
        self.rnn = self.CELLS[cell](96 if mode == "rows" else 3, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # (N, 3, 32, 32)
        if self.mode == "rows":
            seq = x.permute(0, 2, 3, 1).flatten(2)  # (N, 32 rows, 32 * 3)
        else:
            seq = x.flatten(2).transpose(1, 2)  # (N, 1024 pixels, 3)
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


def build_model(name: str) -> nn.Module:
    """A model from its name (see the module docstring); a clear ValueError for anything else."""
    m = re.fullmatch(r"mlp(\d+)-(\w+?)-(default|xavier|kaiming)(-bn)?", name)
    if m:
        return deep_mlp(int(m[1]), 256, m[2], m[3], batch_norm=bool(m[4]))
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if m:
        return cifar_resnet(int(m[2]), shortcuts=m[1] == "resnet")
    m = re.fullmatch(r"(rnn|lstm|gru)-(rows|pixels)", name)
    if m:
        return SequenceClassifier(m[1], m[2])
    known = "; ".join(f"{desc}" for desc in MODEL_PATTERNS.values())
    raise ValueError(f"unknown model {name!r}; known kinds: {known}")


def family(name: str) -> str:
    """``mlp``, ``cnn`` or ``rnn``: decides the default optimiser of a model in the comparisons."""
    if name.startswith("mlp"):
        return "mlp"
    if name.startswith(("resnet", "plain")):
        return "cnn"
    return "rnn"
