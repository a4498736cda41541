"""metricsd: a streaming metrics daemon for machine-learning training.

Training jobs send events to Kafka; the daemon keeps rolling NumPy ring buffers per run and stream,
computes window statistics on a fixed tick under its own profiler, and publishes JSON summaries.

The package splits into a pure core (``buffers``, ``stats``, ``analyses``, ``events``, ``profiler``,
``monitor``, ``batching``) with no I/O, and a thin asyncio shell (``kafka``, ``service``, ``cli``)
around it. The training side's client, ``Emitter`` and ``AsyncEmitter`` (``metricsd.emitter``), is
exported here lazily: importing ``metricsd`` imports neither aiokafka nor the emitter, and starts no
thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncEmitter", "Emitter", "__version__"]

if TYPE_CHECKING:
    from metricsd.emitter import AsyncEmitter, Emitter


def __getattr__(name: str) -> Any:
    if name in ("Emitter", "AsyncEmitter"):
        from metricsd import emitter

        return getattr(emitter, name)
    raise AttributeError(f"module 'metricsd' has no attribute {name!r}")
