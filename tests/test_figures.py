"""Figures from real short runs (Agg backend), and `gradscope report`."""

import re

import matplotlib
import pytest
import torch
from torch import nn

matplotlib.use("Agg")

import gradscope  # noqa: E402
from conftest import train_loop  # noqa: E402
from gradscope import figures, report  # noqa: E402
from gradscope.bench import compare  # noqa: E402
from gradscope.bench.models import SequenceClassifier, deep_mlp  # noqa: E402


class Mixed(nn.Module):
    """ReLU and sigmoid sites, to feed every activation figure."""

    def __init__(self):
        super().__init__()
        self.body = deep_mlp(4, 32, "relu", "kaiming", in_features=12, classes=16)
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.gate(self.body(x)))


def trained(model, x_fn, steps=6):
    return train_loop(model, x_fn, steps, lr=0.05, watch={"dead_window": 16}).scope


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    return trained(Mixed(), lambda: (torch.randn(16, 12), torch.randint(0, 3, (16,))))


@pytest.fixture(scope="module")
def recurrent():
    runs = []
    for cell in ("rnn", "lstm"):
        torch.manual_seed(0)
        model = SequenceClassifier(cell, "rows", hidden=16)
        runs.append(trained(model, lambda: (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), steps=3))
    return runs


def saved(fig, path):
    assert path.stat().st_size > 5000
    matplotlib.pyplot.close(fig)


def test_gradient_flow(mixed, tmp_path):
    fig = figures.gradient_flow(mixed, path=tmp_path / "flow.png")
    ax = fig.axes[0]
    profile = [e["name"] for e in mixed.meta["layers"] if e.get("profile") and e["name"] in mixed.latest()]
    signal = ax.lines[0]
    assert len(signal.get_xdata()) == len(profile)  # one point per layer, parameter-free ones included
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["backprop signal ||dL/d output||",
                                                                       "parameter-gradient RMS"]
    saved(fig, tmp_path / "flow.png")


def test_heatmap(mixed, tmp_path):
    fig = figures.heatmap(mixed, path=tmp_path / "heat.png")
    image = fig.axes[0].images[0]
    layers = [n for n, st in mixed.latest().items() if "grad_norm" in st]
    assert image.get_array().shape == (len(layers), len(mixed.history))
    saved(fig, tmp_path / "heat.png")


def test_dead_and_saturation_timelines(mixed, tmp_path):
    fig = figures.dead_units(mixed, path=tmp_path / "dead.png")
    relu_sites = [n for n, st in mixed.latest().items() if "dead_fraction" in st]
    assert len(relu_sites) == 3 and len(fig.axes[0].lines) == len(relu_sites)
    saved(fig, tmp_path / "dead.png")
    fig = mixed.plot("saturation", path=tmp_path / "sat.png")  # the shortcut
    assert len(fig.axes[0].lines) == 1
    saved(fig, tmp_path / "sat.png")
    with pytest.raises(ValueError, match="kind must be one of"):
        mixed.plot("pie")


def test_through_time_overlay_and_comparison(recurrent, mixed, tmp_path):
    fig = figures.through_time(recurrent, path=tmp_path / "time.png", labels=["rnn", "lstm"])
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_yscale() == "log"
    saved(fig, tmp_path / "time.png")
    with pytest.raises(ValueError, match="no recurrent layer"):
        figures.through_time(mixed)
    fig = figures.comparison(recurrent + [mixed], path=tmp_path / "cmp.png")
    assert len(fig.axes) == 3 and all(len(ax.lines) == 3 for ax in fig.axes)
    saved(fig, tmp_path / "cmp.png")


def test_figures_from_a_saved_file(mixed, tmp_path):
    mixed.save(tmp_path / "run.jsonl")
    fig = figures.gradient_flow(gradscope.load(tmp_path / "run.jsonl"), path=tmp_path / "f.png")
    saved(fig, tmp_path / "f.png")
    with pytest.raises(TypeError, match=r"gradscope.load\("):  # a path is loaded by the caller: no import cycle
        figures.gradient_flow(tmp_path / "run.jsonl")
    with pytest.raises(TypeError, match="Scope or Run"):
        figures.heatmap(42)


