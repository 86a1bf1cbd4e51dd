"""DDP and FSDP2 on 2 processes (gloo, CPU): statistics identical on both ranks, and equal to one process on the union
batch."""

import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradscope

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, WINDOW = 3, 8, 16
ONLY_RANK1 = 5  # a unit that fires only when input feature 0 > 0: never on rank 0's data, sometimes on rank 1's


def make_model(keep_unit=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # dead on every rank
        model[0].weight[ONLY_RANK1] = 0.0
        model[0].weight[ONLY_RANK1, 0] = 1.0
        model[0].bias[ONLY_RANK1] = 0.0
    if keep_unit:  # (FSDP2 replaces the parameters, and this hook with them)
        model[0].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([ONLY_RANK1]), 0.0))  # keep it as built
    return model


def batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 6, generator=g)
        x[:, 0] = x[:, 0].abs() if rank == 1 else -x[:, 0].abs()
        out.append((x, torch.randint(0, 3, (BATCH,), generator=g)))
    return out


def worker(rank, world, init_file, out_dir):
    """Both checks in one process group (each spawn starts two interpreters that import torch): first DDP with a scope
    on every rank; then a scope on rank 0 only, on a model that is not DDP-wrapped (an evaluation model, say), which
    must not reduce."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on how the hostname resolves
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp = DistributedDataParallel(make_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        scope = gradscope.watch(ddp, dead_window=WINDOW)  # the DDP wrapper: its module is watched
        assert scope.model is ddp.module
        for x, y in batches(rank):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            scope.step(loss=loss)  # each rank its own batch's loss: the scope records their mean on every rank
            opt.step()
        scope.save(f"{out_dir}/rank{rank}.jsonl")
        scope.detach()
        dist.barrier()  # neither rank tears its connections down while the other still uses them

        if rank == 0:
            model = make_model()
            scope = gradscope.watch(model)
            x, y = batches(0)[0]
            F.cross_entropy(model(x), y).backward()
            scope.step()  # would wait forever for rank 1 if it reduced
            scope.save(f"{out_dir}/solo.jsonl")
        dist.barrier()
        fsdp_phases(rank, world, out_dir)
    finally:
        dist.destroy_process_group()


# FSDP2: every Linear and the root sharded (uneven shards: 3 rows on 2 ranks), with the optional statistics, the
# update ratio and a NaN batch at the end; and a model with one Linear sharded, the others averaged by hand
FSDP_KW = {"full": dict(extra_stats="all", update_ratio=True), "partial": {}}


def fsdp_batches(rank):
    x, y = batches(rank)[0]
    return batches(rank) + [(x.clone().fill_(float("nan")) if rank == 1 else x, y)]


def fsdp_phases(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (world,))  # fully_shard's own default is a CUDA mesh wherever CUDA is present
    for name, kw in FSDP_KW.items():
        model = make_model(keep_unit=False)
        if name == "full":
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            fully_shard(model[2], mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scope = gradscope.watch(model, dead_window=WINDOW, **kw)  # reduce_ranks: on by itself under FSDP2
        calls, real = [], dist.all_reduce
        for x, y in fsdp_batches(rank) if name == "full" else batches(rank):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            for p in model.parameters():  # what fully_shard left alone: averaged by hand, as DDP would
                if not isinstance(p, DTensor):
                    dist.all_reduce(p.grad)
                    p.grad /= world
            counted = []
            dist.all_reduce = lambda *a, **k: (counted.append(1), real(*a, **k))[1]
            try:
                scope.step(loss=loss)
            finally:
                dist.all_reduce = real
            calls.append(len(counted))
            opt.step()
        scope.save(f"{out_dir}/fsdp-{name}-rank{rank}.jsonl")
        scope.detach()
        (Path(out_dir) / f"fsdp-{name}-calls{rank}.json").write_text(json.dumps(calls))
    # a replicated DTensor parameter whose gradient is still Partial (a sum tensor parallelism has not reduced yet)
    layer = nn.Linear(3, 1)
    layer.weight = nn.Parameter(DTensor.from_local(layer.weight.detach(), mesh, [Replicate()]))
    scope = gradscope.watch(layer, reduce_ranks=False)
    layer.weight.grad = DTensor.from_local(torch.ones(1, 3), mesh, [Partial()])
    layer.bias.grad = torch.ones(1)
    try:
        scope.step()
        refused = "no error"
    except RuntimeError as e:
        refused = str(e)
    scope.detach()
    (Path(out_dir) / f"partial-rank{rank}.txt").write_text(refused)
    tensor_parallel_phase(rank, mesh, out_dir)
    dist.barrier()


def tensor_parallel_phase(rank, mesh, out_dir):
    """Tensor parallelism whose layers hand DTensors on (``use_local_output=False``): the first Linear's output, and
    the ReLU's, are sharded over the units (each rank holds 8 of 16), the second's replicated. Both ranks see the same
    batches, as tensor parallelism has them."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = make_model(keep_unit=False)
    parallelize_module(model, mesh, {"0": ColwiseParallel(use_local_output=False),
                                     "2": RowwiseParallel(use_local_output=False),
                                     "4": ColwiseParallel(output_layouts=Replicate())})
    train_and_save(model, gradscope.watch(model, dead_window=WINDOW), f"{out_dir}/tp-rank{rank}.jsonl")
    # with reduce_ranks (what DDP or FSDP2 beside tensor parallelism turn on): 15 units, so the shards are uneven
    # (8 and 7) and cannot be summed: those sites' dead units and signals are left out, said once; the rest adds up
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 15), nn.ReLU(), nn.Linear(15, 3))
    parallelize_module(model, mesh, {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel()})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train_and_save(model, gradscope.watch(model, reduce_ranks=True), f"{out_dir}/tp-reduced-rank{rank}.jsonl")
    (Path(out_dir) / f"tp-reduced-said{rank}.txt").write_text("\n".join(str(w.message) for w in said))


