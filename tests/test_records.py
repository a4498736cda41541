"""metricsd.records: encode never emits NaN or inf; dead letters and profiles fit the schemas;
summaries too large for the topic are reduced exactly as documented (sklearn as the oracle)."""

from __future__ import annotations

import base64
import math
import tracemalloc
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd import kafka
from metricsd.config import MonitorSettings
from metricsd.events import Decoder, InvalidEvent
from metricsd.monitor import Monitor
from metricsd.profiler import Profiler
from metricsd.records import (
    DEAD_LETTER_KEY_BYTES,
    DEAD_LETTER_VALUE_BYTES,
    TOP_LABELS,
    dead_letter,
    dead_letter_caps,
    dead_letter_key,
    dumps,
    encode,
    fit_summary,
    profile_record,
    sparse_confusion,
)
from sklearn import metrics as skm
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


def test_encoded_bytes_that_are_kept_occupy_their_length_not_orjsons_buffer() -> None:
    """What the outbox holds until acked: 1,000 encoded summaries of ~300 bytes must occupy about
    that, not orjson's 4 KiB working buffer each (orjson >= 3.12 returns it untrimmed)."""
    record = {"type": "summary", "id": "g|r|batch_time|0:1|count:1000|7", "metrics": {"mean": 0.5}}
    assert dumps(record) == orjson.dumps(record) and encode(record) == orjson.dumps(record)
    for make in (dumps, encode):
        tracemalloc.start()
        try:
            kept = [make({**record, "seq": i}) for i in range(1000)]
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 1000 * 1024, f"{make.__name__}: {held / 1000:.0f} bytes per record kept"
        assert len(kept) == 1000


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


@pytest.mark.parametrize("limit", [1_048_576, 1_048_588, 200_000, 50_000, 8_192])
def test_a_dead_letter_fits_its_topics_limit_with_the_caps_derived_from_it(limit: int) -> None:
    """``dead_letter_caps(limit)``: a dead letter of a 10 MB key and value, with its Kafka key,
    stays within ``limit`` as the producer measures it; Kafka's 1 MiB gives the documented
    defaults."""
    key, value = b"k" * 10_000_000, b"\xff" * 10_000_000
    with pytest.raises(InvalidEvent) as info:
        DECODER.decode(key, value)
    max_value, max_key = dead_letter_caps(limit)
    record = dead_letter(
        info.value, topic="t" * 249, partition=2**31 - 1, offset=2**63 - 1,
        timestamp_ms=2**63 - 1, key=key, value=value, emitted_at=1e12,
        max_value_bytes=max_value, max_key_bytes=max_key,
    )  # fmt: skip
    assert kafka.record_size(dead_letter_key(key), encode(record)) <= limit
    assert record["value_truncated"] and record["key_truncated"] and max_value > 0
    if limit >= 1_048_576:
        assert (max_value, max_key) == (DEAD_LETTER_VALUE_BYTES, DEAD_LETTER_KEY_BYTES)


# -- summaries made to fit the output topic ---------------------------------------------------
SUMMARY_SCHEMA = validator("summary")


def multiclass_summary(y_true: list[int], y_pred: list[int]) -> dict[str, Any]:
    """The count-window summary the monitor computes for one multiclass prediction event."""
    monitor = Monitor(MonitorSettings(window=10_000, time_windows=()))
    event = {"type": "prediction", "run_id": "r", "task": "multiclass",
             "y_true": y_true, "y_pred": y_pred}  # fmt: skip
    monitor.ingest([DECODER.decode(None, orjson.dumps(event))], now=1.0)
    (record,) = monitor.due(1.0)
    return record


def wide_window(labels: int, pairs: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, labels, pairs)
    y_pred = np.where(rng.random(pairs) < 0.6, y_true, rng.integers(0, labels, pairs))
    return y_true.tolist(), y_pred.tolist()


def test_a_summary_that_fits_is_encoded_as_it_is() -> None:
    """Under the limit: byte for byte ``encode``, form None (the dense matrix stays)."""
    record = multiclass_summary(*wide_window(5, 50))
    value, form = fit_summary(record, 10**6)
    assert (value, form) == (encode(record), None)
    assert "confusion_matrix" in orjson.loads(value)["metrics"]


