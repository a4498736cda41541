"""Wire format: Kafka record bytes -> validated events; output records -> bytes.

Plan
----
Operations: ``Decoder.decode(key, value)`` turns one Kafka record into one event (a frozen
dataclass) or raises :class:`InvalidEvent`. ``Decoder.decode_hot`` is the ingest hot path's
variant: the same verdicts, but a batch_time or scalar without a rank comes back as a plain
:data:`Hot` tuple (``Monitor.collect`` appends its values to the run's pending row directly).
Records going out (summaries, profiles, dead letters) are built and serialised by
``metricsd.records``.

Contract: for ANY key and value bytes, ``decode`` returns an :data:`Event` or raises
``InvalidEvent`` whose ``reason`` is one of :data:`REASONS`. Any other exception escaping ``decode``
is a bug in this module and must fail loudly. No I/O, no clock, no asyncio.

Goals: the rules are those of ``schemas/*.json``, translated by hand, because a compiled JSON
Schema validator costs tens of µs per event and the budget is about 1 µs for the hot event (a
scalar ``batch_time``). ``tests/test_events.py`` holds the code to the schemas: ``decode`` accepts
exactly what ``event.schema.json`` accepts, except for these rules JSON Schema cannot express:

1. prediction ``y_true`` and ``y_pred`` have equal lengths                -> ``length_mismatch``
2. attention ``weights`` and features ``values`` are rectangular            -> ``length_mismatch``
3. the record key, when not None, is UTF-8                                  -> ``bad_key``
   and equals ``run_id`` (an empty key is a key, and mismatches)           -> ``key_mismatch``
4. numbers lie within the float64 range: ``1e999`` or a 400-digit integer,
   which the schema's unbounded "number" accepts, is rejected             -> ``non_finite``

(Two further rejections concern bytes that are not JSON at all, so no schema sees them:
``malformed_json``, and ``non_finite`` for the tokens ``NaN``/``Infinity`` that Python's ``json``
module writes by default.) Every schema rule is checked before any of rules 1-3, and the value
before the key, so a ``length_mismatch``, ``bad_key`` or ``key_mismatch`` implies a schema-valid
value. The limits are configurable; the schemas state the defaults: ``max_array`` (``maxItems``
10000) -> ``oversized``, ``max_classes`` (multiclass ``maximum`` 999) -> ``label_out_of_range``.

Decisions callers rely on:

- Additional properties are ignored (forward compatibility). An optional field (``ts``, ``step``,
  ``split``) may be absent or null; both mean "not given". ``split`` defaults to ``"val"``.
- Booleans are never numbers. An integer-valued float (``3.0``) is an integer, as JSON Schema's
  "integer" says: ``step``, ``fold``, ``rank`` and class labels accept it and are converted to
  ``int``. ``rank`` (batch_time, scalar) is optional and at most 1,000,000.
  ``step`` and ``fold`` are at most 2**63 - 1 (the schemas say so), so they fit int64.
- Binary labels are 0 or 1 (y_true and y_pred alike): another integer is ``label_out_of_range``,
  a non-integer is ``schema``. Multiclass labels: integers in ``[0, max_classes)``.
- Decoded values: ``ts`` is ``float | None``; losses are ``float``; ``BatchTime.seconds`` is a
  ``float`` for a scalar (no array on the hot path) or a 1-D float64 array for a list; prediction
  arrays are int64 (binary, multiclass) or float64 (regression); ``Attention.weights`` and
  ``Features.values`` are always 2-D float64 (a flat list becomes one row). Arrays are owned by the
  event; do not mutate them.
- Events holding arrays (``BatchTime``, ``Prediction``, ``Attention``, ``Features``) compare by
  identity (``eq=False``): a NumPy array has no single truth value, so field-wise ``==`` would
  raise (and hashing would fail).
- ``decode`` builds ``BatchTime`` without calling its generated ``__init__``, which in a frozen
  dataclass costs one ``object.__setattr__`` per field: it fills an unfrozen shell with the same
  slots and assigns ``__class__`` (``_BatchTimeShell``; about 0.1 µs for the five fields, less
  than the four descriptor calls it replaced); the object is the same frozen BatchTime.
- ``detail`` is one sentence quoting at most about 120 characters of the payload.

Cost (this 2-core machine, best of 15 timeit runs): a scalar ``batch_time`` decodes in about
1.0 µs, of which ``orjson.loads`` is 0.3-0.4 µs, the dict dispatch 0.1 µs, the field checks 0.2 µs
and building the event 0.25 µs; a key adds 0.05 µs. An array costs one type scan
(``set(map(type, xs))``, rejecting bools and strings that ``np.array(..., float)`` would accept
silently) and one ``np.array`` conversion, about 35 ns per element. There is no ``isfinite`` pass:
orjson only yields finite floats and ints in [-2**63, 2**64) (larger integer literals become floats,
overflowing ones are parse errors), and every such value converts to a finite float64.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import orjson
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_SPLIT",
    "REASONS",
    "TASKS",
    "Attention",
    "BatchTime",
    "CvFold",
    "Decoder",
    "Event",
    "Features",
    "Hot",
    "InvalidEvent",
    "Prediction",
    "RunEnd",
    "Scalar",
]

REASONS: Final = (
    "malformed_json",  # not JSON: not UTF-8 (or with a BOM), empty, truncated, no value at all
    "not_an_object",  # JSON, but the top level is not an object
    "schema",  # violates schemas/<type>.schema.json
    "non_finite",  # NaN/Infinity tokens, or a number beyond the float64 range
    "length_mismatch",  # y_true/y_pred lengths differ; ragged weights/values matrix
    "label_out_of_range",  # class label outside [0, 2) for binary, [0, max_classes) for multiclass
    "oversized",  # an array longer than max_array
    "bad_key",  # record key is not UTF-8
    "key_mismatch",  # record key differs from run_id
)

TASKS: Final = ("binary", "multiclass", "regression")
DEFAULT_SPLIT: Final = "val"

_MAX_RUN_ID: Final = 256
_I64_MAX: Final = 2**63 - 1
_NUMBER_TYPES: Final = frozenset((int, float))
_NULLABLE_NUMBER_TYPES: Final = frozenset((int, float, type(None)))
_MAX_NAME: Final = 256
_MISSING: Final = object()
_MAX_RANK: Final = 1_000_000
_INT_TYPES: Final = frozenset((int,))
# ECMA-262 semantics of the schema's "^[A-Za-z0-9_.-]{1,64}$": "$" is the very end (no newline).
_SPLIT_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


class InvalidEvent(ValueError):
    """A rejected input record; the only exception ``Decoder.decode`` raises.

    ``reason`` is a machine code from :data:`REASONS` (counters, dead-letter record); ``detail`` is
    one human sentence that quotes at most about 120 characters of the payload.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(slots=True, frozen=True, eq=False)
