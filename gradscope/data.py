"""Real CIFAR-10 images for examples and tests, from an image-folder copy (``train/<class>/*``, ``test/<class>/*``).

torchvision is needed here (``pip install gradscope[examples]``); the core never imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ENV_VAR = "GRADSCOPE_CIFAR10_DIR"


def find_cifar10_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The image-folder copy to use: ``data_dir``, else ``$GRADSCOPE_CIFAR10_DIR``, else ``../shared/data/cifar10-jpg``
    beside the repository (or the working directory). None if none of them holds ``train/`` and ``test/``."""
    repo = Path(__file__).resolve().parent.parent
    candidates = [data_dir, os.environ.get(ENV_VAR), repo.parent / "shared/data/cifar10-jpg",
                  Path.cwd().parent / "shared/data/cifar10-jpg"]
    for c in candidates:
        if c and (Path(c) / "train").is_dir() and (Path(c) / "test").is_dir():
            return Path(c)
    if data_dir is not None:
        raise FileNotFoundError(f"{data_dir} is not a CIFAR-10 image folder: it needs train/<class>/ and test/<class>/")
    return None


def load_cifar10_subset(root: str | os.PathLike, split: str = "train", n: int = 1024, seed: int = 0):
    """``n`` images of ``split`` picked with ``seed``, normalised, as tensors ``(n, 3, 32, 32)`` and labels ``(n,)``.

    Class indices follow torchvision's CIFAR10 order (ImageFolder sorts class folders alphabetically, which is it).
    """
    try:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms.functional import normalize, to_tensor
    except ImportError as e:
        raise ImportError("loading CIFAR-10 needs torchvision: pip install 'gradscope[examples]'") from e
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = ImageFolder(str(Path(root) / split))
    if tuple(folder.classes) != CLASSES:
        raise ValueError(f"{root}/{split} has classes {folder.classes}, expected CIFAR-10's {list(CLASSES)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(folder), generator=g)[:n].tolist()
    images, labels = [], []
    for i in idx:
        img, label = folder[i]
        images.append(normalize(to_tensor(img.convert("RGB")), MEAN, STD))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)
