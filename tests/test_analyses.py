"""Tests for metricsd.analyses: vectorised batch results against plain per-event oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from metricsd.stats import (
    ATTENTION_METRICS,
    CV_METRICS,
    FEATURE_METRICS,
    attention_metrics,
    cv_metrics,
    feature_metrics,
    latest_per_fold,
    latest_per_fold_2d,
)
from numpy.typing import NDArray

# The module promises never to emit a RuntimeWarning (numpy overflow, division): make one a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

_TOL = {"rtol": 1e-10, "atol": 1e-10}
_PERCENTILES = {"p25": 25, "p50": 50, "p75": 75, "p90": 90, "p95": 95}


# --------------------------------------------------------------------------------------------
# Oracles: one event at a time, written out plainly
# --------------------------------------------------------------------------------------------


def _head_mean(matrix: NDArray[np.float64]) -> list[float]:
    """p_j = (Σ_h w_hj) / heads, summed in a Python loop."""
    heads, positions = matrix.shape
    return [sum(float(matrix[h, j]) for h in range(heads)) / heads for j in range(positions)]


def _attention_oracle(matrix: NDArray[np.float64]) -> tuple[dict[str, float], list[int]]:
    """The issue's formulas for one matrix, and its top-5 positions (ties: lower index first)."""
    p = _head_mean(matrix)
    concentration = max(p)
    scalars = {
        "attention_concentration": concentration,
        "attention_diversity": 1.0 - concentration,
        "attention_entropy": -sum(x * math.log(x + 1e-8) for x in p),
        "mean_attention_score": sum(p) / len(p),
    }
    return scalars, sorted(range(len(p)), key=lambda j: (-p[j], j))[:5]


def _feature_oracle(vector: NDArray[np.float64]) -> dict[str, float]:
    """Per-vector NumPy calls for one non-empty vector."""
    non_zero = np.count_nonzero(vector)
    return {
        "mean": float(np.mean(vector)),
        "std": float(np.std(vector)),
        **{name: float(np.percentile(vector, q)) for name, q in _PERCENTILES.items()},
        "sparsity": 1.0 - non_zero / vector.size,
        "non_zero": float(non_zero),
        "l2_norm": float(np.linalg.norm(vector)),
    }


def _cv_oracle(train: list[float], val: list[float]) -> dict[str, float]:
    """Per-row NumPy calls for one window of de-duplicated folds."""
    k = len(train)
    if k == 0:
        return {name: (0.0 if name == "folds" else math.nan) for name in CV_METRICS}
    mean_t, mean_v = float(np.mean(train)), float(np.mean(val))
    std_t, std_v = float(np.std(train)), float(np.std(val))
    return {
        "folds": float(k),
        "mean_train_loss": mean_t,
        "mean_val_loss": mean_v,
        "std_train_loss": std_t,
        "std_val_loss": std_v,
        "train_val_gap": mean_t - mean_v,
        "overfitting_ratio": mean_v / mean_t if mean_t > 0 else 0.0,
        "train_loss_ci_95": 1.96 * std_t / math.sqrt(k) if k > 1 else math.nan,
        "val_loss_ci_95": 1.96 * std_v / math.sqrt(k) if k > 1 else math.nan,
    }


def _assert_rows_match(
    got: dict[str, NDArray[np.float64]], expected: list[dict[str, float]], names: tuple[str, ...]
) -> None:
    """Every named metric equals the oracle row by row (NaN matches NaN).

    The module's contract reports an overflowed value (±inf, e.g. a ratio over a subnormal mean
    train loss) as NaN, so the oracle's infinities are translated the same way.
    """
    assert set(got) == set(names)
    for name in names:
        assert got[name].shape == (len(expected),), name
        want = np.array([row[name] for row in expected], dtype=np.float64)
        want[np.isinf(want)] = np.nan
        np.testing.assert_allclose(got[name], want, **_TOL, err_msg=name)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_WEIGHT = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)