class BatchTime:
    """Durations of one or more training batches: ``seconds`` is a float or a 1-D float64 array;
    ``rank`` the worker that sent them (distributed training), None when not sent."""

    run_id: str
    ts: float | None
    step: int | None
    seconds: float | NDArray[np.float64]
    rank: int | None = None


@dataclass(slots=True, frozen=True, eq=False)
class Prediction:
    """Pairs of one split: equal-length 1-D arrays, int64 (float64 for regression)."""

    run_id: str
    ts: float | None
    task: str
    split: str
    y_true: NDArray[np.int64] | NDArray[np.float64]
    y_pred: NDArray[np.int64] | NDArray[np.float64]


@dataclass(slots=True, frozen=True)
class RunEnd:
    """The run has finished."""

    run_id: str
    ts: float | None


@dataclass(slots=True, frozen=True)
class CvFold:
    """Final losses of one cross-validation fold."""

    run_id: str
    ts: float | None
    fold: int
    train_loss: float
    val_loss: float


@dataclass(slots=True, frozen=True, eq=False)
class Attention:
    """Attention weights, 2-D float64 (heads, positions), all >= 0."""

    run_id: str
    ts: float | None
    weights: NDArray[np.float64]


@dataclass(slots=True, frozen=True, eq=False)
class Features:
    """Feature vectors, 2-D float64 (vectors, dims)."""

    run_id: str
    ts: float | None
    values: NDArray[np.float64]


@dataclass(slots=True, frozen=True, eq=False)
class Scalar:
    """One named training scalar: ``value`` is a float or a 1-D float64 array; NaN stands for a
    value the producer sent as null (not a finite number: a NaN or infinite loss)."""

    run_id: str
    ts: float | None
    step: int | None
    name: str
    value: float | NDArray[np.float64]


