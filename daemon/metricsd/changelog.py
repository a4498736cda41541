"""Changelog records of window state: encoding at each tick, restoring on assignment. No I/O.

Protocol (docs/state.md has the failure cases)
----------------------------------------------
The changelog is a compacted topic with the input topic's partition count; state of a run lives in
the changelog partition with the number of the input partition the run's events come from.

At every tick, for each input partition whose position advanced, the daemon writes, in this order,
to that changelog partition:

1. one snapshot per (run, stream) row that changed since the previous tick — the row's window in
   arrival order plus ``seq``, ``incarnation``, ``total``, task and latest per-event figures —
   zlib-compressed and split into chunks below Kafka's 1 MB message limit
   (key ``["row", run, stream, chunk]``);
2. a tombstone (value ``None``) per chunk of each row that ended, was evicted or moved away;
3. a **checkpoint** ``["checkpoint", partition]`` -> ``{"offset": position}``: everything before
   ``position`` in the input partition is reflected in the rows written so far.

Offsets are committed only after all of it was acknowledged. On assignment the daemon reads the
changelog partition from the beginning up to a fence record it writes itself (high watermarks are
not trusted), applying row records only when a checkpoint follows them: rows of a tick that was cut
short by a crash are discarded, and the earlier version of those rows stays. It then seeks the input
partition to the last checkpoint (which can be ahead of the committed offset when the daemon died
between the acknowledgement and the commit), so that every event is in the windows exactly once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from metricsd.buffers import RowSnapshot

__all__ = [
    "CHUNK_BYTES",
    "Changelog",
    "Placed",
    "Restore",
    "Restored",
    "Restorer",
    "RowState",
    "checkpoint_record",
    "encode_row",
    "fence_record",
    "tombstones",
]

# Below Kafka's default 1 MB limit with room for the key, the chunk header and the batch framing.
CHUNK_BYTES = 900_000
_VERSION = 1

Record = tuple[bytes, bytes | None]  # key, value (None = tombstone)
Placed = tuple[int, Record]  # changelog partition, record
RowKey = tuple[str, str]  # run_id, stream


@dataclass(frozen=True, slots=True)
class RowState:
    """Everything needed to rebuild one (run, stream) row exactly."""

    run_id: str
    stream: str
    kind: str
    task: str | None
    seq: int
    latest: dict[str, Any] | None
    snapshot: RowSnapshot
    # The window's incarnation (part of its summary ids); None or "" when unknown (records
    # written before incarnations existed, events ingested without offsets).
    incarnation: str | None = None


def _row_key(run_id: str, stream: str, chunk: int) -> bytes:
    return orjson.dumps(["row", run_id, stream, chunk])


def encode_row(state: RowState, generation: int) -> list[Record]:
    """The chunk records of one row snapshot (usually one chunk: a 1,000-value window is ~16 kB).

    Value of each chunk: a JSON header line ``{"v", "gen", "i", "n"}``, a NUL byte, then that
    chunk's share of the zlib stream of (JSON row header, NUL, values bytes, ts bytes).
    """
    snap = state.snapshot
    header = orjson.dumps({
        "run_id": state.run_id, "stream": state.stream, "kind": state.kind, "task": state.task,
        "seq": state.seq, "total": snap.total, "latest": state.latest,
        "channels": int(snap.values.shape[0]), "n": int(snap.ts.shape[0]),
        # Only when known: a row without one is written byte for byte as before incarnations.
        **({"incarnation": state.incarnation} if state.incarnation else {}),
    })  # fmt: skip
    body = b"".join((
        header, b"\0",
        np.ascontiguousarray(snap.values, dtype="<f8").tobytes(),
        np.ascontiguousarray(snap.ts, dtype="<f8").tobytes(),
    ))  # fmt: skip
    packed = zlib.compress(body, 1)
    parts = [packed[i : i + CHUNK_BYTES] for i in range(0, len(packed), CHUNK_BYTES)] or [b""]
    return [
        (
            _row_key(state.run_id, state.stream, i),
            orjson.dumps({"v": _VERSION, "gen": generation, "i": i, "n": len(parts)})
            + b"\0"
            + part,
        )
        for i, part in enumerate(parts)
    ]


def tombstones(run_id: str, stream: str, chunks: int) -> list[Record]:
    """Delete records for every chunk key a row had."""
    return [(_row_key(run_id, stream, i), None) for i in range(max(chunks, 1))]


def checkpoint_record(partition: int, offset: int) -> Record:
    return orjson.dumps(["checkpoint", partition]), orjson.dumps({"offset": offset})


def fence_record(partition: int, token: str) -> Record:
    """The marker a restoring instance writes and then reads up to (the end of the partition)."""
    return orjson.dumps(["fence", partition]), orjson.dumps({"token": token})


def _decode_row(chunks: list[bytes]) -> RowState:
    body = zlib.decompress(b"".join(chunks))
    split = body.index(b"\0")
    header = orjson.loads(body[:split])
    c, n = header["channels"], header["n"]
    raw = np.frombuffer(body, dtype="<f8", offset=split + 1)
    values = raw[: c * n].reshape(c, n).astype(np.float64)
    ts = raw[c * n : c * n + n].astype(np.float64)
    return RowState(
        run_id=header["run_id"], stream=header["stream"], kind=header["kind"],
        task=header["task"], seq=header["seq"], latest=header["latest"],
        snapshot=RowSnapshot(values=values, ts=ts, total=header["total"]),
        incarnation=header.get("incarnation"),
    )  # fmt: skip


@dataclass
class Restorer:
    """Feed one changelog partition's records in offset order; then ``rows()`` and ``offset``.

    Row chunks and tombstones are held back until a checkpoint follows them; what comes after the
    last checkpoint belongs to a tick that never completed and is dropped.
    """

    fence_token: str | None = None
    offset: int | None = None  # the last checkpoint: seek the input partition here
    fenced: bool = False
    records_read: int = 0
    bytes_read: int = 0
    _applied: dict[tuple[str, str], dict[int, bytes]] = field(default_factory=dict)
    _pending: list[tuple[tuple[str, str], int, bytes | None]] = field(default_factory=list)
    _corrupt: int = 0
    chunk_counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def feed(self, key: bytes | None, value: bytes | None) -> None:
        """One changelog record. Unknown or malformed records are counted and skipped."""
        self.records_read += 1
        self.bytes_read += len(value or b"")
        try:
            parts = orjson.loads(key or b"null")
            tag = parts[0]
        except (orjson.JSONDecodeError, TypeError, IndexError, KeyError):
            self._corrupt += 1
            return
        if tag == "row" and len(parts) == 4:
            self._pending.append(((parts[1], parts[2]), int(parts[3]), value))
        elif tag == "checkpoint" and value is not None:
            for row, chunk, data in self._pending:
                if data is None:
                    self._applied.pop(row, None)
                else:
                    self._applied.setdefault(row, {})[chunk] = data
            self._pending.clear()
            self.offset = int(orjson.loads(value)["offset"])
        elif tag == "fence" and value is not None and self.fence_token is not None:
            if orjson.loads(value).get("token") == self.fence_token:
                self.fenced = True
        else:
            self._corrupt += 1

    @property
    def corrupt(self) -> int:
        return self._corrupt

    def rows(self) -> Iterable[RowState]:
        """The restored rows. A row whose chunks do not form one complete generation is skipped
        (counted in ``corrupt``): its window starts empty rather than wrong."""
        for row_key, chunks in self._applied.items():
            # Every chunk key present, stale ones included, so later tombstones cover them all.
            self.chunk_counts[row_key] = max(chunks) + 1
            try:
                heads = {}
                for i, data in chunks.items():
                    split = data.index(b"\0")
                    heads[i] = (orjson.loads(data[:split]), data[split + 1 :])
                first = heads[0][0]
                n, gen = first["n"], first["gen"]
                parts = [heads[i][1] for i in range(n) if heads[i][0]["gen"] == gen]
                if len(parts) != n:
                    raise KeyError("incomplete generation")
                yield _decode_row(parts)
            except (KeyError, ValueError, zlib.error, orjson.JSONDecodeError):
                self._corrupt += 1


@dataclass(frozen=True)
class Restored:
    """What reading some changelog partitions up to their fences gave."""

    rows: list[tuple[int, RowState]]  # (partition, row), to rebuild in the monitor
    offsets: dict[int, int]  # partition -> last checkpoint: seek the input partition there
    chunk_counts: dict[int, dict[RowKey, int]]  # chunk keys present per row (for tombstones)
    corrupt: int
    records: int
    bytes: int


class Restore:
    """Reading changelog partitions back: the fence records to write first, then ``feed`` every
    record read (any order across partitions, offset order within one) until ``done``."""

    def __init__(self, partitions: Iterable[int], token: str) -> None:
        self._restorers = {p: Restorer(fence_token=token) for p in partitions}
        self.fences: list[Placed] = [(p, fence_record(p, token)) for p in self._restorers]

    @property
    def partitions(self) -> list[int]:
        return list(self._restorers)

    def feed(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._restorers[partition].feed(key, value)

    @property
    def done(self) -> bool:
        """Every partition was read up to its own fence."""
        return all(r.fenced for r in self._restorers.values())

    def result(self) -> Restored:
        rows = [(p, state) for p, r in self._restorers.items() for state in r.rows()]
        rs = self._restorers
        return Restored(
            rows=rows,
            offsets={p: r.offset for p, r in rs.items() if r.offset is not None},
            chunk_counts={p: dict(r.chunk_counts) for p, r in rs.items()},
            corrupt=sum(r.corrupt for r in rs.values()),
            records=sum(r.records_read for r in rs.values()),
            bytes=sum(r.bytes_read for r in rs.values()),
        )


class Changelog:
    """The writer's bookkeeping for the changelog partitions this instance owns. No I/O: it says
    which records to write; the shell sends them in the order given, awaits the acks, commits.

    Per owned partition it remembers how many chunk keys each row last wrote (so a row that
    shrinks, ends or is evicted gets tombstones for every key it had) and the offset of the last
    checkpoint (so an idle partition is not checkpointed again every tick).
    """

    def __init__(self) -> None:
        self._chunks: dict[int, dict[RowKey, int]] = {}
        self._checkpointed: dict[int, int] = {}
        # The last checkpoint this instance wrote or restored per partition, kept across revokes:
        # a later restore that finds none means the changelog was lost.
        self._known: dict[int, int] = {}
        self.snapshots = 0  # row snapshots written, for the stats

    @property
    def owned(self) -> set[int]:
        return set(self._chunks)

    def assign(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._chunks.setdefault(p, {})

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget partitions moved away: their state stays in the changelog for the next owner."""
        for p in partitions:
            self._chunks.pop(p, None)
            self._checkpointed.pop(p, None)

    def restored(self, restored: Restored) -> None:
        """Adopt what a restore found: the chunk keys present and the last checkpoints."""
        for p, counts in restored.chunk_counts.items():
            self._chunks.setdefault(p, {}).update(counts)
        self._checkpointed.update(restored.offsets)
        self._known.update(restored.offsets)

    def lost(self, restored: Restored) -> dict[int, int]:
        """Partitions of ``restored`` with no checkpoint although this instance knew one (its
        offset, > 0): the changelog lost them (deleted, or a broker that came back empty)."""
        return {
            p: offset
            for p, offset in self._known.items()
            if p in restored.chunk_counts and p not in restored.offsets and offset > 0
        }

    def tick(
        self,
        positions: Mapping[int, int],
        changed: Iterable[tuple[int, RowState]],
        removed: Iterable[tuple[int, str, str]],
        generation: int,
    ) -> list[Placed]:
        """The records of one tick for the owned partitions, in write order: each changed row's
        chunks (plus tombstones for chunk keys it no longer uses), tombstones of removed rows,
        then a checkpoint per partition that was touched or whose position moved.

        ``positions`` maps input partition -> next offset consumed, taken together with the
        changes (nothing ingested in between). Rows of partitions not owned are skipped.
        """
        out: list[Placed] = []
        touched: set[int] = set()
        for partition, state in changed:
            chunks = self._chunks.get(partition)
            if chunks is None:
                continue
            key = (state.run_id, state.stream)
            records = encode_row(state, generation)
            before = chunks.get(key, 0)
            chunks[key] = len(records)
            records += tombstones(state.run_id, state.stream, before)[len(records) :]
            out += [(partition, r) for r in records]
            self.snapshots += 1
            touched.add(partition)
        for partition, run_id, stream in removed:
            chunks = self._chunks.get(partition)
            if chunks is None:
                continue
            out += [
                (partition, r) for r in tombstones(run_id, stream, chunks.pop((run_id, stream), 1))
            ]
            touched.add(partition)
        for p, offset in positions.items():
            if p in self._chunks and (p in touched or self._checkpointed.get(p) != offset):
                out.append((p, checkpoint_record(p, offset)))
                self._checkpointed[p] = self._known[p] = offset
        return out