def test_sparse_triples_are_the_non_zero_cells_of_sklearn_confusion_matrix() -> None:
    """1,000 labels, 3,000 pairs: the 2 MB dense matrix becomes its non-zero cells, row-major,
    as [true label, predicted label, count]; everything else is unchanged."""
    y_true, y_pred = wide_window(1000, 3000)
    record = multiclass_summary(y_true, y_pred)
    dense = encode(record)
    assert len(dense) > 1_900_000
    value, form = fit_summary(record, 1_000_000)
    assert form == "sparse" and len(value) < 60_000
    out = orjson.loads(value)
    SUMMARY_SCHEMA.validate(out)
    labels = sorted(set(y_true) | set(y_pred))
    cells = skm.confusion_matrix(y_true, y_pred, labels=labels)
    t, p = np.nonzero(cells)
    expected = [[labels[i], labels[j], int(cells[i, j])] for i, j in zip(t, p, strict=True)]
    assert out["metrics"]["confusion_sparse"] == expected
    assert sum(c for _, _, c in expected) == 3000
    rest = {k: v for k, v in orjson.loads(dense)["metrics"].items() if k != "confusion_matrix"}
    assert {k: v for k, v in out["metrics"].items() if k != "confusion_sparse"} == rest
    assert {k: v for k, v in out.items() if k != "metrics"} == {
        k: v for k, v in orjson.loads(dense).items() if k != "metrics"
    }
    assert "confusion_matrix" in record["metrics"]  # the input record is left alone


def test_omitted_matrix_keeps_headline_metrics_and_the_labels_of_most_support() -> None:
    """Not even the triples fit: no matrix, a reason naming both sizes and the limit, the 100
    labels of most support (ties: the smaller label) with their support, and the headline
    metrics of sklearn over every label."""
    y_true, y_pred = wide_window(1000, 8000, seed=1)
    record = multiclass_summary(y_true, y_pred)
    sparse_bytes = len(fit_summary(record, 10**6)[0])
    value, form = fit_summary(record, 20_000)
    assert form == "omitted" and len(value) <= 20_000
    out = orjson.loads(value)
    SUMMARY_SCHEMA.validate(out)
    m = out["metrics"]
    assert "confusion_matrix" not in m and "confusion_sparse" not in m
    assert m["confusion_omitted"] == (
        f"the confusion matrix of {m['labels_total']} labels is {len(encode(record))} bytes "
        f"dense and {sparse_bytes} bytes as sparse triples, over the limit of 20000 bytes"
    )
    present = np.array(sorted(set(y_true) | set(y_pred)))
    support = np.bincount(y_true, minlength=1000)[present]
    ranked = sorted(range(present.size), key=lambda i: (-support[i], present[i]))[:TOP_LABELS]
    kept = sorted(ranked)
    assert m["labels"] == present[kept].tolist() and m["support"] == support[kept].tolist()
    assert m["labels_total"] == present.size and m["labels_truncated"] is True
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    for average in ("macro", "weighted"):
        f1 = skm.f1_score(y_true, y_pred, average=average, zero_division=0)
        assert m[f"f1_{average}"] == pytest.approx(f1, abs=1e-12)
    assert m["precision_macro"] == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12
    )


def test_omitted_with_few_labels_is_not_flagged_truncated() -> None:
    """A tiny limit with fewer labels than TOP_LABELS: every label kept, labels_truncated false;
    a record that fits no form comes back longer than the limit (the outbox drops it)."""
    y_true, y_pred = wide_window(20, 400, seed=2)
    record = multiclass_summary(y_true, y_pred)
    value, form = fit_summary(record, 1_000)
    m = orjson.loads(value)["metrics"]
    assert form == "omitted" and len(value) <= 1_000
    assert m["labels"] == sorted(set(y_true) | set(y_pred)) and m["labels_truncated"] is False
    assert m["support"] == np.bincount(y_true)[m["labels"]].tolist()
    value, form = fit_summary(record, 300)
    assert form == "omitted" and len(value) > 300


def test_records_without_a_matrix_are_never_reduced() -> None:
    """Only a confusion matrix is reduced: any other record comes back encoded as it is."""
    record = {"type": "summary", "run_id": "r", "metrics": {"mean": 1.0, "big": [0] * 1000}}
    assert fit_summary(record, 100) == (encode(record), None)
    assert fit_summary({"type": "profile", "x": [1] * 100}, 10)[1] is None


def test_sparse_confusion_of_an_empty_matrix() -> None:
    """No labels: no triples."""
    empty = np.zeros((0, 0), dtype=np.int64)
    assert sparse_confusion(np.zeros(0, dtype=np.int64), empty) == []
