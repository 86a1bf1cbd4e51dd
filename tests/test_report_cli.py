"""`gradscope report` / `gradscope compare` against hostile input (issue 12, items 10-14), on real short runs."""

import base64
import html
import math
import re
import sys

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")

import gradscope  # noqa: E402
from gradscope import cli, figures, report  # noqa: E402
from gradscope.bench import compare  # noqa: E402
from gradscope.bench.data import ENV_VAR, load_cifar10  # noqa: E402
from gradscope.bench.models import deep_mlp  # noqa: E402


def embedded(page: str) -> list[str]:
    """The base64 payloads of the images embedded in a report page."""
    return re.findall("data:image/png;base64,([A-Za-z0-9+/=]+)", page)


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and err.strip()


def save_small_run(path, width=8, steps=3, seed=1):
    """A saved run of a small ReLU MLP, different from the ``run_file`` fixture's (another depth, width and seed)."""
    torch.manual_seed(seed)
    model = deep_mlp(3, width, "relu", "kaiming", in_features=6, classes=4)
    scope = gradscope.watch(model)
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 4, (8,))).backward()
        scope.step()
        model.zero_grad()
    scope.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    scope.save(path)
    return scope


# item 10: runs with the same directory name -------------------------------------------------------------------------

def test_runs_with_the_same_directory_name_get_their_own_figures_and_sections(run_file, tmp_path):
    scope, log = run_file
    (tmp_path / "a/run").mkdir(parents=True)
    scope.save(tmp_path / "a/run/gradscope.jsonl")
    save_small_run(tmp_path / "b/run/gradscope.jsonl")
    out = tmp_path / "rep"
    assert cli.main(["report", str(tmp_path / "a/run"), str(tmp_path / "b/run"), "--out", str(out)]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert {"a_run-flow.png", "b_run-flow.png", "a_run-heatmap.png", "b_run-heatmap.png", "comparison.png"} <= pngs
    page = (out / "report.html").read_text()
    images = embedded(page)
    assert len(images) == len(pngs) and len(set(images)) == len(images)  # every figure once, none twice
    assert "<h2>a/run</h2>" in page and "<h2>b/run</h2>" in page
    a = page.index("<h2>a/run</h2>")
    b = page.index("<h2>b/run</h2>")
    flow_a = base64.b64encode((out / "a_run-flow.png").read_bytes()).decode()
    flow_b = base64.b64encode((out / "b_run-flow.png").read_bytes()).decode()
    assert flow_a != flow_b
    assert a < page.index(flow_a) < b < page.index(flow_b)  # each run's figures in its own section


def test_the_same_log_twice_and_same_stems_in_different_directories(run_file, tmp_path):
    _, log = run_file
    save_small_run(tmp_path / "x/run.jsonl")
    out = tmp_path / "rep"
    assert report.main([str(log), str(tmp_path / "x/run.jsonl"), str(log), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    labels = re.findall("<h2>(.*?)</h2>", page)
    assert len(labels) == 3 and len(set(labels)) == 3
    assert labels[1] == "x/run" and labels[0].endswith("/run") and labels[2] == labels[0] + "-2"
    flows = sorted(p.name for p in out.glob("*-flow.png"))
    assert len(flows) == 3
    assert len(embedded(page)) == len(list(out.glob("*.png")))


# item 11: `$` in layer names and run labels -------------------------------------------------------------------------

class Dollars(nn.Module):
    """Every module named with matplotlib mathtext in it; ReLU, tanh and a recurrent layer, to feed every figure."""

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleDict({"a$b$c": nn.Linear(6, 8), "r$^$": nn.ReLU(), "t$\\frac$": nn.Tanh()})
        self.add_module("rnn$x_{$", nn.RNN(8, 8, batch_first=True))
        self.add_module("out$", nn.Linear(8, 3))

    def forward(self, x):  # (N, T, 6)
        h = self.parts["t$\\frac$"](self.parts["r$^$"](self.parts["a$b$c"](x)))
        y, _ = getattr(self, "rnn$x_{$")(h)
        return getattr(self, "out$")(y[:, -1])


def dollar_run(label, seed):
    torch.manual_seed(seed)
    model = Dollars()
    scope = gradscope.watch(model)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(4, 5, 6)), torch.randint(0, 3, (4,))).backward()
        scope.step()
        model.zero_grad()
    scope.detach()
    scope.meta["label"] = label
    return scope


def test_dollar_signs_in_layer_names_and_labels_are_drawn_literally(tmp_path):
    runs = [dollar_run("cost $x^$", 0), dollar_run("$\\frac$", 1)]
    for kind in figures.FIGURES:
        path = tmp_path / f"{kind}.png"
        fig = runs[0].plot(kind, path=path)
        assert path.stat().st_size > 5000, kind
        matplotlib.pyplot.close(fig)
    for name, fn in (("cmp", figures.comparison), ("time2", figures.through_time)):
        fig = fn(runs, path=tmp_path / f"{name}.png", labels=["a$^$", "b$\\frac$"])
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
        matplotlib.pyplot.close(fig)
    logs = []
    for k, scope in enumerate(runs):
        logs.append(tmp_path / f"run{k}$x^$.jsonl")
        scope.save(logs[-1])
    out = tmp_path / "rep"
    assert report.main([str(p) for p in logs] + ["--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))

    def all_zero(scope, stat):
        values = [st[stat] for r in scope.history.records() for st in r.layers.values() if stat in st]
        return bool(values) and all(v == 0 for v in values)

    blank = {(k, stat) for k, scope in enumerate(runs) for stat in ("dead_fraction", "saturation")
             if all_zero(scope, stat)}  # such a figure is left out of the report: a sentence says so
    # flow, heatmap, dead, saturation, time per run; comparison; through-time overlay
    assert len(pngs) == 2 * 5 + 2 - len(blank)
    assert all(p.stat().st_size > 5000 for p in pngs)
    page = (out / "report.html").read_text()
    assert len(embedded(page)) == len(pngs)
    assert page.count("no dead units") == len({k for k, stat in blank if stat == "dead_fraction"})


# item 12: report --out ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where,message", [
    ("file", "is an existing file"),
    ("file/below", "which is a file"),
    ("file/below/deeper", "which is a file"),
    ("", "--out is empty"),
    ("  ", "--out is empty"),
])
def test_report_out_must_be_a_directory(run_file, tmp_path, capsys, monkeypatch, where, message):
    _, log = run_file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(log), "--out", where])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    no_traceback(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run.jsonl"]  # nothing written anywhere


def test_report_refuses_to_overwrite_a_report_without_force(run_file, tmp_path, capsys):
    _, log = run_file
    out = tmp_path / "rep"
    assert report.main([str(log), "--out", str(out), "--no-figures"]) == 0
    first = (out / "report.html").read_bytes()
    (out / "report.html").write_text("my notes")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(log), "--out", str(out), "--no-figures"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a report" in err and "--force" in err
    no_traceback(err)
    assert (out / "report.html").read_text() == "my notes"  # untouched
    assert report.main([str(log), "--out", str(out), "--force", "--no-figures"]) == 0
    assert (out / "report.html").read_bytes() == first


def test_a_page_without_figures_needs_no_matplotlib_and_keeps_the_text(run_file, tmp_path, monkeypatch):
    scope, log = run_file
    out = tmp_path / "rep"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: importing it fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert report.main([str(log), "--out", str(out), "--no-figures"]) == 0
    page = page_of(out)
    assert "data:image/png" not in page and not list(out.glob("*.png"))
    assert html.escape(gradscope.verdict.verdict(scope)) in page and "gradscope summary" in page
    with pytest.raises(ImportError, match="--no-figures"):  # without the flag: the fix, named
        report.write_report([("run", gradscope.load(log))], tmp_path / "drawn")


# item 13: compare arguments and data directory ---------------------------------------------------------------------

TINY = ["--models", "mlp3-relu-kaiming", "--synthetic", "--steps", "1", "--subset", "16", "--test-subset", "8",
        "--batch-size", "8", "--evals", "1", "--no-progress"]  # a second's training, had a bad argument passed


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--epochs", "nan"], "--epochs must be a finite number > 0"),
    (["--epochs=-inf"], "--epochs must be a finite number > 0"),
    (["--subset", "0"], "--subset must be >= 1"),
    (["--test-subset", "-5"], "--test-subset must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--every", "-1"], "--every must be >= 1"),
    (["--evals", "0"], "--evals must be >= 1"),
    (["--seed", str(2 ** 64)], "--seed must fit in a signed 64-bit integer"),
    (["--models", "mlp3-relu-kaiming", "mlp3-relu-kaiming"], "more than once"),
])
def test_compare_rejects_bad_numbers_before_training(args, message, tmp_path, capsys):
    tiny = TINY[:3] + TINY[5:] if args[0].startswith("--epochs") else TINY  # --steps and --epochs exclude each other
    argv = ["compare"] + tiny + ["--out", str(tmp_path)] + args
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: gradscope compare" in err
    no_traceback(err)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


