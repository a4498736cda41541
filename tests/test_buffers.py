"""Ring-buffer banks against a plain-list model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.buffers import RingBank


def _window(bank: RingBank, row: int) -> list[tuple[float, float, float]]:
    """The row's (channel 0, channel 1, ts) triples as a sorted multiset."""
    rows = np.array([row])
    mask = bank.valid(rows)[0]
    vals = bank.values[:, row][:, mask]
    ts = bank.ts[row][mask]
    return sorted(zip(vals[0].tolist(), vals[1].tolist(), ts.tolist(), strict=True))


appends = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=12)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 9), ops=appends)
def test_windows_hold_the_newest_width_values_like_a_list(
    width: int, ops: list[tuple[int, list[float]]]
) -> None:
    """After any appends each row holds exactly the newest `width` values of a list model."""
    bank = RingBank(width, channels=2, initial_rows=1)  # also forces growth
    rows = [bank.allocate() for _ in range(4)]
    model: dict[int, list[tuple[float, float, float]]] = {r: [] for r in rows}
    clock = 0.0
    for which, values in ops:
        row = rows[which]
        ts = np.arange(clock, clock + len(values))
        clock += len(values)
        block = np.array([values, [-v for v in values]], dtype=np.float64).reshape(2, len(values))
        bank.append(row, block, ts)
        model[row].extend(zip(values, [-v for v in values], ts.tolist(), strict=True))
    for row in rows:
        expected = model[row][-width:] if model[row] else []
        assert _window(bank, row) == sorted(expected)
        assert bank.total[row] == len(model[row])
        assert bank.count[row] == len(expected)
        snap = bank.snapshot(row)
        assert snap.ts.tolist() == [t for _, _, t in expected], "snapshot is in arrival order"
        order = bank.arrival_order(np.array([row]))[0]
        n = int(bank.count[row])
        if n:
            slots = bank.row_order(row)
            assert order[slots].tolist() == list(range(len(model[row]) - n, len(model[row])))


def test_release_recycles_rows_and_clears_them() -> None:
    """A released row is handed out again, empty."""
    bank = RingBank(4, initial_rows=2)
    a = bank.allocate()
    bank.append(a, np.ones((1, 3)), np.zeros(3))
    bank.release(a)
    b = bank.allocate()
    assert b == a
    assert bank.count[b] == 0 and bank.total[b] == 0
    assert not bank.valid(np.array([b])).any()
    assert bank.rows_in_use == 1


def test_growth_keeps_existing_rows() -> None:
    """Allocating past the capacity doubles the arrays and keeps what rows already hold."""
    bank = RingBank(3, initial_rows=2)
    rows = [bank.allocate() for _ in range(2)]
    for i, row in enumerate(rows):
        bank.append(row, np.full((1, 2), float(i)), np.zeros(2))
    more = [bank.allocate() for _ in range(5)]
    assert bank.capacity >= 7
    assert len(set(rows + more)) == 7
    for i, row in enumerate(rows):
        assert bank.values[0, row, :2].tolist() == [float(i), float(i)]


def test_snapshot_restore_round_trip() -> None:
    """Restoring a snapshot into a fresh bank reproduces the window, its order and its total."""
    bank = RingBank(5, channels=2)
    row = bank.allocate()
    for k in range(4):
        bank.append(
            row, np.arange(2 * 3, dtype=float).reshape(2, 3) + 10 * k, np.arange(3) + 3.0 * k
        )
    snap = bank.snapshot(row)
    other = RingBank(5, channels=2)
    r2 = other.allocate()
    other.restore(r2, snap)
    assert _window(other, r2) == _window(bank, row)
    assert other.total[r2] == bank.total[row] == 12
    assert other.snapshot(r2).ts.tolist() == snap.ts.tolist()


@pytest.mark.parametrize("width", [0, -1])
def test_width_must_be_positive(width: int) -> None:
    """A bank of zero or negative width is refused at construction."""
    with pytest.raises(ValueError, match="width"):
        RingBank(width)


def test_nbytes_counts_the_window_arrays() -> None:
    """nbytes is the size of the values, timestamps and per-row counters."""
    bank = RingBank(100, channels=2, initial_rows=10)
    assert bank.nbytes == 2 * 10 * 100 * 8 + 10 * 100 * 8 + 3 * 10 * 8


def test_max_rows_caps_growth_and_freed_rows_are_reused() -> None:
    """With max_rows the arrays grow by doubling only up to it; beyond it allocate refuses, and a
    released row is handed out again."""
    bank = RingBank(4, initial_rows=16, max_rows=40)
    rows = [bank.allocate() for _ in range(40)]
    assert bank.capacity == 40 and sorted(rows) == list(range(40))
    with pytest.raises(RuntimeError, match="full"):
        bank.allocate()
    bank.release(7)
    assert bank.allocate() == 7 and bank.capacity == 40
    assert RingBank(4, initial_rows=16, max_rows=3).capacity == 3
