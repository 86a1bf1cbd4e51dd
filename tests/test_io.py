"""save()/load(): round trip, pandas-friendly JSON Lines, never unpickles, clear errors on foreign files."""

import json
import math
import pickle

import pytest

import gradscope
from gradscope.record import History, LayerInfo, StepRecord


def test_round_trip(run_file):
    scope, path = run_file
    run = gradscope.load(path)
    assert run.history.steps == scope.history.steps == [0, 2, 4]
    assert [a.to_dict() for a in run.alerts] == [a.to_dict() for a in scope.alerts]
    assert {a.kind for a in run.alerts} == {"vanishing", "nonfinite"}
    as_saved = lambda meta: {**meta, "layers": [e.to_dict() for e in meta["layers"]]}  # noqa: E731
    assert as_saved(run.meta) == json.loads(json.dumps(as_saved(scope.meta)))
    assert run.meta["layers"] == scope.meta["layers"] and all(isinstance(e, LayerInfo) for e in run.meta["layers"])
    for a, b in zip(scope.history, run.history):
        assert a.info == b.info
        for kind in ("layers", "params"):
            x, y = getattr(a, kind), getattr(b, kind)
            assert x.keys() == y.keys()
            for name in x:
                for stat, v in x[name].items():
                    w = y[name][stat]
                    assert (math.isnan(v) and math.isnan(w)) or (not math.isfinite(v) and math.isnan(w)) or v == w
    assert run.summary() == scope.summary()
    assert run.latest().keys() == scope.latest().keys()


