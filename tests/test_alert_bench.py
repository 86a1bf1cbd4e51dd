"""The labelled alert benchmark (scripts/alert_bench.py) on real models and real CIFAR-10 / text.

The default suite runs the fast subset: a few healthy modern models (timm, Hugging Face, gradscope's zoo) and broken
runs of every kind; each must raise no false alert and, where broken, the right first alert in time. The full
benchmark (every run) is the slow test: ``pytest -m slow tests/test_alert_bench.py`` or
``python scripts/alert_bench.py``.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "alert_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("alert_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["alert_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()
FAST = [c.name for c in bench.cases() if c.fast]
ALL = [c.name for c in bench.cases()]


def check(name):
    case = next(c for c in bench.cases() if c.name == name)
    missing = [m for m in case.needs if not bench.have(m)]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}: pip install -e '.[bench]'")
    result = bench.run_case(case)
    table = bench.format_results([result])
    assert not result.error, table
    assert result.score.passed, table
    if case.label.healthy:
        assert result.loss_falls, f"label does not hold: the loss of a 'healthy' run does not fall\n{table}"
    return result


def test_the_benchmark_is_the_size_the_issue_asks_for():
    cases = bench.cases()
    healthy = [c for c in cases if c.label.healthy]
    assert len(cases) >= 24 and len(healthy) >= 12 and len(cases) - len(healthy) >= 10
    assert len(FAST) <= 12 and {c.label.healthy for c in cases if c.fast} == {True, False}


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(cifar_root, name):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in FAST])
def test_full_benchmark(cifar_root, name):
    check(name)