Event: TypeAlias = BatchTime | Prediction | RunEnd | CvFold | Attention | Features | Scalar

# The hot path builds BatchTime without its __init__ (see _BatchTimeShell).
_new = object.__new__


class _BatchTimeShell:
    """BatchTime's slots (same names, same order: the same layout), not frozen. The decoder's hot
    path fills one with plain attribute stores and then makes it a BatchTime (``__class__``
    assignment, allowed between identical slot layouts): about half the cost of setting the
    frozen slots through their descriptors. The result is an ordinary, frozen BatchTime."""

    __slots__ = BatchTime.__slots__


_Doc: TypeAlias = dict[str, Any]

#: What ``Decoder.decode_hot`` returns for the common events instead of an event object:
#: ``(run_id, ts, values, name)``, ``values`` a float or a list of floats (a JSON array), ``name``
#: None for a batch_time (without a rank), the scalar's name for a scalar (without a rank).
Hot: TypeAlias = tuple[str, float | None, float | list[float], str | None]


class Decoder:
    """Bytes of one Kafka record -> one :data:`Event`, or :class:`InvalidEvent`.

    ``max_array`` caps every JSON array (-> ``oversized``, checked before conversion);
    ``max_classes`` bounds multiclass labels to ``[0, max_classes)``. Both are fixed at
    construction, as is the per-type dispatch table.
    """

    __slots__ = ("_handlers", "max_array", "max_classes")

    def __init__(self, *, max_array: int = 10_000, max_classes: int = 1000) -> None:
        if type(max_array) is not int or max_array < 1:
            raise ValueError(f"max_array must be an int >= 1, got {max_array!r}")
        if type(max_classes) is not int or max_classes < 2:
            raise ValueError(f"max_classes must be an int >= 2, got {max_classes!r}")
        self.max_array: Final = max_array
        self.max_classes: Final = max_classes
        self._handlers: Final[dict[str, Callable[[_Doc], Event]]] = {
            "batch_time": self._batch_time,
            "prediction": self._prediction,
            "run_end": self._run_end,
            "cv_fold": self._cv_fold,
            "attention": self._attention,
            "features": self._features,
            "scalar": self._scalar,
        }

    def decode(self, key: bytes | None, value: bytes | None) -> Event:
        """Decode and validate one record; raise InvalidEvent (and nothing else) if it is bad.

        ``key`` None is allowed (run_id then comes from the value only); ``value`` None (a
        tombstone) is ``malformed_json``.
        """
        try:
            doc = orjson.loads(value)  # type: ignore[arg-type]  # None -> JSONDecodeError
        except orjson.JSONDecodeError as exc:
            raise _unparseable(value, exc) from exc
        if type(doc) is not dict:
            raise InvalidEvent(
                "not_an_object", f"the value must be a JSON object, got {_snip(doc)}"
            )
        return self._event(key, doc)

    def _event(self, key: bytes | None, doc: _Doc) -> Event:
        try:
            handler = self._handlers[doc["type"]]
        except (KeyError, TypeError):  # absent, unknown, or unhashable (a list or an object)
            raise _schema("type", f"one of {', '.join(self._handlers)}", doc.get("type")) from None
        event = handler(doc)
        if key is not None and key != event.run_id.encode():
            raise _bad_key(key, event.run_id)
        return event

    def decode_hot(self, key: bytes | None, value: bytes | None) -> Hot | Event:
        """``decode`` for the ingest hot path: the same accept/reject decisions and reasons, but a
        batch_time or scalar without a rank comes back as a :data:`Hot` tuple (no event object;
        ``step`` is validated and dropped: nothing downstream reads it). Everything else (other
        types, a rank) is the event ``decode`` returns, decoded from the same parse.

        The checks are those of ``_batch_time`` and ``_scalar`` in the same order (the first
        failing field names the error); ``tests/test_events.py`` runs every agreement test
        through both methods.
        """
        try:
            doc = orjson.loads(value)  # type: ignore[arg-type]  # None -> JSONDecodeError
        except orjson.JSONDecodeError as exc:
            raise _unparseable(value, exc) from exc
        if type(doc) is not dict:
            raise InvalidEvent(
                "not_an_object", f"the value must be a JSON object, got {_snip(doc)}"
            )
        kind = doc.get("type")
        if kind == "batch_time" and doc.get("rank") is None:
            run_id = doc.get("run_id")
            if type(run_id) is not str or not 0 < len(run_id) <= _MAX_RUN_ID:
                raise _schema("run_id", _RUN_ID, run_id)
            ts = doc.get("ts")
            if ts is not None and (type(ts) is not float or ts < 0.0):
                ts = _slow_ts(ts)
            step = doc.get("step")
            if step is not None and (type(step) is not int or not 0 <= step <= _I64_MAX):
                _index("step", step)
            seconds = doc.get("seconds")
            if type(seconds) is float:
                if seconds < 0.0:
                    raise _schema("seconds", _SECONDS, seconds)
            elif type(seconds) is int and seconds >= 0:
                seconds = float(seconds)
            elif type(seconds) is list:
                seconds = self._floats(seconds, "seconds", nonnegative=True).tolist()
            else:
                raise _schema("seconds", _SECONDS, seconds)
            if key is not None and key != run_id.encode():
                raise _bad_key(key, run_id)
            return (run_id, ts, seconds, None)
        if kind == "scalar" and doc.get("rank") is None:
            run_id = _run_id(doc.get("run_id"))
            ts = _ts(doc.get("ts"))
            step = doc.get("step")
            if step is not None:
                _index("step", step)
            name = doc.get("name")
            if type(name) is not str or not 0 < len(name) <= _MAX_NAME:
                raise _schema("name", "a string of 1 to 256 characters", name)
            number = doc.get("value", _MISSING)
            if number is None:
                number = math.nan
            elif number is _MISSING:
                raise _schema("value", "present (a number, null or an array of them)", None)
            elif type(number) is float:
                pass
            elif type(number) is int:
                number = float(number)
            elif type(number) is list:
                number = self._nullable_floats(number, "value").tolist()
            else:
                raise _schema(
                    "value", "a number, null or a non-empty array of numbers or nulls", number
                )
            if key is not None and key != run_id.encode():
                raise _bad_key(key, run_id)
            return (run_id, ts, number, name)
        return self._event(key, doc)

    # ------------------------------------------------------------------ one handler per type
    def _batch_time(self, doc: _Doc) -> BatchTime:
        # The hot path: inline fast checks, the slow helpers handle everything else.
        run_id = doc.get("run_id")
        if type(run_id) is not str or not 0 < len(run_id) <= _MAX_RUN_ID:
            raise _schema("run_id", _RUN_ID, run_id)
        ts = doc.get("ts")
        if ts is not None and (type(ts) is not float or ts < 0.0):
            ts = _slow_ts(ts)
        step = doc.get("step")
        if step is not None and (type(step) is not int or not 0 <= step <= _I64_MAX):
            step = _index("step", step)
        seconds = doc.get("seconds")
        if type(seconds) is float:
            if seconds < 0.0:
                raise _schema("seconds", _SECONDS, seconds)
        elif type(seconds) is int and seconds >= 0:
            seconds = float(seconds)
        elif type(seconds) is list:
            seconds = self._floats(seconds, "seconds", nonnegative=True)
        else:
            raise _schema("seconds", _SECONDS, seconds)
        rank = doc.get("rank")
        if rank is not None and (type(rank) is not int or not 0 <= rank <= _MAX_RANK):
            rank = _rank(rank)
        event: Any = _new(_BatchTimeShell)
        event.run_id = run_id
        event.ts = ts
        event.step = step
        event.seconds = seconds
        event.rank = rank
        event.__class__ = BatchTime
        return event  # type: ignore[no-any-return]

    def _prediction(self, doc: _Doc) -> Prediction:
        run_id = _run_id(doc.get("run_id"))
        ts = _ts(doc.get("ts"))
        task = doc.get("task")
        split = doc.get("split")
        if split is None:
            split = DEFAULT_SPLIT
        elif type(split) is not str or _SPLIT_RE.match(split) is None:
            raise _schema("split", "1 to 64 of A-Z a-z 0-9 _ . - (or null)", split)
        y_true: NDArray[np.int64] | NDArray[np.float64]
        y_pred: NDArray[np.int64] | NDArray[np.float64]
        if task == "regression":
            y_true = self._floats(doc.get("y_true"), "y_true")
            y_pred = self._floats(doc.get("y_pred"), "y_pred")
        elif task == "binary":
            y_true = self._labels(doc.get("y_true"), "y_true", 2)
            y_pred = self._labels(doc.get("y_pred"), "y_pred", 2)
        elif task == "multiclass":
            y_true = self._labels(doc.get("y_true"), "y_true", self.max_classes)
            y_pred = self._labels(doc.get("y_pred"), "y_pred", self.max_classes)
        else:
            raise _schema("task", f"one of {', '.join(TASKS)}", task)
        if len(y_true) != len(y_pred):
            raise InvalidEvent(
                "length_mismatch",
                f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}; they must pair up",
            )
        return Prediction(run_id, ts, task, split, y_true, y_pred)

    def _run_end(self, doc: _Doc) -> RunEnd:
        return RunEnd(_run_id(doc.get("run_id")), _ts(doc.get("ts")))

    def _cv_fold(self, doc: _Doc) -> CvFold:
        run_id = _run_id(doc.get("run_id"))
        ts = _ts(doc.get("ts"))
        fold = doc.get("fold")
        if fold is None:
            raise _schema("fold", _INDEX, None)
        return CvFold(
            run_id,
            ts,
            _index("fold", fold),
            _number("train_loss", doc.get("train_loss")),
            _number("val_loss", doc.get("val_loss")),
        )

    def _attention(self, doc: _Doc) -> Attention:
        run_id = _run_id(doc.get("run_id"))
        ts = _ts(doc.get("ts"))
        return Attention(run_id, ts, self._matrix(doc.get("weights"), "weights", nonnegative=True))

    def _features(self, doc: _Doc) -> Features:
        run_id = _run_id(doc.get("run_id"))
        ts = _ts(doc.get("ts"))
        return Features(run_id, ts, self._matrix(doc.get("values"), "values", nonnegative=False))

    def _scalar(self, doc: _Doc) -> Scalar:
        run_id = _run_id(doc.get("run_id"))
        ts = _ts(doc.get("ts"))
        step = doc.get("step")
        if step is not None:
            step = _index("step", step)
        rank = doc.get("rank")
        if rank is not None:
            _rank(rank)
        name = doc.get("name")
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME:
            raise _schema("name", "a string of 1 to 256 characters", name)
        value = doc.get("value", _MISSING)
        if value is None:
            value = math.nan
        elif value is _MISSING:
            raise _schema("value", "present (a number, null or an array of them)", None)
        elif type(value) is float:
            pass
        elif type(value) is int:
            value = float(value)
        elif type(value) is list:
            value = self._nullable_floats(value, "value")
        else:
            raise _schema("value", "a number, null or a non-empty array of numbers or nulls", value)
        return Scalar(run_id, ts, step, name, value)

    # ------------------------------------------------------------------ arrays
    def _nullable_floats(self, value: list[Any], field: str) -> NDArray[np.float64]:
        """A non-empty JSON array of numbers and nulls -> 1-D float64, null as NaN."""
        if not value:
            raise _schema(field, "a non-empty array of numbers or nulls", value)
        if len(value) > self.max_array:
            raise _oversized(field, len(value), self.max_array)
        types = set(map(type, value))
        if types <= _NUMBER_TYPES:
            return np.array(value, dtype=np.float64)
        if not types <= _NULLABLE_NUMBER_TYPES:
            raise _bad_item(field, value, "numbers or nulls", _is_not_nullable_number)
        return np.array([math.nan if x is None else x for x in value], dtype=np.float64)

    def _floats(self, value: Any, field: str, *, nonnegative: bool = False) -> NDArray[np.float64]:
        """A non-empty JSON array of numbers -> 1-D float64 (>= 0 if ``nonnegative``)."""
        what = "numbers >= 0" if nonnegative else "numbers"
        if type(value) is not list or not value:
            raise _schema(field, f"a non-empty array of {what}", value)
        if len(value) > self.max_array:
            raise _oversized(field, len(value), self.max_array)
        # np.array(..., float64) would turn True into 1.0 and "1.5" into 1.5: check types first.
        if not set(map(type, value)) <= _NUMBER_TYPES:
            raise _bad_item(field, value, what, _is_not_number)
        array = np.array(value, dtype=np.float64)
        if nonnegative and array.min() < 0.0:
            raise _bad_item(field, value, what, _is_negative)
        return array

    def _labels(self, value: Any, field: str, n_classes: int) -> NDArray[np.int64]:
        """A non-empty JSON array of integers in [0, n_classes) -> 1-D int64."""
        if type(value) is not list or not value:
            raise _schema(field, "a non-empty array of integer labels", value)
        if len(value) > self.max_array:
            raise _oversized(field, len(value), self.max_array)
        types = set(map(type, value))
        if types == _INT_TYPES:
            try:
                labels = np.array(value, dtype=np.int64)
            except OverflowError:  # orjson ints reach 2**64 - 1
                raise _out_of_range(field, value, n_classes) from None
        elif types <= _NUMBER_TYPES:
            # JSON Schema "integer" accepts integer-valued floats such as 1.0.
            floats = np.array(value, dtype=np.float64)
            if not (np.floor(floats) == floats).all():
                raise _bad_item(field, value, "integer labels", _is_not_integer)
            if floats.min() < 0.0 or floats.max() >= n_classes:
                raise _out_of_range(field, value, n_classes)
            return floats.astype(np.int64)
        else:
            raise _bad_item(field, value, "integer labels", _is_not_number)
        # One reduction checks both ends: negative int64 values view as huge uint64 values.
        if labels.view(np.uint64).max() >= n_classes:
            raise _out_of_range(field, value, n_classes)
        return labels

    def _matrix(self, value: Any, field: str, *, nonnegative: bool) -> NDArray[np.float64]:
        """A flat array (one row) or an array of equal-length rows of numbers -> 2-D float64."""
        if type(value) is not list or not value:
            raise _schema(field, "a non-empty array of numbers or of non-empty arrays", value)
        if type(value[0]) is not list:
            return self._floats(value, field, nonnegative=nonnegative).reshape(1, -1)
        if len(value) > self.max_array:
            raise _oversized(field, len(value), self.max_array)
        what = "numbers >= 0" if nonnegative else "numbers"
        width = len(value[0])
        ragged = False
        types: set[type] = set()
        for i, row in enumerate(value):
            if type(row) is not list or not row:
                raise _schema(f"{field}[{i}]", f"a non-empty array of {what}", row)
            if len(row) > self.max_array:
                raise _oversized(f"{field}[{i}]", len(row), self.max_array)
            ragged |= len(row) != width
            types.update(map(type, row))
        if not types <= _NUMBER_TYPES:
            for i, row in enumerate(value):
                if not set(map(type, row)) <= _NUMBER_TYPES:
                    raise _bad_item(f"{field}[{i}]", row, what, _is_not_number)
        if ragged:
            # Schema rules first: a negative weight outranks the raggedness.
            for i, row in enumerate(value):
                if nonnegative and min(row) < 0:
                    raise _bad_item(f"{field}[{i}]", row, what, _is_negative)
            lengths = sorted({len(row) for row in value})
            raise InvalidEvent(
                "length_mismatch",
                f"field {field!r} must be rectangular, got rows of lengths {_snip(lengths)}",
            )
        matrix = np.array(value, dtype=np.float64)
        if nonnegative and matrix.min() < 0.0:
            for i, row in enumerate(value):
                if min(row) < 0:
                    raise _bad_item(f"{field}[{i}]", row, what, _is_negative)
        return matrix


