"""Per-event and per-window analyses for the attention, feature and cross-validation streams.

Plan
----
Operations
    * ``attention_metrics(matrices)``: one consumed batch of heads x positions weight matrices ->
      four scalars per matrix plus its top-5 positions.
    * ``feature_metrics(vectors)``: one consumed batch of 1-D feature vectors -> ten scalars
      per vector.
    * ``cv_metrics(train, val, valid)``: a bank of cross-validation windows (rows = runs,
      slots = folds) -> nine scalars per row.
    * ``latest_per_fold_2d(folds, order, valid)`` / ``latest_per_fold(folds, order)``: the "a fold
      re-sent replaces the earlier value" rule, as a slot mask the caller passes to ``cv_metrics``.
Goals
    Pure functions of arrays (no I/O, no clock, no state), one vectorised pass per group of
    equally shaped inputs, NaN for every undefined value, never a RuntimeWarning.
Cost
    Batches are grouped by shape with one dict pass; each group is stacked once (``np.stack``) and
    reduced along its axes, so Python work is O(events) dict appends plus O(groups) NumPy calls.
    Nothing is padded. ``cv_metrics`` is O(rows x slots) with no Python loop;
    ``latest_per_fold_2d`` is one ``np.lexsort`` over the valid slots.

Conventions (DESIGN.md): population std (ddof=0); numpy "linear" percentiles; NaN where a
value is undefined (the caller turns NaN into JSON null). Inputs are assumed validated (finite).
Every result passes through ``_finite_or_nan``: a value whose computation overflows float64
(inputs of magnitude around 1e150 and above, e.g. ``x*x`` in the L2 norm) is reported as NaN
rather than ±inf, because JSON cannot carry infinities; overflow warnings are silenced for that
reason only.

Edge cases at a glance (details in each function's docstring)
--------------------------------------------------------------
==========================  ===========================================================
input                       result
==========================  ===========================================================
attention, one head         p is that head's row
attention, one position     concentration = mean = p0, diversity = 1 - p0,
                            entropy = -p0*log(p0 + 1e-8), top = [0]
attention, all zero         concentration 0, diversity 1, entropy 0, mean 0,
                            top = [0, 1, 2, 3, 4] (ties: lower index first)
feature, all zero           mean 0, std 0, every percentile 0, sparsity 1, non_zero 0, l2 0
feature, one element x      mean x, std 0, every percentile x, l2 |x|
feature, empty vector       non_zero 0, l2_norm 0, everything else NaN
cv, no valid fold           folds 0, everything else NaN
cv, single fold             stds 0, both CIs NaN
cv, mean train <= 0         overfitting_ratio 0.0
==========================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ATTENTION_METRICS",
    "CV_METRICS",
    "FEATURE_METRICS",
    "TOP_POSITIONS",
    "attention_metrics",
    "cv_metrics",
    "feature_metrics",
    "latest_per_fold",
    "latest_per_fold_2d",
]

ATTENTION_METRICS = (
    "attention_concentration",
    "attention_diversity",
    "attention_entropy",
    "mean_attention_score",
)
FEATURE_METRICS = (
    "mean",
    "std",
    "p25",
    "p50",
    "p75",
    "p90",
    "p95",
    "sparsity",
    "non_zero",
    "l2_norm",
)
CV_METRICS = (
    "folds",
    "mean_train_loss",
    "mean_val_loss",
    "std_train_loss",
    "std_val_loss",
    "train_val_gap",
    "overfitting_ratio",
    "train_loss_ci_95",
    "val_loss_ci_95",
)

#: How many positions ``attention_metrics`` reports per matrix.
TOP_POSITIONS = 5

_ENTROPY_EPS = 1e-8  # from the original notes: keeps log finite at p = 0 (0 * log(1e-8) = 0)
_PERCENTILES = {"p25": 25.0, "p50": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0}
_Z_95 = 1.96


def _quiet() -> np.errstate:
    """Silence float warnings for one computation.

    Overflow on extreme-but-finite inputs becomes NaN via ``_finite_or_nan``, and 0/0 for an empty
    window is the defined NaN; neither may surface as a RuntimeWarning.
    """
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def _finite_or_nan(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return ``values`` with every ±inf replaced by NaN (JSON has no infinity)."""
    return np.where(np.isinf(values), np.nan, values)


