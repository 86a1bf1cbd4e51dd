"""``gradscope report RUN [RUN ...] --out DIR``: figures as PNGs plus one self-contained ``report.html``.

A RUN is a log written by ``scope.save()``, a run directory holding ``gradscope.jsonl``, or a ``gradscope compare``
output directory (all its runs). Several runs make a comparison page. A run is labelled by its file or directory
name; runs with the same name (``a/run`` and ``b/run``) are told apart by their parent directories.

The page leads with the answer: each run's verdict with its first alert and that alert's remedy; then a table with
one row per run (verdict, parameters, collected steps, input/output signal ratio at the first and last collected
step, largest and final dead fraction, alerts per kind); then the figures over all runs; then one section per run with
its alerts, its text summary and its figures. Each distinct remedy is printed once. A figure that would show only
zeros (no dead unit at any step) is left out and a sentence says so.

``--out`` is a directory (created if needed); one that already holds a ``report.html`` is only written over with
``--force``.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
from pathlib import Path

from . import figures
from .run import Run, load
from .verdict import alert_summary, dead_extent, verdict


def find_logs(arg: str) -> list[tuple[str, Path]]:
    """``[(label, log path)]`` for one command-line RUN argument."""
    p = Path(arg)
    if p.is_file():
        return [(p.parent.name if p.name == "gradscope.jsonl" else p.stem, p)]
    if p.is_dir():
        if (p / "gradscope.jsonl").is_file():
            return [(p.name, p / "gradscope.jsonl")]
        found = sorted(p.glob("*/gradscope.jsonl"))
        if found:
            return [(f.parent.name, f) for f in found]
        raise ValueError(f"{arg} holds no gradscope.jsonl (neither directly nor in a subdirectory)")
    raise FileNotFoundError(f"{arg}: no such file or directory; pass a log written by scope.save() or a run directory")


def _unique(names: list[str], key=lambda name: name) -> list[str]:
    """``names`` with a counter appended to each repeat (``run``, ``run-2``, ...), compared by ``key``."""
    seen, out = set(), []
    for name in names:
        new, k = name, 1
        while key(new) in seen:
            k += 1
            new = f"{name}-{k}"
        seen.add(key(new))
        out.append(new)
    return out


def distinct_labels(logs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """``logs`` (``[(label, log path)]``, as :func:`find_logs` gives) with unique labels: runs that share a label
    (``a/run/gradscope.jsonl`` and ``b/run/gradscope.jsonl``) get as many parent directory names as it takes to tell
    them apart (``a/run``, ``b/run``); the same log given twice gets a counter."""
    def parts(label: str, log: Path) -> tuple[str, ...]:
        where = log.resolve().parent
        return (where.parts[:-1] if log.name == "gradscope.jsonl" else where.parts) + (label,)

    labels = [label for label, _ in logs]
    for label in sorted(set(labels)):
        group = [i for i, (lbl, _) in enumerate(logs) if lbl == label]
        chains = {i: parts(label, logs[i][1]) for i in group}
        distinct = len(set(chains.values()))
        if distinct < 2:
            continue  # one run, or one log given several times: the counter below
        for k in range(2, max(len(c) for c in chains.values()) + 1):
            tried = {i: "/".join(c[-k:]).lstrip("/") for i, c in chains.items()}
            if len(set(tried.values())) == distinct:
                for i in group:
                    labels[i] = tried[i]
                break
    return list(zip(_unique(labels), (log for _, log in logs)))


def _file_stem(label: str) -> str:
    """A label as the start of a file name: path separators and characters that some file systems refuse -> ``_``."""
    return re.sub(r'[\\/:*?"<>|\s\x00-\x1f]+', "_", label).strip("._") or "run"


FIGURE_KINDS = (("flow", "gradient flow at the last collected step"), ("heatmap", "gradient norm per layer and step"),
                ("dead", "dead ReLU units"), ("saturation", "saturated sigmoid/tanh outputs"),
                ("time", "gradient through time"))


def _figures(label: str, stem: str, run: Run, out: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw the figures of one run into ``out``: ``([(caption, png path)], [notes])``. A figure the run has nothing
    for (no ReLU, no recurrent layer) is left out silently; one that would only show zeros or one constant (no dead
    unit at any step) is left out with a note that says so instead."""
    import matplotlib.pyplot as plt

    made, notes = [], []
    for kind, caption in FIGURE_KINDS:
        fn = figures.FIGURES[kind]
        path = out / f"{stem}-{kind}.png"
        try:
            why = figures.uninformative(run, kind)
            if why is not None:
                notes.append(why)
                continue
            fig = fn(run, path=path)
        except figures.NothingToDraw:
            continue  # this run has nothing for that figure (no ReLU, no recurrent layer, ...)
        plt.close(fig)
        made.append((f"{label}: {caption}", path))
    return made, notes


