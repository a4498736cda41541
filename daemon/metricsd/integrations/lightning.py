"""PyTorch Lightning: ``MetricsdCallback`` sends step times, logged metrics, validation
predictions and the end of the run to metricsd.

``Trainer(callbacks=[MetricsdCallback()])``. Works with ``lightning.pytorch`` and, when only that
is installed, ``pytorch_lightning`` (the callback subclasses whichever is found first, and a
Trainer accepts only callbacks of its own package).

- ``batch_time``: the time from ``on_train_batch_start`` to ``on_train_batch_end`` of every
  training batch (forward, backward, optimizer step), ``step`` = ``trainer.global_step`` when the
  batch started; every rank sends its own, tagged with ``rank`` = ``trainer.global_rank``.
- ``scalar``: every entry of ``trainer.callback_metrics`` that is a number or a one-element tensor
  (as a float, named as logged), ``step`` = ``trainer.global_step``, after every
  ``log_every_n_steps``-th training batch (default: the Trainer's ``log_every_n_steps``), at the
  end of each validation run (not the sanity check) and at the end of fit. It is the current value
  of each metric, so an epoch or validation metric repeats until it is updated. NaN and infinity
  are sent (as null) and counted in ``non_finite``: the daemon's summaries show them.
- ``prediction``: with ``predictions=fn``, ``fn(outputs, batch) -> (y_true, y_pred)`` is called on
  every validation batch (``outputs`` is what ``validation_step`` returned) and the pair is sent
  with ``task`` and ``split`` (sanity-check batches are skipped unless ``sanity_check=True``).
- ``run_end``: ``status="completed"`` on ``on_fit_end``, ``"failed"`` on ``on_exception``; sent by
  global rank 0 only (the daemon frees a run's state on ``run_end``, so another rank's would cut the
  run short); the other ranks flush.

Emitter: the one given (used as it is, closed at the end unless ``close=False``), else one created
in ``setup`` from the ``METRICSD_*`` environment with ``rank=trainer.global_rank`` and
``world_size=trainer.world_size``; without ``METRICSD_RUN_ID`` rank 0's generated run_id is
broadcast to the other ranks. With several processes let the callback create it (an emitter
holds a thread and cannot be pickled to spawned workers).

Nothing here breaks training: an exception in a hook (the emitter refusing a value, a conversion
failing) is caught, counted in ``callback.errors`` and logged once (logger
``metricsd.integrations``). The emitter itself never raises because of Kafka.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from typing import Any

from metricsd.emitter import Emitter, _new_run_id
from metricsd.integrations._common import Base, guarded, send_predictions

__all__ = ["MetricsdCallback"]


def _framework() -> Any:
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return importlib.import_module("pytorch_lightning")


_Callback: Any = _framework().Callback

PredictionFn = Callable[[Any, Any], tuple[Any, Any]]


class MetricsdCallback(Base, _Callback):  # type: ignore[misc]
    """See the module docstring. ``emitter``, ``errors`` and ``non_finite`` are attributes."""

    def __init__(
        self,
        emitter: Emitter | None = None,
        *,
        log_every_n_steps: int | None = None,
        predictions: PredictionFn | None = None,
        task: str = "binary",
        split: str = "val",
        sanity_check: bool = False,
        close: bool = True,
        close_timeout: float = 10.0,
    ) -> None:
        _Callback.__init__(self)
        Base.__init__(self, emitter, close=close, close_timeout=close_timeout)
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.prediction_fn = predictions
        self.task = task
        self.split = split
        self.sanity_check = sanity_check
        self._t0: float | None = None
        self._step0 = 0
        self._batches = 0
        self._ended = False

    # ------------------------------------------------------------------ hooks
    @guarded
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.emitter is not None:
            return
        run_id = os.environ.get("METRICSD_RUN_ID") or None
        world = int(trainer.world_size)
        if run_id is None and world > 1:
            run_id = trainer.strategy.broadcast(_new_run_id(), src=0)
        self._ensure(run_id=run_id, rank=int(trainer.global_rank), world_size=world)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step0 = trainer.global_step
        self._t0 = time.perf_counter()

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        t1 = time.perf_counter()
        t0, self._t0 = self._t0, None
        em = self.emitter
        if em is None or t0 is None:
            return
        em.batch_time(t1 - t0, step=self._step0)
        self._batches += 1
        every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 1)
        if self._batches % every == 0:
            self._send_metrics(trainer)

    @guarded
    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        em = self.emitter
        if self.prediction_fn is None or em is None:
            return
        if trainer.sanity_checking and not self.sanity_check:
            return
        y_true, y_pred = self.prediction_fn(outputs, batch)
        send_predictions(em, y_true, y_pred, self.task, self.split)

    @guarded
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._send_metrics(trainer)

    @guarded
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._send_metrics(trainer)
        self._finish(trainer, "completed")

    @guarded
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, "failed")

    # ------------------------------------------------------------------ helpers
    @guarded  # on its own, so that a failure here does not keep on_fit_end from ending the run
    def _send_metrics(self, trainer: Any) -> None:
        em = self.emitter
        if em is None:
            return
        values = self._numbers(trainer.callback_metrics)
        if values:
            em.scalars(values, step=trainer.global_step)

    def _finish(self, trainer: Any, status: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._end(status, send_run_end=int(trainer.global_rank) == 0)
