"""CIFAR-10 for the examples, the comparisons and the tests: real images whenever they can be had, announced otherwise.

Where the images come from, first match wins (:func:`load_cifar10`):

1. ``data_dir`` (``--data-dir``): an image-folder copy, ``train/<class>/*`` and ``test/<class>/*``;
2. ``$GRADSCOPE_CIFAR10_DIR``: the same;
3. torchvision's CIFAR-10 already in ``cache_dir`` (default ``~/.cache/gradscope``);
4. ``../shared/data/cifar10-jpg`` beside the repository (the copy this project's tests and CI use);
5. torchvision's download into ``cache_dir`` (``download=True``);
6. otherwise random CIFAR-shaped images: said loudly on stderr and recorded as ``source`` in every result.

Images are decoded once into uint8 tensors; :class:`Batches` normalises and augments them batch by batch.
torchvision is needed (``pip install gradscope[examples]``); the core never imports this module.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ENV_VAR = "GRADSCOPE_CIFAR10_DIR"

def shared_folder() -> Path:
    """``../shared/data/cifar10-jpg`` beside the working directory: where this project's machines keep a copy (run
    from the repository root). The package itself never knows where a repository lives."""
    return Path.cwd().parent / "shared/data/cifar10-jpg"

SYNTHETIC = "SYNTHETIC random images (no CIFAR-10 found)"
FOLDER_LAYOUT = "train/<class>/ and test/<class>/ for the 10 CIFAR-10 classes (airplane, automobile, ..., truck)"


def _is_image_folder(path) -> bool:
    """``path`` holds ``train/<class>/`` and ``test/<class>/`` for every CIFAR-10 class."""
    return bool(path) and all((Path(path) / split / c).is_dir() for split in ("train", "test") for c in CLASSES)


def check_image_folder(path, what: str = "--data-dir") -> Path:
    """``path`` as a Path if it is a CIFAR-10 image folder.

    Raises:
        FileNotFoundError: it is not one; the message names ``what`` (``--data-dir``, ``$GRADSCOPE_CIFAR10_DIR``) and
            the layout wanted.
    """
    if not _is_image_folder(path):
        missing = next((f"{split}/{c}/" for split in ("train", "test") for c in CLASSES
                        if not (Path(path) / split / c).is_dir()), "")
        problem = "no such directory" if not Path(path).is_dir() else f"it has no {missing}"
        fix = (f"point ${ENV_VAR} at the folder that holds them, or unset it" if what == f"${ENV_VAR}" else
               "pass the folder that holds them, or leave --data-dir out")
        given = f"{what}={path}" if what.startswith("$") else f"{what} {path}"
        raise FileNotFoundError(f"{given} is not a CIFAR-10 image folder ({problem}): it needs {FOLDER_LAYOUT}; "
                                f"{fix}")
    return Path(path)


def find_cifar10_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The image-folder copy to use: ``data_dir``, else ``$GRADSCOPE_CIFAR10_DIR``, else ``../shared/data/cifar10-jpg``
    beside the working directory. None if none of them holds ``train/<class>/`` and
    ``test/<class>/`` for every class.

    Raises:
        FileNotFoundError: ``data_dir`` was given but is not an image folder.
    """
    if data_dir is not None:
        return check_image_folder(data_dir)
    for c in (os.environ.get(ENV_VAR), shared_folder()):
        if _is_image_folder(c):
            return Path(c)
    return None


def _torchvision():
    try:
        from torchvision.datasets import CIFAR10, ImageFolder
    except ImportError as e:
        raise ImportError("loading CIFAR-10 needs torchvision: pip install 'gradscope[examples]'") from e
    return CIFAR10, ImageFolder


def _pick(n_total: int, n: int | None, seed: int) -> list[int]:
    if n is None or n >= n_total:
        return list(range(n_total))
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def read_image_folder(root, split: str, n: int | None = None, seed: int = 0):
    """``n`` images (all if None) of ``root/split`` picked with ``seed``: uint8 ``(n, 3, 32, 32)`` and labels ``(n,)``.

    Class indices follow torchvision's CIFAR10 order (ImageFolder sorts class folders alphabetically, which is it).
    """
    import numpy as np
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, ImageFolder = _torchvision()
    folder = ImageFolder(str(Path(root) / split))
    if tuple(folder.classes) != CLASSES:
        raise ValueError(f"{root}/{split} has classes {folder.classes}, expected CIFAR-10's {list(CLASSES)}")
    idx = _pick(len(folder.samples), n, seed)
    images = np.stack([np.asarray(Image.open(folder.samples[i][0]).convert("RGB")) for i in idx])  # (n, 32, 32, 3)
    labels = torch.tensor([folder.samples[i][1] for i in idx])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, 32, 32)`` -> float32 normalised with the CIFAR-10 channel means and standard deviations."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def load_cifar10_subset(root: str | os.PathLike, split: str = "train", n: int = 1024, seed: int = 0):
    """``n`` normalised images of an image-folder copy, as float tensors ``(n, 3, 32, 32)`` and labels ``(n,)``."""
    images, labels = read_image_folder(root, split, n, seed)
    return normalize(images), labels


