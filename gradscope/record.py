"""What one collected step holds (:class:`StepRecord`), the layer table it follows (:class:`LayerInfo`), the bounded
history of steps, and the few readings of a record every layer above shares (:func:`signal_profile`,
:func:`layer_scalars`). A leaf: it imports nothing from gradscope, so the detectors, rendering and the run API all
build on it.
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Iterator


@dataclass
class StepRecord:
    """Everything collected at one step.

    Attributes:
        step: index of the step (0-based count of ``scope.step()`` calls before this one).
        layers: ``{name: {statistic: float}}`` per layer / call site, in forward order.
        params: ``{qualified parameter name: {statistic: float}}``.
        info: step-level facts, e.g. ``{"grad_scale": 1.0, "overflow": False}``.
    """

    step: int
    layers: dict[str, dict[str, float]]
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerInfo:
    """One entry of the layer table (``meta["layers"]``): a layer or call site, in forward order.

    Attributes:
        name: the module's qualified name (``"layer1.0.conv1"``), a call site of a module run twice
            (``"relu#2"``), or a functional call inside a module's forward (``"block:relu"``); ``""`` is the root.
        module: the module class (``"Conv2d"``), or ``"F.relu"`` for a functional call.
        params: the trainable parameters it owns (0 for a second call site or a functional call).
        profile: whether it is a point of the depth profile (leaf modules and parameterised ones).
        role: ``"gate"`` for a sigmoid/tanh that is meant to saturate (older logs: also ``"inner"``)
            (:func:`gradscope.anatomy.activation_role`), else None.
        depth: its position in forward order.
        extra: fields of a loaded log this version does not know, kept as they were.

    Also readable as the mapping it is saved as (``info["name"]``, ``info.get("role")``).
    """

    name: str
    module: str = ""
    params: int = 0
    profile: bool = False
    role: str | None = None
    depth: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, entry) -> "LayerInfo":
        """``entry`` as a LayerInfo: one already is, a dict (a saved table's entry) is read field by field."""
        if isinstance(entry, LayerInfo):
            return entry
        known = {k: entry[k] for k in _LAYER_KEYS if k in entry}
        return cls(**known, extra={k: v for k, v in entry.items() if k not in _LAYER_KEYS})

    def to_dict(self) -> dict:
        """The entry as it is saved: the fields that are set, then the unknown ones of a loaded log."""
        out = {"name": self.name, "module": self.module, "params": self.params, "profile": self.profile}
        if self.role is not None:
            out["role"] = self.role
        if self.depth is not None:
            out["depth"] = self.depth
        return {**out, **self.extra}

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str):
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]


_LAYER_KEYS = ("name", "module", "params", "profile", "role", "depth")


def layer_table(entries) -> list[LayerInfo]:
    """A layer table (dicts of a saved log, or LayerInfo) as a list of :class:`LayerInfo`."""
    return [LayerInfo.of(e) for e in entries]


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def layer_scalars(record: "StepRecord", stats) -> list[tuple[str, str, float]]:
    """``(statistic, layer, value)`` for each of ``stats`` a layer of ``record`` has with a finite value, the root
    module named ``"(root)"``: what loggers (TensorBoard, Lightning's) write per step."""
    return [(stat, name or "(root)", float(st[stat])) for name, st in record.layers.items()
            for stat in stats if _finite(st.get(stat))]


def signal_profile(record: StepRecord, layers: list[LayerInfo]) -> list[tuple[str, float]]:
    """``[(layer, backprop_signal)]`` for parameterised layers with a finite signal, input side first."""
    out = []
    get = record.layers.get
    for e in layers:
        if e.params and (st := get(e.name)) is not None:
            s = st.get("backprop_signal")
            if s is not None and _finite(s):
                out.append((e.name, s))
    return out


