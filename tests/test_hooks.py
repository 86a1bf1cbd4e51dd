"""Hook mechanics: torchvision ResNet, clean detach, no leaks, optimizer-driven steps.

Non-interference (training is bitwise the same with and without a scope) is test_activations.py's
``test_observing_changes_nothing_bitwise``, with every option on and off."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
from conftest import hook_entries, train_loop
from gradscope.bench.models import deep_mlp


def resnet18():
    return torchvision.models.resnet18(num_classes=10)


def test_resnet18_runs_with_stable_call_site_names():
    model = resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model)
    names = []
    for _ in range(3):
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
        F.cross_entropy(model(x), y).backward()
        scope.step()
        opt.step()
        opt.zero_grad()
        names.append(list(scope.latest()))
    assert names[0] == names[1] == names[2]
    relu_sites = [n for n in names[0] if n.split("#")[0].endswith("relu")]
    assert len(relu_sites) == 17  # stem + two calls in each of 8 BasicBlocks
    assert "layer1.0.relu#2" in relu_sites and "layer4.1.relu#2" in relu_sites
    assert len(scope.latest(per="param")) == len(list(model.parameters()))
    for n in ("conv1", "layer1.0.bn2", "fc"):  # bn2's output is modified by `out += identity`: hook still fine
        assert scope.latest()[n]["backprop_signal"] > 0
    scope.detach()
    assert hook_entries(model) == []


def random_images(n=8):
    return lambda: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))


def test_optimizer_mode_gives_the_same_records_as_manual_steps():
    base = deep_mlp(6, 32, "tanh")
    kw = dict(lr=0.05, momentum=0.9, seed=1, watch={"every": 2})
    manual = train_loop(copy.deepcopy(base), random_images(), 6, **kw).scope
    auto = train_loop(copy.deepcopy(base), random_images(), 6, optimizer_mode=True, **kw).scope
    assert manual.history.steps == auto.history.steps == [0, 2, 4]
    for a, b in zip(manual.history, auto.history):
        assert a.layers == b.layers and a.params == b.params and a.info == b.info
    # the same but for what the optimizer mode knows: the optimizer
    assert {**manual.meta, "context": None} == {**auto.meta, "context": None}
    assert auto.meta["context"] == {**manual.meta["context"], "optimizer": "SGD", "adaptive": False}


def test_detach_leaves_the_model_exactly_as_found():
    model = resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hook_entries(model, opt) == []
    outputs = []
    model.layer1.register_forward_hook(lambda m, a, o: outputs.append(o))  # the test's own hook, kept
    scope = gradscope.watch(model, optimizer=opt)
    out = model(torch.randn(2, 3, 32, 32))  # forward done, backward not: tensor hooks are pending
    assert outputs[0]._backward_hooks
    scope.detach()
    scope.detach()  # idempotent
    assert not outputs[0]._backward_hooks  # pending tensor hooks removed too
    assert hook_entries(model, opt) == ["layer1._forward_hooks"]
    out.sum().backward()  # nothing of gradscope fires any more
    assert scope.history.last is None
    with pytest.raises(RuntimeError, match="detached"):
        scope.step()


def test_context_manager_detaches_even_on_error():
    model = deep_mlp(3, 8, "relu", in_features=4)
    with pytest.raises(ZeroDivisionError):
        with gradscope.watch(model) as scope:
            model(torch.randn(2, 4)).sum().backward()
            scope.step()
            1 / 0
    assert hook_entries(model) == [] and not scope.attached
    gradscope.watch(model).detach()  # can be watched again


def test_thousand_attach_detach_cycles_leak_nothing():
    model = deep_mlp(4, 16, "relu", in_features=8)
    x = torch.randn(4, 8)

    def cycle():
        scope = gradscope.watch(model)
        model(x).sum().backward()
        scope.step()
        scope.detach()
        model.zero_grad(set_to_none=True)
        return weakref.ref(scope)

    for _ in range(10):  # warm-up: first-call caches
        cycle()
    gc.collect()
    before = len(gc.get_objects())
    refs = [cycle() for _ in range(1000)]
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # every scope was freed
    assert len(gc.get_objects()) - before < 1000 + 50  # the 1000 weakrefs themselves, nothing per cycle
    assert hook_entries(model) == []


def test_history_is_bounded_for_long_runs():
    model = nn.Linear(3, 1)
    scope = gradscope.watch(model, history=16)
    for _ in range(500):
        model(torch.randn(2, 3)).sum().backward()
        scope.step()
    assert len(scope.history) <= 16
    steps = scope.history.steps
    assert steps[0] == 0 and steps[-1] >= 500 - 2 * 32 and steps == sorted(steps)
    assert scope.history.last.step == 499 and scope.latest()[""]["grad_norm"] > 0
    scope.detach()


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records every tensor method that moves data to the host."""

    SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_one_device_to_host_transfer_per_collected_step_and_none_in_hooks():
    model = resnet18()
    scope = gradscope.watch(model, every=2)
    for step in range(3):
        with HostSyncs() as fwd:
            loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
            loss.backward()
        # forward hooks and tensor hooks never move data to the host; the only reads are CPU scalars (sq_norm's
        # float32-underflow check, which only the CPU path makes and which is no device sync: test_cuda.py runs the
        # same on CUDA under torch.cuda.set_sync_debug_mode("error"))
        assert set(fwd.calls) <= {"item"}
        with HostSyncs() as close:
            scope.step()
        transfers = [c for c in close.calls if c != "item"]
        assert transfers == (["cpu", "tolist"] if step % 2 == 0 else [])  # one batched transfer, on collected steps
        model.zero_grad()
    scope.detach()


def test_activation_checkpointing_recompute_is_not_a_new_call_site():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    model = Checkpointed()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4)
    scope = gradscope.watch(model)
    model(x).sum().backward()  # the checkpointed block's forward runs again inside this backward
    scope.step()
    assert list(scope.latest()) == ["block.0", "block.1", "block", "head"]
    outs = []
    ref.block[0].register_forward_hook(lambda m, a, o: outs.append(o))
    expected = torch.autograd.grad(ref(x).sum(), outs)[0].norm().item()
    assert scope.latest()["block.0"]["backprop_signal"] == pytest.approx(expected, rel=1e-6)
    scope.detach()