@pytest.mark.parametrize("where,message", [("file", "is an existing file"), ("file/runs", "which is a file"),
                                           ("", "--out is empty")])
def test_compare_out_must_be_a_directory(where, message, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    out = str(tmp_path / where) if where else ""
    with pytest.raises(SystemExit) as exit_:
        compare.main(TINY + ["--out", out])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    no_traceback(err)


@pytest.mark.parametrize("layout,problem", [(None, "no such directory"), ([], "it has no train/airplane/"),
                                            (["train", "test"], "it has no train/airplane/"),
                                            (["train/airplane", "test/airplane"], "it has no train/automobile/")])
def test_a_bad_cifar10_dir_variable_is_named_with_the_layout_it_needs(layout, problem, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cifar"
    if layout is not None:
        root.mkdir()
        for sub in layout:
            (root / sub).mkdir(parents=True)
    monkeypatch.setenv(ENV_VAR, str(root))
    argv = [a for a in TINY if a != "--synthetic"] + ["--no-download", "--out", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_:
        compare.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"${ENV_VAR}={root} is not a CIFAR-10 image folder ({problem})" in err
    assert "train/<class>/ and test/<class>/" in err and f"point ${ENV_VAR} at the folder" in err
    no_traceback(err)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(f"${ENV_VAR}={root}")):  # the library says the same
        load_cifar10(None, cache_dir=tmp_path / "cache", download=False, train_subset=8, test_subset=8)
    assert compare.main(argv + ["--synthetic"]) == 0  # --synthetic does not read the variable


# item 14: figures right after a step with NaN/Inf gradients ---------------------------------------------------------

class Poisonable(nn.Module):
    """A 5-layer MLP whose backward can be made NaN from layer 2's output towards the input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        self.poison = False

    def forward(self, x):
        h = self.net[2](self.net[1](self.net[0](x)))
        if self.poison:
            h.register_hook(lambda g: g * math.nan)
        return self.net[4](self.net[3](h))


def nonfinite_markers(ax):
    """The lines that mark NaN/Inf values (the red triangles along the top; their legend entry says NaN/Inf)."""
    return [line for line in ax.lines if "NaN/Inf" in line.get_label() and line.get_xdata().size]


def poisoned_run(learn: bool):
    """A scope over two steps of :class:`Poisonable`: a clean one (followed by an SGD step when ``learn``), then one
    whose input side has NaN gradients."""
    model = Poisonable()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for poison in (False, True):
        model.poison = poison
        F.cross_entropy(model(x), y).backward()
        scope.step()
        if learn and not poison:
            opt.step()
        opt.zero_grad()
    scope.detach()
    return scope


def test_flow_and_heatmap_after_partly_nan_gradients_draw_the_finite_layers_and_mark_the_rest(tmp_path):
    scope = poisoned_run(learn=True)
    names = [e["name"] for e in scope.meta["layers"] if e.get("profile") and e["name"] in scope.latest()]
    stats = [scope.latest()[n] for n in names]
    bad = [i for i, st in enumerate(stats) if any(not math.isfinite(st.get(k, 0.0))
                                                  for k in ("backprop_signal", "grad_rms"))]
    assert 0 < len(bad) < len(names)  # the input side is NaN, the output side is not
    fig = scope.plot("flow", path=tmp_path / "flow.png")
    ax = fig.axes[0]
    signal = ax.lines[0].get_ydata()
    assert all(math.isfinite(signal[i]) for i in range(len(names)) if i not in bad)  # the finite layers are drawn
    (marker,) = nonfinite_markers(ax)
    assert list(marker.get_xdata()) == bad and marker.get_visible()
    assert marker.get_label() in [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(math.isfinite(v) and v > 0 for v in ax.get_ylim())
    assert (tmp_path / "flow.png").stat().st_size > 5000
    matplotlib.pyplot.close(fig)
    fig = scope.plot("heatmap", path=tmp_path / "heat.png")
    ax = fig.axes[0]
    (squares,) = [line for line in ax.lines if line.get_label() == "NaN/Inf"]
    rows = {n: i for i, n in enumerate(n for n in names if "grad_norm" in scope.latest()[n])}
    assert sorted(squares.get_ydata()) == sorted(rows[n] for n, st in scope.latest().items()
                                                 if not math.isfinite(st.get("grad_norm", 0.0)))
    assert set(squares.get_xdata()) == {1}  # the poisoned step
    matplotlib.pyplot.close(fig)


def test_flow_after_all_nan_gradients_is_not_blank(tmp_path):
    torch.manual_seed(0)
    model = deep_mlp(4, 16, "tanh", in_features=6, classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, detectors=[gradscope.Nonfinite()])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    scope.step()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        next(model.parameters()).mul_(math.nan)  # a NaN weight at the input: everything downstream is NaN
    F.cross_entropy(model(x), y).backward()
    scope.step()
    scope.detach()
    assert not any(math.isfinite(st.get("backprop_signal", math.nan)) for st in scope.latest().values())
    fig = scope.plot("flow", path=tmp_path / "flow.png")
    ax = fig.axes[0]
    n_layers = len(ax.lines[0].get_xdata())
    (marker,) = nonfinite_markers(ax)
    assert list(marker.get_xdata()) == list(range(n_layers))  # every layer marked
    assert any("no finite value to draw" in t.get_text() for t in ax.texts)
    assert all(math.isfinite(v) for v in ax.get_ylim())
    assert (tmp_path / "flow.png").stat().st_size > 5000
    matplotlib.pyplot.close(fig)
    fig = figures.comparison([scope], path=tmp_path / "cmp.png")
    assert all(nonfinite_markers(ax) for ax in fig.axes[:2])  # signal ratio and gradient norm: step 1 is NaN
    matplotlib.pyplot.close(fig)


# issue 14: the page leads with the answer ----------------------------------------------------------------------------

def page_of(out):
    return (out / "report.html").read_text()


def table_rows(page: str) -> list[list[str]]:
    """The cells (markup stripped) of the first table of the page: the comparison table; the header row first."""
    table = page[page.index("<table"):page.index("</table>")]
    return [[re.sub("<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall("<tr>(.*?)</tr>", table)]


def relu_params(depth=3, width=8, in_features=6, classes=4) -> int:
    """The parameter count of :func:`save_small_run`'s model, from the model itself."""
    return sum(p.numel() for p in deep_mlp(depth, width, "relu", "kaiming", in_features=in_features,
                                           classes=classes).parameters())


@pytest.fixture
def three_runs(run_file, tmp_path):
    """Two copies of the sigmoid run (vanishing and nonfinite alerts: the same remedies) and a small ReLU run."""
    scope, log = run_file
    (tmp_path / "b").mkdir()
    other = tmp_path / "b/sig.jsonl"
    other.write_bytes(log.read_bytes())
    save_small_run(tmp_path / "c/relu.jsonl")
    return [log, other, tmp_path / "c/relu.jsonl"]


def test_the_page_reads_verdicts_then_table_then_runs(three_runs, tmp_path):
    out = tmp_path / "rep"
    assert report.main([str(p) for p in three_runs] + ["--out", str(out)]) == 0
    page = page_of(out)
    runs = [gradscope.load(p) for p in three_runs]
    said = [gradscope.verdict.verdict(r) for r in runs]
    assert said[0] == said[1] and said[0].startswith("flagged: ") and said[2] == "healthy"
    table = page.index("<table")
    sections = [page.index(f"<h2>{label}</h2>") for label in ("run", "sig", "relu")]
    assert table < sections[0] < sections[1] < sections[2]
    # the verdict block: each run's label and verdict, in order, before the table
    at, where = 0, []
    for label, text in zip(("run", "sig", "relu"), said):
        at = page.index(f"<b>{label}</b>", at)
        at = page.index(html.escape(text), at)
        where.append(at)
    assert where[-1] < table
    first = min(runs[0].alerts, key=lambda a: a.step)
    assert where[0] < page.index(html.escape(first.message)) < where[1]  # the first alert, under its run's verdict
    assert where[0] < page.index(html.escape(first.hint)) < where[1]  # with its remedy
    # each distinct remedy once on the whole page; the second run's same remedy points back
    hints = {a.hint for r in runs for a in r.alerts}
    assert len(hints) >= 2  # vanishing and nonfinite
    for hint in hints:
        assert page.count(html.escape(hint)) == 1, hint[:60]
    assert "as above (see run)" in page[where[1]:table]
    # the table: one row per run, with what the runs' own numbers say
    header, *rows = table_rows(page)
    assert header[:2] == ["run", "verdict"] and "params" in header and header[-1] == "alerts"
    assert [row[0] for row in rows] == ["run", "sig", "relu"]
    assert [row[1] for row in rows] == said
    col = {title: k for k, title in enumerate(header)}
    assert rows[2][col["params"]] == f"{relu_params():,}"
    assert rows[0][col["collected steps"]] == "3 (0-4)" and rows[2][col["collected steps"]] == "3 (0-2)"
    relu = runs[2].history.records()
    dead = [max(st["dead_fraction"] for st in r.layers.values() if "dead_fraction" in st) for r in relu]
    assert rows[2][col["dead units max (final)"]] == f"{100 * max(dead):.3g}% ({100 * dead[-1]:.3g}%)"
    assert rows[0][col["dead units max (final)"]] == "-"  # no ReLU
    ratio = runs[2].signal_ratio(relu[0]), runs[2].signal_ratio(relu[-1])
    assert (rows[2][col["signal in/out, first"]], rows[2][col["signal in/out, last"]]) == \
        (f"{ratio[0]:.2g}", f"{ratio[1]:.2g}")
    assert rows[0][col["alerts"]].startswith("vanishing x") and "nonfinite x" in rows[0][col["alerts"]]
    assert rows[2][col["alerts"]] == "none"
    # each run's section: its summary, then its figures
    for k, label in enumerate(("run", "sig", "relu")):
        end = sections[k + 1] if k < 2 else len(page)
        section = page[sections[k]:end]
        assert section.index("gradscope summary") < section.index("data:image/png")
        assert section.count("data:image/png") == len([p for p in out.glob(f"{label}-*.png")])


def test_facts_add_columns_and_the_positional_call_still_works(run_file, tmp_path):
    scope, log = run_file
    small = save_small_run(tmp_path / "small.jsonl")
    runs = [("sigmoid", gradscope.load(log)), ("relu", gradscope.load(tmp_path / "small.jsonl"))]
    page = page_of(report.write_report(runs, tmp_path / "plain", draw=False).parent)
    assert "test acc" not in page
    facts = {"relu": {"test acc": "0.412", "wall (s)": "3.5"}}
    path = report.write_report(runs, tmp_path / "facts", facts=facts, draw=False)
    header, *rows = table_rows(path.read_text())
    assert header[-3:] == ["test acc", "wall (s)", "alerts"]
    assert rows[1][-3:-1] == ["0.412", "3.5"] and rows[0][-3:-1] == ["-", "-"]  # a run without facts: "-"
    assert len(small.alerts) == 0 and rows[1][1] == "healthy"


def test_an_all_zero_dead_unit_figure_is_replaced_by_a_sentence(tmp_path):
    torch.manual_seed(0)
    model = deep_mlp(4, 8, "relu", "kaiming", in_features=6, classes=3)
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    with torch.no_grad():  # every pre-activation positive: no unit is ever dead
        for k, m in enumerate(hidden):
            m.bias.fill_(10.0)
            if k:
                m.weight.abs_()
    scope = gradscope.watch(model)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        scope.step()
        model.zero_grad()
    scope.detach()
    dead = [st["dead_fraction"] for r in scope.history.records() for st in r.layers.values() if "dead_fraction" in st]
    assert len(dead) == 9 and set(dead) == {0.0}
    scope.save(tmp_path / "alive.jsonl")
    save_small_run(tmp_path / "small.jsonl")  # a ReLU run with a dead unit at step 0: its figure is drawn
    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "alive.jsonl"), str(tmp_path / "small.jsonl"), "--out", str(out)]) == 0
    names = {p.name for p in out.glob("*.png")}
    assert "alive-dead.png" not in names and "small-dead.png" in names and "alive-flow.png" in names
    page = page_of(out)
    alive, small = page.index("<h2>alive</h2>"), page.index("<h2>small</h2>")
    assert alive < page.index("no dead units") < small and page.count("no dead units") == 1
    assert "3 ReLU call sites" in page[alive:small]