def _group_by_shape(arrays: Sequence[NDArray[np.float64]]) -> dict[tuple[int, ...], list[int]]:
    """Map each distinct array shape to the indices (in input order) of the arrays with it."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(index)
    return groups


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention_metrics(
    matrices: Sequence[NDArray[np.float64]],
) -> tuple[dict[str, NDArray[np.float64]], list[list[int]]]:
    """Per-matrix attention statistics for one consumed batch.

    Each matrix is heads x positions (at least 1 x 1) of finite weights >= 0, already validated;
    shapes may differ within the batch. With p = the mean over heads (a length-positions vector):

    ===========================  ===============================  ================================
    name                         formula                          edge cases
    ===========================  ===============================  ================================
    attention_concentration      max(p)                           one position: p0
    attention_diversity          1 - concentration                all zero: 1; < 0 if max(p) > 1
    attention_entropy            -Σ p·log(p + 1e-8)               all zero: 0; < 0 if p > 1
    mean_attention_score         mean(p)                          one position: p0
    ===========================  ===============================  ================================

    Weights are not assumed normalised, so diversity and entropy may be negative. One head: p is
    that head's row.

    Returns ``(scalars, top)``: ``scalars[name]`` holds one float64 per matrix, in input order, for
    every name in ``ATTENTION_METRICS``; ``top[i]`` lists (as Python ints) the indices of the
    ``min(5, positions)`` largest entries of matrix i's p, largest first, equal values in
    ascending index order (so an all-zero matrix gives ``[0, 1, 2, 3, 4]``).
    """
    count = len(matrices)
    scalars = {name: np.empty(count, dtype=np.float64) for name in ATTENTION_METRICS}
    top: list[list[int]] = [[] for _ in range(count)]
    with _quiet():
        for indices, stack in _stacked_groups(matrices):
            p = stack.mean(axis=1)  # (events, heads, positions) -> (events, positions)
            concentration = p.max(axis=1)
            scalars["attention_concentration"][indices] = concentration
            scalars["attention_diversity"][indices] = 1.0 - concentration
            # "0.0 -" rather than unary minus: an all-zero p sums to -0.0, which must report 0.0.
            entropy = 0.0 - (p * np.log(p + _ENTROPY_EPS)).sum(axis=1)
            scalars["attention_entropy"][indices] = entropy
            scalars["mean_attention_score"][indices] = p.mean(axis=1)
            for index, positions in zip(indices, _top_positions(p).tolist(), strict=True):
                top[index] = positions
    return {name: _finite_or_nan(values) for name, values in scalars.items()}, top


def _stacked_groups(
    arrays: Sequence[NDArray[np.float64]],
) -> list[tuple[list[int], NDArray[np.float64]]]:
    """Stack equally shaped arrays: ``[(input indices, stack of shape (len(indices), *shape))]``."""
    return [
        (indices, np.stack([arrays[i] for i in indices]).astype(np.float64, copy=False))
        for indices in _group_by_shape(arrays).values()
    ]


def _top_positions(p: NDArray[np.float64]) -> NDArray[np.intp]:
    """Column indices of each row's ``TOP_POSITIONS`` largest values, largest first.

    ``TOP_POSITIONS`` rounds of ``argmax``, each masking its pick with -inf (below every p >= 0).
    ``argmax`` returns the first maximum, which is the tie rule (lower index first); this is
    O(5·positions) per row and about 10x cheaper than a stable ``argsort`` at 128 positions, while
    ``argpartition`` would break ties arbitrarily.
    """
    work = p.copy()
    rows = np.arange(work.shape[0])
    picks = np.empty((work.shape[0], min(TOP_POSITIONS, work.shape[1])), dtype=np.intp)
    for rank in range(picks.shape[1]):
        best = work.argmax(axis=1)
        picks[:, rank] = best
        work[rows, best] = -np.inf
    return picks


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def feature_metrics(vectors: Sequence[NDArray[np.float64]]) -> dict[str, NDArray[np.float64]]:
    """Per-vector feature statistics for one consumed batch.

    Each vector is 1-D and finite; lengths may differ within the batch (equal lengths are stacked
    into one 2-D block and reduced along axis 1). For a vector x of n entries:

    ========  =====================================  ==========================================
    name      formula                                edge cases
    ========  =====================================  ==========================================
    mean      Σx / n                                 all zero: 0; n = 0: NaN
    std       sqrt(Σ(x - mean)² / n) (population)    all zero or n = 1: 0; n = 0: NaN
    p25..p95  numpy "linear" percentile              all zero: 0; n = 1: x0; n = 0: NaN
    sparsity  1 - non_zero / n                       all zero: 1; n = 0: NaN
    non_zero  number of entries != 0 (-0.0 is 0)     all zero or n = 0: 0
    l2_norm   sqrt(Σx²)                              all zero or n = 0: 0; n = 1: |x0|
    ========  =====================================  ==========================================

    A constant non-zero vector has std 0 up to the rounding of its mean (about 1e-17 x |value|).
    Returns ``{name: one float64 per vector, in input order}`` for every name in
    ``FEATURE_METRICS``.
    """
    count = len(vectors)
    out = {name: np.empty(count, dtype=np.float64) for name in FEATURE_METRICS}
    with _quiet():
        for indices, block in _stacked_groups(vectors):
            for name, values in _feature_block(block).items():
                out[name][indices] = values
    return {name: _finite_or_nan(values) for name, values in out.items()}


def _feature_block(block: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """``FEATURE_METRICS`` for each row of a (vectors, length) block."""
    rows, length = block.shape
    non_zero = np.count_nonzero(block, axis=1).astype(np.float64)
    l2_norm = np.sqrt(np.einsum("ij,ij->i", block, block))
    if length == 0:  # no order statistics, 0/0 mean: every location statistic is undefined
        undefined = np.full(rows, np.nan)
        values = dict.fromkeys(("mean", "std", "sparsity", *_PERCENTILES), undefined)
        return {**values, "non_zero": non_zero, "l2_norm": l2_norm}
    percentiles = _linear_percentiles(np.sort(block, axis=1))
    return {
        "mean": block.mean(axis=1),
        "std": block.std(axis=1),
        **percentiles,
        "sparsity": 1.0 - non_zero / length,
        "non_zero": non_zero,
        "l2_norm": l2_norm,
    }


def _linear_percentiles(ordered: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """numpy's "linear" percentiles of each row of a row-sorted (rows, n >= 1) block.

    Same arithmetic as ``np.percentile(..., method="linear")``: virtual index h = q/100·(n - 1),
    lerp between the order statistics at floor(h) and floor(h) + 1, from the nearer end. One sort
    serves all five percentiles; ``np.percentile`` partitions each row around ten order statistics,
    which measured about 2.5x slower than the sort at 512 entries.
    """
    last = ordered.shape[1] - 1
    out: dict[str, NDArray[np.float64]] = {}
    for name, q in _PERCENTILES.items():
        virtual = q / 100.0 * last
        below = int(np.floor(virtual))
        above = min(below + 1, last)
        gamma = virtual - below
        low, high = ordered[:, below], ordered[:, above]
        step = high - low
        out[name] = high - step * (1.0 - gamma) if gamma >= 0.5 else low + step * gamma
    return out


# --------------------------------------------------------------------------------------------
# Cross-validation windows
# --------------------------------------------------------------------------------------------


def cv_metrics(
    train: NDArray[np.float64],
    val: NDArray[np.float64],
    valid: NDArray[np.bool_],
) -> dict[str, NDArray[np.float64]]:
    """Cross-validation statistics for every row (run) of a rows x slots window bank.

    ``train[r, s]`` and ``val[r, s]`` are fold s's losses for run r and count only where
    ``valid[r, s]``; other slots may hold anything, NaN included. The caller has already applied
    the replacement rule (see ``latest_per_fold_2d``), so each valid slot is a distinct fold.
    With k = number of valid slots of a row and t, v its valid train and validation losses:

    ==================  ================================  ======================================
    name                formula                           edge cases
    ==================  ================================  ======================================
    folds               k                                 empty row: 0
    mean_train_loss     mean(t)                           empty: NaN
    mean_val_loss       mean(v)                           empty: NaN
    std_train_loss      population std of t               empty: NaN; single fold: 0
    std_val_loss        population std of v               empty: NaN; single fold: 0
    train_val_gap       mean(t) - mean(v)                 empty: NaN
    overfitting_ratio   mean(v) / mean(t); 0.0 when       empty: NaN; mean(t) <= 0: 0.0
                        mean(t) <= 0
    train_loss_ci_95    1.96 · std(t) / sqrt(k), k > 1    k <= 1: NaN
    val_loss_ci_95      1.96 · std(v) / sqrt(k), k > 1    k <= 1: NaN
    ==================  ================================  ======================================

    Returns ``{name: one float64 per row}`` for every name in ``CV_METRICS``.
    """
    with _quiet():
        folds = np.count_nonzero(valid, axis=1).astype(np.float64)
        mean_train, std_train = _masked_mean_std(train, valid, folds)
        mean_val, std_val = _masked_mean_std(val, valid, folds)
        ratio = np.where(mean_train > 0, mean_val / mean_train, 0.0)
        ci_scale = np.where(folds > 1, _Z_95 / np.sqrt(folds), np.nan)
        out = {
            "folds": folds,
            "mean_train_loss": mean_train,
            "mean_val_loss": mean_val,
            "std_train_loss": std_train,
            "std_val_loss": std_val,
            "train_val_gap": mean_train - mean_val,
            "overfitting_ratio": np.where(folds > 0, ratio, np.nan),
            "train_loss_ci_95": std_train * ci_scale,
            "val_loss_ci_95": std_val * ci_scale,
        }
    return {name: _finite_or_nan(values) for name, values in out.items()}


def _masked_mean_std(
    x: NDArray[np.float64], valid: NDArray[np.bool_], counts: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-row mean and population std over the valid slots (two passes; NaN for empty rows).

    ``np.where`` (not multiplication by the mask) keeps NaN or inf in invalid slots out of the sums.
    """
    mean = np.where(valid, x, 0.0).sum(axis=1) / counts
    deviation = np.where(valid, x - mean[:, None], 0.0)
    return mean, np.sqrt(np.einsum("ij,ij->i", deviation, deviation) / counts)