# ---------------------------------------------------------------------- scalar fields
_RUN_ID: Final = "a string of 1 to 256 characters"
_TS: Final = "a number >= 0 (or null)"
_SECONDS: Final = "a number >= 0 or a non-empty array of numbers >= 0"
_INDEX: Final = "an integer in [0, 2**63 - 1]"


def _run_id(value: Any) -> str:
    if type(value) is not str or not 0 < len(value) <= _MAX_RUN_ID:
        raise _schema("run_id", _RUN_ID, value)
    return value


def _ts(value: Any) -> float | None:
    if value is None or (type(value) is float and value >= 0.0):
        return value
    return _slow_ts(value)


def _slow_ts(value: Any) -> float:
    if type(value) is int and value >= 0:
        return float(value)
    if type(value) is float and value >= 0.0:
        return value
    raise _schema("ts", _TS, value)


def _index(field: str, value: Any) -> int:
    """An integer field in [0, 2**63 - 1]; integer-valued floats count (JSON Schema "integer")."""
    if type(value) is int and 0 <= value <= _I64_MAX:
        return value
    if type(value) is float and value.is_integer() and 0 <= value <= _I64_MAX:
        return int(value)
    raise _schema(field, _INDEX, value)


def _rank(value: Any) -> int:
    """The optional ``rank`` of batch_time and scalar: an integer in [0, _MAX_RANK]."""
    integral = type(value) is int or (type(value) is float and value.is_integer())
    if integral and 0 <= value <= _MAX_RANK:
        return int(value)
    raise _schema("rank", f"an integer in [0, {_MAX_RANK}] (or null)", value)


