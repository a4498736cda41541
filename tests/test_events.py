"""metricsd.events: the decoder agrees with schemas/event.schema.json, and every reason by example.

The oracle is jsonschema on event.schema.json (with ECMA-262 "$", see tests/test_schemas.py). The
decoder must accept exactly what it accepts, except for the rules JSON Schema cannot express, which
are generated separately and must produce their own reasons:

- prediction y_true/y_pred of unequal length               -> length_mismatch
- attention weights / features values not rectangular       -> length_mismatch
- record key not UTF-8 / not equal to run_id                -> bad_key / key_mismatch
- a number beyond the float64 range (e.g. a 400-digit int)  -> non_finite
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from metricsd.events import (
    REASONS,
    Attention,
    BatchTime,
    CvFold,
    Decoder,
    Features,
    InvalidEvent,
    Prediction,
    RunEnd,
    Scalar,
)
from test_schemas import EVENT_TYPES, INVALID_EVENTS, VALID_EVENTS, validator

DECODER = Decoder()
EVENT_SCHEMA = validator("event")
#: what a schema-invalid document may be rejected as (the reason names the broken rule)
SCHEMA_REASONS = {"schema", "label_out_of_range", "oversized"}


def dumps(doc: Any) -> bytes:
    """JSON bytes of doc: orjson, or the stdlib for integers beyond 64 bits."""
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return json.dumps(doc, allow_nan=False).encode()


def _verdict(decode: Any, key: bytes | None, value: bytes | None) -> tuple[str, Any]:
    try:
        got = decode(key, value)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return exc.reason, exc.detail
    return "ok", got


def _hot_of(event: BatchTime | Scalar) -> tuple[Any, ...]:
    """The ``Hot`` tuple decode_hot must return where decode returns ``event``."""
    if isinstance(event, BatchTime):
        values, name = event.seconds, None
    else:
        values, name = event.value, event.name
    return (event.run_id, event.ts, values if type(values) is float else values.tolist(), name)


def reason_of(key: bytes | None, value: bytes | None, decoder: Decoder = DECODER) -> str:
    """The decoder's verdict: "ok" or the reason of the InvalidEvent.

    Every verdict is reached twice, by ``decode`` and by the ingest hot path ``decode_hot``: both
    must agree on the reason and the detail, and on the values of an accepted record (a Hot
    tuple for a batch_time or scalar without a rank, the same event otherwise).
    """
    reason, got = _verdict(decoder.decode, key, value)
    hot_reason, hot = _verdict(decoder.decode_hot, key, value)
    if reason != "ok":
        assert (hot_reason, hot) == (reason, got)
        return reason
    assert hot_reason == "ok"
    doc = orjson.loads(value)  # type: ignore[arg-type]  # accepted: a JSON object
    if doc["type"] in ("batch_time", "scalar") and doc.get("rank") is None:
        want = _hot_of(got)
        assert type(hot) is tuple and _same(hot, want), (hot, want)
    else:
        assert type(hot) is type(got)
        assert _same(list(_fields(hot)), list(_fields(got)))
    return "ok"


def _fields(event: Any) -> Any:
    for name in type(event).__slots__:
        value = getattr(event, name)
        yield value.tolist() if isinstance(value, np.ndarray) else value


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and float types kept (1 is not 1.0)."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if type(a) is float and type(b) is float and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def _overflows(doc: Any) -> bool:
    """Whether doc holds a number that float64 cannot represent (an int of about 309+ digits)."""
    if isinstance(doc, dict):
        return any(map(_overflows, doc.values()))
    if isinstance(doc, list):
        return any(map(_overflows, doc))
    return type(doc) is int and abs(doc) >= 2**1024 - 2**970  # rounds to inf as a double


def _semantic_reason(doc: dict[str, Any]) -> str | None:
    """The reason for a schema-valid document that breaks a rule JSON Schema cannot express."""
    if doc["type"] == "prediction" and len(doc["y_true"]) != len(doc["y_pred"]):
        return "length_mismatch"
    matrix: Any = doc.get("weights") if doc["type"] == "attention" else doc.get("values")
    if (
        doc["type"] in ("attention", "features")
        and type(matrix[0]) is list
        and len({len(row) for row in matrix}) > 1
    ):
        return "length_mismatch"
    return None


def expected_reason(doc: Any) -> str | set[str]:
    """What the decoder must say about dumps(doc), according to the schema plus the exceptions."""
    if _overflows(doc):
        return "non_finite"
    if not isinstance(doc, dict):
        return "not_an_object"
    if not EVENT_SCHEMA.is_valid(doc):
        return SCHEMA_REASONS
    return _semantic_reason(doc) or "ok"


# ---------------------------------------------------------------------- strategies
finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.integers(0, 2**64 - 1) | st.floats(0, allow_nan=False, allow_infinity=False)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | finite | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
#: values on or just across the schemas' numeric boundaries (and booleans, which are not numbers)
BOUNDARY_NUMBERS = (
    True,
    False,
    None,
    -1,
    -0.0,
    0,
    1,
    1.0,
    1.5,
    -2.5,
    2,
    999,
    999.0,
    1000,
    1000.0,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**400,
    1e300,
    5e-324,
)
boundary_numbers = st.sampled_from(BOUNDARY_NUMBERS)
#: strings on or across the boundaries of run_id, split, task and type
BOUNDARY_STRINGS = (
    "",
    "0",
    "val",
    "val\n",
    "a b",
    "x" * 64,
    "x" * 65,
    "ü" * 256,
    "x" * 257,
    "binary",
    "Binary",
    "multiclass",
    "regression",
    "batch_time",
    "prediction",
    "run_end",
    "cv_fold",
    "attention",
    "features",
    "scalar",
    "summary",
)
boundary_strings = st.sampled_from(BOUNDARY_STRINGS)
#: arrays that are empty, nested, ragged or hold non-numbers
BOUNDARY_ARRAYS: tuple[Any, ...] = (
    [],
    {},
    [[]],
    [0],
    [1, [2]],
    [[1, 2], [3]],
    [[0.5]],
    [[-1]],
    [[[1]]],
    [True],
    [None],
    ["1"],
    {"a": 1},
)
boundary_arrays = st.sampled_from(BOUNDARY_ARRAYS).map(copy.deepcopy)  # never edit the originals
replacements = st.one_of(
    boundary_numbers,
    boundary_numbers,
    boundary_strings,
    boundary_arrays,
    st.integers(-3, 1001),
    finite,
    json_values,
)
STRING_FIELDS = {"type", "run_id", "task", "split", "name"}


def _replacement(field: str) -> st.SearchStrategy[Any]:
    """Mostly the boundary values of the field's own kind, otherwise anything."""
    own = boundary_strings if field in STRING_FIELDS else boundary_numbers
    return st.one_of(own, own, replacements)


