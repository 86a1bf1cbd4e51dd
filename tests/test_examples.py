"""Every example script runs end to end (tiny sizes)."""

import subprocess
import sys
from pathlib import Path

import gradscope

ROOT = Path(__file__).resolve().parent.parent


def test_wrap_training_loop_example(tmp_path):
    log = tmp_path / "run.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "examples/wrap_training_loop.py"), "--steps", "4", "--depth", "8",
                           "--batch-size", "32", "--save", str(log)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gradscope summary" in proc.stdout and "average factor per layer" in proc.stdout
    run = gradscope.load(log)
    assert run.history.steps == [0, 1, 2, 3]


def test_audit_models_script():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/audit_models.py"), "--batch-size", "16", "--depth", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("mlp", "resnet"))}
    assert len(lines) == 10
    assert "vanishing" in lines["mlp6-sigmoid-default"] and lines["resnet18"].endswith("none")


def test_activation_diagnostics_example():
    proc = subprocess.run([sys.executable, str(ROOT / "examples/activation_diagnostics.py"), "--steps", "3",
                           "--batch-size", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("dead fraction (%) per ReLU call site") == 2
    assert all(name in proc.stdout for name in ("RNN ", "LSTM ", "LSTM-fb1", "GRU "))


def test_train_cifar10_example():
    proc = subprocess.run([sys.executable, str(ROOT / "examples/train_cifar10.py"), "--model", "plain20", "--steps", "3",
                           "--batch-size", "16", "--subset", "64"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gradscope summary: CifarResNet" in proc.stdout and "layer1.0.relu2" in proc.stdout


def test_overhead_benchmark_script_runs_tiny():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_overhead.py"), "--models", "mlp20", "lstm",
                           "--steps", "2", "--rounds", "1", "--warmup", "1", "--batch-size", "4", "--growth", "5",
                           "--phases"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tables, growth = proc.stdout.split("memory over 5 steps")
    tables, phase_tables = tables.split("mlp20: median ms per phase")
    assert "| gradscope step() | 0.00 |" in phase_tables and "lstm: median ms per phase" in phase_tables
    rows = [line for line in tables.splitlines() if line.startswith("| ") and "monitor" not in line]
    assert len(rows) >= 10 and len(rows) % 2 == 0  # 5 monitors per model, and the peers that are installed
    assert rows[0].startswith("| plain | ") and "| 1.000 | 1.000 |" in rows[0]
    assert any(line.startswith("| gradscope every=10 |") for line in rows)
    assert [line.split("|")[1].strip() for line in growth.splitlines() if line[:2] == "| " and "step" not in line
            and not line.startswith("|---")] == ["1", "2", "3", "4", "5"]
