"""Keras 3: ``MetricsdCallback`` sends step times, the logs and the end of the run to metricsd.

``model.fit(..., callbacks=[MetricsdCallback()])``. Keras picks its backend when it is first
imported (``KERAS_BACKEND``; this callback is tested with ``torch``, no TensorFlow needed).

- ``batch_time``: the time from ``on_train_batch_begin`` to ``on_train_batch_end`` of every
  training batch, ``step`` = the number of training batches before it (counted across epochs;
  Keras restarts its batch index every epoch).
- ``scalar``: the numeric entries of the batch ``logs`` (``loss`` and the compiled metrics: Keras
  reports their running mean over the epoch so far), named as logged, ``step`` = the number of
  batches done, after every ``log_every_n_steps``-th batch; at each epoch end the epoch's logs
  (``val_*`` included) as ``epoch/<name>``. Non-numeric values are left out; non-finite ones
  are sent (as null, counted as ``non_finite``).
- ``run_end``: ``status="completed"`` on ``on_train_end``. Keras has no hook for an exception: use
  ``with emitter: model.fit(...)`` for ``"failed"``.

Emitter: the one given (closed at train end unless ``close=False``), else one created in
``on_train_begin`` from the ``METRICSD_*`` environment (``RANK``/``WORLD_SIZE`` too). Nothing here
breaks training: an exception in a hook is caught, counted in ``callback.errors`` and logged once.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from typing import Any

from metricsd.emitter import Emitter
from metricsd.integrations._common import Base, guarded

__all__ = ["MetricsdCallback"]

_Callback: Any = importlib.import_module("keras").callbacks.Callback


class MetricsdCallback(Base, _Callback):  # type: ignore[misc]
    """See the module docstring. ``emitter``, ``errors`` and ``non_finite`` are attributes."""

    def __init__(
        self,
        emitter: Emitter | None = None,
        *,
        log_every_n_steps: int = 1,
        close: bool = True,
        close_timeout: float = 10.0,
    ) -> None:
        _Callback.__init__(self)
        Base.__init__(self, emitter, close=close, close_timeout=close_timeout)
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._batches = 0  # training batches done, across epochs

    @guarded
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._ensure()

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._t0 = time.perf_counter()

    @guarded
    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        t1 = time.perf_counter()
        t0, self._t0 = self._t0, None
        em = self.emitter
        if em is None or t0 is None:
            return
        step = self._batches
        self._batches += 1
        em.batch_time(t1 - t0, step=step)
        if logs and self._batches % self.log_every_n_steps == 0:
            values = self._numbers(logs)
            if values:
                em.scalars(values, step=self._batches)

    @guarded
    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.emitter is None or not logs:
            return
        values = self._numbers(logs, prefix="epoch/")
        if values:
            self.emitter.scalars(values, step=self._batches)

    @guarded
    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._end("completed")