# Small integers make every head mean exact, so ties are frequent and exactly reproducible.
_INTEGER_WEIGHT = st.integers(0, 3).map(float)


@st.composite
def _matrix_batches(draw: st.DrawFn, elements: st.SearchStrategy[float]) -> list[NDArray]:
    """0-6 matrices whose shapes come from a small pool, so batches mix repeated and new shapes."""
    shapes = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 8)), min_size=1, max_size=3))
    picks = draw(st.lists(st.sampled_from(shapes), max_size=6))
    return [draw(hnp.arrays(np.float64, shape, elements=elements)) for shape in picks]


_FEATURE = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False))


@st.composite
def _vector_batches(draw: st.DrawFn) -> list[NDArray]:
    """0-6 non-empty vectors whose lengths come from a small pool (zeros are common)."""
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    picks = draw(st.lists(st.sampled_from(lengths), max_size=6))
    return [draw(hnp.arrays(np.float64, n, elements=_FEATURE)) for n in picks]


# Losses on a 1/64 grid: sums of a few are exact in any order, so the oracle's dict order and the
# bank's slot order agree exactly even where the overfitting ratio divides by a mean near zero
# (which would otherwise amplify harmless rounding differences past any fixed tolerance).
_LOSS = st.integers(-320, 640).map(lambda sixty_fourths: sixty_fourths / 64.0)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(_matrix_batches(_WEIGHT))
def test_attention_scalars_match_per_matrix_oracle(matrices: list[NDArray]) -> None:
    """Each scalar metric of a mixed-shape batch equals the per-matrix formula, in input order."""
    scalars, top = attention_metrics(matrices)
    _assert_rows_match(scalars, [_attention_oracle(m)[0] for m in matrices], ATTENTION_METRICS)
    assert len(top) == len(matrices)


@settings(max_examples=150, deadline=None)
@given(_matrix_batches(_INTEGER_WEIGHT))
def test_attention_top_positions_match_oracle_with_ties(matrices: list[NDArray]) -> None:
    """Top positions equal a sort by (-p, index): highest first, ties to the lower index."""
    _, top = attention_metrics(matrices)
    assert top == [_attention_oracle(m)[1] for m in matrices]
    assert all(type(position) is int for row in top for position in row)


@settings(max_examples=100, deadline=None)
@given(_matrix_batches(_WEIGHT))
def test_attention_top_positions_hold_the_largest_means(matrices: list[NDArray]) -> None:
    """With arbitrary weights the reported positions are distinct and carry the top-k head means."""
    _, top = attention_metrics(matrices)
    for matrix, positions in zip(matrices, top, strict=True):
        p = _head_mean(matrix)
        assert len(set(positions)) == len(positions) == min(5, len(p))
        np.testing.assert_allclose(
            [p[j] for j in positions], sorted(p, reverse=True)[: len(positions)], **_TOL
        )


@pytest.mark.parametrize(
    ("matrix", "expected", "top"),
    [
        pytest.param(
            [[0.1, 0.6, 0.3]],
            [0.6, 0.4, -sum(x * math.log(x + 1e-8) for x in (0.1, 0.6, 0.3)), 1 / 3],
            [1, 2, 0],
            id="one head: p is the row, fewer than 5 positions",
        ),
        pytest.param(
            [[0.2], [0.6]],
            [0.4, 0.6, -0.4 * math.log(0.4 + 1e-8), 0.4],
            [0],
            id="one position",
        ),
        pytest.param([[0.7]], [0.7, 0.3, -0.7 * math.log(0.7 + 1e-8), 0.7], [0], id="1x1"),
        pytest.param(np.zeros((2, 7)), [0.0, 1.0, 0.0, 0.0], [0, 1, 2, 3, 4], id="all zero"),
        pytest.param(
            [[0.5, 0.0, 0.5, 0.5, 0.0, 0.5, 0.5]],
            [0.5, 0.5, -5 * 0.5 * math.log(0.5 + 1e-8), 2.5 / 7],
            [0, 2, 3, 5, 6],
            id="ties beyond the fifth are cut, lower index first",
        ),
    ],
)
def test_attention_edge_cases(
    matrix: list[list[float]], expected: list[float], top: list[int]
) -> None:
    """One head, one position, all zero and tied weights give the tabulated results."""
    scalars, positions = attention_metrics([np.asarray(matrix, dtype=np.float64)])
    got = [float(scalars[name][0]) for name in ATTENTION_METRICS]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert positions == [top]


