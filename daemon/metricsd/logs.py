"""The one structlog configuration.

Only the CLI calls :func:`configure`. Modules call ``structlog.get_logger()`` and bind context;
tests use ``structlog.testing.capture_logs()``.

- ``json`` (default when stderr is not a TTY): one orjson-encoded JSON object per line on stderr,
  with ISO timestamps and the level, via ``BytesLoggerFactory`` (structlog's performance recipe).
- ``console`` (default on a TTY): structlog's readable ``ConsoleRenderer``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import orjson
import structlog

__all__ = ["RateLimiter", "configure"]

LogFormat = Literal["auto", "json", "console"]


def configure(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Configure structlog for the whole process (call once, from the CLI)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer(serializer=_dumps)
        structlog.configure(
            cache_logger_on_first_use=True,
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            processors=[*shared, structlog.processors.format_exc_info, renderer],
            logger_factory=structlog.BytesLoggerFactory(file=sys.stderr.buffer),
        )
        # The stdlib loggers of libraries (aiokafka) render through the same JSON renderer, with
        # orjson's bytes decoded because logging handlers write text.
        foreign: structlog.types.Processor = structlog.processors.JSONRenderer(
            serializer=_dumps_text
        )
    else:
        structlog.configure(
            cache_logger_on_first_use=True,
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        )
        foreign = structlog.dev.ConsoleRenderer()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RepeatFilter(period=10.0))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(allow=["suppressed"]),
                *shared,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                foreign,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter below WARNING (aiokafka's INFO about every rebalance step) stays out.
    root.setLevel(max(numeric, logging.WARNING))


def _dumps(obj: object, **kw: Any) -> bytes:
    """orjson with non-string dict keys allowed; a log line never fails on a value's type."""
    return orjson.dumps(obj, default=kw.get("default", repr), option=orjson.OPT_NON_STR_KEYS)


def _dumps_text(obj: object, **kw: Any) -> str:
    return _dumps(obj, **kw).decode()


class _RepeatFilter(logging.Filter):
    """Lets a library's repeated message (same logger, same format string) through once per
    ``period``; the next one that passes carries ``suppressed=N``. While a broker is down aiokafka
    logs the same connection error ten times a second: ops get one line per period instead."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self._limiter = RateLimiter(period)

    def filter(self, record: logging.LogRecord) -> bool:
        suppressed = self._limiter.allow(f"{record.name}:{record.msg}")
        if suppressed is None:
            return False
        if suppressed:
            record.suppressed = suppressed
        return True


class RateLimiter:
    """Allows one event per ``period`` seconds per key and counts what it suppressed.

    Used for warnings that bad input can trigger at any rate (dead letters): the first one per key
    is logged at once, the rest are folded into the next allowed line as ``suppressed=N``.
    """

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float | None = None) -> int | None:
        """``None`` when this event must be suppressed, else the number suppressed before it."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
