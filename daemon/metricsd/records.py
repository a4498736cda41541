"""Records going out: every output record's shape is built here, and ``encode`` serialises it.

- ``summary`` records (schemas/summary.schema.json) come from the window computations;
- ``profile_record`` wraps the profiler's report (schemas/profile.schema.json);
- ``dead_letter`` holds a rejected input record (schemas/dead_letter.schema.json).

``encode`` turns any of them into JSON bytes with orjson; NaN and ±inf become ``null``, since JSON
never carries them. ``fit_summary`` encodes a summary so that it fits the output topic's message
limit, reducing a multiclass confusion matrix when it would not (below). Pure: no I/O, no clock
(times are passed in).

Reduced multiclass summaries (one record must never be too large to publish: a 1,000-label window
gives a 2 MB dense matrix). Tried in this order, the first that fits is published:

1. as computed: ``labels`` and the dense ``confusion_matrix`` (rows = true, columns = predicted);
2. ``confusion_sparse``: the non-zero cells as ``[true label, predicted label, count]`` triples in
   row-major order (by true label, then predicted label), instead of ``confusion_matrix``; a window
   of n pairs has at most n non-zero cells, whatever the number of labels;
3. ``confusion_omitted``: a sentence giving the dense and sparse sizes against the limit, instead of
   any matrix; ``labels`` and ``support`` (pairs with that true label) are kept for the
   ``TOP_LABELS`` labels of most support (ties: the smaller label), in label order, with
   ``labels_total`` (labels in the window) and ``labels_truncated`` (some were left out).

The headline metrics (accuracy, macro/micro/weighted averages) are never touched: they are computed
over every label before any reduction. A record that does not fit even then (a limit of a few kB)
is encoded as it is, and the outbox counts and logs it as dropped.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray

from metricsd.events import InvalidEvent

__all__ = [
    "DEAD_LETTER_KEY_BYTES",
    "DEAD_LETTER_VALUE_BYTES",
    "SCHEMA_VERSION",
    "TOP_LABELS",
    "dead_letter",
    "dead_letter_caps",
    "dead_letter_key",
    "dumps",
    "encode",
    "fit_summary",
    "profile_record",
    "sparse_confusion",
]

#: ``schema_version`` of every record this module builds.
SCHEMA_VERSION: Final = 1

# A dead letter must fit Kafka's default 1 MiB message limit whatever it holds. Base64 grows the
# copies by 4/3: 700,000 value bytes (933,336 in base64) + 16,384 key bytes (21,848) + a Kafka key
# of at most 1,024 bytes + the rest of the record (under 1 kB) stays below 1,048,576 bytes.
DEAD_LETTER_VALUE_BYTES: Final = 700_000
DEAD_LETTER_KEY_BYTES: Final = 16_384
_DEAD_LETTER_KAFKA_KEY_BYTES: Final = 1_024
# Room for everything in a dead letter but the two copies: the Kafka key, the batch overhead, the
# other fields (reason, detail, topic...; well under 2 kB).
_DEAD_LETTER_RESERVE: Final = 4_096

_ENCODE_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY

#: Labels kept, by support, in a multiclass summary whose confusion matrix had to be omitted.
TOP_LABELS: Final = 100


def _encode_default(obj: Any) -> Any:
    # orjson serialises only C-contiguous native arrays itself; everything else NumPy lands here.
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def dumps(obj: Any, **options: Any) -> bytes:
    """``orjson.dumps``, right-sized, for bytes that are kept (queued until acknowledged).

    orjson >= 3.12 returns its whole working buffer, at least 4 KiB, whatever the length of the
    JSON (its final resize is a no-op), so a 500-byte summary held in the outbox occupied 4 KiB:
    at 10,000 runs a tick's 30,000 summaries and the changelog's keys held over 200 MiB until
    their acks, and glibc kept that heap afterwards. The copy costs ~0.2 µs and is quicker
    overall here: the next ``dumps`` reuses the buffer just freed instead of faulting in a new
    one (30,000 summaries: 16 MiB resident instead of 118 MiB, 0.6 instead of 1.8 µs each)."""
    return bytes(memoryview(orjson.dumps(obj, **options)))


def encode(record: Mapping[str, Any]) -> bytes:
    """Serialise an output record to JSON bytes; NaN and ±inf (float or NumPy) become null.

    Records should carry None for undefined statistics already; orjson's null for non-finite
    floats is the safety net. Non-string keys or unknown types raise (a bug in the caller).
    """
    return dumps(record, default=_encode_default, option=_ENCODE_OPTIONS)


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
    max_value_bytes: int | None = DEAD_LETTER_VALUE_BYTES,
    max_key_bytes: int | None = DEAD_LETTER_KEY_BYTES,
) -> dict[str, Any]:
    """The ``dead_letter`` record (schemas/dead_letter.schema.json) for a rejected input record.

    ``max_value_bytes`` and ``max_key_bytes`` (None = no limit) keep only a prefix of the value
    and of the key, flagged by ``value_truncated`` / ``key_truncated``, so that the record fits
    the dead-letter topic: base64 grows them by a third, and an input near the broker's message
    size limit would not fit otherwise.
    """
    value, value_truncated = _prefix(value, max_value_bytes)
    key, key_truncated = _prefix(key, max_key_bytes)
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
        "value_truncated": value_truncated,
        "key_truncated": key_truncated,
        "emitted_at": emitted_at,
    }


def dead_letter_caps(record_limit: int) -> tuple[int, int]:
    """``(max_value_bytes, max_key_bytes)`` for ``dead_letter`` so that a dead letter fits a
    topic taking records of ``record_limit`` bytes: the defaults (700,000 and 16,384) for
    Kafka's 1 MiB, less for a topic with a smaller ``max.message.bytes`` (the key copy at most a
    quarter of what the base64 copies may take, the value the rest)."""
    raw = max(0, record_limit - _DEAD_LETTER_RESERVE) * 3 // 4  # base64: 4 bytes per 3
    key = min(DEAD_LETTER_KEY_BYTES, raw // 4)
    return min(DEAD_LETTER_VALUE_BYTES, raw - key), key


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The Kafka key of a dead letter: the original key, or its first 1,024 bytes when longer
    (the whole key, up to ``DEAD_LETTER_KEY_BYTES``, is in the record's ``key_b64``)."""
    return None if key is None else key[:_DEAD_LETTER_KAFKA_KEY_BYTES]


