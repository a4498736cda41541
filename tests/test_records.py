"""metricsd.records: encode never emits NaN or inf; dead letters and profiles fit the schemas."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.events import Decoder, InvalidEvent
from metricsd.profiler import Profiler
from metricsd.records import dead_letter, dead_letter_key, encode, profile_record
from test_schemas import validator

DECODER = Decoder()
DEAD_LETTER_SCHEMA = validator("dead_letter")
PROFILE_SCHEMA = validator("profile")


def _plain(value: Any) -> Any:
    """The JSON-ready model of a record: non-finite floats become None, arrays become lists."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


any_float = st.floats(allow_nan=True, allow_infinity=True)
float_arrays = st.lists(any_float, min_size=1, max_size=6).map(np.array)
record_leaves = (
    any_float
    | any_float.map(np.float64)
    | st.integers(-(2**63), 2**63 - 1)
    | st.none()
    | st.booleans()
    | st.text(max_size=5)
    | float_arrays
    | float_arrays.map(lambda a: np.stack([a, a])[:, ::-1])  # not C-contiguous
    | st.integers(-5, 5).map(np.int64)
)
records = st.recursive(
    record_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(deadline=None)  # jsonschema and a busy machine make timings noisy
@given(record=st.dictionaries(st.text(max_size=6), records, max_size=5))
def test_encode_never_emits_nan(record: dict[str, Any]) -> None:
    """encode turns every NaN/inf (float, numpy scalar or array item) into null, nothing else."""
    out = encode(record)
    assert orjson.loads(out) == _plain(record)  # orjson.loads rejects NaN/Infinity


def test_encode_float32_nan_is_null() -> None:
    """A float32 NaN or inf, as a scalar or in an array, is encoded as null."""
    out = encode({"a": np.float32("nan"), "b": np.array([np.inf, 1.0], dtype=np.float32)})
    assert orjson.loads(out) == {"a": None, "b": [None, 1.0]}


def test_encode_rejects_what_it_cannot_represent() -> None:
    """An unknown type in a record is a caller bug and raises instead of being mangled."""
    with pytest.raises(TypeError):
        encode({"x": object()})


@settings(deadline=None)  # jsonschema and a busy machine make timings noisy
@given(
    key=st.none() | st.binary(max_size=16),
    value=st.none() | st.binary(max_size=64),
    limit=st.none() | st.integers(0, 80),
    key_limit=st.none() | st.integers(0, 20),
)
def test_dead_letter_record(
    key: bytes | None, value: bytes | None, limit: int | None, key_limit: int | None
) -> None:
    """dead_letter builds a schema-valid record whose base64 fields give back the (capped) bytes."""
    with pytest.raises(InvalidEvent) as info:
        DECODER.decode(key, b"[" if value is None else value + b"[")  # never valid JSON
    exc = info.value
    record = dead_letter(
        exc,
        topic="in",
        partition=2,
        offset=7,
        timestamp_ms=None,
        key=key,
        value=value,
        emitted_at=5.0,
        max_value_bytes=limit,
        max_key_bytes=key_limit,
    )
    DEAD_LETTER_SCHEMA.validate(orjson.loads(encode(record)))
    assert record["reason"] == exc.reason and record["detail"] == exc.detail
    if key is None:
        assert record["key_b64"] is None and record["key_truncated"] is False
    else:
        kept_key = key if key_limit is None else key[:key_limit]
        assert base64.b64decode(record["key_b64"]) == kept_key
        assert record["key_truncated"] is (len(kept_key) < len(key))
    if value is None:
        assert record["value_b64"] is None and record["value_truncated"] is False
    else:
        kept = value if limit is None else value[:limit]
        assert base64.b64decode(record["value_b64"]) == kept
        assert record["value_truncated"] is (len(kept) < len(value))


def test_a_dead_letter_of_any_record_fits_the_default_message_limit() -> None:
    """Worst case: a key and a value of 10 MB each; with the default caps the dead letter and its
    Kafka key stay below 1 MiB together (Kafka's default max.message.bytes)."""
    key, value = b"k" * 10_000_000, b"\xff" * 10_000_000
    with pytest.raises(InvalidEvent) as info:
        DECODER.decode(key, value)
    record = dead_letter(info.value, topic="t" * 249, partition=2**31 - 1, offset=2**63 - 1,
                         timestamp_ms=2**63 - 1, key=key, value=value,
                         emitted_at=1.8e9)  # fmt: skip
    kafka_key = dead_letter_key(key)
    assert kafka_key is not None and len(kafka_key) == 1024
    assert len(encode(record)) + len(kafka_key) < 1_048_576 - 1_000  # room for record framing
    assert record["key_truncated"] and record["value_truncated"]
    DEAD_LETTER_SCHEMA.validate(orjson.loads(encode(record)))


def test_profile_record_fits_the_schema() -> None:
    """A profile record built from a real profiler report validates against profile.schema.json."""
    profiler = Profiler()
    for _ in range(3):
        with profiler.profile_operation("tick", "tick"), profiler.profile_operation("x", "stats"):
            pass
    record = profile_record(profiler.report(60.0), instance="host-1", emitted_at=12.5)
    PROFILE_SCHEMA.validate(orjson.loads(encode(record)))
    assert record["instance"] == "host-1" and record["emitted_at"] == 12.5
    assert record["ticks"] == 3
