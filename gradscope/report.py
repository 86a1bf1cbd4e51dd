"""``gradscope report RUN [RUN ...] --out DIR``: figures as PNGs plus one self-contained ``report.html``.

A RUN is a log written by ``scope.save()``, a run directory holding ``gradscope.jsonl``, or a ``gradscope compare``
output directory (all its runs). Several runs make a comparison page. A run is labelled by its file or directory
name; runs with the same name (``a/run`` and ``b/run``) are told apart by their parent directories.

``--out`` is a directory (created if needed); one that already holds a ``report.html`` is only written over with
``--force``.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
import sys
from pathlib import Path

from .run import Run, load


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


def _figures(label: str, stem: str, run: Run, out: Path) -> list[tuple[str, Path]]:
    import matplotlib.pyplot as plt

    from . import figures

    made = []
    for kind, fn in (("flow", figures.gradient_flow), ("heatmap", figures.heatmap), ("dead", figures.dead_units),
                     ("saturation", figures.saturation), ("time", figures.through_time)):
        path = out / f"{stem}-{kind}.png"
        try:
            fig = fn(run, path=path)
        except figures.NothingToDraw:
            continue  # this run has nothing for that figure (no ReLU, no recurrent layer, ...)
        plt.close(fig)
        made.append((f"{label}: {kind}", path))
    return made


def write_report(runs: list[tuple[str, Run]], out: Path) -> Path:
    """Write the PNGs and ``report.html`` for ``runs`` into ``out``; return the HTML path.

    Every run gets its own figures and its own section: a label given twice gets a counter (``run``, ``run-2``), and
    the PNG names are made from the labels (path separators replaced) and unique too."""
    import matplotlib.pyplot as plt

    from . import figures

    out.mkdir(parents=True, exist_ok=True)
    runs = list(zip(_unique([label for label, _ in runs]), (run for _, run in runs)))
    stems = _unique([_file_stem(label) for label, _ in runs], key=str.casefold)
    images, opened = [], []
    per_run = [_figures(label, stem, run, out) for (label, run), stem in zip(runs, stems)]
    if len(runs) > 1:
        path = out / "comparison.png"
        opened.append(figures.comparison([r for _, r in runs], path=path, labels=[lbl for lbl, _ in runs]))
        images.insert(0, ("comparison of all runs", path))
        recurrent = [(lbl, r) for lbl, r in runs if any("through_time" in st for st in r.history.last.layers.values())]
        if len(recurrent) > 1:
            path = out / "through-time-overlay.png"
            opened.append(figures.through_time([r for _, r in recurrent], path=path,
                                               labels=[lbl for lbl, _ in recurrent]))
            images.insert(1, ("gradient through time, all recurrent runs", path))
    for fig in opened:
        plt.close(fig)

    def embed(title: str, path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"

    parts = [f"<h1>gradscope report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>"]
    parts += [embed(title, path) for title, path in images]
    for (label, run), made in zip(runs, per_run):
        parts.append(f"<h2>{html.escape(label)}</h2>")
        parts += [embed(title, path) for title, path in made]
        parts.append(f"<pre>{html.escape(run.summary())}</pre>")
        if run.alerts:
            rows = "".join(f"<tr><td>{a.step}</td><td>{html.escape(a.kind)}</td><td>{html.escape(a.layer)}</td>"
                           f"<td>{html.escape(a.message)}</td><td>{html.escape(a.hint)}</td></tr>" for a in run.alerts)
            parts.append("<table><tr><th>step</th><th>kind</th><th>layer</th><th>what</th><th>remedy</th></tr>"
                         f"{rows}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>gradscope report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto} img{max-width:100%} "
            "pre{font-size:11px;overflow-x:auto;background:#f6f6f6;padding:8px} "
            "table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:3px}</style></head>"
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
        path = write_report(runs, Path(args.out))
    except (OSError, ValueError) as e:
        print(f"gradscope report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
