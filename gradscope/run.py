"""A run: the reading API a live scope and a loaded log share (:class:`Run`), and its JSON Lines file (``save``,
:class:`LogStream`, :func:`load`).

The saved format is JSON Lines (one JSON object per line, never pickle), so ``pandas.read_json(path, lines=True)``
opens it. Every line has a ``"type"``:

* ``"meta"`` (first line): ``format == "gradscope"``, format ``version``, ``every``, and ``layers``: one entry per
  tracked layer or call site in forward order (``name``, ``module`` class, trainable ``params`` count, ``depth``).
* ``"step"``: step-level information (``step``, ``grad_scale``, ``overflow``).
* ``"layer"``: one per layer/call site and collected step: ``step``, ``name`` and its statistics as columns
  (``through_time`` of a recurrent layer is a list, one value per time step).
* ``"param"``: one per parameter and collected step: ``step``, ``name`` (qualified parameter name) and its statistics.
* ``"alert"``: one per alert, with the fields of :class:`gradscope.Alert`.
* ``"end"`` (last line, format version 2): ``steps`` and ``alerts``, the counts of what the file holds.

A log streamed while training (``watch(..., log_to=path)``, :class:`LogStream`) has the same lines, written one
collected step at a time: each step's block (its step, layer and param lines, then the alerts raised at that step)
ends with a ``"sync"`` line holding the counts so far, and a later ``"meta"`` line replaces the earlier one when the
layer table grew (a branch first taken late). A run killed mid-way has no end line, and
``load(path, partial=True)`` recovers every step up to the last sync line.

JSON has no NaN or infinity, so non-finite statistics are written as ``null`` and read back as ``nan``; the
``grad_nonfinite`` count keeps how many NaN/Inf entries a gradient had.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
import warnings
from array import array

from . import figures
from .alerts import Alert
from .record import History, LayerInfo, StepRecord, layer_table, signal_profile
from .render import format_summary
from .statistics import names

FORMAT = "gradscope"
FORMAT_VERSION = 2  # 2: an "end" line closes every file, with its counts of steps and alerts


class Run:
    """The reading side of a monitored run: what a live :class:`~gradscope.Scope` and :func:`gradscope.load` share."""

    def __init__(self, meta: dict, history: History, alerts: list[Alert]):
        meta["layers"] = layer_table(meta.get("layers", ()))  # a saved table's dicts read as LayerInfo
        self.meta = meta
        self.history = history
        self._alerts = alerts

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (each fired when its condition started)."""
        return list(self._alerts)

    @property
    def layer_names(self) -> list[str]:
        """Tracked layers and call sites in forward execution order (input side first)."""
        return [entry.name for entry in self.meta["layers"]]

    def latest(self, per: str = "layer") -> dict[str, dict[str, float]]:
        """Statistics of the last collected step.

        Args:
            per: ``"layer"`` for ``{layer or call-site name: {stat: value}}`` or ``"param"`` for
                ``{parameter name: {stat: value}}``.
        """
        if per not in ("layer", "param"):
            raise ValueError(f"per must be 'layer' or 'param', got {per!r}")
        last = self.history.last
        if last is None:
            return {}
        src = last.layers if per == "layer" else last.params
        return {name: dict(stats) for name, stats in src.items()}

    def _record(self, record) -> "StepRecord | None":
        """``record``, or the last one when None; a clear error for anything else."""
        if record is None:
            return self.history.last
        if not isinstance(record, StepRecord):
            raise TypeError(f"record must be a StepRecord (e.g. scope.history[-1]) or None for the last one, "
                            f"got {record!r}")
        return record

    def depth_profile(self, record: StepRecord | None = None) -> list[tuple[str, float]]:
        """``[(name, backprop_signal)]`` from input to output over the profile sites (leaf or parameterised modules)."""
        record = self._record(record)
        if record is None:
            return []
        out = []
        for entry in self.meta["layers"]:
            if entry.profile and entry.name in record.layers:
                sig = record.layers[entry.name].get("backprop_signal")
                if sig is not None:
                    out.append((entry.name, sig))
        return out

    def decay_factor(self, record: StepRecord | None = None) -> float:
        """Average factor by which the backprop signal is multiplied per parameterised layer, going output → input.

        ``(s_input / s_output) ** (1 / (n - 1))`` over the parameterised layers with a finite positive signal:
        about 1 is healthy, well below 1 means vanishing towards the input, above 1 exploding. ``nan`` if undefined.
        """
        record = self._record(record)
        if record is None:
            return math.nan
        sig = [s for _, s in signal_profile(record, self.meta["layers"]) if s > 0]
        if len(sig) < 2:
            return math.nan
        return (sig[0] / sig[-1]) ** (1.0 / (len(sig) - 1))

    def signal_ratio(self, record: StepRecord | None = None) -> float:
        """Backprop signal of the first parameterised layer over that of the last (input side / output side);
        ``nan`` with fewer than two layers or no output-side signal."""
        record = self._record(record)
        profile = signal_profile(record, self.meta["layers"]) if record is not None else []
        if len(profile) < 2 or not profile[-1][1] > 0:
            return math.nan
        return profile[0][1] / profile[-1][1]

    def summary(self, full: bool = False) -> str:
        """The verdict, a table of the last collected step, the depth profile and the alerts, for a terminal.

        Args:
            full: one row per layer/call site. By default a table of more than 40 rows (a deep net) shows the
                input-side and output-side rows and every row of a layer with an alert (with its neighbours), and
                folds the rows between them into one line per top-level block with the range of their backprop
                signal and gradient RMS; a smaller net prints every row either way.
        """
        return format_summary(self, full=full)

    def plot(self, kind: str = "flow", path=None, **kwargs):
        """A figure of this run: ``flow`` (gradient flow), ``heatmap``, ``dead``, ``saturation`` or ``time``
        (see :mod:`gradscope.figures`; needs matplotlib). Saved to ``path`` when given."""
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path (str or os.PathLike) or None, got {path!r}")
        if kind not in figures.FIGURES:
            raise ValueError(f"kind must be one of {sorted(figures.FIGURES)}, got {kind!r}")
        return figures.FIGURES[kind](self, path=path, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the run as JSON Lines (see the module docstring for the layout), atomically.

        The file is written beside ``path`` under a temporary name, flushed to disk and then renamed over ``path``:
        a save that is killed half-way leaves the previous file as it was. The last line (``"type": "end"``) counts
        the steps and alerts, so :func:`load` can tell a complete file from one cut short by other means.
        """
        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"save({path!r}): it is not a regular file (a directory, device or pipe), and saving "
                             "replaces the file at the path; pass a file path")
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                _write(f, {"type": "meta", **self.meta})
                records = self.history.records()
                for rec in records:
                    _write_record(f, rec)
                for a in self._alerts:
                    _write(f, {"type": "alert", **a.to_dict()})
                _write(f, {"type": "end", "steps": len(records), "alerts": len(self._alerts)})
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp makes 0600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _write_record(f, rec: StepRecord) -> None:
    _write(f, {"type": "step", "step": rec.step, **rec.info})
    for name, stats in rec.layers.items():
        _write(f, {"type": "layer", "step": rec.step, "name": name, **stats})
    for name, stats in rec.params.items():
        _write(f, {"type": "param", "step": rec.step, "name": name, **stats})


class LogStream:
    """Writes a run to a JSON Lines file while it trains, one collected step at a time (``watch(..., log_to=path)``).

    Each step's block is written with one ``write`` and flushed, so a process killed at step 90,000 leaves a log of
    its steps up to the last complete block (``gradscope.load(path, partial=True)`` reads them). :meth:`close` (the
    scope's ``detach()``) writes the end line and syncs the file to disk. Every collected step is written, not the
    thinned in-memory history.

    Raises:
        TypeError: ``path`` is not a path.
        FileExistsError: a file is already there: a log is never written over.
        FileNotFoundError / NotADirectoryError: its directory does not exist.
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"log_to must be a file path (str or os.PathLike) or None, got {path!r}")
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"log_to={self.path!r} already exists: gradscope never writes over a log; remove "
                                  "it or choose a new path (e.g. one with the date or run id in it)")
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"log_to={self.path!r}: its directory {directory!r} does not exist; create it "
                                    "first (os.makedirs(..., exist_ok=True))")
        self._f = open(self.path, "x", encoding="utf-8")
        self.steps = 0
        self.alerts = 0
        self._meta_seen = None  # (layer table object, the other meta items) the last meta line was written from

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, meta: dict, record: StepRecord, alerts: list[Alert]) -> None:
        """Append one collected step and the alerts it raised (and a meta line first if the layer table changed)."""
        buf = io.StringIO()
        self._write_meta(buf, meta)
        _write_record(buf, record)
        for a in alerts:
            _write(buf, {"type": "alert", **a.to_dict()})
        _write(buf, {"type": "sync", "steps": self.steps + 1, "alerts": self.alerts + len(alerts)})
        self._f.write(buf.getvalue())
        self._f.flush()
        self.steps += 1
        self.alerts += len(alerts)

    def _write_meta(self, f, meta: dict) -> None:
        """A meta line, if none was written yet or ``meta`` changed since (a new layer table, which the scope replaces
        rather than edits, or any other item: ``unmonitored``, ``uncounted_passes``)."""
        rest = {k: v for k, v in meta.items() if k != "layers"}
        if self._meta_seen is None or meta.get("layers") is not self._meta_seen[0] or rest != self._meta_seen[1]:
            _write(f, {"type": "meta", **meta})
            self._meta_seen = (meta.get("layers"), copy.deepcopy(rest))

    def abandon(self) -> None:
        """Close the file without an end line (a write failed: what is there loads with ``partial=True``)."""
        with contextlib.suppress(OSError, ValueError):
            self._f.close()

    def close(self, meta: dict | None = None) -> None:
        """Write the end line (and a meta line first if ``meta`` changed, or none was written), sync and close.
        Idempotent."""
        if self._f.closed:
            return
        try:
            if meta is not None:
                self._write_meta(self._f, meta)
            _write(self._f, {"type": "end", "steps": self.steps, "alerts": self.alerts})
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()