def test_attention_all_zero_entropy_is_positive_zero() -> None:
    """An all-zero matrix reports entropy +0.0, not -0.0 (which JSON would print as -0.0)."""
    scalars, _ = attention_metrics([np.zeros((3, 4))])
    assert math.copysign(1.0, scalars["attention_entropy"][0]) == 1.0


def test_attention_mixed_shapes_keep_input_order() -> None:
    """Matrices of interleaved shapes come back aligned with their input positions."""
    matrices = [np.full((1, 2), 1.0), np.full((3, 6), 2.0), np.full((1, 2), 3.0), np.eye(1)]
    scalars, top = attention_metrics(matrices)
    np.testing.assert_array_equal(scalars["attention_concentration"], [1.0, 2.0, 3.0, 1.0])
    assert top == [[0, 1], [0, 1, 2, 3, 4], [0, 1], [0]]


def test_attention_empty_batch() -> None:
    """No matrices give empty metric arrays and no positions."""
    scalars, top = attention_metrics([])
    assert all(scalars[name].shape == (0,) for name in ATTENTION_METRICS)
    assert top == []


def test_attention_overflow_reports_nan_not_inf() -> None:
    """Weights near float64's limit make the head mean overflow: NaN, never ±inf or a warning."""
    scalars, top = attention_metrics([np.full((2, 2), 1e308), np.array([[1.0]])])
    for name in ATTENTION_METRICS:
        assert math.isnan(scalars[name][0]), name
        assert math.isfinite(scalars[name][1]), name
    assert top == [[0, 1], [0]]


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(_vector_batches())
def test_feature_metrics_match_per_vector_numpy(vectors: list[NDArray]) -> None:
    """Each metric of a mixed-length batch equals per-vector NumPy calls, in input order."""
    _assert_rows_match(
        feature_metrics(vectors), [_feature_oracle(v) for v in vectors], FEATURE_METRICS
    )


@pytest.mark.parametrize(
    ("vector", "expected"),
    [
        pytest.param(
            np.zeros(9),
            {
                "mean": 0,
                "std": 0,
                **dict.fromkeys(_PERCENTILES, 0.0),
                "sparsity": 1,
                "non_zero": 0,
                "l2_norm": 0,
            },
            id="all zero",
        ),
        pytest.param(
            np.array([-3.0]),
            {
                "mean": -3,
                "std": 0,
                **dict.fromkeys(_PERCENTILES, -3.0),
                "sparsity": 0,
                "non_zero": 1,
                "l2_norm": 3,
            },
            id="one element",
        ),
        pytest.param(
            np.array([0.0, 3.0, 0.0, 4.0]),
            {
                "mean": 1.75,
                "std": math.sqrt(25 / 4 - 1.75**2),
                "p25": 0.0,
                "p50": 1.5,
                "p75": 3.25,
                "p90": 3.7,
                "p95": 3.85,
                "sparsity": 0.5,
                "non_zero": 2,
                "l2_norm": 5,
            },
            id="half sparse, worked by hand",
        ),
        pytest.param(
            np.array([]),
            {
                "mean": math.nan,
                "std": math.nan,
                **dict.fromkeys(_PERCENTILES, math.nan),
                "sparsity": math.nan,
                "non_zero": 0,
                "l2_norm": 0,
            },
            id="empty vector",
        ),
    ],
)
def test_feature_edge_cases(vector: NDArray, expected: dict[str, float]) -> None:
    """All-zero, single-element, hand-worked and empty vectors give the tabulated results."""
    got = feature_metrics([vector])
    for name in FEATURE_METRICS:
        np.testing.assert_allclose(got[name][0], expected[name], rtol=1e-12, atol=0, err_msg=name)