def _opt(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A strategy for an optional field: absent (the marker), null, or a value."""
    return st.just(_ABSENT) | st.none() | value


_ABSENT = object()
KNOWN_FIELDS = (
    "type",
    "run_id",
    "ts",
    "step",
    "seconds",
    "task",
    "split",
    "y_true",
    "y_pred",
    "fold",
    "train_loss",
    "val_loss",
    "weights",
    "values",
    "name",
    "value",
    "rank",
)


@st.composite
def valid_docs(draw: st.DrawFn, kinds: tuple[str, ...] = EVENT_TYPES) -> dict[str, Any]:
    """A document of one of kinds satisfying event.schema.json and, mostly, the semantic rules."""
    kind = draw(st.sampled_from(kinds))
    doc: dict[str, Any] = {"type": kind, "run_id": draw(st.text(min_size=1, max_size=12))}
    fields: dict[str, Any] = {"ts": draw(_opt(nonneg))}
    if kind == "batch_time":
        fields["step"] = draw(_opt(st.integers(0, 2**63 - 1) | st.integers(0, 2**40).map(float)))
        fields["rank"] = draw(_opt(st.integers(0, 1_000_000) | st.sampled_from([0.0, 7.0])))
        fields["seconds"] = draw(nonneg | st.lists(nonneg, min_size=1, max_size=6))
    elif kind == "prediction":
        task = draw(st.sampled_from(["binary", "multiclass", "regression"]))
        label = {
            "binary": st.sampled_from([0, 1, 0.0, 1.0]),
            "multiclass": st.integers(0, 999) | st.sampled_from([0.0, 999.0]),
            "regression": st.integers(-(2**63), 2**64 - 1) | finite,
        }[task]
        n = draw(st.integers(1, 6))
        fields.update(
            task=task,
            split=draw(_opt(st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z"))),
            y_true=draw(st.lists(label, min_size=n, max_size=n)),
            y_pred=draw(st.lists(label, min_size=n, max_size=n)),
        )
    elif kind == "cv_fold":
        fields.update(
            fold=draw(st.integers(0, 2**63 - 1) | st.sampled_from([0.0, 3.0])),
            train_loss=draw(finite | st.integers(-(2**63), 2**64 - 1)),
            val_loss=draw(finite),
        )
    elif kind == "scalar":
        item = finite | st.integers(-(2**63), 2**64 - 1) | st.none()
        fields.update(
            step=draw(_opt(st.integers(0, 2**63 - 1))),
            rank=draw(_opt(st.integers(0, 1_000_000) | st.sampled_from([0.0, 7.0]))),
            name=draw(st.text(min_size=1, max_size=12)),
            value=draw(item | st.lists(item, min_size=1, max_size=6)),
        )
    elif kind in ("attention", "features"):
        number = nonneg if kind == "attention" else finite
        width = draw(st.integers(1, 5))
        row = st.lists(number, min_size=width, max_size=width)
        fields["weights" if kind == "attention" else "values"] = draw(
            row | st.lists(row, min_size=1, max_size=4)
        )
    if draw(st.booleans()):  # a forward-compatible extra field
        name = draw(st.text(max_size=5).filter(lambda k: k not in KNOWN_FIELDS))
        fields[name] = draw(json_values)
    doc.update((k, v) for k, v in fields.items() if v is not _ABSENT and k not in doc)
    return doc


FIELDS = {
    kind: sorted(
        json.loads((Path(__file__).parent.parent / "schemas" / f"{kind}.schema.json").read_text())[
            "properties"
        ]
    )
    for kind in EVENT_TYPES
}


@st.composite
def one_fault_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with one field of its type, or one item inside it, replaced or removed."""
    doc = draw(valid_docs())
    parent: Any = doc
    last: Any = draw(st.sampled_from(FIELDS[doc["type"]]))
    field = last
    while type(parent[last] if last in parent or type(parent) is list else None) is list:
        if not parent[last] or draw(st.booleans()):
            break
        parent, last = parent[last], draw(st.integers(0, len(parent[last]) - 1))
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "append"]))
    exists = type(parent) is list or last in parent
    if action == "append" and exists and type(parent[last]) is list:
        parent[last].append(draw(_replacement(field)))
    elif action == "delete" and exists:
        del parent[last]
    else:
        parent[last] = draw(_replacement(field))
    return doc