def train_and_save(model, scope, path):
    """Train on rank 0's batches (tensor parallelism: the same on every rank), save the run, detach."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(0):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        scope.step(loss=loss)
        opt.step()
    scope.save(path)
    scope.detach()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The saved logs of ``worker`` on 2 processes, and whether the solo phase hung (then the processes are killed)."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=False)
    deadline = None
    while not ctx.join(timeout=2):
        if deadline is None and all((out / f"rank{r}.jsonl").exists() for r in (0, 1)):
            deadline = time.monotonic() + 120  # the DDP phase is done: the solo phase takes a fraction of a second
        if deadline is not None and time.monotonic() > deadline:  # a reducing scope waits for rank 1 forever
            for proc in ctx.processes:
                proc.kill()
            return out, True
    return out, False


def test_two_ranks_agree_with_one_process_on_the_union(two_ranks):
    out, _ = two_ranks
    ranks = [gradscope.load(out / f"rank{r}.jsonl") for r in (0, 1)]

    model = make_model()  # one process, each step on both ranks' batches: the same mean loss, the same updates
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, dead_window=WINDOW)
    for (x0, y0), (x1, y1) in zip(batches(0), batches(1)):
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1]))
        loss.backward()
        scope.step(loss=loss)
        opt.step()

    keys = ("dead_fraction", "dead_units", "fire_rate", "saturation", "mean_output", "grad_norm", "backprop_signal")
    for step in range(STEPS):
        want = scope.history[step].layers
        got0, got1 = ranks[0].history[step].layers, ranks[1].history[step].layers
        assert got0.keys() == got1.keys() == want.keys()
        losses = [r.history[step].info["loss"] for r in ranks]
        assert losses[0] == losses[1] == pytest.approx(scope.history[step].info["loss"], rel=1e-6)
        for layer, st in want.items():
            for key in keys:
                if key not in st:
                    continue
                a, b, w = got0[layer][key], got1[layer][key], st[key]
                where = f"step {step}, site {layer}, {key}: rank 0 {a:.6g}, rank 1 {b:.6g}, one process {w:.6g}"
                assert a == b, where  # every rank reports the same numbers
                assert a == pytest.approx(w, rel=1e-5, abs=1e-9), where
    # unit 5 never fires on rank 0's data but does on rank 1's: not dead, since dead means dead on every rank's data
    assert ranks[0].latest()["1"]["dead_units"] == 4 and scope.dead_units()["1"].tolist() == [0, 1, 2, 3]
    assert math.isfinite(ranks[0].latest()["2"]["backprop_signal"])
    scope.detach()


def union_run(kw, data, keep_unit=True):
    """One process on both ranks' batches, step by step: the same mean loss and the same updates as 2 ranks."""
    model = make_model(keep_unit)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, dead_window=WINDOW, **kw)
    for (x0, y0), (x1, y1) in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1]))
        loss.backward()
        scope.step(loss=loss)
        opt.step()
    scope.detach()
    return scope


