"""Every example script runs end to end (tiny sizes), each in an interpreter of its own.

The four scripts start together when the first test here needs one (most of each run is the interpreter importing
torch, one core's work: two run side by side on two cores), one thread each; every test then waits for its own script
and checks its output.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.bench.data import find_cifar10_folder

ROOT = Path(__file__).resolve().parent.parent


class Background:
    """A script started in the background, one thread (``OMP_NUM_THREADS=1``), its output going to files in
    ``folder`` (no pipe to fill up while it waits)."""

    def __init__(self, argv, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.out, self.err = folder, folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *map(str, argv)], stdout=out, stderr=err, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    def result(self, timeout=300) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read_text(), self.err.read_text())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    argvs = {
        "wrap": [ROOT / "examples/wrap_training_loop.py", "--steps", "4", "--depth", "8", "--batch-size", "32",
                 "--save", folder / "wrap/run.jsonl"],
        "audit": [ROOT / "scripts/audit_models.py", "--batch-size", "16", "--depth", "6"],
        "activations": [ROOT / "examples/activation_diagnostics.py", "--steps", "3", "--batch-size", "16"],
    }
    cifar = find_cifar10_folder()  # the test itself skips without it
    if cifar is not None:
        argvs["cifar10"] = [ROOT / "examples/train_cifar10.py", "--model", "plain20", "--steps", "3",
                            "--batch-size", "16", "--subset", "64", "--data-dir", cifar]
    started = {name: Background(argv, folder / name) for name, argv in argvs.items()}
    yield started
    for script in started.values():
        script.stop()


def test_wrap_training_loop_example(scripts):
    proc = scripts["wrap"].result()
    assert proc.returncode == 0, proc.stderr
    assert "gradscope summary" in proc.stdout and "average factor per layer" in proc.stdout
    run = gradscope.load(scripts["wrap"].folder / "run.jsonl")
    assert run.history.steps == [0, 1, 2, 3]


def test_audit_models_script(scripts):
    proc = scripts["audit"].result()
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("mlp", "resnet"))}
    assert len(lines) == 10
    assert "vanishing" in lines["mlp6-sigmoid-default"] and lines["resnet18"].endswith("none")


def test_activation_diagnostics_example(scripts):
    proc = scripts["activations"].result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("dead fraction (%) per ReLU call site") == 2
    assert all(name in proc.stdout for name in ("RNN ", "LSTM ", "LSTM-fb1", "GRU "))


def test_train_cifar10_example(cifar_root, scripts):
    proc = scripts["cifar10"].result()
    assert proc.returncode == 0, proc.stderr
    assert "gradscope summary: CifarResNet" in proc.stdout and "layer3.2.relu2" in proc.stdout  # the output side
    assert "rows folded" in proc.stdout  # a 62-row table folds its middle (summary(full=True) shows it)


@pytest.mark.slow  # ~14 s on 2 cores: the script starts a child interpreter per model to measure peak memory
def test_overhead_benchmark_script_runs_tiny():
    if not (ROOT / ".git").exists():
        pytest.skip("--against reads a git revision: this is no git checkout")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_overhead.py"), "--models", "mlp20", "lstm",
                           "--steps", "2", "--rounds", "1", "--warmup", "1", "--batch-size", "4", "--growth", "5",
                           "--phases", "--history", "3", "--floor", "--against", "HEAD"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tables, growth = proc.stdout.split("memory over 5 steps")
    tables, history = tables.split("history memory after 3 collected steps")
    rows = {line.split("|")[1].strip(): line.split("|") for line in history.splitlines() if line.startswith("| ")
            and "model" not in line and not line.startswith("|---")}
    assert set(rows) == {"resnet50", "gpt2"} and all(float(r[6]) < float(r[8]) for r in rows.values())  # packed < dicts
    tables, phase_tables = tables.split("mlp20: median ms per phase")
    assert "| gradscope step() | 0.00 |" in phase_tables and "lstm: median ms per phase" in phase_tables
    parts = phase_tables.split("mlp20: inside gradscope step(), median ms per collected step")[1].split("\n\n")[0]
    assert [line.split("|")[1].strip().split(" ")[0] for line in parts.splitlines()[3:]] == \
        ["parameter", "the", "dead", "detectors", "history", "the", "step()"]  # the parts, the rest, the whole
    rows = [line for line in tables.splitlines() if line.startswith("| ") and "monitor" not in line]
    assert len(rows) >= 18 and len(rows) % 2 == 0  # 9 monitors per model, and the peers that are installed
    # gradscope as of a git revision, beside the current one (--against): its own package, the same cycles
    assert sum(line.startswith("| gradscope every=1, at ") for line in rows) == 2
    assert rows[0].startswith("| plain | ") and "| 1.000 | 1.000 |" in rows[0]
    assert any(line.startswith("| gradscope every=10 |") for line in rows)
    assert sum(line.startswith("| floor: ") for line in rows) == 6  # three floor monitors per model
    assert sum(line.startswith("| floor: + ReLU counts") for line in rows) == 2
    assert [line.split("|")[1].strip() for line in growth.splitlines() if line[:2] == "| " and "step" not in line
            and not line.startswith("|---")] == ["1", "2", "3", "4", "5"]


def test_overhead_benchmark_third_floor_computes_what_gradscope_records():
    """The benchmark's floor 3 (``HookFloor(3)``) claims to compute what gradscope's default statistics compute: on the
    same weights and batch its fired counts give gradscope's firing rates and its through-time profile is gradscope's."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "scripts/bench_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name in ("mlp20", "lstm"):
        make, _, make_batch = bench.MODELS[name]
        torch.manual_seed(0)
        base = make()
        x, y = make_batch(16, torch.device("cpu"))
        floored, watched = bench.copy_of(base), bench.copy_of(base)
        floor = bench.HookFloor(3)
        floor.attach(floored, None)
        scope = gradscope.watch(watched)
        try:
            F.cross_entropy(floored(x), y).backward()
            F.cross_entropy(watched(x), y).backward()
            counts, times = [c.clone() for c in floor.counts], [t.clone() for t in floor.times]
            floor.after_backward(floored, 0)
            scope.step()
        finally:
            floor.detach()
            scope.detach()
        layers = scope.history.last.layers
        if name == "mlp20":
            rates = [st["fire_rate"] for st in layers.values() if "fire_rate" in st]
            assert len(rates) == len(counts) == 19
            assert rates == pytest.approx([c.sum().item() / (16 * c.numel()) for c in counts], rel=1e-6)
        else:
            (profile,) = [st["through_time"] for st in layers.values() if "through_time" in st]
            assert len(times) == 1 and list(profile) == pytest.approx(times[0].tolist(), rel=1e-5)