@dataclass
class Cifar10:
    """Decoded CIFAR-10: uint8 images ``(N, 3, 32, 32)``, int64 labels, and where they came from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC


def load_cifar10(data_dir=None, cache_dir=None, download: bool = True, train_subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0, search: bool = True) -> Cifar10:
    """CIFAR-10 from the first source that has it (see the module docstring), decoded into memory.

    Args:
        data_dir: an image-folder copy to use; an error if it is not one.
        cache_dir: where torchvision's CIFAR-10 is looked for and downloaded to (default ``~/.cache/gradscope``).
        download: allow torchvision's download when nothing local is found.
        train_subset, test_subset: how many images of each split to keep (picked with ``seed``); all if None.
        search: look at ``$GRADSCOPE_CIFAR10_DIR``, the cache and ``../shared`` (False: only ``data_dir``/download).
    """
    folder = find_cifar10_folder(data_dir) if data_dir is not None else None
    cache = Path(cache_dir or Path.home() / ".cache/gradscope")
    if folder is None and search and os.environ.get(ENV_VAR):
        folder = check_image_folder(os.environ[ENV_VAR], f"${ENV_VAR}")
    if folder is not None:
        return _from_folder(folder, train_subset, test_subset, seed)
    if search and (cache / "cifar-10-batches-py").is_dir():
        return _from_torchvision(cache, False, train_subset, test_subset, seed)
    if search and _is_image_folder(shared_folder()):
        return _from_folder(shared_folder(), train_subset, test_subset, seed)
    if download:
        try:
            return _from_torchvision(cache, True, train_subset, test_subset, seed)
        except Exception as e:  # offline: any failure of the download means "not available"
            print(f"gradscope: could not download CIFAR-10 into {cache} ({type(e).__name__}: {e})", file=sys.stderr)
    return synthetic_cifar10(train_subset or 50_000, test_subset or 10_000, seed)


def _from_folder(folder, train_subset, test_subset, seed) -> Cifar10:
    tr = read_image_folder(folder, "train", train_subset, seed)
    te = read_image_folder(folder, "test", test_subset, seed)
    return Cifar10(*tr, *te, source=f"CIFAR-10 image folder {folder}")


def _from_torchvision(cache: Path, download: bool, train_subset, test_subset, seed) -> Cifar10:
    CIFAR10, _ = _torchvision()
    parts = []
    for train, n in ((True, train_subset), (False, test_subset)):
        ds = CIFAR10(str(cache), train=train, download=download)
        idx = _pick(len(ds.data), n, seed)
        parts += [torch.from_numpy(ds.data[idx]).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)[idx]]
    return Cifar10(*parts, source=f"torchvision CIFAR-10 in {cache}")


def synthetic_cifar10(n_train: int, n_test: int, seed: int = 0) -> Cifar10:
    """Random CIFAR-shaped images with random labels, announced on stderr: nothing to learn, only for running
    offline."""
    print("gradscope: NO CIFAR-10 FOUND (no --data-dir, no $GRADSCOPE_CIFAR10_DIR, no cached or downloadable copy): "
          "using SYNTHETIC random images; accuracies mean nothing", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    return Cifar10(torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n_train,), generator=g),
                   torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n_test,), generator=g), source=SYNTHETIC)


class Batches:
    """Endless shuffled training batches of normalised (optionally augmented) images on ``device``.

    Augmentation, as in He et al. (2015): a random 32x32 crop of the image padded by 4 pixels, and a horizontal flip
    with probability 1/2.
    """

    def __init__(self, images, labels, batch_size: int, device, augment: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.device, self.augment = min(batch_size, len(images)), device, augment
        self.g = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.randperm(len(images), generator=self.g), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._pos + self.batch_size > len(self._order):
            self._order, self._pos = torch.randperm(len(self.images), generator=self.g), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        x = self.images[idx]
        if self.augment:
            x = self._augment(x)
        return normalize(x.to(self.device)), self.labels[idx].to(self.device)

    def _augment(self, x):
        n = len(x)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2, n), generator=self.g).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
        flip = torch.rand(n, generator=self.g) < 0.5
        return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)


def batches_of(images, labels, batch_size: int, device):
    """The images in order, in normalised batches (for evaluation)."""
    for i in range(0, len(images), batch_size):
        yield normalize(images[i:i + batch_size].to(device)), labels[i:i + batch_size].to(device)


_TEXT: list = []


def text_bytes() -> torch.Tensor:
    """Byte tokens (int64, 0-255) of a real English text that every CPython ships: its documentation topics
    (``pydoc_data.topics``, ~800 KB), read once. Raises FileNotFoundError where that module is missing."""
    if not _TEXT:
        import importlib.util

        spec = importlib.util.find_spec("pydoc_data.topics")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("pydoc_data.topics (CPython's documentation text) not found")
        data = Path(spec.origin).read_bytes()
        _TEXT.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).long())
    return _TEXT[0]


class ByteWindows(torch.utils.data.Dataset):
    """``n`` windows of ``length`` byte tokens of :func:`text_bytes`, as causal-LM examples for a Hugging Face
    model: ``{"input_ids": window, "labels": window}`` (one byte, one token: a vocabulary of 256)."""

    def __init__(self, n: int, length: int, seed: int = 0):
        data = text_bytes()
        starts = torch.randint(0, len(data) - length, (n,), generator=torch.Generator().manual_seed(seed))
        self.windows = torch.stack([data[s:s + length] for s in starts.tolist()])

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}