def test_file_is_strict_json_lines_with_a_type_per_line(run_file):
    _, path = run_file
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
            for line in path.read_text().splitlines()]
    assert rows[0]["type"] == "meta" and rows[0]["format"] == "gradscope"
    assert {r["type"] for r in rows} == {"meta", "step", "layer", "param", "alert", "end"}
    assert rows[-1] == {"type": "end", "steps": 3, "alerts": sum(r["type"] == "alert" for r in rows)}
    layer_rows = [r for r in rows if r["type"] == "layer" and r["step"] == 4 and r["name"] == "1"]
    assert layer_rows[0]["grad_norm"] is None  # NaN written as null
    assert layer_rows[0]["grad_nonfinite"] > 0


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"hello world\n", "not JSON"),
    (b'{"type": "meta", "format": "wandb"}\n', "first line"),
    (b'[1, 2, 3]\n', "no 'type'"),
    (b'{"type": "meta", "format": "gradscope", "version": 99}\n', "upgrade gradscope"),
    (b'{"type": "meta", "format": "gradscope", "version": "1"}\n', "version must be an int"),
    (b'{"type": "meta", "format": "gradscope", "version": 1, "layers": 5}\n', "layers"),
    (b'{"type": "meta", "format": "gradscope", "version": 1}\n{"type": "step", "step": "3"}\n', "must be an int"),
    (b'{"type": "meta", "format": "gradscope", "version": 1}\n{"type": "layer", "step": 0, "name": "a", "grad_norm": "big"}\n', "not a number"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", "not JSON"),
    (b'{"type": "meta", "format": "gradscope", "version": 1}\n{"type": "layer"}\n', "line 2"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_foreign_or_broken_files_raise_value_error(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        gradscope.load(path)


def test_load_never_unpickles(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("load() unpickled a file",))

    path = tmp_path / "evil.jsonl"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a gradscope log"):
        gradscope.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scope.save"):
        gradscope.load(tmp_path / "nope.jsonl")


def test_history_thinning_covers_the_whole_run_in_bounded_memory():
    h = History(100)
    for step in range(100_000):
        h.append(StepRecord(step, {}))
    assert len(h) <= 100
    steps = h.steps
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] > 95_000
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert len(gaps) == 1  # evenly spaced
    assert h.last.step == 99_999 and h.records()[-1].step == 99_999
    with pytest.raises(ValueError, match="history"):
        History(1)


HUGE = 10**400  # a 401-digit int: JSON holds it, a float cannot


def is_meta(row):
    return row["type"] == "meta"


def of_type(kind):
    return lambda row: row["type"] == kind


def edit_line(path, pick, change, text=None) -> int:
    """Apply ``change`` to the first line of ``text`` (default: the file's) whose parsed row satisfies ``pick``,
    write the result to ``path`` and return that line's number."""
    lines = (path.read_text() if text is None else text).splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if pick(json.loads(line)))
    row = json.loads(lines[i])
    change(row)
    lines[i] = json.dumps(row) + "\n"
    path.write_text("".join(lines))
    return i + 1


def set_layer(j, **fields):
    return lambda row: row["layers"][j].update(fields)


BAD_FIELDS = [  # (which line, its change, what the error says after "line N: ")
    (is_meta, set_layer(2, params="12"), r"meta layer 2 \('3'\): 'params' must be an int"),
    (is_meta, set_layer(2, params=[12]), r"meta layer 2 \('3'\): 'params' must be an int"),
    (is_meta, set_layer(2, params=-1), r"'params' must be an int from 0"),
    (is_meta, set_layer(2, params=HUGE), r"'params' must be an int from 0 to 2\*\*63 - 1, got 1000000000"),
    (is_meta, set_layer(2, depth="2"), r"'depth' must be an int"),
    (is_meta, set_layer(2, depth=2.0), r"'depth' must be an int"),
    (is_meta, set_layer(2, module=5), r"'module' must be a str, got 5"),
    (is_meta, set_layer(2, profile=1), r"'profile' must be a bool, got 1"),
    (is_meta, set_layer(2, role=["gate"]), r"'role' must be a str"),
    (is_meta, set_layer(2, name="1"), r"meta layer 2 \('1'\): layer names must be unique"),
    (is_meta, set_layer(2, name=None), r"string 'name'; entry 2 is"),
    (is_meta, lambda row: row["layers"].append([1]), r"string 'name'; entry \d+ is \[1\]"),
    (is_meta, lambda row: row.update(every=HUGE), r"'every' must be an int from 1 to 2\*\*63 - 1"),
    (is_meta, lambda row: row.update(every=0), r"'every' must be an int from 1"),
    (is_meta, lambda row: row.update(version=0), r"format version must be an int >= 1"),
    (is_meta, lambda row: row.update(model=["x"]), r"'model' must be a string"),
    (is_meta, lambda row: row.update(context=[1]), r"'context' must be an object"),
    (is_meta, lambda row: row["context"].update(eps=HUGE), r"context field 'eps' 1000.* is too large: an int"),
    (is_meta, lambda row: row["context"].update(eps={"a": 1}), r"context field 'eps' is dict, not a number"),
    (of_type("step"), lambda row: row.update(step=HUGE), r"'step' must be an int from 0 to 2\*\*63 - 1"),
    (of_type("step"), lambda row: row.update(step=2**63), r"'step' must be an int from 0 to 2\*\*63 - 1"),
    (of_type("step"), lambda row: row.update(step=-1), r"'step' must be an int from 0"),
    (of_type("step"), lambda row: row.pop("step"), r"'step' is missing"),
    (of_type("step"), lambda row: row.update(grad_scale=HUGE), r"statistic 'grad_scale' 1000.* is too large"),
    (of_type("step"), lambda row: row.update(loss=[1.0]), r"statistic 'loss' is list, not a number"),
    (of_type("layer"), lambda row: row.update(grad_norm=HUGE), r"statistic 'grad_norm' 1000.* is too large"),
    (of_type("layer"), lambda row: row.update(grad_norm=-HUGE), r"statistic 'grad_norm' -1000.* is too large"),
    (of_type("layer"), lambda row: row.update(grad_norm=10**307), r"statistic 'grad_norm' 1000.* is too large"),
    (of_type("layer"), lambda row: row.update(grad_norm=True), r"statistic 'grad_norm' is bool, not a number"),
    (of_type("layer"), lambda row: row.update(grad_norm=[1.0, 2.0]), r"statistic 'grad_norm' is list"),
    (of_type("layer"), lambda row: row.update(through_time=[]), r"'through_time' must be a non-empty list"),
    (of_type("layer"), lambda row: row.update(through_time=3.0), r"'through_time' must be a non-empty list"),
    (of_type("layer"), lambda row: row.update(through_time=[1.0, HUGE]), r"an entry of statistic 'through_time'"),
    (of_type("layer"), lambda row: row.update(through_time=[1.0], through_time_ratio=1.0),
     r"a through_time profile comes with 'through_time_reach'"),
    (of_type("layer"), lambda row: row.update(through_time_reach=None), r"'through_time_reach' must be a finite"),
    (of_type("param"), lambda row: row.update(grad_rms=HUGE), r"statistic 'grad_rms' 1000.* is too large"),
    (of_type("param"), lambda row: row.update(name=7), r"'name' must be a string"),
    (of_type("alert"), lambda row: row.update(value=HUGE), r"alert field 'value' 1000.* is too large: an int"),
    (of_type("alert"), lambda row: row.update(threshold="1e-3"), r"alert field 'threshold' is str, not a number"),
    (of_type("alert"), lambda row: row.update(value=False), r"alert field 'value' is bool, not a number"),
    (of_type("alert"), lambda row: row.update(step=HUGE), r"alert field 'step' must be an int from 0"),
    (of_type("alert"), lambda row: row.update(kind=3), r"alert field 'kind' must be a string, got 3"),
    (of_type("alert"), lambda row: row.pop("hint"), r"alert field 'hint' is missing"),
    (of_type("alert"), lambda row: row.update(related="1"), r"alert field 'related' must be a list"),
    (of_type("end"), lambda row: row.update(steps=HUGE), r"'steps' must be an int from 0"),
    (of_type("layer"), lambda row: row.update(name="\ud800"), r"escaped lone surrogate '\\ud800', not text"),
]


def test_wrong_typed_or_huge_fields_are_refused_naming_their_line(run_file):
    _, saved = run_file
    text = saved.read_text()
    for pick, change, match in BAD_FIELDS:  # one saved run for all: a loop, not a parametrised test
        path = saved.parent / "edited.jsonl"
        n = edit_line(path, pick, change, text)
        for partial in (False, True):
            with pytest.raises(ValueError, match=rf"line {n}: .*{match}"):
                gradscope.load(path, partial=partial)


def test_json_number_traps(run_file):
    """NaN/Infinity literals and 1e999 are numbers (nan, inf); an int of over 4300 digits is not JSON Python reads."""
    _, path = run_file
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "layer")
    row = json.loads(lines[n])
    lines[n] = lines[n].replace(json.dumps(row["grad_norm"]), "NaN", 1).replace(
        json.dumps(row["grad_rms"]), "Infinity", 1).replace(json.dumps(row["backprop_signal"]), "1e999", 1)
    path.write_text("".join(lines))
    st = gradscope.load(path).history[0].layers[row["name"]]
    assert math.isnan(st["grad_norm"]) and st["grad_rms"] == math.inf and st["backprop_signal"] == math.inf
    lines[n] = lines[n].replace("NaN", "1" * 5000, 1)
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"line {n + 1} is not JSON \(Exceeds the limit"):
        gradscope.load(path)