def _number(v, fmt: str = "{:.2g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def run_facts(run: Run) -> dict[str, str]:
    """The comparison-table row of one run (without its label), formatted: verdict, parameters, collected steps,
    input-side / output-side backprop signal at the first and the last collected step, the largest dead fraction
    over the run against its final value, and the alerts per kind."""
    records = run.history.records()
    params = sum(entry.params for entry in run.meta["layers"])
    steps = f"{len(records)}" + (f" ({records[0].step}-{records[-1].step})" if records else "")
    dead = dead_extent(run)
    return {
        "verdict": verdict(run),
        "params": f"{params:,}",
        "collected steps": steps,
        "signal in/out, first": _number(run.signal_ratio(records[0])) if records else "-",
        "signal in/out, last": _number(run.signal_ratio(records[-1])) if records else "-",
        "dead units max (final)": "-" if dead is None else
        f"{_number(100 * dead[0], '{:.3g}')}% ({_number(100 * dead[1], '{:.3g}')}%)",
        "alerts": "; ".join(k.describe() for k in alert_summary(run)) or "none",
    }


def _verdict_class(text: str) -> str:
    return text.split(":")[0].split()[0] if text else "none"


CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;font-size:15px;line-height:1.45;max-width:1200px;margin:0 auto;padding:12px 20px;
  color:#222;overflow-wrap:anywhere}
h1{font-size:24px} h2{font-size:20px;margin-top:32px;border-bottom:2px solid #ddd} h3{font-size:16px;margin-bottom:4px}
img{max-width:100%;height:auto;display:block}
figure{margin:12px 0} figcaption{font-size:13px;color:#555}
pre{font-size:11px;line-height:1.3;background:#f6f6f6;padding:8px;max-width:100%;overflow-x:auto;
  white-space:pre-wrap;overflow-wrap:anywhere}
code{overflow-wrap:anywhere}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;
  text-align:left;overflow-wrap:normal} th{background:#f0f0f0}
td.num{text-align:right;white-space:nowrap}
.verdict{border-left:6px solid #999;background:#fafafa;padding:6px 12px;margin:10px 0}
.verdict p{margin:4px 0}
.badge{font-weight:bold}
.healthy{border-color:#009E73} .healthy .badge,.badge.healthy{color:#007a5a}
.flagged{border-color:#D55E00} .flagged .badge,.badge.flagged{color:#b34a00}
.cleared{border-color:#E69F00} .cleared .badge,.badge.cleared{color:#8a5d00}
.remedy{background:#eef5fb;padding:4px 8px}
.note{color:#555;font-style:italic}
@media (max-width:900px){pre{white-space:pre}}
"""


class _Remedies:
    """Prints each distinct remedy text once on the page: the first time in full, later as a pointer back."""

    def __init__(self):
        self.first: dict[str, str] = {}  # remedy text -> label of the run where it was printed

    def html(self, hint: str, label: str) -> str:
        if not hint:
            return ""
        if hint in self.first:
            where = self.first[hint]
            return ("<p class='remedy'><b>remedy:</b> as above" +
                    (f" (see {html.escape(where)})" if where != label else "") + "</p>")
        self.first[hint] = label
        return f"<p class='remedy'><b>remedy:</b> {html.escape(hint)}</p>"


def _alert_line(a) -> str:
    where = f" in <code>{html.escape(a.layer)}</code>" if a.layer else ""
    return f"step {a.step}, <b>{html.escape(a.kind)}</b>{where}: {html.escape(a.message)}"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table in its own horizontally scrolling box; cells are already escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("gradscope report draws its figures with matplotlib: pip install 'gradscope[plot]', "
                          "or pass --no-figures (draw=False) for a page of text only") from e
    return plt


def write_report(runs: list[tuple[str, Run]], out: Path, *, facts: dict[str, dict[str, str]] | None = None,
                 draw: bool = True) -> Path:
    """Write the PNGs and ``report.html`` for ``runs`` into ``out``; return the HTML path.

    The page reads top-down: each run's verdict with its first alert and that alert's remedy; a comparison table
    (one row per run: verdict, parameters, collected steps, input/output signal ratio at the first and last collected
    step, largest and final dead fraction, alerts per kind, then the columns of ``facts``); the figures over all runs;
    then one section per run with its alerts, its text summary and its figures. Each distinct remedy text is printed
    once; later mentions point back to it. A figure that would only show zeros (no dead unit at any step) is replaced
    by a sentence saying so.

    Args:
        runs: ``[(label, run)]``. Every run gets its own figures and its own section: a label given twice gets a
            counter (``run``, ``run-2``), and the PNG names are made from the labels (path separators replaced) and
            unique too.
        out: the directory to write into (created if needed).
        facts: more table columns per run, ``{label: {column title: formatted value}}`` (e.g. the accuracies and
            wall time ``gradscope compare`` measured); a run without an entry gets ``-``.
        draw: False for a page of text only (verdicts, table, summaries): no figure is drawn, so matplotlib is not
            needed (``gradscope report --no-figures``).

    Raises:
        ImportError: ``draw`` and matplotlib is not installed (the message names both fixes).
    """
    plt = _pyplot() if draw else None
    out.mkdir(parents=True, exist_ok=True)
    given = [label for label, _ in runs]
    runs = list(zip(_unique(given), (run for _, run in runs)))
    facts = facts or {}
    extra = [title for label in given for title in facts.get(label, {})]
    extra = list(dict.fromkeys(extra))
    stems = _unique([_file_stem(label) for label, _ in runs], key=str.casefold)
    images, opened = [], []
    per_run = [_figures(label, stem, run, out) if draw else ([], []) for (label, run), stem in zip(runs, stems)]
    if len(runs) > 1 and draw:
        metrics = ["signal_ratio", "grad_norm"]
        for metric, kind in (("max_dead", "dead"), ("saturation", "saturation")):
            stat = figures.SERIES_STAT[metric]
            has = [r for _, r in runs if any(stat in st for rec in r.history.records() for st in rec.layers.values())]
            if has and not all(figures.uninformative(r, kind) for r in has):
                metrics.append(metric)
        path = out / "comparison.png"
        opened.append(figures.comparison([r for _, r in runs], path=path, labels=[lbl for lbl, _ in runs],
                                         metrics=metrics))
        images.append(("all runs over training: " + ", ".join(figures.COMPARISON_METRICS[m][0] for m in metrics),
                       path))
        recurrent = [(lbl, r) for lbl, r in runs if any("through_time" in st for st in r.history.last.layers.values())]
        if len(recurrent) > 1:
            path = out / "through-time-overlay.png"
            opened.append(figures.through_time([r for _, r in recurrent], path=path,
                                               labels=[lbl for lbl, _ in recurrent]))
            images.append(("gradient through time, all recurrent runs", path))
    for fig in opened:
        plt.close(fig)

    def embed(title: str, path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return (f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(title)}</figcaption></figure>")

    ids = [f"run-{k + 1}" for k in range(len(runs))]
    verdicts = [verdict(run) for _, run in runs]
    remedies = _Remedies()
    n = len(runs)
    parts = [f"<h1>gradscope report: {n} run{'s' if n > 1 else ''}</h1>", "<h2 id='verdicts'>Verdicts</h2>"]
    severity = {"flagged": 0, "cleared": 1, "healthy": 3}  # flagged runs first: the answer leads
    order = sorted(range(n), key=lambda k: severity.get(_verdict_class(verdicts[k]), 2))
    for (label, run), anchor, said in (list(zip(runs, ids, verdicts))[k] for k in order):
        alerts = sorted(run.alerts, key=lambda a: a.step)
        block = [f"<p><a href='#{anchor}'><b>{html.escape(label)}</b></a>: "
                 f"<span class='badge'>{html.escape(said)}</span></p>"]
        if alerts:
            more = f" ({len(alerts) - 1} more below)" if len(alerts) > 1 else ""
            block.append(f"<p>first alert: {_alert_line(alerts[0])}{more}</p>")
            block.append(remedies.html(alerts[0].hint, label))
        elif run.history.last is not None:
            m = len(run.history.records())
            block.append(f"<p>no alert over {m} collected step{'s' if m != 1 else ''}</p>")
        parts.append(f"<div class='verdict {_verdict_class(said)}'>" + "".join(block) + "</div>")

    rows, header = [], []
    for (label, run), anchor, given_label in zip(runs, ids, given):
        row = run_facts(run)
        alerts = row.pop("alerts")
        header = ["run", *row, *extra, "alerts"]
        mine = facts.get(given_label, facts.get(label, {}))
        rows.append([f"<a href='#{anchor}'>{html.escape(label)}</a>",
                     *(html.escape(v) for v in row.values()),
                     *(html.escape(str(mine.get(title, "-"))) for title in extra), html.escape(alerts)])
    numeric = {k for k, title in enumerate(header) if title not in ("run", "verdict", "alerts")}  # right-aligned
    parts += ["<h2 id='comparison'>Comparison</h2>", _table(header, rows, numeric),
              "<p class='note'>signal in/out: the backprop signal reaching the first parameterised layer over the "
              "last one's, at the first and the last collected step (about 1: the gradient reaches the input side; "
              "far below 1: it vanishes on the way; far above: it explodes). dead units: the largest fraction of "
              "dead ReLU units in a layer over the run, and at the last collected step.</p>"]
    if images:
        parts += [embed(title, path) for title, path in images]

    for (label, run), (made, notes), anchor, said in zip(runs, per_run, ids, verdicts):
        parts.append(f"<section id='{anchor}'><h2>{html.escape(label)}</h2>")
        parts.append(f"<p class='verdict {_verdict_class(said)}'><span class='badge'>{html.escape(said)}</span></p>")
        kinds = alert_summary(run)
        if kinds:
            parts.append("<h3>alerts</h3>")
            for k in kinds:
                first = min((a for a in run.alerts if a.kind == k.kind), key=lambda a: a.step)
                on = f" on {k.layers} layer{'s' if k.layers != 1 else ''}" if k.layers > 1 else ""
                parts.append(f"<div class='verdict'><p><b>{html.escape(k.describe())}</b>{on}; first: "
                             f"{_alert_line(first)}</p>{remedies.html(first.hint, label)}</div>")
            rows = [[str(a.step), html.escape(a.kind), f"<code>{html.escape(a.layer)}</code>", html.escape(a.message)]
                    for a in run.alerts]
            parts.append(f"<details><summary>all {len(rows)} alert{'s' if len(rows) != 1 else ''} "
                         "(step, kind, layer, what)</summary>" +
                         _table(["step", "kind", "layer", "what"], rows, {0}) + "</details>")
        text = run.summary()
        for hint in remedies.first:  # printed above already: the summary points there instead of repeating it
            text = text.replace(hint, "(printed above)")
        parts.append(f"<h3>summary</h3><pre>{html.escape(text)}</pre>")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
        parts += [embed(title, path) for title, path in made]
        parts.append("</section>")
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>gradscope report</title><style>{CSS}</style></head>"
            "<body>" + "\n".join(parts) + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def out_dir_problem(out: str, flag: str = "--out") -> str | None:
    """Why ``out`` cannot be the output directory (empty, an existing file, or below one), or None when it can."""
    if not out.strip():
        return f"{flag} is empty: give the directory to write into (it is created if needed)"
    p = Path(out)
    for where in (p, *p.parents):
        if where.exists() and not where.is_dir():
            if where == p:
                return f"{flag} {out} is an existing file, not a directory: give a directory (new or existing)"
            return f"{flag} {out} is below {where}, which is a file, not a directory: give a directory path"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gradscope report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN")
    ap.add_argument("--out", required=True, help="directory for the PNGs and report.html (created if needed)")
    ap.add_argument("--force", action="store_true", help="write over a report.html already in --out")
    ap.add_argument("--no-figures", dest="draw", action="store_false",
                    help="a page of text only (verdicts, table, summaries); needs no matplotlib")
    args = ap.parse_args(argv)
    problem = out_dir_problem(args.out)
    if problem:
        ap.error(problem)
    if (Path(args.out) / "report.html").exists() and not args.force:
        ap.error(f"--out {args.out} already holds a report (report.html): pass --force to write over it, or give "
                 "another --out")
    runs = []
    try:
        logs = distinct_labels([found for arg in args.runs for found in find_logs(arg)])
        for label, log in logs:
            run = load(log)
            if run.history.last is None:
                raise ValueError(f"{log} has no collected step: nothing to report")
            run.meta.setdefault("label", label)
            runs.append((label, run))
        path = write_report(runs, Path(args.out), draw=args.draw)
    except (OSError, ValueError, ImportError) as e:
        print(f"gradscope report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
