"""Tests for metricsd.stats: every statistic against numpy/scipy/sklearn (and exact arithmetic).

Oracles run per row on the valid values only; our functions run on whole blocks with random masks
and garbage (NaN, ±inf, huge numbers) in the invalid slots, under ``warnings.simplefilter("error")``
so any RuntimeWarning fails the test. Float tolerances follow the error analysis of the oracle:
numpy sums without compensation, so its mean is off by up to ~n·eps·max|x| and everything centred
on it inherits that error divided by the spread; exact rational arithmetic (``fractions``) is the
reference where scipy itself is inaccurate (tiny variance).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from metricsd import stats
from metricsd.stats import (
    BINARY_METRICS,
    MULTICLASS_METRICS,
    NUMERIC_METRICS,
    REGRESSION_METRICS,
    binary_summary,
    multiclass_summary,
    numeric_summary,
    quantiles,
    regression_summary,
)
from numpy.typing import NDArray
from sklearn import metrics as skm

EPS = float(np.finfo(np.float64).eps)
NAN = math.nan
GARBAGE = [NAN, np.inf, -np.inf, 1e308, -1e308, 0.0, 7.0]

F64 = NDArray[np.float64]
Bools = NDArray[np.bool_]


# --------------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _strict() -> Iterator[None]:
    """Turn every warning raised inside the block into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the oracles' own warnings (scipy precision loss, sklearn undefined metrics)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _same(got: float, want: float) -> bool:
    """Equal, or both NaN."""
    return (math.isnan(got) and math.isnan(want)) or got == want


def _near(got: float, want: float, tol: float) -> bool:
    """Within ``tol`` of each other, or both NaN."""
    if math.isnan(got) or math.isnan(want):
        return math.isnan(got) and math.isnan(want)
    return abs(got - want) <= tol


def _block(rows: Sequence[Sequence[float]]) -> tuple[F64, Bools]:
    """A block from ragged rows: valid slots first, NaN garbage after."""
    width = max([len(r) for r in rows] + [1])
    values = np.full((len(rows), width), NAN)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
        valid[i, : len(r)] = True
    return values, valid


def _row(result: dict[str, F64], i: int) -> dict[str, float]:
    """Row ``i`` of a summary as plain floats."""
    return {name: float(col[i]) for name, col in result.items()}


_magnitudes = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
_values = st.one_of(
    _magnitudes,
    st.sampled_from([0.0, 1.0, -1.0, 0.1, 4.2, 1e6, -1e6, 1e-6]),  # ties and classic roundings
    st.floats(-1e-3, 1e-3),
).map(lambda x: 0.0 if abs(x) < 1e-30 else x)  # no subnormal 4th powers


@st.composite
def _masked_blocks(
    draw: st.DrawFn,
    elements: st.SearchStrategy[float] = _values,
    max_rows: int = 6,
    max_slots: int = 14,
) -> tuple[F64, Bools]:
    """A random block with per-row shapes: random mask, full, empty, constant or single value."""
    rows = draw(st.integers(1, max_rows))
    slots = draw(st.integers(1, max_slots))
    values = draw(hnp.arrays(np.float64, (rows, slots), elements=elements))
    valid = draw(hnp.arrays(np.bool_, (rows, slots)))
    for i in range(rows):
        kind = draw(st.sampled_from(["mask", "mask", "full", "empty", "constant", "single"]))
        if kind == "full":
            valid[i] = True
        elif kind == "empty":
            valid[i] = False
        elif kind == "constant":
            values[i] = values[i, 0]
        elif kind == "single":
            valid[i] = False
            valid[i, draw(st.integers(0, slots - 1))] = True
    values[~valid] = draw(st.sampled_from(GARBAGE))
    return values, valid


# --------------------------------------------------------------------------------------------------
# Numeric windows


def _numeric_oracle(row: F64) -> dict[str, float]:
    """numpy/scipy per window; constant windows give NaN shape statistics (scipy's intended test).

    scipy's own mean can be off by an ulp on constant data (``skew([4.2] * 37)`` is 1.0), so for
    exactly constant windows the contract's NaN is the oracle.
    """
    if row.size == 0:
        return {name: (0.0 if name == "count" else NAN) for name in NUMERIC_METRICS}
    with _quiet():
        constant = row.min() == row.max()
        return {
            "count": float(row.size),
            "mean": float(np.mean(row)),
            "std": float(np.std(row)),
            "min": float(np.min(row)),
            "max": float(np.max(row)),
            "median": float(np.percentile(row, 50)),
            "p95": float(np.percentile(row, 95)),
            "p99": float(np.percentile(row, 99)),
            "cv": float(scipy.stats.variation(row)),
            "skewness": NAN if constant else float(scipy.stats.skew(row)),
            "kurtosis": NAN if constant else float(scipy.stats.kurtosis(row)),
        }


