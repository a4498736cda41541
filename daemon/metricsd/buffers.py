"""Ring-buffer banks: many small windows of one stream kind in one 2-D array.

Plan
----
A daemon serving many training runs holds thousands of small windows. Keeping all windows of one
stream kind in one array (rows = windows, columns = slots) lets the statistics code compute every
run's figures in one vectorised pass instead of a Python call per run.

Layout of a bank with ``channels`` values per slot and ``width`` slots per row::

    values[channel, row, slot]   float64   the stored values (e.g. y_true and y_pred are 2 channels)
    ts[row, slot]                float64   event time of each slot (unix seconds)
    count[row]                   int64     filled slots, <= width
    head[row]                    int64     next slot to write
    total[row]                   int64     values ever appended to the row

A row fills from slot 0 and then wraps, so the filled slots are always ``0 .. count-1``: the valid
mask of a row is ``arange(width) < count``. Order inside a window does not matter for the statistics
(they are symmetric functions), which is what makes "whole row at once" exact.

Operations and their cost:
- ``allocate()`` / ``release(row)``: O(1) via a free list; the arrays double when full,
  up to ``max_rows`` (a bank never shrinks: its memory is its high-water mark of rows).
- ``append(row, values, ts)``: one or two slice assignments per channel (wraps at most once),
  however
  many values arrive; a write longer than the row keeps only the newest ``width`` values.
- ``valid(rows)``, ``arrival_order(rows)``: vectorised over the selected rows.
- ``snapshot(row)`` / ``restore(row, snap)``: plain arrays in slot order, so state can be persisted.

No I/O, no clock: everything here is plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["RingBank", "RowSnapshot"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RowSnapshot:
    """One row's window in arrival order (oldest first): what a changelog record would carry."""

    values: FloatArray  # (channels, n)
    ts: FloatArray  # (n,)
    total: int
    # Values in the window when this holds only its newest ``n`` of them (``snapshot(since=)``);
    # None: the snapshot is the whole window.
    count: int | None = None

    @property
    def window(self) -> int:
        """Values in the window (``n`` for a whole-window snapshot)."""
        return int(self.ts.shape[0]) if self.count is None else self.count


