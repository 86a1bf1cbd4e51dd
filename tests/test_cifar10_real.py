"""A few dozen real training steps on real CIFAR-10 images: the textbook story, measured."""

import math

import torch
import torch.nn.functional as F

import gradscope
from gradscope.bench.models import deep_mlp


def train_on_cifar(model, data, steps=30, batch=128, lr=0.05):
    images, labels = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    with gradscope.watch(model, optimizer=opt) as scope:  # the one-line form
        for step in range(steps):
            x, y = images[step * batch:(step + 1) * batch], labels[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return scope, losses


def test_cifar10_images_load_with_torchvision_class_order(cifar_train):
    images, labels = cifar_train
    assert images.shape == (3840, 3, 32, 32) and labels.shape == (3840,)
    assert set(labels.tolist()) == set(range(10))
    assert abs(images.mean().item()) < 0.2 and 0.8 < images.std().item() < 1.2  # normalised


def test_deep_sigmoid_vanishes_and_relu_kaiming_learns_on_real_cifar10(cifar_train):
    torch.manual_seed(0)
    sig_scope, sig_losses = train_on_cifar(deep_mlp(20, 256, "sigmoid"), cifar_train)
    torch.manual_seed(0)
    relu_scope, relu_losses = train_on_cifar(deep_mlp(20, 256, "relu", "kaiming"), cifar_train, lr=0.01)

    flagged = {a.layer for a in sig_scope.alerts if a.kind == "vanishing"}
    assert {"1", "3", "5"} <= flagged  # the first Linear layers
    assert sig_scope.decay_factor() < 0.3
    assert relu_scope.alerts == []
    assert 0.5 < relu_scope.decay_factor() < 2
    assert len(sig_scope.history) == len(relu_scope.history) == 30
    # the sigmoid net is stuck near chance (ln 10 = 2.30); the ReLU/Kaiming net learns
    assert min(sig_losses[-5:]) > math.log(10) - 0.15
    assert sum(relu_losses[-5:]) / 5 < sum(relu_losses[:5]) / 5 - 0.1