def _check_numeric_row(got: dict[str, float], row: F64) -> None:
    """Compare one window with the numpy/scipy oracle within the oracle's own error bounds."""
    want = _numeric_oracle(row)
    for name in ("count", "min", "max", "median", "p95", "p99"):
        assert _same(got[name], want[name]), (name, got[name], want[name], row)
    if row.size == 0:
        assert all(math.isnan(got[k]) for k in NUMERIC_METRICS if k != "count"), got
        return
    n = row.size
    scale = float(np.max(np.abs(row)))
    std = want["std"]
    err_mean = 4 * n * EPS * scale  # numpy's uncompensated sum
    err_std = err_mean + 4 * n * EPS * std
    assert _near(got["mean"], want["mean"], 1e-12 * abs(want["mean"]) + err_mean), (got, want)
    assert _near(got["std"], want["std"], 1e-12 * std + err_std), (got, want)
    mean = want["mean"]
    if abs(mean) > 2 * err_mean:  # otherwise std/mean is not determined by float64 data
        tol = 1e-9 * abs(want["cv"]) + (err_std + abs(want["cv"]) * err_mean) / abs(mean)
        assert _near(got["cv"], want["cv"], tol), (got, want, row)
    elif got["mean"] == 0:
        assert math.isnan(got["cv"])
    for name in ("skewness", "kurtosis"):
        if std <= 1e3 * n * EPS * scale and not math.isnan(want[name]):
            continue  # near scipy's "constant" threshold: the oracle's rounding decides NaN-ness
        # centring error / spread, amplified by the statistic's slope (see module docstring)
        cond = 32 * n * EPS * scale / std if std > 0 else math.inf
        tol = 1e-9 * abs(want[name]) + 1e-12 + cond * (4 + abs(want[name]))
        assert _near(got[name], want[name], tol), (name, got[name], want[name], row)


@settings(deadline=None, max_examples=200)
@given(_masked_blocks())
def test_numeric_summary_matches_numpy_and_scipy(block: tuple[F64, Bools]) -> None:
    """Every numeric statistic of every row matches numpy/scipy on that row's valid values."""
    values, valid = block
    with _strict():
        result = numeric_summary(values, valid)
    assert set(result) == set(NUMERIC_METRICS)
    for i in range(values.shape[0]):
        _check_numeric_row(_row(result, i), values[i][valid[i]])


def _exact_moments(row: F64) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    """Mean and central moments m2, m3, m4 (divided by n) in exact rational arithmetic."""
    xs = [Fraction(float(x)) for x in row]
    mean = sum(xs, Fraction(0)) / len(xs)
    ds = [x - mean for x in xs]
    return (
        mean,
        sum((d**2 for d in ds), Fraction(0)) / len(ds),
        sum((d**3 for d in ds), Fraction(0)) / len(ds),
        sum((d**4 for d in ds), Fraction(0)) / len(ds),
    )


def _check_exact(got: dict[str, float], row: F64) -> None:
    """Mean, std, cv, skewness and kurtosis of one window agree with exact arithmetic."""
    n = row.size
    mean, m2, m3, m4 = _exact_moments(row)
    std = math.sqrt(m2)
    assert abs(Fraction(got["mean"]) - mean) <= 2 * EPS * abs(mean) + 4 * n * EPS * Fraction(std)
    assert math.isclose(got["std"], std, rel_tol=1e-12, abs_tol=0.0)
    if abs(float(mean)) > 4 * n * EPS * std:  # else the mean is rounding noise
        cv = std / float(mean)
        assert abs(got["cv"] - cv) <= abs(cv) * (1e-11 + 4 * n * EPS * std / abs(float(mean)))
    threshold = (Fraction(EPS) * mean) ** 2  # scipy's "constant" test on exact moments
    if threshold / 4 <= m2 <= 4 * threshold:
        return  # within rounding of the threshold either answer is right
    if m2 <= threshold:
        assert math.isnan(got["skewness"]) and math.isnan(got["kurtosis"]), got
        return
    skew = math.copysign(math.sqrt(m3 * m3 / m2**3), m3)
    kurt = float(m4 / (m2 * m2) - 3)
    assert math.isclose(got["skewness"], skew, rel_tol=1e-10, abs_tol=1e-12), (got, skew)
    assert math.isclose(got["kurtosis"], kurt, rel_tol=1e-10, abs_tol=1e-12), (got, kurt)


