"""``gradscope report RUN [RUN ...] --out DIR``: figures as PNGs plus one self-contained ``report.html``.

A RUN is a log written by ``scope.save()``, a run directory holding ``gradscope.jsonl``, or a ``gradscope compare``
output directory (all its runs). Several runs make a comparison page.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

from .record import Run, load


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


def _figures(label: str, run: Run, out: Path) -> list[tuple[str, Path]]:
    import matplotlib.pyplot as plt

    from . import figures

    made = []
    for kind, fn in (("flow", figures.gradient_flow), ("heatmap", figures.heatmap), ("dead", figures.dead_units),
                     ("saturation", figures.saturation), ("time", figures.through_time)):
        path = out / f"{label}-{kind}.png"
        try:
            fig = fn(run, path=path)
        except ValueError:
            continue  # this run has nothing for that figure (no ReLU, no recurrent layer, ...)
        plt.close(fig)
        made.append((f"{label}: {kind}", path))
    return made


def write_report(runs: list[tuple[str, Run]], out: Path) -> Path:
    """Write the PNGs and ``report.html`` for ``runs`` into ``out``; return the HTML path."""
    import matplotlib.pyplot as plt

    from . import figures

    out.mkdir(parents=True, exist_ok=True)
    images, opened = [], []
    for label, run in runs:
        images += _figures(label, run, out)
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
    parts = [f"<h1>gradscope report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>"]
    for title, path in images:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    for label, run in runs:
        parts.append(f"<h2>{html.escape(label)}</h2><pre>{html.escape(run.summary())}</pre>")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gradscope report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN")
    ap.add_argument("--out", required=True, help="directory for the PNGs and report.html")
    args = ap.parse_args(argv)
    runs = []
    try:
        for arg in args.runs:
            for label, log in find_logs(arg):
                run = load(log)
                if run.history.last is None:
                    raise ValueError(f"{log} has no collected step: nothing to report")
                run.meta.setdefault("label", label)
                runs.append((label, run))
        path = write_report(runs, Path(args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"gradscope report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
