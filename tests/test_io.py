"""save()/load(): round trip, pandas-friendly JSON Lines, never unpickles, clear errors on foreign files."""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.models import deep_mlp
from gradscope.record import History, StepRecord


def test_round_trip(run_file):
    scope, path = run_file
    run = gradscope.load(path)
    assert run.history.steps == scope.history.steps == [0, 2, 4]
    assert [a.to_dict() for a in run.alerts] == [a.to_dict() for a in scope.alerts]
    assert {a.kind for a in run.alerts} == {"vanishing", "nonfinite"}
    assert run.meta == json.loads(json.dumps(scope.meta))
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
