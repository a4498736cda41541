"""schemas/*.json: valid draft 2020-12 schemas that accept and reject what they describe."""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, validators
from metricsd.events import REASONS, Decoder, InvalidEvent
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
EVENT_TYPES = ("batch_time", "prediction", "run_end", "cv_fold", "attention", "features", "scalar")
RECORD_TYPES = ("summary", "profile", "dead_letter")
ALL_NAMES = (*EVENT_TYPES, "event", *RECORD_TYPES)


def load(name: str) -> dict[str, Any]:
    """The parsed schemas/<name>.schema.json."""
    result: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return result


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    # JSON Schema patterns are ECMA-262, where "$" matches only at the very end; Python's re.search
    # (used by jsonschema) also matches before a final "\n", which would accept "val\n".
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if validator.is_type(instance, "string") and not re.search(pattern, instance):
        yield from Draft202012Validator({"pattern": pattern}).iter_errors(instance)


_Validator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


def _dialectless(name: str) -> dict[str, Any]:
    # Without "$schema", a $ref into a sibling keeps _Validator (jsonschema would otherwise pick
    # the stock validator class registered for the sibling's declared dialect).
    return {k: v for k, v in load(name).items() if k != "$schema"}


REGISTRY: Registry[Any] = Registry().with_resources(
    (load(name)["$id"], DRAFT202012.create_resource(_dialectless(name))) for name in ALL_NAMES
)


