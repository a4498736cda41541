"""Records going out: every output record's shape is built here, and ``encode`` serialises it.

- ``summary`` records (schemas/summary.schema.json) come from the window computations;
- ``profile_record`` wraps the profiler's report (schemas/profile.schema.json);
- ``dead_letter`` holds a rejected input record (schemas/dead_letter.schema.json).

``encode`` turns any of them into JSON bytes with orjson; NaN and ±inf become ``null``, since JSON
never carries them. Pure: no I/O, no clock (times are passed in).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from metricsd.events import InvalidEvent

__all__ = ["SCHEMA_VERSION", "dead_letter", "encode", "profile_record"]

#: ``schema_version`` of every record this module builds.
SCHEMA_VERSION: Final = 1

_ENCODE_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY


def _encode_default(obj: Any) -> Any:
    # orjson serialises only C-contiguous native arrays itself; everything else NumPy lands here.
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(record: Mapping[str, Any]) -> bytes:
    """Serialise an output record to JSON bytes; NaN and ±inf (float or NumPy) become null.

    Records should carry None for undefined statistics already; orjson's null for non-finite
    floats is the safety net. Non-string keys or unknown types raise (a bug in the caller).
    """
    return orjson.dumps(record, default=_encode_default, option=_ENCODE_OPTIONS)


def dead_letter(
    exc: InvalidEvent,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
    emitted_at: float,
    max_value_bytes: int | None = None,
) -> dict[str, Any]:
    """The ``dead_letter`` record (schemas/dead_letter.schema.json) for a rejected input record.

    ``max_value_bytes`` (None = no limit) keeps only a prefix of the value, flagged by
    ``value_truncated``, so that the record fits the dead-letter topic: base64 grows the value by
    a third, and an input near the broker's message size limit would not fit otherwise.
    """
    truncated = max_value_bytes is not None and value is not None and len(value) > max_value_bytes
    if truncated:
        assert value is not None and max_value_bytes is not None
        value = value[:max_value_bytes]
    return {
        "type": "dead_letter",
        "schema_version": SCHEMA_VERSION,
        "reason": exc.reason,
        "detail": exc.detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
        "key_b64": None if key is None else base64.b64encode(key).decode("ascii"),
        "value_b64": None if value is None else base64.b64encode(value).decode("ascii"),
        "value_truncated": truncated,
        "emitted_at": emitted_at,
    }


def profile_record(body: Mapping[str, Any], *, instance: str, emitted_at: float) -> dict[str, Any]:
    """The ``profile`` record of one profiler report (``Profiler.report``) from ``instance``."""
    return {
        "type": "profile",
        "schema_version": SCHEMA_VERSION,
        "instance": instance,
        "emitted_at": emitted_at,
        **body,
    }