def _clean(v):
    if isinstance(v, LayerInfo):
        v = v.to_dict()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple, array)):  # a profile such as through_time, the meta's layer table
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _write(f, obj: dict) -> None:
    f.write(json.dumps({k: _clean(v) for k, v in obj.items()}, allow_nan=False) + "\n")


MAX_INT = 2**63  # step numbers, counts and sizes must fit an int64
PROFILE_STATS = names(profile=True)  # the statistics that are lists, one value per time step
# the fields of a meta "layers" entry that the reading code uses, and their types ("name" is required)
LAYER_FIELDS = {"name": str, "module": str, "role": str, "profile": bool, "params": int, "depth": int}
META_STRINGS = ("model", "label", "torch_version")


def _short(v) -> str:
    """``repr(v)`` cut to a length an error message can show (a 400-digit int, a long string)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _number(v, what: str) -> None:
    """Refuse anything but a JSON number: an int or float, not a bool. A float may be anything JSON gives (NaN,
    Infinity and 1e999 included); an int, which the writer only uses for counts, must lie within +-2**63: one
    larger would overflow a float, or a float's format() after the reading code scales it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} is {type(v).__name__}, not a number")
    if isinstance(v, int) and not -MAX_INT < v < MAX_INT:
        raise ValueError(f"{what} {_short(v)} is too large: an int must lie within +-2**63 (write it as a float)")