def test_feature_empty_vector_mixed_with_others() -> None:
    """An empty vector in a batch yields NaN only in its own position."""
    got = feature_metrics([np.array([1.0, 2.0]), np.array([]), np.array([5.0, 7.0])])
    np.testing.assert_array_equal(got["mean"], [1.5, np.nan, 6.0])
    np.testing.assert_array_equal(got["non_zero"], [2.0, 0.0, 2.0])


def test_feature_overflow_reports_nan_not_inf() -> None:
    """A vector whose squares overflow reports NaN for std and l2_norm, never ±inf or a warning."""
    got = feature_metrics([np.full(3, 1e200)])
    assert math.isnan(got["l2_norm"][0])
    assert got["mean"][0] == 1e200
    assert got["non_zero"][0] == 3.0


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------


@st.composite
def _cv_banks(draw: st.DrawFn) -> tuple[NDArray, NDArray, NDArray]:
    """A rows x slots bank whose invalid slots hold NaN garbage that must not leak into results."""
    rows, slots = draw(st.integers(0, 5)), draw(st.integers(1, 6))
    train = draw(hnp.arrays(np.float64, (rows, slots), elements=_LOSS))
    val = draw(hnp.arrays(np.float64, (rows, slots), elements=_LOSS))
    valid = draw(hnp.arrays(np.bool_, (rows, slots)))
    train[~valid] = np.nan
    val[~valid] = np.inf
    return train, val, valid


@settings(max_examples=200, deadline=None)
@given(_cv_banks())
def test_cv_metrics_match_per_row_numpy(bank: tuple[NDArray, NDArray, NDArray]) -> None:
    """Each metric equals np.mean/np.std over a row's valid slots with the issue's rules."""
    train, val, valid = bank
    expected = [
        _cv_oracle(list(train[r][valid[r]]), list(val[r][valid[r]])) for r in range(len(valid))
    ]
    _assert_rows_match(cv_metrics(train, val, valid), expected, CV_METRICS)


@pytest.mark.parametrize(
    ("train", "val", "expected"),
    [
        pytest.param(
            [0.4],
            [0.6],
            {
                "folds": 1,
                "std_train_loss": 0,
                "std_val_loss": 0,
                "overfitting_ratio": 1.5,
                "train_loss_ci_95": math.nan,
                "val_loss_ci_95": math.nan,
            },
            id="single fold: CIs NaN",
        ),
        pytest.param(
            [0.0, 0.0],
            [1.0, 2.0],
            {"folds": 2, "overfitting_ratio": 0.0, "train_val_gap": -1.5},
            id="mean train 0: ratio 0.0",
        ),
        pytest.param(
            [-1.0, -3.0],
            [1.0, 2.0],
            {"overfitting_ratio": 0.0, "train_loss_ci_95": 1.96 * 1.0 / math.sqrt(2)},
            id="mean train negative: ratio 0.0",
        ),
        pytest.param(
            [1e-320],
            [1.0],
            {"folds": 1, "overfitting_ratio": math.nan, "mean_train_loss": 1e-320},
            id="ratio overflows past float64: NaN, not inf",
        ),
        pytest.param(
            [],
            [],
            {name: (0.0 if name == "folds" else math.nan) for name in CV_METRICS},
            id="empty row: folds 0, rest NaN",
        ),
    ],
)
def test_cv_edge_cases(train: list[float], val: list[float], expected: dict[str, float]) -> None:
    """Single fold, mean train <= 0, overflow and an empty row give the tabulated results."""
    slots = 3
    valid = np.zeros((1, slots), dtype=np.bool_)
    valid[0, : len(train)] = True
    train_bank, val_bank = np.full((1, slots), np.nan), np.full((1, slots), np.nan)
    train_bank[0, : len(train)], val_bank[0, : len(val)] = train, val
    got = cv_metrics(train_bank, val_bank, valid)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name][0], want, rtol=1e-12, atol=0, err_msg=name)