def _prefix(data: bytes | None, limit: int | None) -> tuple[bytes | None, bool]:
    if data is None or limit is None or len(data) <= limit:
        return data, False
    return data[:limit], True


def profile_record(body: Mapping[str, Any], *, instance: str, emitted_at: float) -> dict[str, Any]:
    """The ``profile`` record of one profiler report (``Profiler.report``) from ``instance``."""
    return {
        "type": "profile",
        "schema_version": SCHEMA_VERSION,
        "instance": instance,
        "emitted_at": emitted_at,
        **body,
    }


def fit_summary(record: Mapping[str, Any], max_bytes: int) -> tuple[bytes, str | None]:
    """``record`` encoded in at most ``max_bytes`` if it can be: ``(value, form)`` where ``form``
    is None (as computed), ``"sparse"`` or ``"omitted"`` (the reduced multiclass forms in the
    module docstring). ``record`` is not modified. Only a summary with a ``confusion_matrix`` can
    be reduced; any other record, or one still too large after the last form, comes back encoded
    as it is (longer than ``max_bytes``: the caller's size check drops it)."""
    value = encode(record)
    metrics = record.get("metrics")
    if len(value) <= max_bytes or not isinstance(metrics, Mapping):
        return value, None
    matrix = metrics.get("confusion_matrix")
    labels = metrics.get("labels")
    if not isinstance(matrix, list) or not isinstance(labels, list):
        return value, None
    lab = np.asarray(labels, dtype=np.int64)
    cells = np.asarray(matrix, dtype=np.int64).reshape(lab.size, lab.size)
    rest = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    triples = sparse_confusion(lab, cells)
    sparse = encode({**record, "metrics": {**rest, "confusion_sparse": triples}})
    if len(sparse) <= max_bytes:
        return sparse, "sparse"
    support = cells.sum(axis=1)
    order = np.lexsort((lab, -support))  # most support first, then the smaller label
    kept = np.sort(order[:TOP_LABELS])
    omitted = {
        **{k: v for k, v in rest.items() if k != "labels"},
        "labels": lab[kept].tolist(),
        "support": support[kept].tolist(),
        "labels_total": int(lab.size),
        "labels_truncated": bool(kept.size < lab.size),
        "confusion_omitted": (
            f"the confusion matrix of {lab.size} labels is {len(value)} bytes dense and "
            f"{len(sparse)} bytes as sparse triples, over the limit of {max_bytes} bytes"
        ),
    }
    return encode({**record, "metrics": omitted}), "omitted"


def sparse_confusion(labels: NDArray[np.int64], matrix: NDArray[np.int64]) -> list[list[int]]:
    """The non-zero cells of a confusion ``matrix`` indexed by ``labels`` as ``[true label,
    predicted label, count]`` triples, row-major (by true label, then predicted label)."""
    true_at, pred_at = np.nonzero(matrix)
    triples = np.stack([labels[true_at], labels[pred_at], matrix[true_at, pred_at]], axis=1)
    result: list[list[int]] = triples.tolist()
    return result