def test_the_page_keeps_within_its_width(run_file, tmp_path):
    _, log = run_file
    out = tmp_path / "rep"
    assert report.main([str(log), "--out", str(out)]) == 0
    page = page_of(out)
    css = re.sub(r"\s+", "", page[page.index("<style>"):page.index("</style>")])
    rules = re.findall(r"([^{}]+)\{([^}]*)\}", css)

    def rule(selector):  # the first rule for it (the page-wide one, not a narrow-screen override)
        return next(body for sel, body in rules if selector in sel.split(","))

    assert "white-space:pre-wrap" in rule("pre") and "overflow-x:auto" in rule("pre")
    assert "max-width:100%" in rule("img")
    assert "overflow-x:auto" in rule(".scroll")
    tables = [m.start() for m in re.finditer("<table", page)]
    assert tables and all(page[:t].endswith("<div class='scroll'>") for t in tables)  # each scrolls in its own box
    assert "max-width" in rule("body")


def test_a_report_after_nan_gradients_draws_the_flow_with_its_marks(tmp_path):
    scope = poisoned_run(learn=False)
    assert any(not math.isfinite(st.get("backprop_signal", 0.0)) for st in scope.latest().values())
    assert figures.uninformative(scope, "flow") is None and figures.uninformative(scope, "heatmap") is None
    scope.save(tmp_path / "nan.jsonl")
    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "nan.jsonl"), "--out", str(out)]) == 0
    assert {"nan-flow.png", "nan-heatmap.png"} <= {p.name for p in out.glob("*.png")}
    page = page_of(out)
    flow = base64.b64encode((out / "nan-flow.png").read_bytes()).decode()
    assert flow in page and "no gradient" not in page


def test_flagged_runs_lead_the_verdicts_and_the_table_keeps_the_given_order(run_file, tmp_path):
    _, log = run_file
    save_small_run(tmp_path / "healthy.jsonl")
    runs = [("healthy", gradscope.load(tmp_path / "healthy.jsonl")), ("sick", gradscope.load(log))]
    assert [gradscope.verdict.verdict(r).split(":")[0] for _, r in runs] == ["healthy", "flagged"]
    page = report.write_report(runs, tmp_path / "rep", draw=False).read_text()
    verdicts, table = page[:page.index("<table")], page[page.index("<table"):]
    assert verdicts.index("<b>sick</b>") < verdicts.index("<b>healthy</b>")
    assert table.index(">healthy</a>") < table.index(">sick</a>")