def test_a_file_that_is_not_utf8_names_its_line(run_file):
    _, path = run_file
    lines = path.read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b'"name"', b'"n\xffme"')
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"not UTF-8 text\): line 7: .* invalid start byte"):
        gradscope.load(path)


def test_a_loaded_run_with_extreme_values_is_usable(run_file):
    """Values at the edges of what load() accepts: the reading API and a figure still work."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    _, path = run_file
    edit_line(path, is_meta, lambda row: row.update(every=2**63 - 1, context={"eps": 1e308, "x": None},
                                                    layers=row["layers"] + [{"name": "extra", "params": 2**63 - 1,
                                                                             "odd": [HUGE, {"a": [None]}]}]))
    edit_line(path, of_type("layer"), lambda row: row.update(grad_norm=2**63 - 1, grad_zero_frac=1 - 2**63,
                                                             backprop_signal=1e308, grad_rms=-math.inf))
    edit_line(path, of_type("alert"), lambda row: row.update(value=2**63 - 1, threshold=None))
    run = gradscope.load(path)
    assert run.layer_names[-1] == "extra" and run.meta["layers"][-1]["odd"][0] == HUGE  # unknown keys are kept
    assert "collected every 9223372036854775807" in run.summary()
    run.latest(), run.depth_profile(), run.decay_factor(), run.signal_ratio()
    plt.close(run.plot("flow"))


def test_save_refuses_a_path_that_is_not_a_regular_file(run_file, tmp_path):
    """Saving replaces the file at the path: a FIFO or directory there (or /dev/null, for a root user) must be left
    alone, not replaced by a regular file."""
    import os
    import stat

    scope, _ = run_file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        scope.save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(ValueError, match="not a regular file"):
        scope.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_history_keeps_records_packed_and_reads_them_back_equal():
    from array import array

    h = History(4)
    recs = []
    for s in range(9):
        layers = {"a": {"grad_norm": 0.1 * s, "dead_units": s, "huge": 2**60 + s},
                  "rnn": {"through_time_ratio": 1e-40, "through_time": array("f", [1.0, 2.0 + s])}}
        params = {"a.weight": {"grad_norm": float("nan"), "grad_nonfinite": 3}}
        recs.append(StepRecord(s, layers, params, {"grad_scale": 1.0, "overflow": False, "holding.vanishing": 2}))
        h.append(recs[-1])
    assert h.steps == [0, 4, 8] and h.last is recs[-1] and len(h) == 3  # thinned as before
    for got, want in zip(h, [recs[0], recs[4], recs[8]]):
        assert got.step == want.step and got.info == want.info and list(got.layers) == list(want.layers)
        for name in want.layers:
            assert list(got.layers[name]) == list(want.layers[name])  # the same statistics, in the same order
            for stat, v in want.layers[name].items():
                assert type(got.layers[name][stat]) is type(v) and got.layers[name][stat] == v
        assert math.isnan(got.params["a.weight"]["grad_norm"]) and got.params["a.weight"]["grad_nonfinite"] == 3
    assert h[-1].layers["a"]["huge"] == 2**60 + 8  # an int beyond 2**53 stays exact
    assert h._records[0].columns is h._records[-1].columns  # one column list while the layout stays the same
    assert h.records()[-1] is recs[-1]


def test_history_reuses_the_layout_only_while_names_statistics_and_types_match():
    h = History(100)
    rows = [{"grad_norm": 0.5, "dead_units": 3}, {"grad_norm": 0.25, "dead_units": 4},  # same layout
            {"grad_norm": 0.25, "dead_units": 4.0},  # an int column now holds a float
            {"grad_norm": 0.125, "dead_units": 2**53 + 1},  # an int beyond float's exact range
            {"grad_norm": 1.0, "dead_units": 5}, {"dead_units": 5, "grad_norm": 1.0},  # the same keys, reordered
            {"grad_norm": "n/a", "dead_units": 6}, {"grad_norm": 2.0, "dead_units": 7, "units": 8}]
    recs = []
    for s, row in enumerate(rows):
        recs.append(StepRecord(s, {"a": dict(row)}, {"a": {"grad_norm": 1.5 * s, "grad_nonfinite": s}}))
        h.append(recs[-1])
    for got, want in zip(h, recs):
        for part in ("layers", "params"):
            g, w = getattr(got, part)["a"], getattr(want, part)["a"]
            assert list(g.items()) == list(w.items()) and [type(v) for v in g.values()] == [type(v) for v in w.values()]
    assert h._records[0].columns is h._records[1].columns and h._records[1].values.itemsize == 8


def test_history_packs_through_time_profiles_without_a_loop_per_value(monkeypatch):
    """A recurrent model's records hold a profile (an array) per step: the layout is still reused, the profiles kept
    by position, and a record whose layout or types differ is packed value by value again."""
    from array import array

    h, each = History(100), []
    real = History._pack_each
    monkeypatch.setattr(History, "_pack_each", lambda self, record: each.append(record.step) or real(self, record))
    profiles = [array("f", [1.0, 2.0]), array("f", [3.0, 4.0]), array("f", [5.0, 6.0, 7.0]), "n/a",
                array("f", [8.0]), array("f", [9.0])]
    recs = []
    for s, profile in enumerate(profiles):
        layers = {"rnn": {"grad_norm": 0.5 * s, "through_time": profile, "units": s + 2 ** 60 * (s == 5)}}
        recs.append(StepRecord(s, layers, {"rnn.w": {"grad_norm": 0.25 * s, "grad_nonfinite": s}}))
        h.append(recs[-1])
    assert each == [0, 3, 4, 5]  # first, a string where a profile was, back to a profile, an int beyond 2**53
    for got, want in zip(h, recs):
        assert got.layers == want.layers and got.params == want.params
        assert [type(v) for v in got.layers["rnn"].values()] == [type(v) for v in want.layers["rnn"].values()]
    assert h[2].layers["rnn"]["through_time"] == array("f", [5.0, 6.0, 7.0])
    assert h._records[1].values.itemsize == 8 and math.isnan(h._records[1].values[1])  # a profile's slot


def test_history_costs_at_most_16_bytes_per_value_on_a_real_run():
    import torch
    import torch.nn.functional as F

    from gradscope.bench.models import deep_mlp

    model = deep_mlp(20, 64, "relu", init="kaiming", in_features=32)
    scope = gradscope.watch(model, history=100)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    for _ in range(30):
        F.cross_entropy(model(x), y).backward()
        scope.step()
        model.zero_grad()
    values = sum(len(st) for r in scope.history for part in (r.layers, r.params) for st in part.values())
    per_value = scope.history.nbytes() / values
    assert values > 30 * 100 and per_value <= 16, per_value
    scope.detach()


def test_history_records_are_unpacked_once_per_append():
    h = History(10)
    for s in range(3):
        h.append(StepRecord(s, {"a": {"grad_norm": float(s)}}))
    first, again = h.records(), h.records()
    assert first == again and first is not again and all(x is y for x, y in zip(first, again))
    first.append("mine")  # a caller's list is its own
    assert len(h.records()) == 3
    h.append(StepRecord(3, {"a": {"grad_norm": 3.0}}))
    fresh = h.records()
    assert [r.step for r in fresh] == [0, 1, 2, 3] and fresh[0] is not first[0] and fresh[-1] is h.last
