"""Time windows of the numeric kinds are packed whatever their width (``KindSpec.pack_wide``),
not only under half the buffer, and the packed blocks' statistics skip mask passes
(``numeric_summary(packed=True)``). These tests build banks by the ring's own ``append``
(partial rows, wrapped rows, one slot, repeated and out-of-order timestamps, NaN and infinite
scalars) and compare the packed windows with the masked full width of the half-width rule:
count, min, max and the quantiles bit for bit (order statistics), the moments to 1e-12 (the
pairwise sums are grouped differently), and with numpy/scipy oracles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd import windows
from metricsd.windows import KINDS, Kind
from scipy import stats as sps

_SPECS = {spec.name: spec for spec in KINDS}


def _bank(
    kind_name: str,
    width: int,
    rows: list[list[tuple[float, list[float]]]],
) -> tuple[Kind, np.ndarray]:
    """A kind whose bank holds ``rows``: per row, appends of (ts, channel values)."""
    kind = Kind(_SPECS[kind_name], width)
    ids = []
    for appends in rows:
        row = kind.bank.allocate()
        ids.append(row)
        for ts, vals in appends:
            block = np.asarray(vals, dtype=np.float64).reshape(kind.bank.channels, -1)
            kind.bank.append(row, block, np.full(block.shape[1], ts))
    return kind, np.asarray(ids, dtype=np.int64)


def _both(kind: Kind, rows: np.ndarray, seconds: tuple[float, ...]) -> Any:
    """The windows as computed, and with time windows packed only under half the buffer."""
    wide = windows._windows(kind, rows, seconds)
    compact = windows._compact

    def half(values: Any, mask: Any, counts: Any, limit: int) -> Any:
        return compact(values, mask, counts, min(limit, mask.shape[1] // 2))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(windows, "_compact", half)
        masked = windows._windows(kind, rows, seconds)
    return wide, masked


_EXACT = {"count", "min", "max", "median", "p95", "p99", "p25", "p50", "p75", "p90", "non_finite"}


def _close(a: Any, b: Any, name: str = "") -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b) or name in _EXACT:
            return (math.isnan(a) and math.isnan(b)) or a == b
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], k) for k in a)
    return bool(a == b)


def _assert_agree(wide: Any, masked: Any) -> None:
    assert len(wide) == len(masked)
    for a, b in zip(wide, masked, strict=True):
        assert a.window == b.window
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.first, b.first)
        np.testing.assert_array_equal(a.last, b.last)
        if a.truncated is None:
            assert b.truncated is None
        else:
            np.testing.assert_array_equal(a.truncated, b.truncated)
        assert len(a.per_row) == len(b.per_row)
        for x, y in zip(a.per_row, b.per_row, strict=True):
            assert _close(x, y), (x, y)


_value = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, width=64),
    st.sampled_from([0.0, 1.0, 0.15, -2.5]),
)


@st.composite
def _rows(draw: Any, ordered: bool, channels: int = 1, special: bool = False) -> Any:
    """Rows of appends: event times non-decreasing when ``ordered`` (repeats allowed)."""
    n_rows = draw(st.integers(1, 6))
    out = []
    for _ in range(n_rows):
        appends = []
        ts = draw(st.floats(0.0, 1e4))
        for _ in range(draw(st.integers(0, 12))):
            step = draw(st.sampled_from([0.0, 0.5, 1.0, 7.0, 30.0]))
            ts = ts + step if ordered else draw(st.floats(0.0, 1e4))
            k = draw(st.integers(1, 5))
            pool = st.one_of(_value, st.sampled_from([math.nan, math.inf])) if special else _value
            appends.append((ts, draw(st.lists(pool, min_size=k * channels, max_size=k * channels))))
        out.append(appends)
    return out


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 24),
    ordered=st.booleans(),
    seconds=st.sampled_from([(60.0, 300.0), (1.0,), (0.5, 7.0, 1e9), (300.0, 60.0)]),
    rows=st.data(),
)
def test_packed_time_windows_agree_with_the_masked_width(
    width: int, ordered: bool, seconds: tuple[float, ...], rows: Any
) -> None:
    kind, ids = _bank("batch_time", width, rows.draw(_rows(ordered)))
    both = _both(kind, ids, seconds)
    _assert_agree(*both)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 16), rows=st.data())
def test_packed_scalar_windows_agree_with_non_finite_values(width: int, rows: Any) -> None:
    kind, ids = _bank("scalar", width, rows.draw(_rows(True, special=True)))
    both = _both(kind, ids, (2.0, 30.0))
    _assert_agree(*both)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 16), rows=st.data())
def test_packed_multichannel_figures_agree(width: int, rows: Any) -> None:
    kind, ids = _bank("features", width, rows.draw(_rows(True, channels=3)))
    both = _both(kind, ids, (1.0, 8.0))
    _assert_agree(*both)


@pytest.mark.parametrize("head_values", [0, 3, 997])
def test_wide_time_windows_match_numpy_and_scipy(head_values: int) -> None:
    """A bank like the tick benchmark's (1,000 slots, 20 events of 50 values 25 s apart), its
    ring rotated by ``head_values`` extra values: every statistic of the 60 s and 300 s windows
    (150 and 600 values, the second more than half the buffer) against numpy/scipy."""
    rng = np.random.default_rng(head_values)
    kind, ids = _bank("batch_time", 1000, [[]] * 3)
    expected: list[list[np.ndarray]] = []
    for row in ids.tolist():
        xs, tss = [], []
        for event in range(20 + head_values // 50 + 1):
            vals = rng.lognormal(np.log(0.15), 0.2, 50 if event < 20 else head_values % 50 or 50)
            kind.bank.append(row, vals[None, :], np.full(vals.size, 1000.0 + 25.0 * event))
            xs.append(vals)
            tss.append(np.full(vals.size, 1000.0 + 25.0 * event))
        x, t = np.concatenate(xs)[-1000:], np.concatenate(tss)[-1000:]
        expected.append([x[t > t.max() - s] for s in (60.0, 300.0)])
    computed = windows._windows(kind, ids, (60.0, 300.0))
    for j, window in enumerate(computed[1:]):
        for r, metrics in enumerate(window.per_row):
            sel = expected[r][j]
            assert metrics["count"] == sel.size
            assert metrics["mean"] == pytest.approx(np.mean(sel), rel=1e-12)
            assert metrics["std"] == pytest.approx(np.std(sel), rel=1e-9)
            assert metrics["min"] == np.min(sel) and metrics["max"] == np.max(sel)
            for name, q in (("median", 50), ("p95", 95), ("p99", 99)):
                assert metrics[name] == np.percentile(sel, q)  # numpy "linear", bit for bit
            assert metrics["cv"] == pytest.approx(sps.variation(sel), rel=1e-9)
            assert metrics["skewness"] == pytest.approx(sps.skew(sel), rel=1e-9)
            assert metrics["kurtosis"] == pytest.approx(sps.kurtosis(sel), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 8),
    slots=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_packed_summary_is_the_masked_summary_bit_for_bit(rows: int, slots: int, seed: int) -> None:
    """``numeric_summary(packed=True)`` on a packed block (valid slots first, garbage after) is
    ``numeric_summary`` of the same block and mask, bit for bit."""
    from metricsd import stats

    rng = np.random.default_rng(seed)
    values = rng.normal(rng.normal(0, 100), rng.lognormal(0, 3), (rows, slots))
    values[:, ::3] = np.round(values[:, ::3])
    n = rng.integers(0, slots + 1, rows)
    mask = np.arange(slots)[None, :] < n[:, None]
    values[~mask] = rng.choice([np.nan, np.inf, -1e300, 0.0])
    packed = stats.numeric_summary(values, mask, packed=True)
    plain = stats.numeric_summary(values, mask)
    for name in plain:
        np.testing.assert_array_equal(packed[name], plain[name], err_msg=name)
