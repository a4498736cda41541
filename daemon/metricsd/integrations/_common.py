"""What the three framework callbacks share: the emitter they own or borrow, the guard that keeps an
emitter problem out of the training loop, and the conversion of logged values to floats.

No framework is imported here (torch included): values are read through ``item()``/``__array__``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import numpy as np

from metricsd.emitter import Emitter, _host_array

log = logging.getLogger("metricsd.integrations")

F = TypeVar("F", bound=Callable[..., Any])

# the emitter refuses arrays longer than this in one call (see metricsd.emitter)
MAX_ITEMS = 10_000


def guarded(method: F) -> F:
    """A hook that never raises: an exception is counted in ``self.errors`` and logged once (with
    its traceback) per callback; the hook then returns None, as framework hooks do."""

    @functools.wraps(method)
    def wrapper(self: Base, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self._failed(method.__name__)
            return None

    return cast(F, wrapper)


class Base:
    """The emitter handling shared by the callbacks.

    ``emitter`` given: it is used as it is (its run_id and rank), and closed (``run_end``) at the
    end of training when ``close`` is true. ``emitter`` None: one is created when training starts,
    from the ``METRICSD_*`` environment, with the framework's rank and world size, and always
    closed.
    """

    def __init__(self, emitter: Emitter | None, *, close: bool, close_timeout: float) -> None:
        self.emitter = emitter
        self.owns_emitter = emitter is None
        self.close_emitter = close or emitter is None
        self.close_timeout = close_timeout
        self.errors = 0  # exceptions caught in hooks (emitter or conversion problems)
        self.non_finite = 0  # logged values that were NaN/inf: sent, the daemon counts them

    def _ensure(self, **kwargs: Any) -> Emitter | None:
        """The emitter, created from the environment on first use (``kwargs`` for ``Emitter``)."""
        if self.emitter is None:
            self.emitter = Emitter(**kwargs)
            self.owns_emitter = True
            self.close_emitter = True
        return self.emitter

    def _failed(self, where: str) -> None:
        self.errors += 1
        if self.errors == 1:
            log.warning(
                "metricsd callback %s: %s failed; training goes on, further failures are only "
                "counted (callback.errors)",
                type(self).__name__,
                where,
                exc_info=True,
            )

    def _end(self, status: str, *, send_run_end: bool = True) -> None:
        """``run_end`` with ``status`` (closing the emitter), or only a flush for a rank that must
        not end the run; nothing when the emitter was given with ``close=False``."""
        em = self.emitter
        if em is None:
            return
        if self.close_emitter and send_run_end:
            em.close(status, timeout=self.close_timeout)
        else:
            em.flush(self.close_timeout)

    def _numbers(self, values: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
        """The numeric entries of ``values`` as floats (one-element tensors/arrays too);
        strings, booleans, None and larger arrays are left out. NaN/infinity are sent (as null;
        a diverged loss is what the summaries must show, as ``non_finite``) and counted here."""
        out: dict[str, float] = {}
        for name, value in values.items():
            v = to_float(value)
            if v is None:
                continue
            if not math.isfinite(v):
                self.non_finite += 1
            out[prefix + str(name)] = v
        return out


def to_float(value: Any) -> float | None:
    """A float for a number, a NumPy scalar or a one-element tensor/array; else None."""
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
        return None
    if isinstance(value, int | float):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "item"):  # a torch tensor (no import of torch)
        if numel() != 1:
            return None
        item = value.item()
        return float(item) if isinstance(item, int | float) and not isinstance(item, bool) else None
    if isinstance(value, np.generic | np.ndarray) or hasattr(value, "__array__"):
        try:
            a = np.asarray(value)
        except Exception:
            return None
        if a.size != 1 or a.dtype.kind not in "iuf":
            return None
        return float(a.reshape(()))
    return None


def send_predictions(em: Emitter, y_true: Any, y_pred: Any, task: str, split: str) -> None:
    """``em.predictions`` of the flattened pair, in calls of at most ``MAX_ITEMS`` pairs (a
    validation set is often larger than the emitter takes in one event)."""
    yt = np.ravel(_host_array(y_true, "y_true")[0])
    yp = np.ravel(_host_array(y_pred, "y_pred")[0])
    if len(yt) != len(yp):
        raise ValueError(f"y_true has {len(yt)} items but y_pred has {len(yp)}")
    for i in range(0, len(yt), MAX_ITEMS):
        em.predictions(yt[i : i + MAX_ITEMS], yp[i : i + MAX_ITEMS], task=task, split=split)