def test_cv_no_rows() -> None:
    """A bank with no rows gives empty arrays for every metric."""
    empty = np.empty((0, 4))
    got = cv_metrics(empty, empty, np.zeros((0, 4), dtype=np.bool_))
    assert all(got[name].shape == (0,) for name in CV_METRICS)


# --------------------------------------------------------------------------------------------
# Fold replacement
# --------------------------------------------------------------------------------------------

_ARRIVALS = st.lists(st.tuples(st.integers(0, 4), _LOSS, _LOSS), max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ARRIVALS, max_size=4), st.randoms(use_true_random=False))
def test_resent_folds_replace_earlier_values(rows: list[list[tuple]], rng: object) -> None:
    """Arrivals placed in shuffled slots, masked by latest_per_fold_2d, match a last-wins dict."""
    slots = 8
    shape = (len(rows), slots)
    folds, order = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    train, val = np.full(shape, np.nan), np.full(shape, np.nan)
    valid = np.zeros(shape, dtype=np.bool_)
    expected = []
    for r, arrivals in enumerate(rows):
        latest: dict[int, tuple[float, float]] = {}
        places = rng.sample(range(slots), len(arrivals))  # type: ignore[attr-defined]
        for arrival, ((fold, t, v), slot) in enumerate(zip(arrivals, places, strict=True)):
            latest[fold] = (t, v)
            folds[r, slot], order[r, slot], valid[r, slot] = fold, arrival, True
            train[r, slot], val[r, slot] = t, v
        pairs = list(latest.values())
        expected.append(_cv_oracle([t for t, _ in pairs], [v for _, v in pairs]))

    keep = latest_per_fold_2d(folds, order, valid)
    assert not (keep & ~valid).any()
    _assert_rows_match(cv_metrics(train, val, keep), expected, CV_METRICS)
    for r in range(len(rows)):
        one_row = latest_per_fold(folds[r][valid[r]], order[r][valid[r]])
        np.testing.assert_array_equal(one_row, keep[r][valid[r]])


def test_fold_resent_keeps_latest_value() -> None:
    """Fold 1 sent at order 0 then re-sent at order 2: only the re-sent value counts."""
    folds = np.array([[1, 2, 1, 0]])
    order = np.array([[0, 1, 2, 0]])
    valid = np.array([[True, True, True, False]])
    keep = latest_per_fold_2d(folds, order, valid)
    np.testing.assert_array_equal(keep, [[False, True, True, False]])
    got = cv_metrics(np.array([[9.0, 1.0, 3.0, 0.0]]), np.array([[9.0, 2.0, 4.0, 0.0]]), keep)
    np.testing.assert_array_equal(got["mean_train_loss"], [2.0])
    np.testing.assert_array_equal(got["folds"], [2.0])


def test_fold_equal_order_keeps_highest_slot() -> None:
    """Two arrivals of one fold with the same order keep the higher slot index, exactly one."""
    np.testing.assert_array_equal(
        latest_per_fold(np.array([3, 3, 5]), np.array([7, 7, 1])), [False, True, True]
    )


def test_fold_rows_are_independent() -> None:
    """The same fold id in two rows is de-duplicated per row, not across rows."""
    folds = np.array([[0, 0], [0, 1]])
    order = np.array([[1, 2], [0, 0]])
    keep = latest_per_fold_2d(folds, order, np.ones((2, 2), dtype=np.bool_))
    np.testing.assert_array_equal(keep, [[False, True], [True, True]])


def test_fold_empty_inputs() -> None:
    """No valid slots keep nothing, in both forms."""
    empty = np.zeros((2, 3), dtype=np.int64)
    assert not latest_per_fold_2d(empty, empty, np.zeros((2, 3), dtype=np.bool_)).any()
    assert latest_per_fold(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0,)