@st.composite
def mutated_docs(draw: st.DrawFn) -> Any:
    """A valid document with 1-3 mutations: a field or array item replaced, deleted, appended to."""
    doc = draw(valid_docs())
    for _ in range(draw(st.integers(1, 3))):
        known = st.sampled_from(KNOWN_FIELDS)
        parent: Any = doc
        last: Any = draw(st.one_of(st.sampled_from(sorted(doc)), known) if doc else known)
        # Descend into the array (and the row of a matrix) half of the time.
        while (
            (type(parent) is list or last in parent)
            and type(parent[last]) is list
            and parent[last]
            and draw(st.booleans())
        ):
            parent, last = parent[last], draw(st.integers(0, len(parent[last]) - 1))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "append"]))
        exists = type(parent) is list or last in parent
        if action == "append" and exists and type(parent[last]) is list:
            parent[last].append(draw(replacements))
        elif action == "delete" and exists:
            del parent[last]
        else:
            parent[last] = draw(replacements)
    return doc


# ---------------------------------------------------------------------- agreement with the schema
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(one_fault_docs(), one_fault_docs(), mutated_docs(), valid_docs(), json_values))
@example(doc={"type": "prediction", "run_id": "r", "task": "binary", "y_true": [2], "y_pred": [0]})
@example(doc={"type": "attention", "run_id": "r", "weights": [[1, 2], [-1]]})
@example(
    doc={
        "type": "prediction",
        "run_id": "r",
        "task": "multiclass",
        "y_true": [2**64 - 1],
        "y_pred": [0],
    }
)
def test_decoder_agrees_with_schema(doc: Any) -> None:
    """decode accepts exactly what event.schema.json accepts, modulo the documented exceptions."""
    expected = expected_reason(doc)
    got = reason_of(None, dumps(doc))
    if isinstance(expected, set):
        assert got in expected
    else:
        assert got == expected


