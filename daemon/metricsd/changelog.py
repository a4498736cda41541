"""Changelog records of window state: encoding at each tick, restoring on assignment. No I/O.

Protocol (docs/state.md has the failure cases)
----------------------------------------------
The changelog is a compacted topic with the input topic's partition count; state of a run lives in
the changelog partition with the number of the input partition the run's events come from.

A (run, stream) window is a sequence of values numbered by ``total`` (the values ever appended),
cut into fixed **chunks** of ``chunk`` values (default ``CHUNK_VALUES``): chunk ``k`` holds the
values numbered ``k*chunk .. (k+1)*chunk - 1``. A row is written as

- one **block** per complete chunk that still overlaps the window, key
  ``["block", run, stream, k % slots]`` (``slots``: the most chunks a window can span, so a block
  key is reused once its chunk has left the window and compaction drops the old version); a block
  is written once, in the tick its chunk completes;
- one **head**, key ``["head", run, stream]``: the row's figures (``seq``, ``incarnation``,
  ``total``, the window's size, task, latest per-event figures, ``chunk``, ``slots``) and the
  **tail**, the values of the incomplete last chunk.

So a tick rewrites, per changed row, its head (at most ``chunk`` values) and the blocks completed
since the previous tick: bytes grow with the values that arrived, not with the window's size
(version 1 wrote every changed window whole). At every tick, for each input partition whose
position advanced, the daemon writes, in this order, to that changelog partition:

1. the head and new blocks of each (run, stream) row that changed since the previous tick;
2. tombstones (value ``None``) of every key of each row that ended, was evicted or moved away;
3. a **checkpoint** ``["checkpoint", partition]`` -> ``{"offset": position}``: everything before
   ``position`` in the input partition is reflected in the rows written so far.

Offsets are committed only after all of it was acknowledged. On assignment the daemon reads the
changelog partition from the beginning up to a fence record it writes itself (high watermarks are
not trusted), applying row records only when a checkpoint follows them: rows of a tick that was cut
short by a crash are discarded, and the earlier version of those rows stays. It then seeks the input
partition to the last checkpoint (which can be ahead of the committed offset when the daemon died
between the acknowledgement and the commit), so that every event is in the windows exactly once.

Version 1 rows (key ``["row", run, stream, i]``, the whole window zlib-compressed in parts of at
most ``CHUNK_BYTES``), written by earlier releases, are still restored; the first write of such a
row after the upgrade is a whole version 2 row plus tombstones of its version 1 keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from metricsd.buffers import RowSnapshot
from metricsd.records import dumps

__all__ = [
    "CHUNK_VALUES",
    "Changelog",
    "Keys",
    "Placed",
    "Restore",
    "Restored",
    "Restorer",
    "RowState",
    "checkpoint_record",
    "encode_row",
    "fence_record",
    "rewrite_from",
    "slots_for",
    "split_checkpoints",
    "tombstones",
]

#: Values per chunk. A tick rewrites at most this many old values per changed row (the tail), so
#: smaller chunks mean fewer bytes per tick but more block records per window.
CHUNK_VALUES = 64
# Version 1 split one zlib stream into parts below Kafka's default 1 MB message limit.
CHUNK_BYTES = 900_000
_VERSION = 2

Record = tuple[bytes, bytes | None]  # key, value (None = tombstone)
Placed = tuple[int, Record]  # changelog partition, record
_CHECKPOINT_KEY = b'["checkpoint",'
RowKey = tuple[str, str]  # run_id, stream
FloatArray = NDArray[np.float64]


def slots_for(window: int, chunk: int = CHUNK_VALUES) -> int:
    """Block keys of a row whose window holds ``window`` values: the most chunks a window can
    overlap (a chunk's key is reused once the chunk has left the window)."""
    return -(-window // chunk) + 1


def rewrite_from(saved: int, chunk: int = CHUNK_VALUES) -> int:
    """The first value (index over ``total``) a row's next write needs, when ``saved`` values
    were handed to the changelog before: the start of the chunk that was incomplete then."""
    return saved - saved % chunk


@dataclass(frozen=True, slots=True)
class RowState:
    """Everything needed to rebuild one (run, stream) row exactly, or, for writing, its
    figures and the values since ``rewrite_from`` of what was written before (``snapshot``
    then holds the newest values only; its ``count`` says how many the window has)."""

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
    chunk: int = CHUNK_VALUES
    slots: int = 0  # block keys of the row (``slots_for`` its bank's width); 0: from the window
    # The format the row was restored from (1: a whole window, written by an older release).
    version: int = _VERSION


@dataclass(slots=True)
class Keys:
    """The keys a row has in the changelog besides its head, so that its removal deletes all of
    them."""

    blocks: int = 0  # block keys 0 .. blocks-1 may hold records
    v1: int = 0  # version 1 part keys 0 .. v1-1 may hold records


def _key(tag: str, run_id: str, stream: str, *index: int) -> bytes:
    return dumps([tag, run_id, stream, *index])


def _pack(meta: dict[str, Any], values: FloatArray, ts: FloatArray) -> bytes:
    """A JSON header, a NUL byte, then the values (channel-major) and the timestamps as
    little-endian float64. Not compressed: zlib saved 16% of the bytes of a tick's step times
    (random mantissas) for 35 µs per record, 173 of the 200 ms a 1,000-row tick took."""
    return b"".join((
        orjson.dumps(meta), b"\0",
        np.ascontiguousarray(values, dtype="<f8").tobytes(),
        np.ascontiguousarray(ts, dtype="<f8").tobytes(),
    ))  # fmt: skip


def _unpack(
    data: bytes, channels: int | None = None
) -> tuple[dict[str, Any], FloatArray, FloatArray]:
    """Header, values (channels, n) and timestamps of a record; ``channels`` from the header
    when it has them (a head), else as given (a block: its head's)."""
    split = data.index(b"\0")
    meta = orjson.loads(data[:split])
    channels = meta["channels"] if channels is None else channels
    raw = np.frombuffer(data, dtype="<f8", offset=split + 1)
    n = raw.shape[0] // (channels + 1)
    if raw.shape[0] != n * (channels + 1):
        raise ValueError("values and timestamps do not match")
    return meta, raw[: channels * n].reshape(channels, n), raw[channels * n :]


def _slots(state: RowState) -> int:
    """The block keys the row's write uses (``slots_for`` its window unless the state says)."""
    return state.slots or slots_for(state.snapshot.window, state.chunk)


def _encode(state: RowState) -> tuple[list[Record], int]:
    """The head and the blocks of one write of a row, and how many block keys they reach
    (highest key + 1, 0 without blocks)."""
    snap, chunk = state.snapshot, state.chunk
    total, held, window = snap.total, int(snap.ts.shape[0]), snap.window
    first, start = total - window, total - held
    slots = _slots(state)
    tail = max(first, total - total % chunk)
    if start > tail or start > max(start - start % chunk, first):
        raise ValueError(
            f"a write needs the values from the window's start or a chunk boundary: {start}"
        )
    records: list[Record] = []
    reached = 0
    for k in range(start // chunk, tail // chunk):
        lo, hi = max(k * chunk, first), (k + 1) * chunk
        meta = {"v": _VERSION, "k": k, "start": lo}
        part = slice(lo - start, hi - start)
        slot = k % slots
        records.append(
            (
                _key("block", state.run_id, state.stream, slot),
                _pack(meta, snap.values[:, part], snap.ts[part]),
            )
        )
        reached = max(reached, slot + 1)
    head = {
        "v": _VERSION, "run_id": state.run_id, "stream": state.stream, "kind": state.kind,
        "task": state.task, "seq": state.seq, "total": total, "latest": state.latest,
        "channels": int(snap.values.shape[0]), "n": window, "tail": total - tail,
        "chunk": chunk, "slots": slots,
        **({"incarnation": state.incarnation} if state.incarnation else {}),
    }  # fmt: skip
    records.insert(
        0,
        (
            _key("head", state.run_id, state.stream),
            _pack(head, snap.values[:, tail - start :], snap.ts[tail - start :]),
        ),
    )
    return records, reached


def encode_row(state: RowState) -> list[Record]:
    """The records of one write of a row: its head, then the blocks of the chunks that are
    complete in ``state.snapshot`` (all of them for a whole-window snapshot)."""
    return _encode(state)[0]


def tombstones(run_id: str, stream: str, keys: Keys | None = None) -> list[Record]:
    """Delete records for every key a row has (only its head when ``keys`` is None)."""
    keys = keys or Keys()
    return [
        (_key("head", run_id, stream), None),
        *((_key("block", run_id, stream, i), None) for i in range(keys.blocks)),
        *((_key("row", run_id, stream, i), None) for i in range(keys.v1)),
    ]


def checkpoint_record(partition: int, offset: int) -> Record:
    return dumps(["checkpoint", partition]), dumps({"offset": offset})


def split_checkpoints(placed: Iterable[Placed]) -> tuple[list[Placed], list[Placed]]:
    """A tick's records as (rows and tombstones, checkpoints): a checkpoint is written only once
    the rows before it are acknowledged (docs/state.md)."""
    rows: list[Placed] = []
    checkpoints: list[Placed] = []
    for item in placed:
        (checkpoints if item[1][0].startswith(_CHECKPOINT_KEY) else rows).append(item)
    return rows, checkpoints


def fence_record(partition: int, token: str) -> Record:
    """The marker a restoring instance writes and then reads up to (the end of the partition)."""
    return dumps(["fence", partition]), dumps({"token": token})


def _decode_v1(chunks: list[bytes]) -> RowState:
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
        incarnation=header.get("incarnation"), version=1,
    )  # fmt: skip


def _v1_row(parts: dict[int, bytes]) -> RowState:
    """A version 1 row from its part records; KeyError unless they form one generation."""
    heads = {}
    for i, data in parts.items():
        split = data.index(b"\0")
        heads[i] = (orjson.loads(data[:split]), data[split + 1 :])
    first = heads[0][0]
    n, gen = first["n"], first["gen"]
    chosen = [heads[i][1] for i in range(n) if heads[i][0]["gen"] == gen]
    if len(chosen) != n:
        raise KeyError("incomplete generation")
    return _decode_v1(chosen)


def _v2_row(head: bytes, blocks: dict[int, bytes]) -> RowState:
    """A version 2 row from its head and blocks; KeyError or ValueError if a value of the
    window is missing from them."""
    meta, tail_values, tail_ts = _unpack(head)
    channels = meta["channels"]
    chunk, slots, total, window = meta["chunk"], meta["slots"], meta["total"], meta["n"]
    first, tail = total - window, total - meta["tail"]
    if tail_ts.shape[0] != meta["tail"] or not 0 <= first <= tail <= total:
        raise ValueError("head does not match its tail")
    values, ts = [], []
    for k in range(first // chunk, (tail - 1) // chunk + 1 if tail > first else 0):
        lo, hi = max(k * chunk, first), min((k + 1) * chunk, tail)
        block, block_values, block_ts = _unpack(blocks[k % slots], channels)
        at = lo - block["start"]
        if block["k"] != k or at < 0 or at + hi - lo > block_ts.shape[0]:
            raise KeyError(f"block {k} is missing")
        values.append(block_values[:, at : at + hi - lo])
        ts.append(block_ts[at : at + hi - lo])
    return RowState(
        run_id=meta["run_id"], stream=meta["stream"], kind=meta["kind"], task=meta["task"],
        seq=meta["seq"], latest=meta["latest"],
        snapshot=RowSnapshot(
            values=np.concatenate([*values, tail_values], axis=1),
            ts=np.concatenate([*ts, tail_ts]),
            total=total,
        ),
        incarnation=meta.get("incarnation"), chunk=chunk, slots=slots,
    )  # fmt: skip


@dataclass
class Restorer:
    """Feed one changelog partition's records in offset order; then ``rows()`` and ``offset``.

    Row records and tombstones are held back until a checkpoint follows them; what comes after the
    last checkpoint belongs to a tick that never completed and is dropped.
    """

    fence_token: str | None = None
    offset: int | None = None  # the last checkpoint: seek the input partition here
    fenced: bool = False
    records_read: int = 0
    bytes_read: int = 0
    discarded: int = 0  # row records of ticks that never completed (no checkpoint before a fence)
    _heads: dict[RowKey, bytes] = field(default_factory=dict)
    _blocks: dict[RowKey, dict[int, bytes]] = field(default_factory=dict)
    _v1: dict[RowKey, dict[int, bytes]] = field(default_factory=dict)
    _pending: list[tuple[str, RowKey, int, bytes | None]] = field(default_factory=list)
    _corrupt: int = 0
    keys: dict[RowKey, Keys] = field(default_factory=dict)

    def feed(self, key: bytes | None, value: bytes | None) -> None:
        """One changelog record. Unknown or malformed records are counted and skipped."""
        self.records_read += 1
        self.bytes_read += len(value or b"")
        try:
            parts = orjson.loads(key or b"null")
            tag = parts[0]
            if tag in ("row", "block", "head"):
                row = (str(parts[1]), str(parts[2]))
                index = int(parts[3]) if tag != "head" else 0
                if len(parts) != (3 if tag == "head" else 4):
                    raise IndexError(tag)
        except (orjson.JSONDecodeError, TypeError, IndexError, KeyError, ValueError):
            self._corrupt += 1
            return
        if tag in ("row", "block", "head"):
            self._pending.append((tag, row, index, value))
        elif tag == "checkpoint" and value is not None:
            self._apply()
            self.offset = int(orjson.loads(value)["offset"])
        elif tag == "fence" and value is not None:
            # Whoever wrote the row records since the last checkpoint stopped before its tick
            # completed: a new owner started restoring. They are never applied, even when a
            # later writer's checkpoint follows (it checkpoints its own position, not theirs).
            self.discarded += len(self._pending)
            self._pending.clear()
            token = orjson.loads(value).get("token")
            if self.fence_token is not None and token == self.fence_token:
                self.fenced = True
        else:
            self._corrupt += 1

    def _apply(self) -> None:
        for tag, row, index, data in self._pending:
            if tag == "head":
                if data is None:
                    self._heads.pop(row, None)
                else:
                    self._heads[row] = data
                    self._v1.pop(row, None)  # superseded (its keys are deleted with this write)
            elif tag == "block":
                if data is None:
                    self._blocks.get(row, {}).pop(index, None)
                else:
                    self._blocks.setdefault(row, {})[index] = data
            elif data is None:  # version 1: one tombstone deleted the row
                self._v1.pop(row, None)
            else:
                self._v1.setdefault(row, {})[index] = data
        self._pending.clear()

    @property
    def corrupt(self) -> int:
        return self._corrupt

    def rows(self) -> Iterable[RowState]:
        """The restored rows. A row whose records do not hold its whole window is skipped
        (counted in ``corrupt``): its window starts empty rather than wrong."""
        for row in {**self._heads, **self._blocks, **self._v1}:
            # Every key present, stale ones included, so later tombstones cover them all.
            blocks, v1 = self._blocks.get(row, {}), self._v1.get(row, {})
            self.keys[row] = Keys(blocks=max(blocks, default=-1) + 1, v1=max(v1, default=-1) + 1)
            head = self._heads.get(row)
            if head is None and not v1:
                continue  # blocks left without their head: not a row
            try:
                yield _v2_row(head, blocks) if head is not None else _v1_row(v1)
            except (KeyError, ValueError, TypeError, zlib.error, orjson.JSONDecodeError):
                self._corrupt += 1


@dataclass(frozen=True)
class Restored:
    """What reading some changelog partitions up to their fences gave."""

    rows: list[tuple[int, RowState]]  # (partition, row), to rebuild in the monitor
    offsets: dict[int, int]  # partition -> last checkpoint: seek the input partition there
    keys: dict[int, dict[RowKey, Keys]]  # keys present per row (for tombstones)
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
            keys={p: dict(r.keys) for p, r in rs.items()},
            corrupt=sum(r.corrupt for r in rs.values()),
            records=sum(r.records_read for r in rs.values()),
            bytes=sum(r.bytes_read for r in rs.values()),
        )


class Changelog:
    """The writer's bookkeeping for the changelog partitions this instance owns. No I/O: it says
    which records to write; the shell sends them in the order given, awaits the acks, commits.

    Per owned partition it remembers the keys each row has (so a row that ends or is evicted
    gets tombstones for every one of them) and the offset of the last checkpoint (so an idle
    partition is not checkpointed again every tick).
    """

    def __init__(self) -> None:
        self._keys: dict[int, dict[RowKey, Keys]] = {}
        self._checkpointed: dict[int, int] = {}
        # The last checkpoint this instance wrote or restored per partition, kept across revokes:
        # a later restore that finds none means the changelog was lost.
        self._known: dict[int, int] = {}
        # The known checkpoints the last tick's replaced, for :meth:`unwritten`.
        self._replaced: dict[int, int | None] = {}
        self.snapshots = 0  # row writes, for the stats

    @property
    def owned(self) -> set[int]:
        return set(self._keys)

    def assign(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._keys.setdefault(p, {})

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget partitions moved away: their state stays in the changelog for the next owner."""
        for p in partitions:
            self._keys.pop(p, None)
            self._checkpointed.pop(p, None)

    def restored(self, restored: Restored) -> None:
        """Adopt what a restore found: the keys present and the last checkpoints."""
        for p, keys in restored.keys.items():
            self._keys.setdefault(p, {}).update(keys)
        self._checkpointed.update(restored.offsets)
        self._known.update(restored.offsets)

    def lost(self, restored: Restored) -> dict[int, int]:
        """Partitions of ``restored`` with no checkpoint although this instance knew one (its
        offset, > 0): the changelog lost them (deleted, or a broker that came back empty)."""
        return {
            p: offset
            for p, offset in self._known.items()
            if p in restored.keys and p not in restored.offsets and offset > 0
        }

    def tick(
        self,
        positions: Mapping[int, int],
        changed: Iterable[tuple[int, RowState]],
        removed: Iterable[tuple[int, str, str]],
    ) -> list[Placed]:
        """The records of one tick for the owned partitions, in write order: each changed row's
        head and new blocks (plus tombstones of keys it no longer uses: version 1 parts, block
        keys beyond its slots), tombstones of removed rows, then a checkpoint per partition that
        was touched or whose position moved.

        ``positions`` maps input partition -> next offset consumed, taken together with the
        changes (nothing ingested in between). Rows of partitions not owned are skipped.
        """
        out: list[Placed] = []
        touched: set[int] = set()
        for partition, state in changed:
            rows = self._keys.get(partition)
            if rows is None:
                continue
            key = (state.run_id, state.stream)
            records, reached = _encode(state)
            keys = rows.get(key)
            if keys is None:
                keys = Keys()
                out += self._delete_elsewhere(key, partition, touched)
            slots = _slots(state)
            # Keys this write leaves behind: version 1 parts, blocks of a larger slot count.
            gone = [
                *((_key("block", *key, i), None) for i in range(slots, keys.blocks)),
                *((_key("row", *key, i), None) for i in range(keys.v1)),
            ]
            rows[key] = Keys(blocks=max(min(keys.blocks, slots), reached))
            out += [(partition, r) for r in (*records, *gone)]
            self.snapshots += 1
            touched.add(partition)
        for partition, run_id, stream in removed:
            rows = self._keys.get(partition)
            if rows is None:
                continue
            key = (run_id, stream)
            if key in rows:
                out += [(partition, r) for r in tombstones(run_id, stream, rows.pop(key))]
            else:
                out += self._delete_elsewhere(key, partition, touched)
                out += [(partition, r) for r in tombstones(run_id, stream)]
            touched.add(partition)
        self._replaced = {}
        for p, offset in positions.items():
            if p in self._keys and (p in touched or self._checkpointed.get(p) != offset):
                out.append((p, checkpoint_record(p, offset)))
                self._replaced[p] = self._known.get(p)
                self._checkpointed[p] = self._known[p] = offset
        return out

    def unwritten(self, checkpoints: Iterable[Placed]) -> None:
        """The last tick's ``checkpoints`` were not written (its row records were not all
        acknowledged): the next tick writes one for each of those partitions, after the rows it
        resends, even if nothing else changes there (the rows would otherwise wait, unapplied,
        for a checkpoint that a partition whose position stays put never writes)."""
        for p, _ in checkpoints:
            if p not in self._replaced:
                continue
            known = self._replaced.pop(p)
            self._checkpointed.pop(p, None)
            if known is None:
                self._known.pop(p, None)
            else:
                self._known[p] = known

    def _delete_elsewhere(self, key: RowKey, partition: int, touched: set[int]) -> list[Placed]:
        """Tombstones for a row's keys in owned partitions other than ``partition``: its run's
        events came from another partition before (a producer not keyed by run id), and the
        row is written, or deleted, where they come from now."""
        out: list[Placed] = []
        for other, rows in self._keys.items():
            if other != partition and key in rows:
                out += [(other, r) for r in tombstones(*key, rows.pop(key))]
                touched.add(other)
        return out