@settings(deadline=None, max_examples=150)
@given(_masked_blocks(max_slots=10))
def test_moments_match_exact_arithmetic(block: tuple[F64, Bools]) -> None:
    """Moment statistics stay within ~1e-10 of exact rational arithmetic for any data."""
    values, valid = block
    with _strict():
        result = numeric_summary(values, valid)
    for i in range(values.shape[0]):
        row = values[i][valid[i]]
        if row.size:
            _check_exact(_row(result, i), row)


@settings(deadline=None, max_examples=150)
@given(
    centre=st.floats(1e-3, 1e6).flatmap(lambda c: st.sampled_from([c, -c])),
    exponent=st.integers(4, 12),
    steps=st.lists(st.integers(0, 1000), min_size=2, max_size=40).filter(lambda s: len(set(s)) > 1),
)
def test_tiny_variance_moments_match_exact_arithmetic(
    centre: float, exponent: int, steps: list[int]
) -> None:
    """Windows whose spread is 1e-4..1e-12 of their mean keep exact-arithmetic accuracy."""
    row = np.array([centre + k * abs(centre) * 10.0**-exponent for k in steps])
    if row.min() == row.max():
        return  # the steps vanished in rounding: a constant window, tested elsewhere
    with _strict():
        result = numeric_summary(row[None, :], np.ones((1, row.size), dtype=bool))
    _check_exact(_row(result, 0), row)


NUMERIC_CASES: list[tuple[str, list[float], dict[str, float]]] = [
    (
        "empty",
        [],
        {
            "count": 0.0,
            "mean": NAN,
            "std": NAN,
            "min": NAN,
            "max": NAN,
            "median": NAN,
            "p95": NAN,
            "p99": NAN,
            "cv": NAN,
            "skewness": NAN,
            "kurtosis": NAN,
        },
    ),
    (
        "one value",
        [3.5],
        {
            "count": 1.0,
            "mean": 3.5,
            "std": 0.0,
            "min": 3.5,
            "max": 3.5,
            "median": 3.5,
            "p95": 3.5,
            "p99": 3.5,
            "cv": 0.0,
            "skewness": NAN,
            "kurtosis": NAN,
        },
    ),
    (
        "one zero",
        [0.0],
        {
            "count": 1.0,
            "mean": 0.0,
            "std": 0.0,
            "min": 0.0,
            "max": 0.0,
            "median": 0.0,
            "p95": 0.0,
            "p99": 0.0,
            "cv": NAN,
            "skewness": NAN,
            "kurtosis": NAN,
        },
    ),
    (
        "constant 4.2 x37",
        [4.2] * 37,
        {
            "count": 37.0,
            "mean": 4.2,
            "std": 0.0,
            "min": 4.2,
            "max": 4.2,
            "median": 4.2,
            "p95": 4.2,
            "p99": 4.2,
            "cv": 0.0,
            "skewness": NAN,
            "kurtosis": NAN,
        },
    ),
    (
        "constant zero",
        [0.0] * 5,
        {
            "count": 5.0,
            "mean": 0.0,
            "std": 0.0,
            "min": 0.0,
            "max": 0.0,
            "median": 0.0,
            "p95": 0.0,
            "p99": 0.0,
            "cv": NAN,
            "skewness": NAN,
            "kurtosis": NAN,
        },
    ),
    (
        "two values",
        [1.0, 3.0],
        {
            "count": 2.0,
            "mean": 2.0,
            "std": 1.0,
            "min": 1.0,
            "max": 3.0,
            "median": 2.0,
            "p95": 2.9,
            "p99": 2.98,
            "cv": 0.5,
            "skewness": 0.0,
            "kurtosis": -2.0,
        },
    ),
    (
        "zero mean",
        [-2.0, 2.0],
        {
            "count": 2.0,
            "mean": 0.0,
            "std": 2.0,
            "min": -2.0,
            "max": 2.0,
            "median": 0.0,
            "p95": 1.8,
            "p99": 1.96,
            "cv": NAN,
            "skewness": 0.0,
            "kurtosis": -2.0,
        },
    ),
    (
        "skewed",
        [0.0, 0.0, 0.0, 4.0],
        {
            "count": 4.0,
            "mean": 1.0,
            "std": math.sqrt(3.0),
            "min": 0.0,
            "max": 4.0,
            "median": 0.0,
            "p95": 3.4,
            "p99": 3.88,
            "cv": math.sqrt(3.0),
            "skewness": 2 / math.sqrt(3.0),
            "kurtosis": -2 / 3,
        },
    ),
]