def latest_per_fold_2d(
    folds: NDArray[np.int64],
    order: NDArray[np.int64],
    valid: NDArray[np.bool_],
) -> NDArray[np.bool_]:
    """Keep, in every row, only the latest valid slot of each fold id.

    ``folds``, ``order`` and ``valid`` are rows x slots: per-slot fold id, per-slot arrival order
    (higher = later) and whether the slot holds a value. The result is a rows x slots mask, a
    subset of ``valid``, with exactly one True per (row, fold id) present: the slot with the highest
    order; if several share that order, the one with the highest slot index. Rows are independent.
    One ``np.lexsort`` over the valid slots; no Python loop.
    """
    valid = np.asarray(valid, dtype=np.bool_)
    rows, slots = np.nonzero(valid)
    fold = np.asarray(folds)[rows, slots]
    # Sort by row, then fold, then arrival, then slot: each (row, fold) run ends at its survivor.
    ranked = np.lexsort((slots, np.asarray(order)[rows, slots], fold, rows))
    row_sorted, fold_sorted = rows[ranked], fold[ranked]
    last = np.ones(ranked.size, dtype=np.bool_)
    last[:-1] = (row_sorted[1:] != row_sorted[:-1]) | (fold_sorted[1:] != fold_sorted[:-1])
    keep = np.zeros(valid.shape, dtype=np.bool_)
    keep[rows[ranked[last]], slots[ranked[last]]] = True
    return keep


def latest_per_fold(folds: NDArray[np.int64], order: NDArray[np.int64]) -> NDArray[np.bool_]:
    """One-row form of ``latest_per_fold_2d``: ``folds`` and ``order`` are one row's valid slots.

    Returns a mask of the same length keeping the latest slot of each fold id (ties in ``order``:
    the later position).
    """
    folds_row = np.asarray(folds).reshape(1, -1)
    valid = np.ones(folds_row.shape, dtype=np.bool_)
    return latest_per_fold_2d(folds_row, np.asarray(order).reshape(1, -1), valid).reshape(-1)