def validator(name: str) -> Any:
    """A validator for schemas/<name>.schema.json that resolves references to its siblings."""
    return _Validator(_dialectless(name), registry=REGISTRY)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            if key not in ("examples", "const", "enum"):
                yield from _walk(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{path}/{i}")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    """Every schema file is itself a valid draft 2020-12 schema."""
    schema = load(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_schema_is_documented(name: str) -> None:
    """Every schema has an $id naming its file, a title, a description and one per field."""
    schema = load(name)
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert schema["title"] and schema["description"]
    undocumented = [
        f"{path}/properties/{field}"
        for path, node in _walk(schema)
        for field, sub in node.get("properties", {}).items()
        if isinstance(node.get("properties"), dict)
        and "/if" not in path  # conditions restate fields, they do not define them
        and "/then" not in path
        and "description" not in sub
    ]
    assert undocumented == []


@pytest.mark.parametrize("name", ALL_NAMES)
def test_examples_validate(name: str) -> None:
    """Each schema's examples validate against it (and events against event.schema.json)."""
    schema = load(name)
    examples = schema.get("examples", [])
    assert examples or name == "event"
    for example in examples:
        validator(name).validate(example)
        if name in EVENT_TYPES:
            validator("event").validate(example)


@pytest.mark.parametrize("name", EVENT_TYPES)
def test_event_schemas_share_common_fields(name: str) -> None:
    """run_id and ts are defined identically everywhere and extra properties are allowed."""
    schema, reference = load(name), load("batch_time")
    assert schema["properties"]["run_id"] == reference["properties"]["run_id"]
    assert schema["properties"]["ts"] == reference["properties"]["ts"]
    assert schema["properties"]["type"]["const"] == name
    assert schema["additionalProperties"] is True
    assert {"type", "run_id"} <= set(schema["required"])


def test_schema_limits_match_decoder_defaults() -> None:
    """maxItems and the top multiclass label are the decoder's max_array and max_classes - 1."""
    decoder = Decoder()
    max_items = {
        node["maxItems"]
        for name in EVENT_TYPES
        for _, node in _walk(load(name))
        if "maxItems" in node
    }
    assert max_items == {decoder.max_array}
    label = load("prediction")["$defs"]["multiclass_label"]
    assert (label["minimum"], label["maximum"]) == (0, decoder.max_classes - 1)
    assert load("event")["properties"]["type"]["enum"] == list(EVENT_TYPES)


def test_dead_letter_reasons_match_code() -> None:
    """The dead_letter reason enum lists exactly metricsd.events.REASONS, in order."""
    assert load("dead_letter")["properties"]["reason"]["enum"] == list(REASONS)


def test_dead_letter_example_is_a_real_rejection() -> None:
    """The dead_letter example's value really is rejected by the decoder for the stated reason,
    by ``decode`` and by the ingest hot path's ``decode_hot`` alike."""
    example = load("dead_letter")["examples"][0]
    key = base64.b64decode(example["key_b64"])
    decoder = Decoder()
    for decode in (decoder.decode, decoder.decode_hot):
        with pytest.raises(InvalidEvent) as info:
            decode(key, base64.b64decode(example["value_b64"]))
        assert info.value.reason == example["reason"]


# ---------------------------------------------------------------------- events: tables
BT = {"type": "batch_time", "run_id": "r1", "seconds": 0.5}
PRED = {"type": "prediction", "run_id": "r1", "task": "binary", "y_true": [0, 1], "y_pred": [1, 1]}
MC = {**PRED, "task": "multiclass", "y_true": [0, 999], "y_pred": [5, 0]}
REG = {**PRED, "task": "regression", "y_true": [-1.5, 2], "y_pred": [0.0, 1e300]}
CV = {"type": "cv_fold", "run_id": "r1", "fold": 0, "train_loss": 0.1, "val_loss": -0.2}
ATT = {"type": "attention", "run_id": "r1", "weights": [[0.5, 0.5], [1, 0]]}
FEAT = {"type": "features", "run_id": "r1", "values": [[-1, 2.5]]}
END = {"type": "run_end", "run_id": "r1"}

VALID_EVENTS = [
    pytest.param({**BT, "ts": 0, "step": 0}, id="batch_time-zero-ts-and-step"),
    pytest.param({**BT, "ts": None, "step": None}, id="batch_time-null-optionals"),
    pytest.param({**BT, "step": 42.0}, id="batch_time-integer-valued-float-step"),
    pytest.param({**BT, "step": 2**63 - 1}, id="batch_time-max-step"),
    pytest.param({**BT, "seconds": [0, 0.1, 7]}, id="batch_time-list"),
    pytest.param({**BT, "seconds": -0.0}, id="batch_time-negative-zero"),
    pytest.param({**BT, "extra": {"any": ["thing"]}}, id="batch_time-extra-property"),
    pytest.param({**BT, "run_id": "ü" * 256}, id="batch_time-256-code-points"),
    pytest.param({**BT, "rank": 0}, id="batch_time-rank-0"),
    pytest.param({**BT, "rank": 1_000_000, "seconds": [0.1, 0.2]}, id="batch_time-max-rank"),
    pytest.param({**BT, "rank": 3.0}, id="batch_time-integer-valued-float-rank"),
    pytest.param({**BT, "rank": None}, id="batch_time-null-rank"),
    pytest.param(PRED, id="prediction-binary"),
    pytest.param({**PRED, "y_true": [0.0, 1.0]}, id="prediction-binary-float-labels"),
    pytest.param({**PRED, "split": "test.v-2_x"}, id="prediction-split"),
    pytest.param({**PRED, "split": None}, id="prediction-null-split"),
    pytest.param(MC, id="prediction-multiclass"),
    pytest.param(REG, id="prediction-regression"),
    pytest.param({**PRED, "y_pred": [1]}, id="prediction-unequal-lengths-schema-cannot-tell"),
    pytest.param(CV, id="cv_fold"),
    pytest.param(ATT, id="attention-matrix"),
    pytest.param({**ATT, "weights": [0.1, 0.9]}, id="attention-flat"),
    pytest.param({**ATT, "weights": [[1], [1, 2]]}, id="attention-ragged-schema-cannot-tell"),
    pytest.param(FEAT, id="features-matrix"),
    pytest.param({**FEAT, "values": [1, -2]}, id="features-flat"),
    pytest.param(END, id="run_end"),
    pytest.param({**END, "ts": 1764000000.5}, id="run_end-ts"),
]

INVALID_EVENTS = [
    pytest.param({"run_id": "r1", "seconds": 1}, id="no-type"),
    pytest.param({**BT, "type": "summary"}, id="unknown-type"),
    pytest.param({**BT, "type": ["batch_time"]}, id="type-not-a-string"),
    pytest.param({"type": "batch_time", "seconds": 1}, id="no-run_id"),
    pytest.param({**BT, "run_id": ""}, id="empty-run_id"),
    pytest.param({**BT, "run_id": "x" * 257}, id="long-run_id"),
    pytest.param({**BT, "run_id": 7}, id="run_id-not-a-string"),
    pytest.param({**BT, "ts": -1}, id="negative-ts"),
    pytest.param({**BT, "ts": "1764000000"}, id="string-ts"),
    pytest.param({**BT, "ts": True}, id="boolean-ts"),
    pytest.param({**BT, "step": -1}, id="negative-step"),
    pytest.param({**BT, "step": 1.5}, id="fractional-step"),
    pytest.param({**BT, "step": 2**63}, id="step-beyond-int64"),
    pytest.param({**BT, "rank": -1}, id="negative-rank"),
    pytest.param({**BT, "rank": 1_000_001}, id="rank-beyond-max"),
    pytest.param({**BT, "rank": 1.5}, id="fractional-rank"),
    pytest.param({**BT, "rank": True}, id="boolean-rank"),
    pytest.param({**BT, "rank": "3"}, id="string-rank"),
    pytest.param({"type": "batch_time", "run_id": "r1"}, id="no-seconds"),
    pytest.param({**BT, "seconds": -0.1}, id="negative-seconds"),
    pytest.param({**BT, "seconds": True}, id="boolean-seconds"),
    pytest.param({**BT, "seconds": []}, id="empty-seconds"),
    pytest.param({**BT, "seconds": [0.1, False]}, id="boolean-in-seconds"),
    pytest.param({**BT, "seconds": [0.1, -2]}, id="negative-in-seconds"),
    pytest.param({**BT, "seconds": [[0.1]]}, id="nested-seconds"),
    pytest.param({**BT, "seconds": [0.0] * 10_001}, id="oversized-seconds"),
    pytest.param({**PRED, "task": "ranking"}, id="unknown-task"),
    pytest.param({k: v for k, v in PRED.items() if k != "task"}, id="no-task"),
    pytest.param({**PRED, "split": ""}, id="empty-split"),
    pytest.param({**PRED, "split": "a b"}, id="split-with-space"),
    pytest.param({**PRED, "split": "val\n"}, id="split-with-trailing-newline"),
    pytest.param({**PRED, "split": "x" * 65}, id="long-split"),
    pytest.param({**PRED, "y_true": []}, id="empty-y_true"),
    pytest.param({**PRED, "y_true": [0, 2]}, id="binary-label-2"),
    pytest.param({**PRED, "y_pred": [0.5, 1]}, id="binary-score-not-label"),
    pytest.param({**PRED, "y_pred": [True, False]}, id="binary-booleans"),
    pytest.param({**MC, "y_true": [0, 1000]}, id="multiclass-label-1000"),
    pytest.param({**MC, "y_true": [0, -1]}, id="multiclass-negative-label"),
    pytest.param({**REG, "y_true": [1, "2"]}, id="regression-string"),
    pytest.param({**REG, "y_pred": [1, None]}, id="regression-null"),
    pytest.param({**CV, "fold": -1}, id="negative-fold"),
    pytest.param({**CV, "val_loss": None}, id="null-val_loss"),
    pytest.param({k: v for k, v in CV.items() if k != "train_loss"}, id="no-train_loss"),
    pytest.param({**ATT, "weights": [[0.5, -0.5]]}, id="negative-weight"),
    pytest.param({**ATT, "weights": [[]]}, id="empty-row"),
    pytest.param({**ATT, "weights": [1, [2]]}, id="mixed-flat-and-rows"),
    pytest.param({**ATT, "weights": [[[1]]]}, id="three-dimensional"),
    pytest.param({**FEAT, "values": []}, id="empty-values"),
    pytest.param({**FEAT, "values": {"a": 1}}, id="values-object"),
    pytest.param([BT], id="not-an-object"),
]


@pytest.mark.parametrize("doc", VALID_EVENTS)
def test_valid_events(doc: dict[str, Any]) -> None:
    """Documents that follow the rules are accepted by their own schema and by event.schema.json."""
    assert validator(doc["type"]).is_valid(doc)
    assert validator("event").is_valid(doc)


@pytest.mark.parametrize("doc", INVALID_EVENTS)
def test_invalid_events(doc: Any) -> None:
    """Documents that break a rule are rejected by event.schema.json."""
    assert not validator("event").is_valid(doc)


def test_ecma_pattern_oracle_differs_from_python_re_only_at_final_newline() -> None:
    """The oracle's ECMA "$" rejects "val\\n", which plain jsonschema (Python re) accepts."""
    doc = {**PRED, "split": "val\n"}
    assert Draft202012Validator(load("prediction")).is_valid(doc)
    assert not validator("prediction").is_valid(doc)


# ---------------------------------------------------------------------- records out
NUMERIC_METRICS = {
    "count": 3,
    "mean": 0.15,
    "std": 0.01,
    "min": 0.14,
    "max": 0.16,
    "median": 0.15,
    "p95": 0.159,
    "p99": 0.1598,
    "cv": None,
    "skewness": None,
    "kurtosis": None,
}
BINARY_METRICS = {
    "precision": 0.5,
    "recall": 1.0,
    "f1": 0.6667,
    "accuracy": 0.5,
    "tp": 1,
    "fp": 1,
    "fn": 0,
    "tn": 0,
}
MULTICLASS_METRICS = {
    "accuracy": 0.5,
    "precision_macro": None,
    "recall_macro": 0.5,
    "f1_macro": 0.4,
    "f1_micro": 0.5,
    "f1_weighted": 0.45,
    "labels": [0, 3],
    "confusion_matrix": [[1, 0], [1, 0]],
}
REGRESSION_METRICS = {
    "mse": 0.25,
    "rmse": 0.5,
    "mae": 0.5,
    "r2": -3.0,
    "pearson_r": None,
    "within_threshold": 1.0,
}
SUMMARY = {
    "type": "summary",
    "schema_version": 1,
    "id": "r1|batch_time|count:1000|0",
    "run_id": "r1",
    "stream": "batch_time",
    "window": {"kind": "count", "size": 1000},
    "count": 3,
    "total": 3,
    "metrics": NUMERIC_METRICS,
    "seq": 0,
    "first_ts": 1.0,
    "last_ts": 2.0,
    "emitted_at": 3.0,
    "final": False,
}
PRED_SUMMARY = {**SUMMARY, "stream": "prediction/val", "task": "binary", "metrics": BINARY_METRICS}


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


VALID_SUMMARIES = [
    pytest.param(SUMMARY, id="batch_time"),
    pytest.param(
        {**SUMMARY, "window": {"kind": "time", "seconds": 60, "truncated": True}}, id="time-window"
    ),
    pytest.param(
        {
            **SUMMARY,
            "count": 0,
            "first_ts": None,
            "last_ts": None,
            "final": True,
            "metrics": {**{k: None for k in NUMERIC_METRICS}, "count": 0},
        },
        id="empty-window-all-null",
    ),
    pytest.param({**SUMMARY, "metrics": {**NUMERIC_METRICS, "p50": 0.15}}, id="extra-metric"),
    pytest.param(PRED_SUMMARY, id="binary"),
    pytest.param(
        {
            **PRED_SUMMARY,
            "stream": "prediction/test",
            "task": "multiclass",
            "metrics": MULTICLASS_METRICS,
        },
        id="multiclass",
    ),
    pytest.param(
        {**PRED_SUMMARY, "task": "regression", "metrics": REGRESSION_METRICS}, id="regression"
    ),
    pytest.param({**SUMMARY, "stream": "cv", "metrics": {"val_mean": 0.3, "gap": None}}, id="cv"),
    pytest.param(
        {**SUMMARY, "stream": "attention", "metrics": {"entropy": [[0.1, None]]}}, id="attention"
    ),
    pytest.param({**SUMMARY, "stream": "features", "metrics": {}}, id="features"),
    pytest.param(
        {
            **SUMMARY,
            "stream": "attention",
            "metrics": {"entropy": {"count": 3, "mean": 1.6, "p99": None}},
        },
        id="nested-metric-object",
    ),
]

INVALID_SUMMARIES = [
    pytest.param(_without(SUMMARY, "seq"), id="no-seq"),
    pytest.param({**SUMMARY, "extra": 1}, id="extra-top-level-property"),
    pytest.param({**SUMMARY, "schema_version": 2}, id="wrong-version"),
    pytest.param({**SUMMARY, "stream": "loss"}, id="unknown-stream"),
    pytest.param({**SUMMARY, "stream": "prediction/"}, id="prediction-without-split"),
    pytest.param({**SUMMARY, "task": "binary"}, id="task-on-batch_time"),
    pytest.param(_without(PRED_SUMMARY, "task"), id="prediction-without-task"),
    pytest.param({**SUMMARY, "window": {"kind": "time", "seconds": 60}}, id="time-no-truncated"),
    pytest.param(
        {**SUMMARY, "window": {"kind": "time", "seconds": 0, "truncated": False}},
        id="time-zero-seconds",
    ),
    pytest.param({**SUMMARY, "window": {"kind": "count", "size": 0}}, id="count-size-zero"),
    pytest.param({**SUMMARY, "count": -1}, id="negative-count"),
    pytest.param({**SUMMARY, "metrics": _without(NUMERIC_METRICS, "p99")}, id="numeric-no-p99"),
    pytest.param({**SUMMARY, "metrics": {**NUMERIC_METRICS, "mean": "0.1"}}, id="numeric-string"),
    pytest.param({**SUMMARY, "metrics": {**NUMERIC_METRICS, "std": -1.0}}, id="negative-std"),
    pytest.param({**PRED_SUMMARY, "metrics": NUMERIC_METRICS}, id="binary-with-numeric-metrics"),
    pytest.param({**PRED_SUMMARY, "metrics": {**BINARY_METRICS, "tp": 1.5}}, id="fractional-tp"),
    pytest.param({**PRED_SUMMARY, "metrics": {**BINARY_METRICS, "f1": 1.5}}, id="f1-above-1"),
    pytest.param(
        {
            **PRED_SUMMARY,
            "task": "multiclass",
            "metrics": {**MULTICLASS_METRICS, "confusion_matrix": [[0.5]]},
        },
        id="fractional-confusion",
    ),
    pytest.param(
        {
            **PRED_SUMMARY,
            "task": "regression",
            "metrics": {**REGRESSION_METRICS, "pearson_r": 1.0000000000000002},
        },
        id="pearson-above-1",
    ),
    pytest.param({**SUMMARY, "stream": "cv", "metrics": {"note": "text"}}, id="cv-string-metric"),
    pytest.param(
        {**SUMMARY, "stream": "features", "metrics": {"x": {"nested": True}}},
        id="features-boolean-metric",
    ),
    pytest.param(
        {**SUMMARY, "metrics": {**NUMERIC_METRICS, "extra": "text"}},
        id="numeric-extra-string-metric",
    ),
]


@pytest.mark.parametrize("doc", VALID_SUMMARIES)
def test_valid_summaries(doc: dict[str, Any]) -> None:
    """Summaries of every stream, task and window kind validate."""
    validator("summary").validate(doc)


@pytest.mark.parametrize("doc", INVALID_SUMMARIES)
def test_invalid_summaries(doc: dict[str, Any]) -> None:
    """Summaries with a missing, extra, mistyped or task-inconsistent part are rejected."""
    assert not validator("summary").is_valid(doc)


PROFILE = load("profile")["examples"][0]


def _profile_op(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(PROFILE)
    doc["operations"][0].update(change)
    return doc


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        pytest.param(PROFILE, True, id="example"),
        pytest.param(
            {
                **PROFILE,
                "ticks": 0,
                "overhead_fraction": None,
                "operations": [],
                "tick_ms": dict.fromkeys(("mean", "p50", "p95", "p99", "max")),
            },
            True,
            id="before-any-tick",
        ),
        pytest.param(
            _profile_op(
                count=0,
                mean_us=None,
                p50_us=None,
                p95_us=None,
                p99_us=None,
                max_us=None,
                total_us=0,
            ),
            True,
            id="idle-operation",
        ),
        pytest.param(_without(PROFILE, "instance"), False, id="no-instance"),
        pytest.param({**PROFILE, "tick_ms": {"mean": 1.0}}, False, id="partial-tick_ms"),
        pytest.param({**PROFILE, "overhead_fraction": -0.1}, False, id="negative-overhead"),
        pytest.param(_profile_op(count=1.5), False, id="fractional-count"),
        pytest.param(_profile_op(extra=1), False, id="extra-operation-field"),
    ],
)
def test_profile_records(doc: dict[str, Any], valid: bool) -> None:
    """Profile records validate exactly when complete and well-typed."""
    assert validator("profile").is_valid(doc) is valid


DEAD = load("dead_letter")["examples"][0]


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        pytest.param(DEAD, True, id="example"),
        pytest.param(
            {**DEAD, "key_b64": None, "value_b64": None, "timestamp_ms": None},
            True,
            id="no-key-no-value",
        ),
        pytest.param({**DEAD, "reason": "weird"}, False, id="unknown-reason"),
        pytest.param({**DEAD, "offset": -1}, False, id="negative-offset"),
        pytest.param(_without(DEAD, "value_truncated"), False, id="no-value_truncated"),
        pytest.param(_without(DEAD, "key_truncated"), False, id="no-key_truncated"),
        pytest.param({**DEAD, "extra": 1}, False, id="extra-property"),
    ],
)
def test_dead_letter_records(doc: dict[str, Any], valid: bool) -> None:
    """Dead-letter records validate exactly when complete and well-typed."""
    assert validator("dead_letter").is_valid(doc) is valid