def _int(row: dict, key: str, low: int = 0, what: str | None = None) -> int:
    """``row[key]``, refused unless it is an int with ``low <= value < 2**63``."""
    what = what or repr(key)
    if key not in row:
        raise ValueError(f"{what} is missing")
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v < MAX_INT:
        raise ValueError(f"{what} must be an int from {low} to 2**63 - 1, got {_short(v)}")
    return v


def _stats(row: dict, skip: tuple, info: bool = False) -> dict:
    """The statistics of a layer/param line (``info=False``) or the facts of a step line (``info=True``: the
    ``overflow`` flag makes bools allowed, no profile lists). ``null`` is read as ``nan``."""
    out = {}
    for k, v in row.items():
        if k in skip:
            continue
        if k in PROFILE_STATS and not info:
            if not isinstance(v, list) or not v:
                raise ValueError(f"statistic {k!r} must be a non-empty list of numbers, got {_short(v)}")
            for x in v:
                if x is not None:
                    _number(x, f"an entry of statistic {k!r}")
            out[k] = array("f", [math.nan if x is None else x for x in v])
        elif type(v) is float:  # the common case, checked first: any float is fine
            out[k] = v
        elif v is None:
            out[k] = math.nan
        elif info and isinstance(v, bool):
            out[k] = v
        else:
            _number(v, f"statistic {k!r}")
            out[k] = v
    if "through_time" in out:
        missing = [k for k in ("through_time_ratio", "through_time_reach") if k not in out]
        if missing:
            raise ValueError(f"a through_time profile comes with {' and '.join(map(repr, missing))}: missing")
    if "through_time_reach" in out and not math.isfinite(out["through_time_reach"]):
        raise ValueError(f"statistic 'through_time_reach' must be a finite number of steps, "
                         f"got {out['through_time_reach']!r}")
    return out