@pytest.mark.parametrize(
    ("values", "expected"), [c[1:] for c in NUMERIC_CASES], ids=[c[0] for c in NUMERIC_CASES]
)
def test_numeric_edge_cases(values: list[float], expected: dict[str, float]) -> None:
    """Empty, single-value, constant and two-value windows give the documented results."""
    block, valid = _block([values, [9.0, -9.0, 1.0]])  # a neighbour row must not interfere
    with _strict():
        got = _row(numeric_summary(block, valid), 0)
    for name, want in expected.items():
        assert _near(got[name], want, 1e-12 * abs(want) + 1e-15), (name, got[name], want)


def test_constant_window_is_exact_where_scipy_rounds() -> None:
    """A constant window has std exactly 0 and NaN skewness even where scipy's rounding says 1.0."""
    row = np.full(37, 4.2)
    with _quiet():
        assert scipy.stats.skew(row) == 1.0  # the oracle's artefact this contract deviates from
    with _strict():
        got = _row(numeric_summary(row[None, :], np.ones((1, 37), dtype=bool)), 0)
    assert got["std"] == 0.0 and got["mean"] == 4.2
    assert math.isnan(got["skewness"]) and math.isnan(got["kurtosis"])


@settings(deadline=None, max_examples=150)
@given(_masked_blocks(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_quantiles_match_numpy_percentile(block: tuple[F64, Bools], qs: list[float]) -> None:
    """quantiles() equals np.quantile(row[valid], qs) bit for bit, NaN for empty rows."""
    values, valid = block
    levels = [0.0, 1.0, 0.5, 0.95, 0.99, *qs]
    with _strict():
        got = quantiles(values, valid, levels)
    assert got.shape == (len(levels), values.shape[0])
    for i in range(values.shape[0]):
        row = values[i][valid[i]]
        want = np.quantile(row, levels) if row.size else np.full(len(levels), NAN)
        np.testing.assert_array_equal(got[:, i], want)


@pytest.mark.parametrize("qs", [[-0.1], [1.5], [NAN]])
def test_quantiles_reject_levels_outside_unit_interval(qs: list[float]) -> None:
    """Quantile levels outside [0, 1] are a caller bug and raise ValueError."""
    values, valid = _block([[1.0, 2.0]])
    with pytest.raises(ValueError, match="quantile levels"):
        quantiles(values, valid, qs)


@settings(deadline=None, max_examples=100)
@given(_masked_blocks(), st.sampled_from(GARBAGE), st.randoms(use_true_random=False))
def test_invalid_slots_never_leak(block: tuple[F64, Bools], junk: float, rnd: Any) -> None:
    """Changing what invalid slots hold, or the slot order, changes no result."""
    values, valid = block
    other = values.copy()
    other[~valid] = junk
    order = list(range(values.shape[1]))
    rnd.shuffle(order)
    with _strict():
        base = numeric_summary(values, valid)
        again = numeric_summary(other, valid)
        shuffled = numeric_summary(other[:, order], valid[:, order])
    for name in NUMERIC_METRICS:
        np.testing.assert_array_equal(base[name], again[name], err_msg=name)
        if name in ("count", "min", "max", "median", "p95", "p99"):
            np.testing.assert_array_equal(base[name], shuffled[name], err_msg=name)
        else:  # summation order changes the last bits only
            np.testing.assert_allclose(
                shuffled[name], base[name], rtol=1e-9, atol=1e-9, err_msg=name
            )


@settings(deadline=None, max_examples=60)
@given(_masked_blocks(max_rows=12, max_slots=9), st.integers(1, 30))
def test_chunking_does_not_change_results(block: tuple[F64, Bools], chunk: int) -> None:
    """Splitting the rows into cache-sized chunks (full and masked paths mixed) is invisible."""
    values, valid = block
    with _strict():
        whole = numeric_summary(values, valid)
        q_whole = quantiles(values, valid, [0.3])
    saved = stats._CHUNK_VALUES
    stats._CHUNK_VALUES = chunk
    try:
        with _strict():
            parts = numeric_summary(values, valid)
            q_parts = quantiles(values, valid, [0.3])
    finally:
        stats._CHUNK_VALUES = saved
    np.testing.assert_array_equal(q_parts, q_whole)
    for name in NUMERIC_METRICS:
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_full_window_fast_path_matches_masked_path() -> None:
    """A block where every slot is valid gives the same numbers as the masked path."""
    rng = np.random.default_rng(7)
    values = rng.normal(5.0, 3.0, size=(20, 300))
    valid = np.ones(values.shape, dtype=bool)
    padded = np.concatenate([values, np.full((20, 5), NAN)], axis=1)
    with _strict():
        full = numeric_summary(values, valid)
        masked = numeric_summary(padded, np.concatenate([valid, np.zeros((20, 5), bool)], axis=1))
    for name in NUMERIC_METRICS:
        np.testing.assert_allclose(full[name], masked[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_no_runtime_warnings_on_degenerate_blocks() -> None:
    """Empty rows, NaN/inf garbage, zero means and constant rows raise no warnings at all."""
    values = np.array(
        [
            [NAN, np.inf, -np.inf, 1e308],
            [0.0, 0.0, NAN, NAN],
            [-1.0, 1.0, np.inf, 5.0],
            [2.0, 2.0, 2.0, 2.0],
        ]
    )
    valid = np.array(
        [[False] * 4, [True, True, False, False], [True, True, False, False], [True] * 4]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numeric_summary(values, valid)
        quantiles(values, valid, [0.0, 0.5, 1.0])
        binary_summary(values, values, valid)
        regression_summary(values, values[::-1], valid, 0.5)
        multiclass_summary(np.where(valid, 1.0, values), np.where(valid, 2, 0), valid)
    assert caught == []


@pytest.mark.parametrize(
    "function",
    [
        numeric_summary,
        lambda v, m: binary_summary(v, v, m),
        lambda v, m: regression_summary(v, v, m, 1.0),
        lambda v, m: quantiles(v, m, [0.5]),
    ],
)
def test_shape_mismatch_is_rejected(function: Callable[[F64, Bools], object]) -> None:
    """A mask whose shape differs from the values is a caller bug and raises ValueError."""
    with pytest.raises(ValueError, match="shape"):
        function(np.zeros((2, 3)), np.ones((2, 4), dtype=bool))


def test_summaries_return_their_metric_names_as_float_rows() -> None:
    """Each summary returns exactly its *_METRICS names, as float64 arrays of one value per row."""
    values, valid = _block([[1.0, 0.0], [], [1.0]])
    results = [
        numeric_summary(values, valid),
        binary_summary(values, values, valid),
        multiclass_summary(values, values, valid)[0],
        regression_summary(values, values, valid, 0.1),
    ]
    names = [NUMERIC_METRICS, BINARY_METRICS, MULTICLASS_METRICS, REGRESSION_METRICS]
    for result, expected in zip(results, names, strict=True):
        assert tuple(result) == expected
        for column in result.values():
            assert column.dtype == np.float64 and column.shape == (3,)


def test_metric_tables_are_the_contract() -> None:
    """The metric name tuples are the ones other modules code against, in order."""
    assert NUMERIC_METRICS == (
        "count",
        "mean",
        "std",
        "min",
        "max",
        "median",
        "p95",
        "p99",
        "cv",
        "skewness",
        "kurtosis",
    )
    assert BINARY_METRICS == ("precision", "recall", "f1", "accuracy", "tp", "fp", "fn", "tn")
    assert MULTICLASS_METRICS == (
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "f1_micro",
        "f1_weighted",
    )
    assert REGRESSION_METRICS == ("mse", "rmse", "mae", "r2", "pearson_r", "within_threshold")


# --------------------------------------------------------------------------------------------------
# Binary classification


def _binary_oracle(t: NDArray[Any], p: NDArray[Any]) -> dict[str, float]:
    """sklearn's binary metrics (pos_label=1, zero_division=0) and confusion counts."""
    if t.size == 0:
        return {
            "precision": NAN,
            "recall": NAN,
            "f1": NAN,
            "accuracy": NAN,
            "tp": 0.0,
            "fp": 0.0,
            "fn": 0.0,
            "tn": 0.0,
        }
    t, p = t.astype(int), p.astype(int)
    with _quiet():
        tn, fp, fn, tp = skm.confusion_matrix(t, p, labels=[0, 1]).ravel()
        return {
            "precision": float(skm.precision_score(t, p, zero_division=0)),
            "recall": float(skm.recall_score(t, p, zero_division=0)),
            "f1": float(skm.f1_score(t, p, zero_division=0)),
            "accuracy": float(skm.accuracy_score(t, p)),
            "tp": float(tp),
            "fp": float(fp),
            "fn": float(fn),
            "tn": float(tn),
        }


@st.composite
def _label_blocks(
    draw: st.DrawFn, labels: st.SearchStrategy[int]
) -> tuple[NDArray[Any], NDArray[Any], Bools]:
    """y_true, y_pred (float64 or int64) and a mask, garbage in invalid slots of y_true."""
    rows = draw(st.integers(1, 5))
    slots = draw(st.integers(1, 12))
    shape = (rows, slots)
    t = draw(hnp.arrays(np.int64, shape, elements=labels))
    p = draw(hnp.arrays(np.int64, shape, elements=labels))
    valid = draw(hnp.arrays(np.bool_, shape))
    valid[draw(st.integers(0, rows - 1))] = draw(st.booleans())  # a full or empty row
    y_true: NDArray[Any] = t.astype(np.float64) if draw(st.booleans()) else t
    y_pred: NDArray[Any] = p.astype(np.float64) if draw(st.booleans()) else p
    if y_true.dtype == np.float64:
        y_true[~valid] = draw(st.sampled_from([NAN, np.inf, 1.0, -3.0]))
    else:
        y_true[~valid] = -7
    return y_true, y_pred, valid


@settings(deadline=None, max_examples=100)
@given(_label_blocks(st.integers(0, 1)))
def test_binary_summary_matches_sklearn(block: tuple[NDArray[Any], NDArray[Any], Bools]) -> None:
    """Binary precision/recall/F1/accuracy and counts match sklearn per row."""
    y_true, y_pred, valid = block
    with _strict():
        result = binary_summary(y_true, y_pred, valid)
    for i in range(valid.shape[0]):
        want = _binary_oracle(y_true[i][valid[i]], y_pred[i][valid[i]])
        got = _row(result, i)
        for name in BINARY_METRICS:
            assert _near(got[name], want[name], 1e-12), (name, got[name], want[name])


BINARY_CASES = [
    (
        "all negative",
        [0, 0, 0],
        [0, 0, 0],
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0, "tn": 3.0},
    ),
    (
        "all positive",
        [1, 1],
        [1, 1],
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0, "tp": 2.0},
    ),
    (
        "no positive prediction",
        [1, 0, 1],
        [0, 0, 0],
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1 / 3, "fn": 2.0, "tn": 1.0},
    ),
    (
        "no positive label",
        [0, 0],
        [1, 0],
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5, "fp": 1.0, "tn": 1.0},
    ),
    (
        "mixed",
        [1, 1, 0, 0, 1],
        [1, 0, 1, 0, 1],
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 0.6, "tp": 2.0},
    ),
    (
        "empty",
        [],
        [],
        {
            "precision": NAN,
            "recall": NAN,
            "f1": NAN,
            "accuracy": NAN,
            "tp": 0.0,
            "fp": 0.0,
            "fn": 0.0,
            "tn": 0.0,
        },
    ),
]


