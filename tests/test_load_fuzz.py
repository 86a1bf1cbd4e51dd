"""Fuzzing load() (issue 12, item 5): thousands of seeded mutations of real saved runs.

Every mutated file must either load, or be refused with a ValueError that names its line (or says the file is empty,
not UTF-8, or cut short); ``partial=True`` must behave alike except that it recovers a cut file with a RuntimeWarning.
A run that loads must be usable: the reading API never raises on it. A failure prints the case number, which
reproduces it alone: ``mutate(base, random.Random(SEED * 1_000_003 + case))``.
"""

import json
import random
import re
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.bench.models import deep_mlp

SEED = 12
CASES = 3000
# values a JSON-level mutation puts in place of another (10**400 and 1e308 written as they are, nan as NaN)
ODD_VALUES = ["x", "", "\ud800", [], [1, "a"], [None], {}, {"a": 1}, None, True, False, 0, -1, 2**63 - 1, 2**63,
              10**307, 10**400, -10**400, 1.5, -0.0, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
ODD_BYTES = [b"\n", b"{", b"}", b'"', b",", b":", b" ", b"\r", b"\x00", b"\xff", b"\xc3", b"\\ud800", b"NaN",
             b"-Infinity", b"1e999", b"null", b"true", b"[]", b"9" * 400, b"9" * 5000, b"[" * 3000]


class Seq(nn.Module):
    """A vanilla RNN (through_time profiles), a functional ReLU call site and a sigmoid gate (a "role" entry)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 6, batch_first=True)
        self.gate = nn.Sequential(nn.Linear(6, 6), nn.Sigmoid())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.rnn(x)[0][:, -1])
        return self.head(h * self.gate(h))


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of three real logs: a sigmoid MLP with vanishing and nonfinite alerts (a NaN input at the last
    collected step; the optional statistics too), and a small recurrent model with a gradient-spike alert, saved and
    streamed as it trained (log_to: sync lines after every step)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz-base")
    model = deep_mlp(5, 4, "sigmoid", in_features=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, every=2, optimizer=opt, update_ratio=True, extra_stats="all",
                            detectors=[gradscope.Vanishing(patience=1), gradscope.Nonfinite()])
    for step in range(5):
        x = torch.randn(4, 5)
        if step == 4:
            x[0, 0] = float("nan")
        F.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
        opt.step()  # the scope collects on the optimizer's step
        opt.zero_grad()
    scope.detach()
    assert {a.kind for a in scope.alerts} == {"vanishing", "nonfinite"}
    scope.save(folder / "mlp.jsonl")

    model = Seq()
    scope = gradscope.watch(model, dead_window=2, log_to=folder / "stream.jsonl")
    for step in range(4):
        loss = F.cross_entropy(model(torch.randn(4, 8, 3)), torch.randint(0, 2, (4,)))
        (loss * (1e4 if step == 3 else 1.0)).backward()  # a gradient spike: an alert that names related layers
        scope.step()
        model.zero_grad()
    scope.detach()
    assert "through_time" in scope.latest()["rnn"] and any(e.get("role") for e in scope.meta["layers"])
    assert any(a.related for a in scope.alerts)
    scope.save(folder / "seq.jsonl")
    assert '"type": "sync"' in (folder / "stream.jsonl").read_text()
    return {name: (folder / f"{name}.jsonl").read_bytes() for name in ("mlp", "seq", "stream")}


# Mutations: each takes (rng, data) and returns (mutated data, what it did).

def _truncate(rng, data):
    at = rng.randrange(len(data) + 1)
    return data[:at], f"truncate at byte {at}"


def _flip_bits(rng, data):
    data = bytearray(data)
    spots = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(rng.randint(1, 3))]
    for at, bit in spots:
        data[at] ^= 1 << bit
    return bytes(data), f"flip (byte, bit) {spots}"


def _delete_bytes(rng, data):
    at = rng.randrange(len(data))
    n = rng.randint(1, 20)
    return data[:at] + data[at + n:], f"delete {n} bytes at {at}"


def _insert_bytes(rng, data):
    at = rng.randrange(len(data) + 1)
    piece = rng.choice(ODD_BYTES) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return data[:at] + piece + data[at:], f"insert {piece[:20]!r}{'...' if len(piece) > 20 else ''} at {at}"


def _lines_op(rng, data):
    lines = data.splitlines(keepends=True)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(["swap", "delete", "duplicate"])
    if op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
        what = f"swap lines {i + 1} and {j + 1}"
    elif op == "delete":
        del lines[i]
        what = f"delete line {i + 1}"
    else:
        lines.insert(j, lines[i])
        what = f"copy line {i + 1} before line {j + 1}"
    return b"".join(lines), what


def _slots(obj, depth=0):
    """``(container, key)`` for every value inside a parsed line, nested ones (the meta's layer table) included."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for k, v in items:
        out.append((obj, k))
        if depth < 3:
            out += _slots(v, depth + 1)
    return out


def _json_op(rng, data):
    """Change one value of one line at the JSON level: replace it by an odd value, delete it, or add a key."""
    lines = data.splitlines(keepends=True)
    i = 0 if rng.random() < 0.25 else rng.randrange(len(lines))
    try:
        row = json.loads(lines[i])
    except ValueError:
        return _flip_bits(rng, data)  # an earlier mutation broke this line
    slots = _slots(row)
    if not slots:
        return _flip_bits(rng, data)
    container, key = rng.choice(slots)
    op = rng.choice(["swap", "swap", "delete", "add"])
    value = rng.choice(ODD_VALUES)
    if op == "swap":
        container[key] = value
    elif op == "delete":
        del container[key]
    else:
        dicts = [c for c, _ in slots if isinstance(c, dict)] or [row]
        names = sorted({k for c in dicts for k in c} | {"extra", "through_time", "step", "name", "related"})
        key = rng.choice(names)
        rng.choice(dicts)[key] = value
    lines[i] = json.dumps(row).encode() + b"\n"
    return b"".join(lines), f"json line {i + 1}: {op} {key!r}" + (f" = {repr(value)[:30]}" if op != "delete" else "")


MUTATIONS = [_truncate, _flip_bits, _delete_bytes, _insert_bytes, _lines_op, _json_op, _json_op, _json_op]


def mutate(base: dict[str, bytes], rng: random.Random) -> tuple[str, bytes, str]:
    """``(name of the base run, mutated bytes, what was done)``: one to three mutations of one base run."""
    name = rng.choice(sorted(base))
    data, done = base[name], []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        data, what = rng.choice(MUTATIONS)(rng, data)
        done.append(what)
    return name, data, "; ".join(done)


def _load(path, partial):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return gradscope.load(path, partial=partial), None, caught
        except ValueError as e:
            return None, e, caught


FILE_LEVEL = ("is empty", "cut short")  # the refusals that are about the whole file, not one line


def use(run) -> None:
    """The reading API on a loaded run: none of it may raise."""
    run.summary().encode("utf-8")  # also: printable, writable to a UTF-8 report page
    run.latest()
    run.latest("param")
    assert all(isinstance(n, str) for n in run.layer_names)
    for a in run.alerts:
        str(a).encode("utf-8")
    for rec in [None, *run.history.records()]:
        run.depth_profile(rec)
        run.decay_factor(rec)
        run.signal_ratio(rec)


def check(path, data: bytes):
    """Load ``data`` both ways and use what loads: ``(run or None, "loaded" | "recovered" | "refused")``."""
    path.write_bytes(data)
    run, error, caught = _load(path, partial=False)
    assert not caught, f"load() warned: {[str(w.message) for w in caught]}"
    if error is not None:
        msg = str(error)
        assert re.search(r"line \d+", msg) or any(s in msg for s in FILE_LEVEL), f"no line number in: {msg}"
    recovered, partial_error, partial_caught = _load(path, partial=True)
    if error is None:
        assert recovered is not None and not partial_caught, f"partial=True refused a complete file: {partial_error}"
        assert recovered.history.steps == run.history.steps
        how = "loaded"
    elif "cut short" in str(error):
        assert recovered is not None, f"partial=True refused a cut file: {partial_error}"
        assert [w.category for w in partial_caught] == [RuntimeWarning]
        assert "cut short" in str(partial_caught[0].message)
        run, how = recovered, "recovered"
    else:
        assert str(partial_error) == str(error) and not partial_caught, f"partial=True said {partial_error}"
        how = "refused"
    if run is not None:
        use(run)
    return run, how


def _around_change(orig: bytes, data: bytes) -> str:
    """The mutated file around its first difference from the run it came from."""
    at = next((k for k, (x, y) in enumerate(zip(orig, data)) if x != y), min(len(orig), len(data)))
    return f"bytes {max(0, at - 150)}..{at + 150} of {len(data)}: {data[max(0, at - 150):at + 150]!r}"


def test_load_survives_thousands_of_mutations(saved_runs, tmp_path):
    for name, data in saved_runs.items():  # the runs themselves load cleanly
        assert check(tmp_path / f"{name}.jsonl", data)[1] == "loaded", name
    path = tmp_path / "mutated.jsonl"
    outcomes = {"loaded": 0, "recovered": 0, "refused": 0}
    usable = []  # mutated runs that loaded with a collected step
    start, cpu = time.perf_counter(), time.process_time()
    for case in range(CASES):
        name, data, what = mutate(saved_runs, random.Random(SEED * 1_000_003 + case))
        try:
            run, how = check(path, data)
        except Exception as e:
            raise AssertionError(f"case {case} ({name}: {what}): {type(e).__name__}: {e}\n"
                                 f"{_around_change(saved_runs[name], data)}") from e
        outcomes[how] += 1
        if run is not None and run.history.last is not None and data != saved_runs[name]:
            usable.append((case, name, what, data))
    assert outcomes["refused"] > CASES // 4 and outcomes["loaded"] > CASES // 10, (
        f"{CASES} mutated files in {time.perf_counter() - start:.1f}s ({time.process_time() - cpu:.1f}s CPU): "
        f"{outcomes}")

    # the gradient-flow figure of a few mutated runs that loaded, after JSON-level changes of the meta line first
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    meta_edits = [c for c in usable if "json line 1:" in c[2]]
    picks = meta_edits[:3] + [c for c in usable if "json line" in c[2] and c not in meta_edits][:2]
    assert len(picks) == 5
    for case, name, what, data in picks:
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            run = gradscope.load(path, partial=True)
        try:
            plt.close(run.plot("flow"))
        except Exception as e:
            raise AssertionError(f"plot of case {case} ({name}: {what}): {type(e).__name__}: {e}\n"
                                 f"{_around_change(saved_runs[name], data)}") from e