@settings(max_examples=300, deadline=None)
@given(doc=valid_docs())
def test_valid_documents_decode_to_their_values(doc: dict[str, Any]) -> None:
    """A valid document decodes to the event class of its type holding the same values."""
    assume(_semantic_reason(doc) is None)
    event = DECODER.decode(doc["run_id"].encode(), dumps(doc))
    assert event.run_id == doc["run_id"]
    ts = doc.get("ts")
    assert event.ts == (None if ts is None else float(ts)) and type(event.ts) in (float, type(None))
    if isinstance(event, BatchTime):
        seconds = doc["seconds"]
        if type(seconds) is list:
            assert isinstance(event.seconds, np.ndarray)
            assert event.seconds.dtype == np.float64 and event.seconds.shape == (len(seconds),)
            assert event.seconds.tolist() == [float(x) for x in seconds]
        else:
            assert type(event.seconds) is float and event.seconds == float(seconds)
        assert event.step == doc.get("step") and type(event.step) in (int, type(None))
        assert event.rank == doc.get("rank") and type(event.rank) in (int, type(None))
    elif isinstance(event, Prediction):
        dtype = np.float64 if doc["task"] == "regression" else np.int64
        assert event.task == doc["task"] and event.split == (doc.get("split") or "val")
        for got, want in ((event.y_true, doc["y_true"]), (event.y_pred, doc["y_pred"])):
            assert got.dtype == dtype and got.shape == (len(want),)
            assert got.tolist() == [dtype(x).item() for x in want]
    elif isinstance(event, CvFold):
        assert event.fold == doc["fold"] and type(event.fold) is int
        assert event.train_loss == float(doc["train_loss"])
        assert event.val_loss == float(doc["val_loss"])
        assert type(event.train_loss) is float and type(event.val_loss) is float
    elif isinstance(event, Scalar):
        assert event.name == doc["name"] and event.step == doc.get("step")
        want = doc["value"] if type(doc["value"]) is list else [doc["value"]]
        got = event.value.tolist() if isinstance(event.value, np.ndarray) else [event.value]
        assert isinstance(event.value, np.ndarray) == (type(doc["value"]) is list)
        assert [None if math.isnan(x) else x for x in got] == [
            None if x is None else float(x) for x in want
        ]
    elif isinstance(event, (Attention, Features)):
        matrix = event.weights if isinstance(event, Attention) else event.values
        want = doc["weights"] if isinstance(event, Attention) else doc["values"]
        rows = want if type(want[0]) is list else [want]
        assert matrix.dtype == np.float64 and matrix.shape == (len(rows), len(rows[0]))
        assert matrix.tolist() == [[float(x) for x in row] for row in rows]
    else:
        assert isinstance(event, RunEnd)


SWEEP_BASES = [
    {"type": "batch_time", "run_id": "r1", "ts": 1.5, "step": 3, "seconds": 0.25},
    {"type": "batch_time", "run_id": "r1", "seconds": [0.25, 1]},
    {"type": "batch_time", "run_id": "r1", "rank": 1_000_000, "seconds": 0.25},
    {
        "type": "prediction",
        "run_id": "r1",
        "ts": 1.5,
        "task": "binary",
        "split": "val",
        "y_true": [0, 1],
        "y_pred": [1, 1],
    },
    {
        "type": "prediction",
        "run_id": "r1",
        "task": "multiclass",
        "y_true": [3, 999],
        "y_pred": [0, 5],
    },
    {
        "type": "prediction",
        "run_id": "r1",
        "task": "regression",
        "y_true": [-1.5, 2],
        "y_pred": [0.5, 3],
    },
    {"type": "run_end", "run_id": "r1", "ts": 1.5},
    {"type": "cv_fold", "run_id": "r1", "ts": 1.5, "fold": 2, "train_loss": 0.5, "val_loss": 0.75},
    {"type": "attention", "run_id": "r1", "weights": [[0.5, 0.5], [1, 0]]},
    {"type": "attention", "run_id": "r1", "weights": [0.25, 0.75]},
    {"type": "features", "run_id": "r1", "values": [[-1, 2.5], [0, 3]]},
    {"type": "features", "run_id": "r1", "values": [1, -2]},
    {
        "type": "scalar",
        "run_id": "r1",
        "ts": 1.5,
        "step": 3,
        "rank": 2,
        "name": "loss",
        "value": 0.5,
    },
    {"type": "scalar", "run_id": "r1", "name": "eval/loss", "value": [0.5, None, -2]},
]