@pytest.mark.parametrize(
    ("t", "p", "expected"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES]
)
def test_binary_edge_cases(t: list[int], p: list[int], expected: dict[str, float]) -> None:
    """One-class windows use zero_division=0; empty windows have NaN ratios and zero counts."""
    y_true, valid = _block([t])
    y_pred = np.nan_to_num(_block([p])[0]).astype(np.int64)  # int labels, float truth
    with _strict():
        got = _row(binary_summary(y_true, y_pred, valid), 0)
    for name, want in expected.items():
        assert _near(got[name], want, 1e-12), (name, got[name], want)
    if t:
        want_all = _binary_oracle(np.array(t), np.array(p))
        for name in BINARY_METRICS:
            assert _near(got[name], want_all[name], 1e-12), (name, got[name], want_all[name])


# --------------------------------------------------------------------------------------------------
# Multiclass classification


def _multiclass_oracle(
    t: NDArray[Any], p: NDArray[Any]
) -> tuple[dict[str, float], tuple[list[int], list[list[int]]]]:
    """sklearn's multiclass metrics (zero_division=0) and its default confusion matrix."""
    t, p = t.astype(int), p.astype(int)
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    with _quiet():
        metrics = {
            "accuracy": float(skm.accuracy_score(t, p)),
            "precision_macro": float(skm.precision_score(t, p, average="macro", zero_division=0)),
            "recall_macro": float(skm.recall_score(t, p, average="macro", zero_division=0)),
            "f1_macro": float(skm.f1_score(t, p, average="macro", zero_division=0)),
            "f1_micro": float(skm.f1_score(t, p, average="micro", zero_division=0)),
            "f1_weighted": float(skm.f1_score(t, p, average="weighted", zero_division=0)),
        }
        return metrics, (labels, skm.confusion_matrix(t, p).tolist())


