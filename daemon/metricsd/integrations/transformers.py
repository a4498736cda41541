"""Hugging Face ``transformers``: ``MetricsdCallback`` sends step times, logged values,
evaluation metrics and predictions, and the end of the run to metricsd.

``cb = MetricsdCallback(); Trainer(..., callbacks=[cb], compute_metrics=cb.compute_metrics(fn))``.

- ``batch_time``: the time from ``on_step_begin`` to ``on_step_end`` of every optimizer step (all
  its gradient-accumulation micro-batches), ``step`` = ``state.global_step`` when it began.
- ``scalar`` from ``on_log``: every numeric value the Trainer logs (``loss``, ``learning_rate``,
  ``grad_norm``, ``epoch``, the final ``train_runtime``...), named as logged, ``step`` =
  ``state.global_step``; strings and booleans are left out, NaN/infinity are sent (as null) and
  counted in ``non_finite``. Keys that start with ``eval_`` are left to ``on_evaluate``.
- ``scalar`` from ``on_evaluate``: every numeric metric as ``eval/<name>`` (``eval_loss`` ->
  ``eval/loss``).
- ``prediction``: ``compute_metrics(fn=None, task="multiclass", split="val")`` returns a function
  for ``Trainer(compute_metrics=...)`` that sends the evaluation's predictions (classification: the
  argmax of the logits, or ``logits > 0`` for a single logit; labels ``-100``, the Trainer's
  padding, are left out; regression: the values) and returns ``fn(eval_pred)`` (``{}`` without
  ``fn``). Exceptions of ``fn`` are yours and propagate; only the sending is guarded.
- ``run_end``: ``status="completed"`` on ``on_train_end``, from the main process
  (``state.is_world_process_zero``) only; the other processes flush. The Trainer has no hook for an
  exception: use ``with emitter: trainer.train()`` for ``"failed"`` (``close`` is idempotent, so
  a run that completed is not ended twice).

Emitter: the one given (closed at train end unless ``close=False``: pass ``close=False`` to
evaluate after training with the same emitter), else one created in ``on_train_begin`` from the
``METRICSD_*`` environment with ``rank=args.process_index``, ``world_size=args.world_size`` (set
``METRICSD_RUN_ID`` for several processes, so that they share one run). Nothing here breaks
training: an exception in a hook is caught, counted in ``callback.errors`` and logged once.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from metricsd.emitter import Emitter
from metricsd.integrations._common import Base, guarded, send_predictions

__all__ = ["MetricsdCallback"]

_TrainerCallback: Any = importlib.import_module("transformers").TrainerCallback

_TASKS = ("binary", "multiclass", "regression")


class MetricsdCallback(Base, _TrainerCallback):  # type: ignore[misc]
    """See the module docstring. ``emitter``, ``errors`` and ``non_finite`` are attributes."""

    def __init__(
        self, emitter: Emitter | None = None, *, close: bool = True, close_timeout: float = 10.0
    ) -> None:
        Base.__init__(self, emitter, close=close, close_timeout=close_timeout)
        self._t0: float | None = None
        self._step0 = 0

    # ------------------------------------------------------------------ hooks
    @guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ensure(rank=int(args.process_index), world_size=int(args.world_size))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step0 = state.global_step
        self._t0 = time.perf_counter()

    @guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t1 = time.perf_counter()
        t0, self._t0 = self._t0, None
        if self.emitter is not None and t0 is not None:
            self.emitter.batch_time(t1 - t0, step=self._step0)

    @guarded
    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        if self.emitter is None or not logs:
            return
        values = self._numbers({k: v for k, v in logs.items() if not k.startswith("eval_")})
        if values:
            self.emitter.scalars(values, step=state.global_step)

    @guarded
    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if self.emitter is None or not metrics:
            return
        renamed = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        values = self._numbers(renamed, prefix="eval/")
        if values:
            self.emitter.scalars(values, step=state.global_step)

    @guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end("completed", send_run_end=bool(state.is_world_process_zero))

    # ------------------------------------------------------------------ compute_metrics
    def compute_metrics(
        self,
        fn: Callable[[Any], dict[str, Any]] | None = None,
        *,
        task: str = "multiclass",
        split: str = "val",
    ) -> Callable[[Any], dict[str, Any]]:
        """A ``compute_metrics`` for the Trainer: sends the predictions, returns ``fn``'s result."""
        if task not in _TASKS:
            raise ValueError(f"task must be one of {', '.join(_TASKS)}, got {task!r}")

        def compute(eval_pred: Any) -> dict[str, Any]:
            self._send_eval_predictions(eval_pred, task, split)
            return fn(eval_pred) if fn is not None else {}

        return compute

    @guarded
    def _send_eval_predictions(self, eval_pred: Any, task: str, split: str) -> None:
        em = self._ensure()
        if em is None:
            return
        y_true, y_pred = eval_labels_and_predictions(eval_pred, task)
        send_predictions(em, y_true, y_pred, task, split)


def eval_labels_and_predictions(eval_pred: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) of an ``EvalPrediction`` (or a ``(predictions, label_ids)`` pair), flat."""
    preds, labels = _first(eval_pred[0]), _first(eval_pred[1])
    logits = np.asarray(preds)
    y_true = np.asarray(labels)
    if task == "regression":
        return y_true.reshape(-1), logits.reshape(-1)
    if logits.ndim >= 2 and logits.shape[-1] > 1 and logits.shape[:-1] == y_true.shape:
        y_pred = logits.argmax(axis=-1)
    else:  # one logit per item: positive means class 1
        y_pred = (logits.reshape(y_true.shape) > 0).astype(np.int64)
    y_true, y_pred = y_true.reshape(-1), y_pred.reshape(-1)
    keep = y_true != -100  # the Trainer's padding / ignored positions
    return y_true[keep], y_pred[keep]


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, tuple | list) else x