def _one_fault_variants(base: dict[str, Any]) -> list[Any]:
    """Each variant of base with one place (field, item, row item) replaced, deleted, appended."""
    places: list[tuple[Any, ...]] = [("extra",)]
    for field, value in base.items():
        places.append((field,))
        if type(value) is list:
            for i, item in enumerate(value):
                places.append((field, i))
                if type(item) is list:
                    places.extend((field, i, j) for j in range(len(item)))
    variants: list[Any] = []
    values = (*BOUNDARY_NUMBERS, *BOUNDARY_STRINGS, *BOUNDARY_ARRAYS)
    for *path, last in places:
        for action in ("replace", "delete", "append"):
            for value in values if action != "delete" else (None,):
                doc = copy.deepcopy(base)
                parent: Any = doc
                for step in path:
                    parent = parent[step]
                if action == "delete":
                    parent.pop(last) if type(parent) is dict and last in parent else None
                    if type(parent) is list:
                        del parent[last]
                elif action == "append":
                    if type(parent.get(last) if type(parent) is dict else parent[last]) is not list:
                        continue
                    parent[last].append(copy.deepcopy(value))
                else:
                    parent[last] = copy.deepcopy(value)
                variants.append(doc)
    return variants


@pytest.mark.parametrize("base", SWEEP_BASES, ids=lambda b: f"{b['type']}")
def test_decoder_agrees_with_schema_on_every_single_fault(base: dict[str, Any]) -> None:
    """Every one-place change of a valid document by a boundary value agrees with the schema."""
    disagreements = []
    for doc in _one_fault_variants(base):
        expected = expected_reason(doc)
        got = reason_of(None, dumps(doc))
        if not (got in expected if isinstance(expected, set) else got == expected):
            disagreements.append((doc, expected, got))
    assert disagreements[:3] == []


@pytest.mark.parametrize("doc", [*VALID_EVENTS, *INVALID_EVENTS])
def test_decoder_agrees_with_schema_tables(doc: Any) -> None:
    """On the hand-written boundary tables of tests/test_schemas.py the decoder agrees as well."""
    expected = expected_reason(doc)
    got = reason_of(None, dumps(doc))
    assert got in expected if isinstance(expected, set) else got == expected


# ---------------------------------------------------------------------- the documented exceptions
@settings(deadline=None)  # jsonschema and a busy machine make timings noisy
@given(
    doc=valid_docs(("prediction",)),
    extra=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=3),
)
def test_unequal_prediction_lengths_are_length_mismatch(
    doc: dict[str, Any], extra: list[int]
) -> None:
    """Schema-valid predictions whose y_true and y_pred differ in length are length_mismatch."""
    doc["y_pred"] = doc["y_pred"] + extra
    assert EVENT_SCHEMA.is_valid(doc)
    assert reason_of(None, dumps(doc)) == "length_mismatch"


@settings(deadline=None)  # jsonschema and a busy machine make timings noisy
@given(doc=valid_docs(("attention", "features")), cut=st.integers(1, 4))
def test_ragged_matrices_are_length_mismatch(doc: dict[str, Any], cut: int) -> None:
    """Schema-valid attention/features matrices with rows of unequal length: length_mismatch."""
    field = "weights" if doc["type"] == "attention" else "values"
    rows = doc[field] if type(doc[field][0]) is list else [doc[field]]
    doc[field] = [*rows, rows[0] + rows[0][:cut]]
    assert EVENT_SCHEMA.is_valid(doc)
    assert reason_of(None, dumps(doc)) == "length_mismatch"