def _check_multiclass(y_true: NDArray[Any], y_pred: NDArray[Any], valid: Bools) -> None:
    """Compare every row of multiclass_summary with sklearn (empty rows: NaN and no matrix)."""
    with _strict():
        metrics, matrices = multiclass_summary(y_true, y_pred, valid)
    assert len(matrices) == valid.shape[0]
    for i in range(valid.shape[0]):
        got = _row(metrics, i)
        t, p = y_true[i][valid[i]], y_pred[i][valid[i]]
        if t.size == 0:
            assert all(math.isnan(v) for v in got.values()) and matrices[i] == ([], [])
            continue
        want, (labels, matrix) = _multiclass_oracle(t, p)
        for name in MULTICLASS_METRICS:
            assert _near(got[name], want[name], 1e-12), (name, got[name], want[name])
        assert matrices[i] == (labels, matrix)
        assert all(type(x) is int for x in matrices[i][0])
        assert all(type(x) is int for r in matrices[i][1] for x in r)


@settings(deadline=None, max_examples=100)
@given(_label_blocks(st.sampled_from([0, 1, 2, 3, 5, 8, 40])))
def test_multiclass_summary_matches_sklearn(
    block: tuple[NDArray[Any], NDArray[Any], Bools],
) -> None:
    """Multiclass metrics, label lists and confusion matrices match sklearn per row."""
    _check_multiclass(*block)


