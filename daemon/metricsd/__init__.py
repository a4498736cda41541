"""metricsd: a streaming metrics daemon for machine-learning training.

Training jobs send events to Kafka; the daemon keeps rolling NumPy ring buffers per run and stream,
computes window statistics on a fixed tick under its own profiler, and publishes JSON summaries.

The package splits into a pure core (``buffers``, ``stats``, ``analyses``, ``events``, ``profiler``,
``monitor``) with no I/O, and a thin asyncio shell (``kafka``, ``service``, ``cli``) around it.
"""

__version__ = "0.1.0"