def _number(field: str, value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _schema(field, "a number", value)


# ---------------------------------------------------------------------- errors (cold path)
_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlong = 40
_repr.maxlist = 4
_repr.maxdict = 3
_repr.maxlevel = 2
_SNIP: Final = 120


def _snip(value: Any) -> str:
    """A short JSON-ish rendering of part of the payload, never more than 120 characters."""
    if value is None:
        return "null or nothing"
    text = _repr.repr(value)
    return text if len(text) <= _SNIP else text[: _SNIP - 3] + "..."


def _schema(field: str, expected: str, value: Any) -> InvalidEvent:
    return InvalidEvent("schema", f"field {field!r} must be {expected}, got {_snip(value)}")


def _oversized(field: str, n: int, limit: int) -> InvalidEvent:
    return InvalidEvent("oversized", f"field {field!r} has {n} items, more than max_array={limit}")


def _is_not_number(x: Any) -> bool:
    return type(x) is not int and type(x) is not float


def _is_not_nullable_number(x: Any) -> bool:
    return x is not None and _is_not_number(x)


def _is_negative(x: Any) -> bool:
    return bool(x < 0)


def _is_not_integer(x: Any) -> bool:
    return type(x) is float and not x.is_integer()


def _bad_item(
    field: str, items: list[Any], expected: str, bad: Callable[[Any], bool]
) -> InvalidEvent:
    i, x = next((i, x) for i, x in enumerate(items) if bad(x))
    return InvalidEvent(
        "schema", f"field {field!r} must hold {expected}, got {_snip(x)} at index {i}"
    )


def _out_of_range(field: str, items: list[Any], n_classes: int) -> InvalidEvent:
    i, x = next((i, x) for i, x in enumerate(items) if not 0 <= x < n_classes)
    return InvalidEvent(
        "label_out_of_range",
        f"field {field!r} must hold labels in [0, {n_classes}), got {_snip(x)} at index {i}",
    )


def _bad_key(key: bytes, run_id: str) -> InvalidEvent:
    try:
        text = bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        return InvalidEvent("bad_key", f"the record key is not UTF-8: {_snip(bytes(key))}")
    return InvalidEvent(
        "key_mismatch", f"the record key {_snip(text)} differs from run_id {_snip(run_id)}"
    )


class _Scan:
    """Hooks for the stdlib json parser that note non-finite numbers instead of building values."""

    __slots__ = ("non_finite",)

    def __init__(self) -> None:
        self.non_finite = False

    def constant(self, _token: str) -> None:  # NaN, Infinity, -Infinity
        self.non_finite = True

    def number(self, token: str) -> None:  # float(token) never raises for a JSON number token
        if math.isinf(float(token)):
            self.non_finite = True


def _unparseable(value: Any, exc: orjson.JSONDecodeError) -> InvalidEvent:
    """Classify a value orjson rejected: ``non_finite`` for JSON with NaN/overflow, else malformed.

    Python's ``json`` module writes NaN/Infinity by default, so a producer sending them is
    realistic and deserves a precise reason. The stdlib parser runs only on this cold path, with
    hooks that never build numbers (so no int-digit limit applies).
    """
    if value is None:
        return InvalidEvent("malformed_json", "the record has no value (a tombstone)")
    scan = _Scan()
    try:
        json.loads(
            value, parse_constant=scan.constant, parse_float=scan.number, parse_int=scan.number
        )
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        pass
    else:
        if scan.non_finite:
            return InvalidEvent(
                "non_finite", "the value holds NaN, Infinity or a number beyond the float64 range"
            )
    return InvalidEvent("malformed_json", f"the value is not JSON: {str(exc)[:_SNIP]}")