def test_schema_errors_outrank_semantic_ones() -> None:
    """A document breaking a schema rule and a semantic rule is reported as a schema error."""
    ragged_negative = {"type": "attention", "run_id": "r", "weights": [[1, 2], [-1]]}
    short_bad_label = {
        "type": "prediction",
        "run_id": "r",
        "task": "binary",
        "y_true": [0, 1],
        "y_pred": [0.5],
    }
    assert reason_of(None, dumps(ragged_negative)) == "schema"
    assert reason_of(b"other", dumps(short_bad_label)) == "schema"


@settings(deadline=None)  # jsonschema and a busy machine make timings noisy
@given(run_id=st.text(min_size=1, max_size=20), key=st.binary(max_size=20))
def test_key_must_be_utf8_run_id(run_id: str, key: bytes) -> None:
    """A key equal to run_id's UTF-8 passes; other UTF-8 is key_mismatch, non-UTF-8 bad_key."""
    value = dumps({"type": "run_end", "run_id": run_id})
    assert reason_of(run_id.encode(), value) == "ok"
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        expected = "bad_key"
    else:
        expected = "ok" if key == run_id.encode() else "key_mismatch"
    assert reason_of(key, value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b'{"type":"batch_time","run_id":"r","seconds":1' + b"0" * 400 + b"}",
        b'{"type":"batch_time","run_id":"r","seconds":1e999}',
        b'{"type":"cv_fold","run_id":"r","fold":0,"train_loss":-1e400,"val_loss":0}',
        b'{"type":"batch_time","run_id":"r","seconds":1' + b"0" * 5000 + b"}",
    ],
    ids=["400-digit-int", "1e999", "minus-1e400", "5000-digit-int-beyond-python-str-limit"],
)
def test_numbers_beyond_float64_are_non_finite(value: bytes) -> None:
    """Literals float64 cannot hold are non_finite, although the schema's "number" is unbounded."""
    assert reason_of(None, value) == "non_finite"


# ---------------------------------------------------------------------- every reason, by example
GOOD = b'{"type":"batch_time","run_id":"r1","seconds":0.1}'
REASON_TABLE = [
    ("malformed_json", None, b'{"type":"batch_time",'),
    ("malformed_json", None, b""),
    ("malformed_json", None, None),
    ("malformed_json", None, b'{"a":"\xff"}'),
    ("malformed_json", None, b"[NaN, "),
    ("malformed_json", None, b'{"run_id":"\\ud800"}'),
    ("malformed_json", None, b"[" * 5000 + b"]" * 5000),
    ("malformed_json", None, b'\xef\xbb\xbf{"type":"run_end","run_id":"r1"}'),
    ("malformed_json", None, '{"type":"run_end","run_id":"r1"}'.encode("utf-16")),
    ("not_an_object", None, b"[1, 2]"),
    ("not_an_object", None, b'"batch_time"'),
    ("schema", None, b'{"type":"batch_time","run_id":"r1","seconds":true}'),
    ("schema", None, b'{"type":"nope","run_id":"r1"}'),
    ("schema", None, b'{"type":{},"run_id":"r1"}'),
    (
        "non_finite",
        None,
        json.dumps({"type": "batch_time", "run_id": "r1", "seconds": math.nan}).encode(),
    ),
    ("non_finite", None, b'{"type":"batch_time","run_id":"r1","seconds":Infinity}'),
    ("non_finite", None, b'{"type":"features","run_id":"r1","values":[1,-Infinity]}'),
    (
        "length_mismatch",
        None,
        b'{"type":"prediction","run_id":"r1","task":"binary","y_true":[0,1],"y_pred":[1]}',
    ),
    ("length_mismatch", None, b'{"type":"features","run_id":"r1","values":[[1,2],[3]]}'),
    (
        "label_out_of_range",
        None,
        b'{"type":"prediction","run_id":"r1","task":"binary","y_true":[0,2],"y_pred":[1,1]}',
    ),
    (
        "label_out_of_range",
        None,
        b'{"type":"prediction","run_id":"r1","task":"multiclass","y_true":[1000],"y_pred":[1]}',
    ),
    (
        "label_out_of_range",
        None,
        b'{"type":"prediction","run_id":"r1","task":"multiclass","y_true":[-1.0],"y_pred":[1]}',
    ),
    (
        "label_out_of_range",
        None,
        b'{"type":"prediction","run_id":"r1","task":"multiclass","y_true":[18446744073709551615],'
        b'"y_pred":[1]}',
    ),
    ("oversized", None, dumps({"type": "batch_time", "run_id": "r1", "seconds": [0.5] * 10_001})),
    ("oversized", None, dumps({"type": "attention", "run_id": "r1", "weights": [[1]] * 10_001})),
    ("oversized", None, dumps({"type": "attention", "run_id": "r1", "weights": [[1] * 10_001]})),
    ("bad_key", b"\xff\xfe", GOOD),
    ("key_mismatch", b"r2", GOOD),
    ("key_mismatch", b"", GOOD),
]