def _check_layer(e, j: int, seen: set) -> None:
    """Entry ``j`` of the meta's layer table: an object whose fields in :data:`LAYER_FIELDS` have their type."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise ValueError(f"'layers' must be a list of objects with a string 'name'; entry {j} is {_short(e)}")
    what = f"meta layer {j} ({_short(e['name'])})"
    if e["name"] in seen:
        raise ValueError(f"{what}: layer names must be unique, this one is listed twice")
    seen.add(e["name"])
    for key, kind in LAYER_FIELDS.items():
        if key not in e:
            continue
        if kind is int:
            _int(e, key, what=f"{what}: {key!r}")
        elif not isinstance(e[key], kind):
            raise ValueError(f"{what}: {key!r} must be a {kind.__name__}, got {_short(e[key])}")


def _check_meta(meta: dict) -> None:
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"format version must be an int >= 1, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {_short(version)} is newer than this gradscope reads ({FORMAT_VERSION}); "
                         "upgrade gradscope")
    if "every" in meta:
        _int(meta, "every", low=1)
    for key in META_STRINGS:
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{key!r} must be a string, got {_short(meta[key])}")
    context = meta.get("context", {})
    if not isinstance(context, dict):
        raise ValueError(f"'context' must be an object, got {_short(context)}")
    for key, v in context.items():
        if v is not None and not isinstance(v, (bool, str)):
            _number(v, f"context field {key!r}")
    layers = meta.get("layers", [])
    if not isinstance(layers, list):
        raise ValueError(f"'layers' must be a list of objects with a string 'name', got {_short(layers)}")
    seen: set = set()
    for j, e in enumerate(layers):
        _check_layer(e, j, seen)


def _check_text(row: dict) -> None:
    """Refuse a line whose ``\\uXXXX`` escapes make a lone UTF-16 surrogate: not text, it cannot be printed or
    written to a UTF-8 file (a summary, ``gradscope report``'s page)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"it holds an escaped lone surrogate {_short(e.object[e.start:e.end])}, not text") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def _check_alert(row: dict) -> Alert:
    """The :class:`Alert` of an alert line, its fields checked."""
    fields = {k: row[k] for k in Alert.__dataclass_fields__ if k in row}
    for key in ("kind", "layer", "message", "hint", "metric"):
        if key in fields and not isinstance(fields[key], str):
            raise ValueError(f"alert field {key!r} must be a string, got {_short(fields[key])}")
        if key not in fields and key != "metric":
            raise ValueError(f"alert field {key!r} is missing")
    if "related" in fields:
        if not (isinstance(fields["related"], list) and all(isinstance(x, str) for x in fields["related"])):
            raise ValueError("alert field 'related' must be a list of layer names")
        fields["related"] = tuple(fields["related"])
    fields["step"] = _int(row, "step", what="alert field 'step'")
    for key in ("value", "threshold"):
        v = fields.get(key)
        if v is not None:
            _number(v, f"alert field {key!r}")
        fields[key] = math.nan if v is None else v
    return Alert(**fields)


def load(path: str | os.PathLike, history: int | None = None, partial: bool = False) -> Run:
    """Read a run written by ``scope.save()``. Parses JSON only; never unpickles.

    Args:
        history: the most records kept in memory (None: all of them).
        partial: recover a file that was cut short (no end line, or a last line cut mid-way): every complete step
            before the cut is loaded, with a warning that says what is missing; without it such a file is refused.

    Every field the reading API uses is checked on load, so a run that loads can be summarised and plotted: the
    meta line (version, ``every``, strings, ``context`` of simple values, a layer table with unique names and
    typed fields), step numbers and counts (ints from 0 to 2**63 - 1), statistics and alert values (numbers, not
    bools: any float, ``null``/NaN/Infinity included, or an int within +-2**63; a ``through_time`` profile is a
    non-empty list and comes with its summary), strings (no escaped lone surrogates). Unknown keys are kept as they
    are; a meta line without a layer table reads as an empty one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid gradscope log (the message names the line that failed), or it was cut
            short and ``partial`` is False.
    """
    if not isinstance(partial, bool):
        raise TypeError(f"partial must be True or False, got {partial!r}")
    if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 2):
        raise ValueError(f"history must be None (keep every record) or an int >= 2, got {history!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no gradscope log at {path!r}; pass the path given to scope.save()")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path!r} is not a gradscope log (not UTF-8 text): line {line}: {e}") from None
    lines = io.StringIO(text, newline=None).readlines()  # as open(path).readlines(): \r\n and \r end lines too
    records: dict[int, StepRecord] = {}
    alerts: list[Alert] = []
    meta = None
    end = None  # the line number of the end line
    synced = None  # (steps, alerts) at the last sync line of a streamed log: complete up to there
    cut = None  # why the file is incomplete, if it is
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if end is not None:
            raise ValueError(f"{path!r} is not a valid gradscope log: line {i} comes after the end line {end}")
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int of over 4300 digits
            if i == len(lines) and not line.endswith("\n") and meta is not None:
                cut = f"its last line ({i}) was cut mid-way"
                break
            raise ValueError(f"{path!r} is not a gradscope log: line {i} is not JSON ({e})") from None
        if not isinstance(row, dict) or "type" not in row:
            raise ValueError(f"{path!r} is not a gradscope log: line {i} has no 'type' field")
        try:
            if "\\u" in line:  # only an escape can make a lone surrogate; the writer escapes all non-ASCII text
                _check_text(row)
            if meta is None:
                if row.get("type") != "meta" or row.get("format") != FORMAT:
                    raise ValueError("its first line must be the meta line written by scope.save()")
                meta = {k: v for k, v in row.items() if k != "type"}
                _check_meta(meta)
                meta.setdefault("layers", [])  # the figures read meta["layers"]
                continue
            kind = row["type"]
            if kind in ("end", "sync"):
                want = (_int(row, "steps"), _int(row, "alerts"))
                if want != (len(records), len(alerts)):
                    raise ValueError(f"the {kind} line counts {want[0]} steps and {want[1]} alerts, the file holds "
                                     f"{len(records)} and {len(alerts)}: it was changed after it was written")
                if kind == "end":
                    end = i
                else:
                    synced = want
            elif kind == "meta":  # a streamed log's layer table grew: the newer meta line replaces the older
                if row.get("format") != FORMAT:
                    raise ValueError(f"a meta line must have format {FORMAT!r}")
                newer = {k: v for k, v in row.items() if k != "type"}
                _check_meta(newer)
                newer.setdefault("layers", [])
                meta = newer
            elif kind == "step":
                step = _int(row, "step")
                rec = records.setdefault(step, StepRecord(step, {}, {}, {}))
                rec.info.update(_stats(row, ("type", "step"), info=True))
            elif kind in ("layer", "param"):
                step = _int(row, "step")
                if not isinstance(row.get("name"), str):
                    raise ValueError("'name' must be a string")
                rec = records.setdefault(step, StepRecord(step, {}, {}, {}))
                target = rec.layers if kind == "layer" else rec.params
                target[row["name"]] = _stats(row, ("type", "step", "name"))
            elif kind == "alert":
                alerts.append(_check_alert(row))
            else:
                raise ValueError(f"unknown line type {kind!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r} is not a valid gradscope log: line {i}: {e}") from None
    if meta is None:
        raise ValueError(f"{path!r} is empty, not a gradscope log")
    if end is None and (cut is not None or meta["version"] >= 2):
        cut = cut or "it has no end line"
        if not partial:
            raise ValueError(f"{path!r} was cut short ({cut}): it holds {len(records)} steps and {len(alerts)} "
                             "alerts before the cut; gradscope.load(path, partial=True) recovers the complete steps")
        if synced is not None:  # a streamed log: every block up to the last sync line is complete
            records = dict(list(records.items())[:synced[0]])
            del alerts[synced[1]:]
        elif records:  # the last step may have lost some of its lines
            records.pop(max(records))
        warnings.warn(f"gradscope: {path!r} was cut short ({cut}); loaded its {len(records)} complete steps and "
                      f"{len(alerts)} alerts (alerts are written after the steps: a file cut before them has none)",
                      RuntimeWarning, stacklevel=2)
    hist = History(max(history or 0, len(records), 2))
    for step in sorted(records):
        hist.append(records[step])
    return Run(meta, hist, alerts)