def test_report_embeds_every_image(mixed, recurrent, tmp_path):
    paths = []
    for name, scope in (("mixed", mixed), ("rnn", recurrent[0]), ("lstm", recurrent[1])):
        paths.append(str(tmp_path / f"{name}.jsonl"))
        scope.save(paths[-1])
    assert report.main(paths + ["--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out/report.html").read_text()
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(re.findall("data:image/png;base64,", page)) == len(pngs) >= 9
    assert "comparison.png" in {p.name for p in pngs} and "through-time-overlay.png" in {p.name for p in pngs}
    assert "gradscope summary" in page and "src='report" not in page  # self-contained


def test_report_on_the_comparison_runner_output(tmp_path):
    out, _ = compare.run(compare.Config(models=["mlp3-relu-kaiming", "rnn-rows"], steps=4, subset=64,
                                        test_subset=32, synthetic=True, out=str(tmp_path / "runs"), progress=False))
    assert report.main([str(out), "--out", str(tmp_path / "rep")]) == 0
    names = {p.name for p in (tmp_path / "rep").glob("*.png")}
    assert {"mlp3-relu-kaiming-flow.png", "rnn-rows-time.png", "comparison.png"} <= names


def test_report_bad_inputs(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"hello": 1}\n')
    assert report.main([str(foreign), "--out", str(tmp_path / "o")]) == 1
    assert "not a gradscope log" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    scope = gradscope.watch(nn.Linear(2, 2))
    scope.save(empty)
    scope.detach()
    assert report.main([str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no collected step" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1  # a directory without logs


# issue 14: figures that lead with the answer -------------------------------------------------------------------------

def relu_run(bias: float, depth: int = 11, steps: int = 60, dead_window: int = 8):
    """A narrow ReLU MLP, not trained (lr 0): with ``bias`` < 0, the first few units of each hidden layer get that
    bias and never fire (dead from step 0, a different number per layer); with ``bias`` > 0 every hidden unit gets it
    and the weights after the first layer are made non-negative, so every unit fires on every sample (none dead)."""
    torch.manual_seed(0)
    model = deep_mlp(depth, 8, "relu", "kaiming", in_features=6, classes=3)
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    with torch.no_grad():
        for k, m in enumerate(hidden):
            if bias < 0:
                m.bias[: 2 + k % 5] = bias
            else:
                m.bias.fill_(bias)
                if k:
                    m.weight.abs_()
    return train_loop(model, lambda: (torch.randn(8, 6), torch.randint(0, 3, (8,))), steps, lr=0.0,
                      watch={"dead_window": dead_window}).scope


@pytest.fixture(scope="module")
def dead_relu():
    return relu_run(-100.0)


@pytest.fixture(scope="module")
def vanishing_from_step_0():
    torch.manual_seed(0)
    model = deep_mlp(12, 8, "sigmoid", in_features=6, classes=3)
    return train_loop(model, lambda: (torch.randn(8, 6), torch.randint(0, 3, (8,))), 60, lr=0.0,
                      watch={"detectors": [gradscope.Vanishing(patience=1)]}).scope


def inside(ax, x, at_least=0.02):
    """``x`` lies inside the x range of ``ax`` by at least ``at_least`` of its width (not on the frame)."""
    lo, hi = ax.get_xlim()
    return lo < x < hi and min(x - lo, hi - x) >= at_least * (hi - lo)


def test_alert_marks_at_step_0_are_inside_the_axes(dead_relu, vanishing_from_step_0, tmp_path):
    assert {a.step for a in dead_relu.alerts if a.kind == "dead_units"} >= {0}
    assert {a.step for a in vanishing_from_step_0.alerts} == {0}
    fig = figures.dead_units(dead_relu, path=tmp_path / "dead.png")
    ax = fig.axes[0]
    vlines = [line for line in ax.lines if list(line.get_xdata()) == [0, 0]]  # axvline at step 0
    assert vlines and inside(ax, 0) and inside(ax, 59)
    saved(fig, tmp_path / "dead.png")
    fig = figures.heatmap(vanishing_from_step_0, path=tmp_path / "heat.png")
    ax = fig.axes[0]
    marks = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(marks) == len(vanishing_from_step_0.alerts)
    assert all(list(m.get_xdata()) == [0] for m in marks) and inside(ax, 0)
    assert not any(m.get_clip_on() for m in marks)  # a mark on the edge of the image is drawn whole
    saved(fig, tmp_path / "heat.png")


def test_many_sites_get_a_colour_bar_and_a_short_legend(dead_relu, tmp_path):
    records = dead_relu.history.records()
    sites = [n for n in dead_relu.latest() if "dead_fraction" in dead_relu.latest()[n]]
    assert len(sites) == 10 > figures.MAX_LEGEND
    fig = figures.dead_units(dead_relu, path=tmp_path / "dead.png")
    ax, bar = fig.axes
    assert len([line for line in ax.lines if len(line.get_xdata()) > 2]) == 10  # every site is drawn
    assert "forward order" in bar.get_ylabel()
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(entries) == figures.LEGEND_TOP
    peak = {n: max(r.layers[n]["dead_fraction"] for r in records) for n in sites}
    highest = sorted(sites, key=lambda n: (-peak[n], sites.index(n)))[:figures.LEGEND_TOP]
    assert [e.split(" (peak")[0] for e in entries] == highest
    top = ax.get_ylim()[1]
    assert 100 * max(peak.values()) < top  # nothing cut off at the top
    saved(fig, tmp_path / "dead.png")
    few = relu_run(-100.0, depth=4, steps=3)
    fig = figures.dead_units(few)
    assert len(fig.axes) == 1 and len(fig.axes[0].get_legend().get_texts()) == 3  # few sites: one entry each
    matplotlib.pyplot.close(fig)


def test_uninformative_figures_are_named_with_a_sentence(dead_relu, mixed):
    alive = relu_run(10.0, depth=4, steps=3)
    values = [st["dead_fraction"] for r in alive.history.records() for st in r.layers.values()
              if "dead_fraction" in st]
    assert len(values) == 3 * 3 and set(values) == {0.0}
    why = figures.uninformative(alive, "dead")
    assert why.startswith("no dead units") and "3 ReLU call sites" in why and "3 collected steps" in why
    assert figures.uninformative(dead_relu, "dead") is None
    for kind in ("flow", "heatmap"):
        assert figures.uninformative(alive, kind) is None
    sat = [st["saturation"] for r in mixed.history.records() for st in r.layers.values() if "saturation" in st]
    assert (figures.uninformative(mixed, "saturation") is None) == (len(set(sat)) > 1)
    # a NaN among the zeros is worth a figure: it is marked there
    run = gradscope.Run(dict(alive.meta), alive.history, alive.alerts)
    site = next(n for n, st in run.history.records()[-1].layers.items() if "dead_fraction" in st)
    saved_value = run.history.records()[-1].layers[site]["dead_fraction"]
    run.history.records()[-1].layers[site]["dead_fraction"] = float("nan")
    try:
        assert figures.uninformative(run, "dead") is None
    finally:
        run.history.records()[-1].layers[site]["dead_fraction"] = saved_value
    with pytest.raises(ValueError, match="kind must be one of"):
        figures.uninformative(alive, "pie")