class History:
    """Collected steps in bounded memory.

    Holds at most ``max_records`` records. When full it drops every other record and from then on keeps every second
    offered record (then every fourth, ...), so the whole run stays covered at a coarser step resolution and memory
    never grows. The newest record is always available as ``history.last`` even if thinning skipped it.

    Records are kept packed: the numbers of a record are one ``array('d')`` (8 bytes each, float64 so a float64
    model's tiny gradients survive), laid out by a column list shared with the records before it while the model's
    layers and statistics stay the same; a through-time profile stays the ``array('f')`` it is. Reading
    (``history[i]``, iterating, :meth:`records`) gives :class:`StepRecord` objects equal to those appended.
    """

    def __init__(self, max_records: int = 2000):
        if not isinstance(max_records, int) or max_records < 2:
            raise ValueError(f"history size must be an int >= 2, got {max_records!r}; pass e.g. history=2000")
        self.max_records = max_records
        self.stride = 1
        self._offered = 0
        self._records: list[_Packed] = []
        self._last_kept = False
        self._columns: tuple | None = None  # the column list of the newest packed record, reused while it fits
        self._shape: tuple | None = None  # what decides that list: the layers' and parameters' names and keys
        self._types: tuple = ()  # and the types of the values in it
        self._ints = None  # a getter of the int columns' values (operator.itemgetter), or None
        self._others: list = []  # the positions of the columns that are not numbers (through-time profiles)
        self._read: list | None = None  # records() unpacked, kept until the next append: readers call it often
        self.last: StepRecord | None = None

    def append(self, record: StepRecord) -> None:
        self.last = record
        self._last_kept = False
        self._read = None
        if self._offered % self.stride == 0:
            if len(self._records) >= self.max_records:
                self._records = self._records[::2]
                self.stride *= 2
                if self._offered % self.stride != 0:
                    self._offered += 1
                    return
            self._records.append(self._pack(record))
            self._last_kept = True
        self._offered += 1

    def _pack(self, record: StepRecord) -> "_Packed":
        # the usual case: the same layers, statistics and value types as the record before, every int exact as a
        # float: the column list is reused and the numbers copied in one go (no loop per value)
        if self._shape is None:
            return self._pack_each(record)
        shape, values = _shape_and_values(record)
        if tuple(shape) != self._shape or tuple(map(type, values)) != self._types:
            return self._pack_each(record)
        if self._ints is not None:
            ints = self._ints(values)
            if max(ints) >= _EXACT or min(ints) <= -_EXACT:
                return self._pack_each(record)
        other = None
        if self._others:  # a through-time profile: kept as it is, by its position
            other = {k: values[k] for k in self._others}
            for k in self._others:
                values[k] = math.nan
        return _Packed(record.step, self._columns, array("d", values), other, dict(record.info))

    def _pack_each(self, record: StepRecord) -> "_Packed":
        columns, values, other = [], array("d"), {}
        for part, table in ((0, record.layers), (1, record.params)):
            for name, stats in table.items():
                for stat, v in stats.items():
                    if type(v) is float:
                        columns.append((part, name, stat, _FLOAT))
                        values.append(v)
                    elif type(v) is int and -_EXACT < v < _EXACT:  # a count: exact as a float, an int again on reading
                        columns.append((part, name, stat, _INT))
                        values.append(v)
                    else:  # a through-time profile (an array('f') already), an int beyond 2**53, anything else
                        columns.append((part, name, stat, _OTHER))
                        values.append(math.nan)
                        other[len(values) - 1] = v
        columns = tuple(columns)
        if columns != self._columns:  # usually equal: the same layers and statistics as the record before
            self._columns = columns
        shape, raw = _shape_and_values(record)
        self._shape = tuple(shape)
        self._types = tuple(map(type, raw))
        self._others = list(other)
        ints = [k for k, c in enumerate(columns) if c[3] == _INT]
        self._ints = None if not ints else itemgetter(*ints) if len(ints) > 1 else (lambda v, k=ints[0]: (v[k],))
        return _Packed(record.step, self._columns, values, other or None, dict(record.info))

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StepRecord]:
        return (p.unpack() for p in self._records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [p.unpack() for p in self._records[i]]
        return self._records[i].unpack()

    def __bool__(self) -> bool:
        return bool(self._records)

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self._records]

    def records(self) -> list[StepRecord]:
        """Kept records plus the newest one if thinning skipped it. Unpacked once per appended record: the list is
        kept until the next :meth:`append` (a report reads it several times), and each call returns a copy of it."""
        if self._read is None:
            out = [p.unpack() for p in self._records]
            if self.last is not None:
                if self._last_kept:
                    out[-1] = self.last
                else:
                    out.append(self.last)
            self._read = out
        return list(self._read)

    def nbytes(self) -> int:
        """The memory the kept records take (their numbers, column lists counted once, profiles and facts), in bytes:
        what ``history`` costs beside the newest record."""
        seen, total = set(), 0
        for p in self._records:
            total += sys.getsizeof(p) + p.values.buffer_info()[1] * p.values.itemsize + sys.getsizeof(p.info)
            if id(p.columns) not in seen:
                seen.add(id(p.columns))
                total += sys.getsizeof(p.columns) + sum(sys.getsizeof(c) for c in p.columns)
            for v in (p.other or {}).values():
                total += sys.getsizeof(v)
        return total


def _shape_and_values(record: StepRecord) -> tuple[list, list]:
    """``(shape, values)`` of a record: what decides its columns in a packed record (each layer's, then each
    parameter's, name, number of statistics and their keys: a flat list, unambiguous since a count is no name) and
    its values in that order."""
    shape, values = [], []
    for table in (record.layers, record.params):
        shape.append(None)  # between the parts: a parameter may share a layer's name
        for name, stats in table.items():
            shape.append(name)
            shape.append(len(stats))
            shape.extend(stats)
            values.extend(stats.values())
    return shape, values


_FLOAT, _INT, _OTHER = 0, 1, 2
_EXACT = 2**53  # ints below this in size are exact as floats


class _Packed:
    """One kept record: its step, a shared column list ``(part, name, statistic, type)`` (part 0: layers, 1:
    parameters), the numbers in that order, the values that are not numbers by their position, and the step's
    facts."""

    __slots__ = ("step", "columns", "values", "other", "info")

    def __init__(self, step, columns, values, other, info):
        self.step, self.columns, self.values, self.other, self.info = step, columns, values, other, info

    def unpack(self) -> StepRecord:
        parts: tuple[dict, dict] = ({}, {})
        other = self.other or {}
        for k, ((part, name, stat, kind), v) in enumerate(zip(self.columns, self.values)):
            table = parts[part]
            stats = table.get(name)
            if stats is None:
                stats = table[name] = {}
            stats[stat] = v if kind == _FLOAT else int(v) if kind == _INT else other[k]
        return StepRecord(self.step, parts[0], parts[1], dict(self.info))