@pytest.mark.parametrize(("reason", "key", "value"), REASON_TABLE)
def test_reason_table(reason: str, key: bytes | None, value: bytes | None) -> None:
    """Each example record is rejected with its reason, and the detail is one short sentence."""
    with pytest.raises(InvalidEvent) as info:
        DECODER.decode(key, value)
    assert info.value.reason == reason
    assert 0 < len(info.value.detail) <= 300 and "\n" not in info.value.detail
    assert str(info.value).startswith(f"{reason}: ")


def test_reason_table_covers_every_reason() -> None:
    """The table above exercises every reason code."""
    assert {row[0] for row in REASON_TABLE} == set(REASONS)


def test_oversized_examples_are_schema_invalid_too() -> None:
    """The oversized examples are also rejected by the schema (maxItems), so they agree with it."""
    for reason, _, value in REASON_TABLE:
        if reason == "oversized":
            assert value is not None and not EVENT_SCHEMA.is_valid(json.loads(value))


# ---------------------------------------------------------------------- specific decisions
def test_scalar_batch_time_is_a_plain_float() -> None:
    """The hot event decodes without arrays: seconds a float, ts a float, step an int."""
    event = DECODER.decode(
        b"r17", b'{"type":"batch_time","run_id":"r17","ts":1764000000,"step":42.0,"seconds":1}'
    )
    assert type(event) is BatchTime
    assert (event.run_id, event.ts, event.step, event.seconds) == ("r17", 1764000000.0, 42, 1.0)
    assert (type(event.ts), type(event.step), type(event.seconds)) == (float, int, float)


@pytest.mark.parametrize(
    ("rank", "want"),
    [(None, None), (0, 0), (7.0, 7), (1_000_000, 1_000_000), (1_000_001, "schema"), (-1, "schema"),
     (True, "schema"), (2.5, "schema"), ("3", "schema")],
)  # fmt: skip
def test_batch_time_rank(rank: Any, want: Any) -> None:
    """rank is optional: absent or null is None, an integer (or integer-valued float) in
    [0, 1,000,000] is an int, anything else is a schema error, as for scalar's rank."""
    doc = {"type": "batch_time", "run_id": "r1", "seconds": 0.5, "rank": rank}
    if want == "schema":
        assert reason_of(None, dumps(doc)) == "schema"
        scalar = {**doc, "type": "scalar", "name": "x", "value": 1}
        assert reason_of(None, dumps(scalar)) == "schema"
        return
    event = DECODER.decode(None, dumps(doc))
    assert isinstance(event, BatchTime) and event.rank == want and type(event.rank) is type(want)


def test_decoded_batch_time_is_frozen_like_a_constructed_one() -> None:
    """The fast-built BatchTime is immutable and has the same fields as one built by __init__."""
    event = DECODER.decode(None, GOOD)
    built = BatchTime("r1", None, None, 0.1)
    assert type(event) is BatchTime and repr(event) == repr(built)
    with pytest.raises(AttributeError):
        event.seconds = 2.0  # type: ignore[misc]  # the point: frozen


def test_flat_attention_and_features_are_one_row() -> None:
    """A flat weights or values list becomes a 2-D array with one row."""
    attention = DECODER.decode(None, b'{"type":"attention","run_id":"r","weights":[0.25,0.75]}')
    features = DECODER.decode(None, b'{"type":"features","run_id":"r","values":[[1,2],[3,4]]}')
    assert isinstance(attention, Attention) and isinstance(features, Features)
    assert attention.weights.shape == (1, 2) and features.values.shape == (2, 2)


