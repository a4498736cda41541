"""Fuzz the service's core path: any record is summarised or dead-lettered, nothing else happens.

The invariant (h11's fuzz rule): for every input record, ``Decoder.decode``
returns an event, which ``Monitor.ingest`` takes, or raises ``InvalidEvent`` with a reason from
``REASONS``, which the service turns into a dead letter. Any other exception, and any warning, is a
bug. The path is the one ``service.Service._consume`` and ``_tick`` run, without Kafka.

Inputs come from one generator written against a small ``Source`` of choices, driven twice: by a
seeded ``random.Random`` (10,240 records: cheap, deterministic, every outcome reached) and by
hypothesis (``st.data()``: exploration with shrinking). Records: random bytes and tombstones,
arbitrary JSON objects, valid events of all six types (extreme finite floats included), and valid
events with exactly one mutation whose outcome is known — a missing or wrong-typed field, a
NaN/Infinity/1e999 token, an array beyond ``max_array``, unequal or ragged arrays, a label out of
range, a negative time, a bad or mismatching key, truncated bytes, a non-object, an unknown type,
an over-long run id, or unknown extra fields (accepted). The monitor has a small ``max_runs`` and
``idle_timeout``, so capacity and idle eviction happen all the time. Counters must add up; every
summary and every dead letter must validate against its schema; every stream that received data in
a batch must be summarised at the next tick.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metricsd.config import MonitorSettings
from metricsd.events import REASONS, TASKS, Decoder, InvalidEvent
from metricsd.monitor import Monitor
from metricsd.records import dead_letter, encode
from test_schemas import validator

T = TypeVar("T")
Doc = dict[str, Any]
Case = tuple[bytes | None, bytes | None, str | None]  # key, value, expected ("ok", reason, None)

MAX_ARRAY = 32
MAX_CLASSES = 5
SETTINGS = MonitorSettings(
    window=8,
    time_windows=(5.0,),
    max_array=MAX_ARRAY,
    max_classes=MAX_CLASSES,
    max_runs=12,
    idle_timeout=3.0,
)
RUNS = [f"run-{i}" for i in range(24)]
SPLITS = ["val", "test", "train", *(f"s{i}" for i in range(9))]  # more than MAX_SPLITS
SUMMARY_SCHEMA = validator("summary")
DEAD_LETTER_SCHEMA = validator("dead_letter")
BATCH = 40  # records per consumed batch
TICK = 2.0  # seconds of processing time between batches (idle_timeout is 3)

# Finite floats that break naive arithmetic: overflow in sums and squares, underflow, cancellation.
EXTREMES = [0.0, -0.0, 5e-324, 2.2e-308, 1e-300, 0.5, 1.0, 2.0**53, 1e16, 1e154, 1e300,
            1.7976931348623157e308, -1.7976931348623157e308, -1e300, -1.0]  # fmt: skip
# Code points for text: ASCII, controls, Latin-1 to CJK, emoji (no surrogates: not encodable).
_TEXT_RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FFF), (0x1F600, 0x1F64F)]


# -- a source of choices: seeded random or hypothesis ---------------------------------------------
class Seeded:
    """Choices from ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def choice(self, options: Sequence[T]) -> T:
        return self.r.choice(options)

    def integer(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def real(self, *, nonneg: bool = False) -> float:
        x = self.r.random()
        if x < 0.15:
            value = self.r.choice(EXTREMES)
        elif x < 0.6:
            value = self.r.uniform(0.0, 10.0)
        else:
            value = self.r.gauss(0.0, 1.0) * 10.0 ** self.r.randint(-8, 8)
        return abs(value) if nonneg else value

    def text(self, lo: int, hi: int) -> str:
        ranges = [self.r.choice(_TEXT_RANGES) for _ in range(self.r.randint(lo, hi))]
        return "".join(chr(self.r.randint(a, b)) for a, b in ranges)

    def raw(self, hi: int) -> bytes:
        return self.r.randbytes(self.r.randint(0, hi))


class Drawn:
    """The same choices drawn by hypothesis (so that failures shrink)."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        result: T = self.draw(st.sampled_from(options))
        return result

    def integer(self, lo: int, hi: int) -> int:
        result: int = self.draw(st.integers(lo, hi))
        return result

    def real(self, *, nonneg: bool = False) -> float:
        floats = st.floats(min_value=0.0 if nonneg else None, allow_nan=False, allow_infinity=False)
        result: float = self.draw(floats | st.sampled_from(EXTREMES).map(abs if nonneg else float))
        return result

    def text(self, lo: int, hi: int) -> str:
        result: str = self.draw(st.text(min_size=lo, max_size=hi))
        return result

    def raw(self, hi: int) -> bytes:
        result: bytes = self.draw(st.binary(max_size=hi))
        return result


Source = Seeded | Drawn


# -- valid events ---------------------------------------------------------------------------------
def _list(src: Source, n: int, item: Callable[[], Any]) -> list[Any]:
    return [item() for _ in range(n)]


def _matrix(src: Source, item: Callable[[], float]) -> list[Any]:
    """A flat list (one row) or a rectangular list of rows."""
    if src.choice([True, False]):
        return _list(src, src.integer(1, 6), item)
    cols = src.integer(1, 6)
    return [_list(src, cols, item) for _ in range(src.integer(1, 3))]


def valid_doc(src: Source) -> Doc:
    """One valid event document of any of the six types."""
    kind = src.choice(["batch_time", "prediction", "cv_fold", "attention", "features", "run_end"])
    run_id = src.choice(RUNS) if src.integer(0, 9) else src.text(1, 12)
    doc: Doc = {"type": kind, "run_id": run_id}
    if src.choice([True, False]):
        doc["ts"] = src.choice([None, 1.764e9 + src.integer(0, 100), src.real(nonneg=True)])
    if kind == "batch_time":
        n = src.integer(0, 8)
        doc["seconds"] = _list(src, n, lambda: src.real(nonneg=True)) or src.real(nonneg=True)
        if src.choice([True, False]):
            doc["step"] = src.choice([None, src.integer(0, 10**6), 2**63 - 1])
    elif kind == "prediction":
        task = doc["task"] = src.choice(TASKS)
        label: Callable[[], Any] = {
            "binary": lambda: src.integer(0, 1),
            "multiclass": lambda: src.choice([src.integer(0, MAX_CLASSES - 1), 1.0]),
            "regression": lambda: src.real(),
        }[task]
        n = src.integer(1, 8)
        doc["y_true"], doc["y_pred"] = _list(src, n, label), _list(src, n, label)
        if src.choice([True, False]):
            doc["split"] = src.choice([None, *SPLITS])
    elif kind == "cv_fold":
        doc["fold"] = src.choice([src.integer(0, 10), 2**63 - 1, 3.0])
        doc["train_loss"], doc["val_loss"] = src.real(), src.real()
    elif kind == "attention":
        doc["weights"] = _matrix(src, lambda: src.real(nonneg=True))
    elif kind == "features":
        doc["values"] = _matrix(src, lambda: src.real())
    return doc


def json_value(src: Source, depth: int = 0) -> Any:
    """Any JSON value (orjson-encodable: integers within 64 bits)."""
    shapes = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    shape = src.choice(shapes)
    if shape == "list":
        return [json_value(src, depth + 1) for _ in range(src.integer(0, 3))]
    if shape == "dict":
        return {src.text(0, 4): json_value(src, depth + 1) for _ in range(src.integer(0, 3))}
    return {
        "null": lambda: None,
        "bool": lambda: src.choice([True, False]),
        "int": lambda: src.choice([src.integer(-5, 5), -(2**63), 2**64 - 1]),
        "float": lambda: src.real(),
        "str": lambda: src.text(0, 6),
    }[shape]()


# -- mutations with a known outcome ---------------------------------------------------------------
REQUIRED = {
    "batch_time": ["type", "run_id", "seconds"],
    "prediction": ["type", "run_id", "task", "y_true", "y_pred"],
    "cv_fold": ["type", "run_id", "fold", "train_loss", "val_loss"],
    "attention": ["type", "run_id", "weights"],
    "features": ["type", "run_id", "values"],
    "run_end": ["type", "run_id"],
}
FIELDS = {f for names in REQUIRED.values() for f in names} | {"ts", "step", "split"}
ARRAYS = {
    "batch_time": ["seconds"],
    "prediction": ["y_true", "y_pred"],
    "attention": ["weights"],
    "features": ["values"],
}
WRONG = [True, False, {"k": 1}, [[[]]]]  # wrong for every field of every type
TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]
NON_OBJECTS = [[], [1, 2], "text", 3, 2.5, None, True]
MUTATIONS = ["valid", "drop", "wrong", "token", "truncate", "non_object", "unknown_type", "extra",
             "bad_key", "key_mismatch", "long_run_id", "negative_ts", "oversized", "ragged",
             "label"]  # fmt: skip
_MARK = "\x00token\x00"


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every scalar inside a document (keys and list indices)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))]
    return [path]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


def mutated(src: Source) -> Case:
    """A valid document with at most one change, and the outcome the decoder must give."""
    doc = valid_doc(src)
    kind = doc["type"]
    how = src.choice(MUTATIONS) if src.integer(0, 2) else "valid"  # a third stay valid
    if (how in ("oversized", "ragged") and kind not in ARRAYS) or (
        how == "label" and doc.get("task") not in ("binary", "multiclass")
    ):
        how = "valid"
    key = src.choice([None, doc["run_id"].encode()])
    expected = "ok"
    if how == "drop":
        del doc[src.choice(REQUIRED[kind])]
        expected = "schema"
    elif how == "wrong":
        doc[src.choice(sorted(doc))] = src.choice(WRONG)
        expected = "schema"
    elif how == "token":
        _set(doc, src.choice(_leaves(doc)), _MARK)
        token = src.choice(TOKENS)
        return key, orjson.dumps(doc).replace(orjson.dumps(_MARK), token), "non_finite"
    elif how == "truncate":
        raw = orjson.dumps(doc)
        return key, raw[: src.integer(0, len(raw) - 1)], "malformed_json"
    elif how == "non_object":
        return None, orjson.dumps(src.choice([*NON_OBJECTS, [doc]])), "not_an_object"
    elif how == "unknown_type":
        doc["type"] = src.choice(["", "batch", "Prediction", "run-end", src.text(0, 8) + "?"])
        expected = "schema"
    elif how == "extra":
        name = src.text(0, 8)
        if name not in FIELDS:
            big = [0.5] * src.integer(MAX_ARRAY + 1, 4 * MAX_ARRAY)
            doc[name] = src.choice([json_value(src), big])
    elif how == "bad_key":
        key = b"\xff" + src.raw(4)
        expected = "bad_key"
    elif how == "key_mismatch":
        key = (doc["run_id"] + src.text(1, 3)).encode()
        expected = "key_mismatch"
    elif how == "long_run_id":
        doc["run_id"] = src.choice(["", "r" * 257])
        key, expected = None, "schema"
    elif how == "negative_ts":
        doc["ts"] = src.choice([-1, -0.5, -1e300])
        expected = "schema"
    elif how == "oversized":
        doc[src.choice(ARRAYS[kind])] = [0] * src.integer(MAX_ARRAY + 1, 3 * MAX_ARRAY)
        expected = "oversized"
    elif how == "ragged":
        expected = "length_mismatch"
        if kind == "prediction":
            doc["y_pred"] = doc["y_true"] + doc["y_true"][:1]
        elif kind == "batch_time":  # no shape rule here: a list of lists is a schema error
            doc["seconds"], expected = [[0.1], [0.1, 0.2]], "schema"
        else:
            doc["weights" if kind == "attention" else "values"] = [
                [0.5] * src.integer(1, 4),
                [0.5] * 5,
            ]
    elif how == "label":
        bad = MAX_CLASSES if doc["task"] == "multiclass" else 2
        doc[src.choice(["y_true", "y_pred"])][0] = src.choice([bad, -1])
        expected = "label_out_of_range"
    return key, orjson.dumps(doc), expected


def case(src: Source) -> Case:
    """One input record: mostly mutated valid events, else random bytes or random JSON."""
    shape = src.integer(0, 9)
    if shape < 7:
        return mutated(src)
    key = src.choice([None, src.raw(8)])
    if shape == 7:
        return key, src.choice([None, src.raw(64)]), None
    fields = src.choice([sorted(FIELDS), [src.text(0, 6) for _ in range(3)]])
    doc = {name: json_value(src) for name in fields if src.choice([True, False])}
    if src.choice([True, False]):
        doc["type"] = src.choice(sorted(REQUIRED))
    return key, orjson.dumps(doc), None


# -- the core path the service runs ---------------------------------------------------------------
_STREAM = {"BatchTime": "batch_time", "CvFold": "cv", "Attention": "attention"}
_STREAM["Features"] = "features"


def stream_of(event: Any) -> str | None:
    """The stream an accepted event writes to (None for run_end)."""
    name = type(event).__name__
    if name == "Prediction":
        return f"prediction/{event.split}"
    return _STREAM.get(name)


def consume(
    decoder: Decoder, monitor: Monitor, batch: list[Case], now: float, totals: Counter[str]
) -> None:
    """One consumed batch and one tick, as the service does them, checking every outcome."""
    events = []
    for offset, (key, value, expected) in enumerate(batch):
        try:
            event = decoder.decode(key, value)
        except InvalidEvent as exc:
            assert exc.reason in REASONS
            assert expected in (None, exc.reason), (expected, str(exc), key, value)
            letter = dead_letter(exc, topic="in", partition=0, offset=offset, timestamp_ms=None,
                                 key=key, value=value, emitted_at=now)  # fmt: skip
            DEAD_LETTER_SCHEMA.validate(orjson.loads(encode(letter)))
            totals[f"dead:{exc.reason}"] += 1
            totals["dead"] += 1
        else:
            assert expected in (None, "ok"), (expected, key, value)
            events.append(event)
            totals["accepted"] += 1
    monitor.ingest(events, now, partition=0)
    records = monitor.due(now)
    wanted = {(e.run_id, s) for e in events if (s := stream_of(e)) is not None}
    assert wanted <= {(r["run_id"], r["stream"]) for r in records}
    for record in records:
        SUMMARY_SCHEMA.validate(orjson.loads(encode(record)))
    totals["summaries"] += len(records)
    totals["finals"] += sum(r["final"] for r in records)


def run_through(cases: list[Case]) -> Counter[str]:
    """All cases through one decoder and one monitor in batches, then a tick long after the last
    (every run idle-evicted); checks the counters and returns them."""
    decoder = Decoder(max_array=MAX_ARRAY, max_classes=MAX_CLASSES)
    monitor = Monitor(SETTINGS)
    totals: Counter[str] = Counter()
    now = 1_000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NumPy RuntimeWarning is a bug too
        for start in range(0, len(cases), BATCH):
            consume(decoder, monitor, cases[start : start + BATCH], now, totals)
            now += TICK
        consume(decoder, monitor, [], now + 10 * SETTINGS.idle_timeout, totals)
    assert totals["accepted"] + totals["dead"] == len(cases)
    assert monitor.events_ingested == totals["accepted"]
    assert sum(n for k, n in totals.items() if k.startswith("dead:")) == totals["dead"]
    assert monitor.runs_tracked == 0 and monitor.rows_tracked == 0
    totals["evicted_idle"] = monitor.runs_evicted["idle"]
    totals["evicted_capacity"] = monitor.runs_evicted["capacity"]
    return totals


def test_seeded_fuzz_of_10240_records_reaches_every_outcome_and_counters_add_up() -> None:
    """10,240 seeded records: no crash or warning, each one accepted or dead-lettered with its
    expected reason, counters that add up, all nine reasons and both eviction kinds reached."""
    started = time.perf_counter()
    src = Seeded(20240601)
    cases = [case(src) for _ in range(10_240)]
    totals = run_through(cases)
    print(f"\nseeded fuzz: {dict(sorted(totals.items()))} in {time.perf_counter() - started:.1f} s")
    assert {f"dead:{reason}" for reason in REASONS} <= set(totals)
    assert totals["accepted"] > 3_000 and totals["finals"] > 0
    assert totals["evicted_idle"] > 0 and totals["evicted_capacity"] > 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_fuzz_records_are_summarised_or_dead_lettered(data: st.DataObject) -> None:
    """Hypothesis-drawn batches of records: no crash or warning, the expected outcome for each."""
    src = Drawn(data.draw)
    run_through([case(src) for _ in range(data.draw(st.integers(1, 40), label="records"))])
