"""CUDA: collection never synchronises the host inside a step; one transfer when the step closes. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradscope
from gradscope.bench.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "mlp20-relu-kaiming", "lstm-rows", "mlp6-tanh-xavier"])
@pytest.mark.parametrize("every", [1, 3])
def test_forward_and_backward_do_not_synchronise(name, every):
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(num_classes=10) if name == "resnet18" else build_model(name)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scope = gradscope.watch(model, every=every)
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    for _ in range(4):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scope.step()  # the one transfer of a collected step
        opt.step()
    assert scope.history.steps == list(range(0, 4, every))
    scope.detach()


def test_statistics_on_cuda_equal_the_cpu_ones(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions, as on CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16),
                          nn.Sigmoid(), nn.Linear(16, 10))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    results = []
    for device in ("cpu", "cuda"):
        m = model.to(device)
        scope = gradscope.watch(m, extra_stats="all")
        F.cross_entropy(m(x.to(device)), y.to(device)).backward()
        scope.step()
        results.append(scope.latest())
        scope.detach()
        m.zero_grad()
    cpu, cuda = results
    assert cpu.keys() == cuda.keys()
    for layer, st in cpu.items():
        for key, v in st.items():
            if isinstance(v, float):
                assert cuda[layer][key] == pytest.approx(v, rel=1e-4, abs=1e-7), (layer, key)


def test_norms_of_a_model_split_over_cpu_and_cuda():
    ts = [torch.randn(64, 32), torch.randn(16, device="cuda") * 1e-25, torch.randn(8, 8).t()]
    got = gradscope.stats.norms(ts)
    want = [float(t.detach().cpu().double().norm()) for t in ts]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("batch_bytes", [1, 32 << 20], ids=["each at once", "together at the end"])
@pytest.mark.parametrize("streams", ["default", "side", "backward from a side stream"])
def test_kept_output_gradients_give_the_autograd_signals(monkeypatch, batch_bytes, streams):
    """CUDA keeps output gradients in the hooks and measures them together (Collector.BATCHED_DEVICES): the signals
    equal dLoss/d(output) from plain autograd, with no host sync, when everything runs on the default stream, on a
    side stream, or when backward() and step() are called from a side stream other than the forward's (autograd runs
    the backward ops on the forward's stream; the measuring stream is then waited for by the caller's)."""
    from gradscope.collect import Collector

    monkeypatch.setattr(Collector, "BATCH_BYTES", batch_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16),
                          nn.Tanh(), nn.Linear(16, 10)).cuda()
    x, y = torch.randn(32, 3, 8, 8, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    outs = []
    handles = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in model]
    wanted = torch.autograd.grad(F.cross_entropy(model(x), y), outs)
    for h in handles:
        h.remove()
    wanted = [float(g.double().norm()) for g in wanted]
    scope = gradscope.watch(model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        if streams == "side":
            with torch.cuda.stream(side):
                F.cross_entropy(model(x), y).backward()
            torch.cuda.current_stream().wait_stream(side)  # the user's part: reading side-stream results elsewhere
        else:
            loss = F.cross_entropy(model(x), y)
            with torch.cuda.stream(side) if streams != "default" else torch.cuda.stream(torch.cuda.current_stream()):
                loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scope._collector._kept == []
    with torch.cuda.stream(side) if streams == "backward from a side stream" else torch.cuda.stream(None):
        scope.step()
    got = [scope.latest()[str(i)]["backprop_signal"] for i in range(len(model))]
    assert got == pytest.approx(wanted, rel=1e-5)
    scope.detach()