def test_prediction_defaults_and_dtypes() -> None:
    """split defaults to "val"; binary float labels 0.0/1.0 become int64; regression is float64."""
    binary = DECODER.decode(
        None, b'{"type":"prediction","run_id":"r","task":"binary","y_true":[1.0,0],"y_pred":[0,1]}'
    )
    regression = DECODER.decode(
        None,
        b'{"type":"prediction","run_id":"r","task":"regression","split":"test","y_true":[1],'
        b'"y_pred":[18446744073709551615]}',
    )
    assert isinstance(binary, Prediction) and isinstance(regression, Prediction)
    assert binary.split == "val" and binary.y_true.dtype == np.int64
    assert binary.y_true.tolist() == [1, 0]
    assert regression.split == "test" and regression.y_pred.dtype == np.float64
    assert regression.y_pred.tolist() == [float(2**64 - 1)]


@pytest.mark.parametrize(
    ("decoder", "value", "reason"),
    [
        (Decoder(max_array=3), b'{"type":"batch_time","run_id":"r","seconds":[1,2,3]}', "ok"),
        (
            Decoder(max_array=3),
            b'{"type":"batch_time","run_id":"r","seconds":[1,2,3,4]}',
            "oversized",
        ),
        (
            Decoder(max_classes=10),
            b'{"type":"prediction","run_id":"r","task":"multiclass","y_true":[9],"y_pred":[0]}',
            "ok",
        ),
        (
            Decoder(max_classes=10),
            b'{"type":"prediction","run_id":"r","task":"multiclass","y_true":[10],"y_pred":[0]}',
            "label_out_of_range",
        ),
    ],
)
def test_limits_are_configurable(decoder: Decoder, value: bytes, reason: str) -> None:
    """max_array and max_classes set the oversized and label_out_of_range boundaries."""
    assert reason_of(None, value, decoder) == reason


@pytest.mark.parametrize("kwargs", [{"max_array": 0}, {"max_classes": 1}, {"max_array": True}])
def test_bad_limits_fail_at_construction(kwargs: dict[str, Any]) -> None:
    """Nonsensical limits raise ValueError when the decoder is built, not per record."""
    with pytest.raises(ValueError, match="must be an int"):
        Decoder(**kwargs)


def test_details_quote_little_of_the_payload() -> None:
    """Details stay short even when the offending value or the run_id is huge."""
    long_text = "é" * 5000
    for key, value in [
        (None, dumps({"type": long_text, "run_id": "r"})),
        (None, dumps({"type": "batch_time", "run_id": long_text, "seconds": 1})),
        (None, dumps({"type": "features", "run_id": "r", "values": [1.0] * 500 + [long_text]})),
        (None, dumps([long_text] * 50)),
        (b"k" * 5000, dumps({"type": "run_end", "run_id": "r" * 256})),
    ]:
        with pytest.raises(InvalidEvent) as info:
            DECODER.decode(key, value)
        assert len(info.value.detail) <= 300


def test_invalid_event_is_a_picklable_value_error() -> None:
    """InvalidEvent is a ValueError that survives pickling with its reason and detail."""
    exc = pickle.loads(pickle.dumps(InvalidEvent("schema", "field 'x' must be y")))
    assert isinstance(exc, InvalidEvent) and isinstance(exc, ValueError)
    assert (exc.reason, exc.detail) == ("schema", "field 'x' must be y")


# ---------------------------------------------------------------------- fuzz: never anything else
@settings(max_examples=500, deadline=None)
@given(key=st.none() | st.binary(max_size=8), value=st.none() | st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_invalid_event(
    key: bytes | None, value: bytes | None
) -> None:
    """For any bytes, decode returns an event or raises InvalidEvent with a known reason."""
    reason_of(key, value)


@settings(max_examples=500, deadline=None)
@given(doc=valid_docs(), data=st.data())
def test_corrupted_payloads_decode_or_raise_invalid_event(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    """Byte-level corruption of a valid payload never escapes as anything but InvalidEvent."""
    payload = bytearray(dumps(doc))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(b'{}[]",:-+.eE0129 tnfNI\\\xff\x00'))
        if op == "insert":
            payload.insert(at, byte)
        elif at < len(payload):
            if op == "delete":
                del payload[at]
            else:
                payload[at] = byte
    reason_of(None, bytes(payload))
