"""The package's shape: imports read in one direction (no cycle, lazy imports inside functions included), and
importing gradscope loads none of the optional stacks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope

PACKAGE = Path(gradscope.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The gradscope modules ``path`` imports anywhere in its code (top level or inside a function; not under
    ``if TYPE_CHECKING``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out, tree = set(), ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never run
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gradscope"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("gradscope"):
                continue
            for a in node.names:  # "from . import figures" imports the module gradscope.figures
                sub = f"{target}.{a.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a package's __init__ re-exports; the edges that matter are between the modules that define things
    return {m: {t for t in _imports(p) if t in modules and t != "gradscope"} for m, p in modules.items()
            if m != "gradscope"}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert graph["gradscope.run"] >= {"gradscope.render", "gradscope.figures", "gradscope.record"}  # it sees edges
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a lazy import of the run API inside the records module (the old Run.summary
    shape) is a cycle it reports."""
    graph = _graph()
    graph["gradscope.record"] = graph["gradscope.record"] | {"gradscope.run"}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as e:
        assert "gradscope.record" in str(e) and "gradscope.run" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_records_are_a_leaf():
    assert _graph()["gradscope.record"] == set()


def test_importing_gradscope_loads_no_optional_stack():
    code = ("import sys, gradscope; print(sorted(m for m in ('matplotlib', 'torchvision', 'tensorboard', "
            "'lightning', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"



def test_adding_a_statistic_is_one_entry_plus_its_function(monkeypatch):
    """A new statistic of the parameters, declared only in the registry (a measure, a fold, an entry), is computed
    per parameter and per layer and matches plain autograd."""
    import torch
    import torch.nn.functional as F

    from gradscope import options, statistics
    from gradscope.bench.models import deep_mlp

    monkeypatch.setitem(statistics.MEASURES, "abs_sum", statistics.Measure(
        lambda grads, weights, before: torch.stack([g.detach().abs().sum(dtype=torch.float64) for g in grads]),
        scaled=True))
    monkeypatch.setitem(statistics.FOLDS, "mean_abs", statistics.Fold(
        lambda cols, numels: sum(cols[0]) / sum(numels), lambda cols, numels: [s / n for s, n in zip(cols[0], numels)]))
    monkeypatch.setitem(statistics.STATISTICS, "grad_mean_abs", statistics.Statistic(
        "grad_mean_abs", "mean |g| over the entries", "mean_abs", ("abs_sum",), cost="one pass over the gradients"))
    monkeypatch.setitem(options.EXTRA_STATS, "grad_mean_abs", "one pass over the gradients")

    torch.manual_seed(0)
    model = deep_mlp(3, 16, in_features=8)
    scope = gradscope.watch(model, extra_stats=("grad_mean_abs",))
    F.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 10, (32,))).backward()
    scope.step()
    per_param, per_layer = scope.latest("param"), scope.latest()
    layers = {}
    for name, p in model.named_parameters():
        want = p.grad.double().abs().mean().item()
        assert per_param[name]["grad_mean_abs"] == pytest.approx(want, rel=1e-12)
        layer = name.rpartition(".")[0]
        total, count = layers.get(layer, (0.0, 0))
        layers[layer] = (total + p.grad.double().abs().sum().item(), count + p.numel())
    assert len(layers) == 3
    for layer, (total, count) in layers.items():
        assert per_layer[layer]["grad_mean_abs"] == pytest.approx(total / count, rel=1e-12)
    scope.detach()
    plain = gradscope.watch(model)  # optional: not computed unless asked for
    F.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 10, (32,))).backward()
    plain.step()
    assert "grad_mean_abs" not in plain.latest()["1"] and "grad_norm" in plain.latest()["1"]
    plain.detach()


def test_each_fold_agrees_with_its_group_of_one():
    import math

    from gradscope.statistics import FOLDS

    cols = ([3.0, 0.0, math.nan, 1e-30, 2.5e30, math.inf], [2.0, 0.0, 1.0, 4.0, 1e-3, 7.0])
    numels = [6, 1, 3, 100, 7, 5]
    for name, fold in FOLDS.items():
        each = fold.each(cols, numels)
        assert len(each) == len(numels)
        for k, v in enumerate(each):
            alone = fold.group(tuple([c[k]] for c in cols), [numels[k]])
            assert v == alone or (math.isnan(v) and math.isnan(alone)), (name, k, v, alone)
