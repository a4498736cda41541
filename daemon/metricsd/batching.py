"""The training-side client's core: a bounded queue of calls and their coalescing into records.

Plan
----
Operations: ``Queue.put(item)`` on the caller's thread (one lock, no I/O, never raises for a full
queue under ``drop_oldest``); ``Queue.take()`` on the background thread takes everything queued;
``Encoder.encode(items)`` turns taken items into Kafka records ``(key, value, events)``, coalescing
what the schemas allow. No Kafka, no asyncio, no clock here (``ts`` is stamped by the caller,
``Queue`` waits only under ``policy="block"``); ``metricsd.emitter`` is the shell around it.

An item is the tuple ``(type, stream, payload, step, ts)``: ``stream`` is the coalescing key
(``"batch_time"``, or the scalar's name for ``"scalar"``; None for types that never coalesce),
``payload`` the already validated value (a float, or an owned 1-D float64 array for coalescing
types; for the others see ``_DOCS``). Items are built by ``metricsd.emitter`` after validation, so
everything here may assume valid input: the wire format is ``schemas/*.schema.json`` plus
``scalar``: ``{"type":"scalar","run_id","name","value": number | [numbers],"step"?,"ts"?,"rank"?}``.

Coalescing (why: one record per training step would be hundreds of records per second per run):
consecutive ``batch_time`` items of a batch become one event whose ``seconds`` is the array of all
of them; ``scalar`` items of one name become one event whose ``value`` is the array of all values
(an array value contributes its elements). The coalesced event carries the ``step`` of its last item
that had one and the ``ts`` of its last item (the schema: "step of the (last) batch"). A single
item keeps its scalar form. Arrays are capped at ``max_items`` (the schemas' ``maxItems``, 10000);
a longer run of items continues in a new event.

Order: an emitter serves one run, and one Kafka key (the run_id), so records keep their order on
one partition. Within a batch, order is kept per stream (``batch_time``, each scalar name, and the
non-coalescing types in call order relative to each other); a coalesced event sits where its first
item was. ``run_end`` is a barrier: everything queued before it is encoded before it, nothing
after it joins an event before it.

Cost: ``put`` is one lock round and one ``deque.append`` (about 0.2 µs); ``encode`` is one
``orjson.dumps`` per record, arrays serialised by orjson directly from NumPy (no ``tolist``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import numpy as np
import orjson

__all__ = ["POLICIES", "Encoder", "Item", "Queue", "Record"]

#: (type, stream or None, payload, step or None, ts)
Item: TypeAlias = tuple[str, str | None, Any, int | None, float]
#: (key, value, number of items (calls) it carries; 0 for the emitter's own heartbeat)
Record: TypeAlias = tuple[bytes, bytes, int]

POLICIES: Final = ("drop_oldest", "block")
_DUMPS_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY
_COALESCED: Final = {"batch_time": "seconds", "scalar": "value"}


class Queue:
    """A bounded FIFO of items shared by the callers' threads and one taker thread.

    ``policy="drop_oldest"`` (default): a put to a full queue discards the oldest item and counts
    it in ``dropped``; ``put`` never waits. ``policy="block"``: a put to a full queue waits until
    the taker makes room, or the queue is closed (then the item is dropped and counted).
    ``accepted`` counts every put; ``settled`` counts items whose fate is known (dropped here, or
    reported delivered/failed through :meth:`settle`); :meth:`wait_settled` is what flush waits on.
    """

    __slots__ = (
        "_cond",
        "_items",
        "accepted",
        "capacity",
        "closed",
        "dropped",
        "policy",
        "settled",
    )

    def __init__(self, capacity: int, policy: str = "drop_oldest") -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"queue capacity must be an int >= 1, got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity: Final = capacity
        self.policy: Final = policy
        self._items: deque[Item] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.accepted = 0
        self.dropped = 0
        self.settled = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        with self._cond:
            self._admit(1)
            if self.closed:
                self._lose(1)
                return
            self._items.append(item)

    def put_many(self, items: list[Item]) -> None:
        """Several items in one lock round (``scalars``); the same rules as ``put`` for each."""
        with self._cond:
            for item in items:
                self._admit(1)
                if self.closed:
                    self._lose(1)
                    continue
                self._items.append(item)

    def _admit(self, n: int) -> None:
        """Count ``n`` new items and make room for them (under the lock)."""
        self.accepted += n
        items = self._items
        if len(items) < self.capacity:
            return
        if self.policy == "block":
            while len(items) >= self.capacity and not self.closed:
                self._cond.wait()
            return
        while len(items) >= self.capacity:
            items.popleft()
            self._lose(1)

    def _lose(self, n: int) -> None:
        self.dropped += n
        self.settled += n
        self._cond.notify_all()

    def take(self) -> list[Item]:
        """Everything queued, oldest first (possibly nothing); wakes blocked putters."""
        with self._cond:
            if not self._items:
                return []
            taken = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return taken

    def settle(self, n: int) -> None:
        """``n`` taken items were delivered or failed for good."""
        with self._cond:
            self.settled += n
            self._cond.notify_all()

    def wait_settled(self, target: int, timeout: float | None) -> bool:
        """Wait until ``settled >= target`` (or ``timeout`` seconds); whether it got there."""
        with self._cond:
            return self._cond.wait_for(lambda: self.settled >= target, timeout)

    def close(self) -> int:
        """Refuse further items (counted as dropped) and drop what is queued; how many."""
        with self._cond:
            self.closed = True
            left = len(self._items)
            self._items.clear()
            self._lose(left)
            return left

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held at the fork), empty."""
        self._cond = threading.Condition(threading.Lock())
        self._items = deque()