@pytest.mark.parametrize("name", list(FSDP_KW))
def test_fsdp2_ranks_agree_with_one_process_on_the_union(two_ranks, name):
    out, _ = two_ranks
    ranks = [gradscope.load(out / f"fsdp-{name}-rank{r}.jsonl") for r in (0, 1)]
    data = zip(fsdp_batches(0), fsdp_batches(1)) if name == "full" else zip(batches(0), batches(1))
    one = union_run(FSDP_KW[name], data, keep_unit=False)
    assert len(one.history) == len(ranks[0].history) == len(ranks[1].history) == (STEPS + 1 if name == "full" else STEPS)
    compared = set()
    for step, want_record in enumerate(one.history):
        got0, got1 = ranks[0].history[step], ranks[1].history[step]
        assert got0.layers.keys() == got1.layers.keys() == want_record.layers.keys()
        assert got0.params.keys() == want_record.params.keys()
        for part in ("layers", "params"):
            for layer, st in getattr(want_record, part).items():
                a_st, b_st = getattr(got0, part)[layer], getattr(got1, part)[layer]
                assert a_st.keys() == b_st.keys() == st.keys(), (step, layer)
                for key, w in st.items():
                    if isinstance(w, (list, tuple)) or not isinstance(w, (int, float)):
                        continue
                    a, b = a_st[key], b_st[key]
                    where = f"{name}, step {step}, {part} {layer}, {key}: rank 0 {a!r}, rank 1 {b!r}, one process {w!r}"
                    assert a == b or (math.isnan(a) and math.isnan(b)), where  # every rank the same numbers
                    if math.isnan(w):
                        assert math.isnan(a), where
                    else:
                        assert a == pytest.approx(w, rel=1e-5, abs=1e-9), where
                    compared.add(key)
    assert {"grad_norm", "grad_rms", "backprop_signal", "dead_fraction", "saturation"} <= compared
    # the classes as written, not fully_shard's FSDPSequential / FSDPLinear
    assert ranks[0].meta["model"] == "Sequential" and ranks[0].meta["layers"][0]["module"] == "Linear"
    if name == "full":
        assert {"grad_max", "grad_zero_frac", "weight_norm", "update_ratio", "grad_nonfinite"} <= compared
        last = ranks[0].history[-1].params
        assert last["4.weight"]["grad_nonfinite"] == 3 * 16  # every entry of the whole weight: both shards (2 + 1 rows)
        assert [(a.kind, a.step) for a in ranks[0].alerts] == [(a.kind, a.step) for a in ranks[1].alerts] \
            == [(a.kind, a.step) for a in one.alerts] and ranks[0].alerts
    # one all_reduce of the step's numbers after a two-number size check; grad_max's max one more; NaN counts one more
    calls = [json.loads((out / f"fsdp-{name}-calls{r}.json").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1] == ([3, 3, 3, 4] if name == "full" else [2, 2, 2])


def test_tensor_parallel_outputs_are_measured_per_rank(two_ranks):
    """DTensor outputs (tensor parallelism) neither break training nor get gathered: each rank measures its local part.
    The parameters' statistics are of the whole parameters, as one process has them; a sharded site's numbers are of
    the rank's units, so the two ranks' add up to one process's (dead units, squared backprop signal); a replicated
    site's are one process's on both ranks; a Partial gradient gives no signal rather than a wrong one."""
    out, _ = two_ranks
    ranks = [gradscope.load(out / f"tp-rank{r}.jsonl") for r in (0, 1)]
    one = union_run({}, [((x, y), (x[:0], y[:0])) for x, y in batches(0)], keep_unit=False)  # batches(0) alone
    assert len(one.history) == len(ranks[0].history) == len(ranks[1].history) == STEPS
    for step, want in enumerate(one.history):
        got = [r.history[step] for r in ranks]
        for g in got:
            for pname, st in want.params.items():
                assert g.params[pname]["grad_norm"] == pytest.approx(st["grad_norm"], rel=1e-5), (step, pname)
            assert g.info["loss"] == pytest.approx(want.info["loss"], rel=1e-6)
            # "2" replicated: the whole output and gradient on every rank. "3" (Sigmoid) replicated too, but its
            # gradient is Partial (each rank a summand, until the column-parallel "4" all-reduces it): no signal
            assert g.layers["2"]["backprop_signal"] == pytest.approx(want.layers["2"]["backprop_signal"], rel=1e-5)
            assert "backprop_signal" not in g.layers["3"] and "backprop_signal" in want.layers["3"]
            assert g.layers["3"]["saturation"] == pytest.approx(want.layers["3"]["saturation"])
            assert g.layers["1"]["units"] == 8
        # sharded over the units: the ranks' parts make the whole ("4": gradscope's hook sees its output before the
        # layer's own hook gathers it)
        for site in ("0", "1", "4"):
            signal = math.hypot(*(g.layers[site]["backprop_signal"] for g in got))
            assert signal == pytest.approx(want.layers[site]["backprop_signal"], rel=1e-5), (step, site)
        assert sum(g.layers["1"]["dead_units"] for g in got) == want.layers["1"]["dead_units"] >= 5  # 0-3 and 5
        assert got[0].layers["1"]["dead_units"] >= 5  # units 0-7 are rank 0's


def test_tensor_parallel_sites_are_left_out_of_a_reduction(two_ranks):
    out, _ = two_ranks
    for r in (0, 1):
        run = gradscope.load(out / f"tp-reduced-rank{r}.jsonl")
        assert len(run.history) == STEPS
        last = run.history[-1].layers
        # every site here is tensor-parallel ("2" too: gradscope sees its output before the layer's own hook reduces
        # it); what does add up over ranks stays: output checks, the parameters' statistics, the loss
        for site in ("0", "1", "2"):
            assert "dead_units" not in last[site] and "backprop_signal" not in last[site], (site, last[site])
            assert last[site]["output_nonfinite"] == 0.0
        assert last["0"]["grad_norm"] > 0 and last["2"]["grad_norm"] > 0 and run.history[-1].info["loss"] > 0
        said = (out / f"tp-reduced-said{r}.txt").read_text()
        assert said.count("output DTensors (tensor parallelism)") == 1 and "reduce_ranks=False" in said, said


def test_a_partial_gradient_is_refused_not_summed(two_ranks):
    out, _ = two_ranks
    for r in (0, 1):
        message = (out / f"partial-rank{r}.txt").read_text()
        assert "Partial placement" in message and "scope.step() once the gradients are reduced" in message, message


def test_fsdp1_is_refused_with_what_to_use_instead():
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 cannot be built on a CPU-only machine ("FSDP needs a non-CPU accelerator device"): the real class,
    # wrapping a model as FSDP1 does, without its device set-up
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._fsdp_wrapped_module = make_model()
    for model in (wrapper, nn.Sequential(nn.Linear(2, 2), wrapper)):
        with pytest.raises(TypeError, match="FSDP1's FullyShardedDataParallel.*fully_shard"):
            gradscope.watch(model)


def torchrun(args, cwd):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # a torchrun launch of a whole script (~8 s each); the library's DDP is tested above
def test_gradscope_compare_under_torchrun(tmp_path, cifar_root):
    proc = torchrun(["-m", "gradscope.cli", "compare", "--models", "mlp3-relu-kaiming", "plain8", "--steps", "4",
                     "--subset", "64", "--test-subset", "32", "--batch-size", "16", "--device", "cpu", "--out",
                     str(tmp_path), "--no-progress", "--data-dir", str(cifar_root)], tmp_path)
    assert "DDP over 2 processes (16 images each per step)" in proc.stdout
    assert proc.stdout.count("gradscope compare:") == 1  # the table, from rank 0 only
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # one output directory, named by rank 0
    run = gradscope.load(out / "plain8" / "gradscope.jsonl")
    assert run.history.steps == [0, 1, 2, 3] and "layer1.0.relu1" in run.latest()
    assert '"processes": 2' in (out / "plain8" / "config.json").read_text()


@pytest.mark.slow  # a torchrun launch of a whole script (~8 s each); the library's DDP is tested above
def test_cifar10_runner_under_torchrun(tmp_path, cifar_root):
    proc = torchrun([str(ROOT / "examples/train_cifar10.py"), "--model", "plain20", "--steps", "3",
                     "--batch-size", "16", "--subset", "64", "--device", "cpu", "--data-dir", str(cifar_root)],
                    tmp_path)
    assert "DDP over 2 processes" in proc.stdout
    assert proc.stdout.count("gradscope summary: CifarResNet") == 1  # rank 0 prints, once
    # the user's names, not DDP's: input-side and output-side rows (never folded)
    assert "layer3.2.relu2" in proc.stdout and "layer1.0.conv1" in proc.stdout and "module." not in proc.stdout


@pytest.mark.slow  # a torchrun launch of a whole script (~8 s each); the library's FSDP2 is tested above
def test_cifar10_runner_with_fsdp2_under_torchrun(tmp_path, cifar_root):
    proc = torchrun([str(ROOT / "examples/train_cifar10.py"), "--model", "resnet20", "--fsdp", "--steps", "3",
                     "--batch-size", "16", "--subset", "64", "--device", "cpu", "--data-dir", str(cifar_root)],
                    tmp_path)
    assert "FSDP2 over 2 processes" in proc.stdout
    assert proc.stdout.count("gradscope summary: CifarResNet") == 1  # rank 0 prints, once; the class as written
    assert "layer1.0.conv1" in proc.stdout and "FSDP" not in proc.stdout.split("gradscope summary")[1]


def test_a_scope_on_one_rank_only_does_not_reduce(two_ranks):
    out, hung = two_ranks
    assert not hung, "the scope on rank 0 waited for rank 1: it reduced across ranks"
    assert gradscope.load(out / "solo.jsonl").history.steps == [0]