MULTICLASS_CASES = [
    ("labels with a gap", [0, 2, 2, 0], [0, 2, 0, 0]),
    ("single label", [3, 3, 3], [3, 3, 3]),
    ("prediction outside y_true", [1, 1, 2], [1, 4, 2]),
    ("all wrong", [0, 1], [1, 0]),
    ("large sparse labels", [0, 99_999, 99_999], [99_999, 99_999, 7]),
]


@pytest.mark.parametrize(
    ("t", "p"), [c[1:] for c in MULTICLASS_CASES], ids=[c[0] for c in MULTICLASS_CASES]
)
def test_multiclass_edge_cases(t: list[int], p: list[int]) -> None:
    """Gaps, a single label, unseen predicted labels and sparse labels match sklearn."""
    y_true, valid = _block([t, [], [1, 0]])
    y_pred = np.nan_to_num(_block([p, [], [1, 1]])[0]).astype(np.int64)
    _check_multiclass(y_true, y_pred, valid)


def test_multiclass_matrix_is_per_row_and_small() -> None:
    """Rows with disjoint large labels each get only their own labels' matrix."""
    y_true = np.array([[100_000, 5], [0, 0]])
    y_pred = np.array([[5, 5], [99_000, 0]])
    with _strict():
        metrics, matrices = multiclass_summary(y_true, y_pred, np.ones((2, 2), dtype=bool))
    assert matrices == [([5, 100_000], [[1, 0], [1, 0]]), ([0, 99_000], [[1, 1], [0, 0]])]
    np.testing.assert_allclose(metrics["accuracy"], [0.5, 0.5])


@pytest.mark.parametrize("bad", [-1.0, 2.5])
def test_multiclass_rejects_invalid_labels(bad: float) -> None:
    """Negative or fractional labels in valid slots are a caller bug and raise ValueError."""
    y_true = np.array([[0.0, bad]])
    with pytest.raises(ValueError, match="labels"):
        multiclass_summary(y_true, np.zeros((1, 2)), np.ones((1, 2), dtype=bool))


# --------------------------------------------------------------------------------------------------
# Regression


def _regression_oracle(t: F64, p: F64, threshold: float) -> dict[str, float]:
    """sklearn/scipy per window; r2 forced to 1/0 for constant y_true, pearson NaN if undefined."""
    n = t.size
    if n == 0:
        return dict.fromkeys(REGRESSION_METRICS, NAN)
    with _quiet():
        mse = float(skm.mean_squared_error(t, p))
        out = {
            "mse": mse,
            "rmse": float(skm.root_mean_squared_error(t, p)),
            "mae": float(skm.mean_absolute_error(t, p)),
            "within_threshold": float(np.mean(np.abs(t - p) <= threshold)),
        }
        if n < 2:
            out["r2"] = NAN
        elif t.min() == t.max():  # sklearn's documented rule, free of its mean's rounding
            out["r2"] = 1.0 if mse == 0 else 0.0
        else:
            out["r2"] = float(skm.r2_score(t, p))
        constant = n < 2 or t.min() == t.max() or p.min() == p.max()
        out["pearson_r"] = NAN if constant else float(scipy.stats.pearsonr(t, p).statistic)
    return out


@st.composite
def _regression_blocks(draw: st.DrawFn) -> tuple[F64, F64, Bools]:
    """y_true, y_pred (independent, noisy copy, exact copy or constant) and a mask."""
    values, valid = draw(_masked_blocks(max_rows=5, max_slots=12))
    small = st.floats(-1e3, 1e3).map(lambda x: 0.0 if abs(x) < 1e-30 else x)
    noise = draw(hnp.arrays(np.float64, values.shape, elements=small))
    kind = draw(st.sampled_from(["noisy", "independent", "exact", "constant"]))
    if kind == "noisy":
        y_pred = values + noise
    elif kind == "independent":
        y_pred = noise
    elif kind == "exact":
        y_pred = values.copy()
    else:
        y_pred = np.full(values.shape, draw(_values))
    y_pred[~valid] = draw(st.sampled_from(GARBAGE))
    return values, y_pred, valid