class Encoder:
    """Items of one run -> Kafka records, keyed by ``run_id``; every event carries ``rank`` when
    it is not None. ``max_items`` caps coalesced arrays (the schemas' 10000)."""

    __slots__ = ("_base", "_key", "max_items")

    def __init__(self, run_id: str, rank: int | None = None, *, max_items: int = 10_000) -> None:
        self._key: Final = run_id.encode()
        self._base: Final[dict[str, Any]] = {"run_id": run_id}
        if rank is not None:
            self._base["rank"] = rank
        self.max_items: Final = max_items

    def encode(self, items: Iterable[Item], *, lost: int = 0) -> list[Record]:
        """Coalesce and serialise ``items`` (in call order) into records, in order.

        An item ``("heartbeat", None, None, None, ts)`` becomes the ``emitter/dropped`` scalar with
        value ``lost`` (a record carrying no call: its count is 0).
        """
        out: list[list[Any]] = []  # segments: [type, stream, payloads, step, ts, size, items]
        open_: dict[tuple[str, str], list[Any]] = {}
        cap = self.max_items
        for kind, stream, payload, step, ts in items:
            if stream is None:
                if kind == "heartbeat":
                    out.append([kind, None, lost, None, ts, 1, 0])
                    continue
                out.append([kind, None, payload, step, ts, 1, 1])
                if kind == "run_end":
                    open_.clear()
                continue
            size = 1 if type(payload) is float else len(payload)
            seg = open_.get((kind, stream))
            if seg is not None and seg[5] + size <= cap:
                seg[2].append(payload)
                if step is not None:
                    seg[3] = step
                seg[4] = ts
                seg[5] += size
                seg[6] += 1
            else:
                seg = [kind, stream, [payload], step, ts, size, 1]
                open_[(kind, stream)] = seg
                out.append(seg)
        return [self._record(seg) for seg in out]

    def _record(self, seg: list[Any]) -> Record:
        kind, stream, payload, step, ts, _, n = seg
        if kind == "heartbeat":
            doc: dict[str, Any] = {"type": "scalar", **self._base, "name": "emitter/dropped"}
            doc["value"] = payload
            doc["ts"] = ts
            return self._key, orjson.dumps(doc), 0
        doc = {"type": kind, **self._base}
        if stream is not None:
            if kind == "scalar":
                doc["name"] = stream
            doc[_COALESCED[kind]] = _join(payload)
            if step is not None:
                doc["step"] = step
        else:
            _DOCS[kind](doc, payload)
        doc["ts"] = ts
        return self._key, orjson.dumps(doc, option=_DUMPS_OPTIONS), n


def _join(values: list[Any]) -> Any:
    """One item's value as it was given; several as one flat array (floats stay a list)."""
    if len(values) == 1:
        return values[0]
    if all(type(v) is float for v in values):
        return values
    return np.concatenate([np.atleast_1d(v) for v in values])


def _prediction(doc: dict[str, Any], payload: tuple[str, str | None, Any, Any]) -> None:
    task, split, y_true, y_pred = payload
    doc["task"] = task
    if split is not None:
        doc["split"] = split
    doc["y_true"] = y_true
    doc["y_pred"] = y_pred


def _cv_fold(doc: dict[str, Any], payload: tuple[int, float, float]) -> None:
    doc["fold"], doc["train_loss"], doc["val_loss"] = payload


def _attention(doc: dict[str, Any], payload: Any) -> None:
    doc["weights"] = payload


def _features(doc: dict[str, Any], payload: Any) -> None:
    doc["values"] = payload


def _run_end(doc: dict[str, Any], payload: str) -> None:
    doc["status"] = payload


_DOCS: Final[dict[str, Callable[[dict[str, Any], Any], None]]] = {
    "prediction": _prediction,
    "cv_fold": _cv_fold,
    "attention": _attention,
    "features": _features,
    "run_end": _run_end,
}