class RingBank:
    """A bank of fixed-width ring buffers, one row per (run, stream).

    ``width`` is the count window (the newest ``width`` values of each row are kept). All arrays
    are public and plain NumPy so that statistics can read them directly and state can be
    snapshotted; only this class writes them.
    """

    def __init__(
        self, width: int, channels: int = 1, initial_rows: int = 16, max_rows: int | None = None
    ) -> None:
        """``max_rows`` caps the arrays (growth stops there; allocating beyond it is a bug of the
        caller, which must free rows first); None lets them grow without limit."""
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if max_rows is not None:
            if max_rows < 1:
                raise ValueError(f"max_rows must be >= 1, got {max_rows}")
            initial_rows = min(initial_rows, max_rows)
        self.max_rows = max_rows
        self.width = width
        self.channels = channels
        self.values: FloatArray = np.zeros((channels, initial_rows, width), dtype=np.float64)
        self.ts: FloatArray = np.zeros((initial_rows, width), dtype=np.float64)
        self.count: IntArray = np.zeros(initial_rows, dtype=np.int64)
        self.head: IntArray = np.zeros(initial_rows, dtype=np.int64)
        self.total: IntArray = np.zeros(initial_rows, dtype=np.int64)
        # Rows are handed out lowest first: a popped list end is O(1).
        self._free: list[int] = list(range(initial_rows - 1, -1, -1))
        self._slots: IntArray = np.arange(width, dtype=np.int64)

    # -- rows ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Rows allocated in the arrays (used or free)."""
        return int(self.count.shape[0])

    @property
    def rows_in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the window arrays (values and timestamps plus per-row counters)."""
        return int(
            self.values.nbytes
            + self.ts.nbytes
            + self.count.nbytes
            + self.head.nbytes
            + self.total.nbytes
        )

    def allocate(self) -> int:
        """Return an empty row, growing the arrays (doubling) when none is free."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.count[row] = 0
        self.head[row] = 0
        self.total[row] = 0
        return row

    def release(self, row: int) -> None:
        """Give a row back; its contents are discarded."""
        self.count[row] = 0
        self.head[row] = 0
        self.total[row] = 0
        self._free.append(row)

    def _grow(self) -> None:
        old = self.capacity
        new = max(2 * old, 16)
        if self.max_rows is not None:
            if old >= self.max_rows:
                raise RuntimeError(f"ring bank full: all {old} rows (max_rows) are in use")
            new = min(new, self.max_rows)
        values = np.zeros((self.channels, new, self.width), dtype=np.float64)
        values[:, :old] = self.values
        ts = np.zeros((new, self.width), dtype=np.float64)
        ts[:old] = self.ts
        self.values, self.ts = values, ts
        self.count = np.concatenate([self.count, np.zeros(new - old, dtype=np.int64)])
        self.head = np.concatenate([self.head, np.zeros(new - old, dtype=np.int64)])
        self.total = np.concatenate([self.total, np.zeros(new - old, dtype=np.int64)])
        self._free.extend(range(new - 1, old - 1, -1))

    # -- writes ----------------------------------------------------------------------------
    def append(self, row: int, values: FloatArray, ts: FloatArray) -> None:
        """Append ``k`` slots to ``row``: ``values`` is ``(channels, k)``, ``ts`` is ``(k,)``.

        One slice assignment per channel, two when the write wraps; the oldest values are
        overwritten once the row is full.
        """
        k = int(ts.shape[0])
        if k == 0:
            return
        width = self.width
        self.total[row] += k
        if k >= width:
            self.values[:, row, :] = values[:, k - width :]
            self.ts[row, :] = ts[k - width :]
            self.head[row] = 0
            self.count[row] = width
            return
        h = int(self.head[row])
        first = min(k, width - h)
        self.values[:, row, h : h + first] = values[:, :first]
        self.ts[row, h : h + first] = ts[:first]
        if first < k:
            rest = k - first
            self.values[:, row, :rest] = values[:, first:]
            self.ts[row, :rest] = ts[first:]
        self.head[row] = (h + k) % width
        self.count[row] = min(int(self.count[row]) + k, width)

    def replace(self, row: int, slot: int, values: FloatArray, ts: float) -> None:
        """Overwrite one filled slot in place (e.g. a cross-validation fold sent again)."""
        self.values[:, row, slot] = values
        self.ts[row, slot] = ts

    # -- reads -----------------------------------------------------------------------------
    def valid(self, rows: IntArray) -> NDArray[np.bool_]:
        """Mask ``(len(rows), width)`` of the filled slots of ``rows``."""
        return self._slots[None, :] < self.count[rows][:, None]

    def arrival_order(self, rows: IntArray) -> IntArray:
        """For each slot of ``rows``, the 0-based index of the append that wrote it.

        The newest slot of a row is ``head - 1`` and holds index ``total - 1``; slot ``s`` holds
        ``total - 1 - ((head - 1 - s) mod width)``. Meaningful only where ``valid``.
        """
        head = self.head[rows][:, None]
        total = self.total[rows][:, None]
        back = np.mod(head - 1 - self._slots[None, :], self.width)
        result: IntArray = total - 1 - back
        return result

    def row_order(self, row: int) -> IntArray:
        """Slot indices of ``row`` from oldest to newest."""
        n = int(self.count[row])
        if n < self.width:
            return self._slots[:n].copy()
        return np.roll(self._slots, -int(self.head[row]))

    def snapshot(self, row: int, since: int | None = None) -> RowSnapshot:
        """The row's window as plain arrays in arrival order (oldest first); with ``since``,
        only the values appended from that index on (0-based, counted over ``total``), the
        window's size in ``count``."""
        order = self.row_order(row)
        total, n = int(self.total[row]), int(order.shape[0])
        if since is not None and since > total - n:
            order = order[min(since - (total - n), n) :]
            return RowSnapshot(
                values=self.values[:, row, order], ts=self.ts[row, order], total=total, count=n
            )
        return RowSnapshot(
            values=self.values[:, row, order].copy(),
            ts=self.ts[row, order].copy(),
            total=total,
        )

    def restore(self, row: int, snap: RowSnapshot) -> None:
        """Load a whole-window snapshot into an allocated row; the row ends as it was when
        snapshotted."""
        if snap.count is not None and snap.count != snap.ts.shape[0]:
            raise ValueError("restore needs a whole-window snapshot")
        self.count[row] = 0
        self.head[row] = 0
        self.append(row, snap.values, snap.ts)
        self.total[row] = snap.total