@settings(deadline=None, max_examples=100)
@given(_regression_blocks(), st.sampled_from([0.0, 0.5, 10.0]))
def test_regression_summary_matches_sklearn_and_scipy(
    block: tuple[F64, F64, Bools], threshold: float
) -> None:
    """mse/rmse/mae/r2/pearson_r/within_threshold match sklearn and scipy per row."""
    y_true, y_pred, valid = block
    with _strict():
        result = regression_summary(y_true, y_pred, valid, threshold)
    for i in range(valid.shape[0]):
        t, p = y_true[i][valid[i]], y_pred[i][valid[i]]
        got, want = _row(result, i), _regression_oracle(t, p, threshold)
        for name in ("mse", "rmse", "mae"):
            assert _near(got[name], want[name], 1e-12 * abs(want[name])), (name, got, want)
        assert _same(got["within_threshold"], want["within_threshold"])
        if t.size < 2:
            assert math.isnan(got["r2"]) and math.isnan(got["pearson_r"])
            continue
        n = t.size
        spread_t = float(np.std(t))
        cond_t = 32 * n * EPS * float(np.max(np.abs(t))) / spread_t if spread_t else 0.0
        tol = 1e-9 * abs(want["r2"]) + 1e-12 + cond_t * abs(1 - want["r2"])
        assert _near(got["r2"], want["r2"], tol), ("r2", got, want, t, p)
        spread_p = float(np.std(p))
        cond_p = 32 * n * EPS * float(np.max(np.abs(p))) / spread_p if spread_p else 0.0
        tol = 1e-9 * abs(want["pearson_r"]) + 1e-12 + cond_t + cond_p
        assert _near(got["pearson_r"], want["pearson_r"], tol), ("r", got, want, t, p)


REGRESSION_CASES = [
    (
        "constant y_true, perfect",
        [2.0, 2.0, 2.0],
        [2.0, 2.0, 2.0],
        {"mse": 0.0, "r2": 1.0, "pearson_r": NAN, "within_threshold": 1.0},
    ),
    (
        "constant y_true, imperfect",
        [2.0, 2.0, 2.0],
        [2.0, 3.0, 2.0],
        {"mse": 1 / 3, "mae": 1 / 3, "r2": 0.0, "pearson_r": NAN, "within_threshold": 2 / 3},
    ),
    ("constant 0.1 y_true, imperfect", [0.1] * 3, [0.1, 0.2, 0.1], {"r2": 0.0, "pearson_r": NAN}),
    (
        "constant y_pred",
        [1.0, 2.0, 3.0],
        [2.0, 2.0, 2.0],
        {"mse": 2 / 3, "r2": 0.0, "pearson_r": NAN},
    ),
    (
        "one pair",
        [1.0],
        [1.5],
        {
            "mse": 0.25,
            "rmse": 0.5,
            "mae": 0.5,
            "r2": NAN,
            "pearson_r": NAN,
            "within_threshold": 1.0,
        },
    ),
    (
        "two pairs",
        [1.0, 2.0],
        [2.0, 1.0],
        {"mse": 1.0, "r2": -3.0, "pearson_r": -1.0, "within_threshold": 0.0},
    ),
    ("threshold inclusive", [0.0, 0.0], [0.5, -0.5], {"mae": 0.5, "within_threshold": 1.0}),
    ("empty", [], [], dict.fromkeys(REGRESSION_METRICS, NAN)),
]


@pytest.mark.parametrize(
    ("t", "p", "expected"), [c[1:] for c in REGRESSION_CASES], ids=[c[0] for c in REGRESSION_CASES]
)
def test_regression_edge_cases(t: list[float], p: list[float], expected: dict[str, float]) -> None:
    """Constant y_true forces r2 to 1/0, constant sides or n < 2 make r2/pearson NaN."""
    y_true, valid = _block([t, [5.0, -5.0, 1.0]])
    y_pred, _ = _block([p, [4.0, -4.0, 0.0]])
    with _strict():
        got = _row(regression_summary(y_true, y_pred, valid, 0.5), 0)
    for name, want in expected.items():
        assert _near(got[name], want, 1e-12), (name, got[name], want)
    if t and t[0] != 0.1:  # sklearn's own answer for 0.1-constant data is rounding noise
        want_all = _regression_oracle(np.array(t), np.array(p), 0.5)
        with _quiet():
            if len(t) >= 2:
                assert _near(float(skm.r2_score(t, p)), got["r2"], 1e-12)
        for name in REGRESSION_METRICS:
            assert _near(got[name], want_all[name], 1e-12), (name, got[name], want_all[name])
