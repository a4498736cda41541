"""The asyncio shell: clients, schedule and log lines around the pipeline
(consume -> decode -> monitor -> publish -> commit, in :mod:`metricsd.pipeline`).

Lifecycle (one readable loop, arq style): ``run(settings, stop)`` creates the topics, starts the
producer and the group consumer, then loops until ``stop`` is set:

1. ``getmany`` a batch (waiting at most until the next tick) and hand it to the pipeline, which
   decodes each record; bad records become dead letters (reason, counter, rate-limited warning,
   original bytes) and their offsets advance like any other.
2. At each tick (every ``interval`` seconds, scheduled on a fixed grid so it does not drift) the
   pipeline takes the due summaries and the changed rows at one position; publishing them, the
   wait until the broker acknowledged them and the dead letters sent before, and the commit of
   that position run in the background while the loop consumes on (one tick in flight: the next
   one waits for its commit; docs/state.md). A publish that fails is retried at the next tick
   and holds the commit back.
3. Every ``profile_interval`` a profile record, every ``stats_interval`` a ``stats`` log line.

Shutdown (SIGTERM/SIGINT set ``stop``): a final tick, flush, commit, then the clients stop in
reverse order of start-up, and one ``stopped`` line with the counts.

The HTTP port (``/metrics``, ``/livez``, ``/readyz``: :mod:`metricsd.probes`) is served from the
same event loop; it starts first, so the probes answer while the daemon waits for the broker and
joins the group, and stops last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from metricsd import kafka
from metricsd.config import Settings
from metricsd.exposition import Exposition, Health, not_ready
from metricsd.pipeline import Pipeline
from metricsd.probes import Probes
from metricsd.profiler import Profiler
from metricsd.records import encode, profile_record
from metricsd.topics import MessageLimits

__all__ = ["Service", "ServiceFailed", "ShutdownIncomplete", "StateUnavailable", "run"]

log = structlog.get_logger(__name__)


class ServiceFailed(Exception):
    """The daemon stopped for a reason the operator must see in the exit status (1)."""


class StateUnavailable(ServiceFailed):
    """The window state of an assigned partition could not be restored: consuming without it
    would count events twice or lose windows."""


class ShutdownIncomplete(ServiceFailed):
    """The final tick could not publish or commit everything: the next start re-reads from the
    last commit (at-least-once), but the exit status must say so."""


class Service:
    """One daemon instance: the Kafka clients, the schedule and the operator's log lines around
    a :class:`~metricsd.pipeline.Pipeline`."""

    def __init__(
        self, settings: Settings, *, on_batch: Callable[[float], None] | None = None
    ) -> None:
        """``on_batch(fetched)``: called after each consumed ``getmany`` batch with the
        ``time.perf_counter()`` at which ``getmany`` returned it (e.g. a benchmark's clock; it
        must be quick and must not block)."""
        self.settings = settings
        self.on_batch = on_batch
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.profiler = Profiler()
        self.pipeline = Pipeline(settings, self.instance, self.profiler)
        self.monitor = self.pipeline.monitor
        self.counters = self.pipeline.counters
        self._producer: Any = None
        self._consumer: Any = None
        self._flushed = True  # the final tick published and committed everything
        self._subscribed = False
        self._stop: asyncio.Event | None = None
        self._profiler_overhead = float("nan")
        self.exposition = Exposition(
            self.health,
            max_runs=settings.monitor.max_runs,
            per_run_metrics=settings.per_run_metrics,
        )
        self.pipeline.on_summaries = self.exposition.runs.update
        self.pipeline.on_ticked = self.exposition.observe_tick
        self.pipeline.on_released = self.exposition.runs.forget
        self.http: Probes | None = None
        if settings.http_port:
            self.http = Probes(
                settings.http_host,
                settings.http_port,
                self.exposition.render,
                lambda: not_ready(self.health()),
            )
        self.http_started = asyncio.Event()  # set once the HTTP server listens (or is off)

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        if self.http is not None:
            try:
                await self.http.start()
            except OSError as exc:
                raise ServiceFailed(
                    f"cannot listen on {self.settings.http_host}:{self.settings.http_port} "
                    f"(--http-port, 0 disables): {exc}"
                ) from exc
            log.info("http_listening", url=self.http.url, paths=["/metrics", "/livez", "/readyz"])
        self.http_started.set()
        try:
            await self._run(stop)
        finally:
            if self.http is not None:
                await self.http.stop()

    async def _run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # An unreachable broker at start-up is waited for (with backoff and a warning per
        # attempt) until it comes or a signal arrives; refused TLS/SASL fails at once.
        topics = kafka.ensure_topics(
            s.bootstrap_servers, s.topics(), security=s.security, timeout=None
        )
        done, created = await _unless_stopped(topics, stop)
        if not done:
            log.info("stopped", reason="signal before the broker was reachable")
            return
        log.info(
            "topics_ready",
            created=created,
            input=s.input_topic,
            output=s.output_topic,
            dead_letter=s.dead_letter_topic,
        )
        limits = await MessageLimits.read(s)
        self._producer = kafka.producer(
            s.bootstrap_servers, security=s.security, message_limit=limits.smallest
        )
        await self._producer.start()
        self.pipeline.use_producer(self._producer, limits)
        _tune_gc()
        try:
            if s.changelog:
                await self.pipeline.topics.ensure_changelog()
            self._consumer = kafka.consumer(
                s.bootstrap_servers,
                s.group_id,
                security=s.security,
                # A broker that does not answer a fetch early when records arrive (Tansu) holds
                # them for up to this long: keep it a small share of the tick interval.
                fetch_max_wait_ms=int(min(500.0, s.interval * 1000 / 20)),
            )
            await self._consumer.start()
            self.pipeline.use_consumer(self._consumer)
            try:
                self._consumer.subscribe(
                    [s.input_topic],
                    listener=kafka.Partitions(self.pipeline.revoke, self.pipeline.assign),
                )
                self._subscribed = True
                log.info(
                    "started",
                    instance=self.instance,
                    group_id=s.group_id,
                    interval=s.interval,
                    window=s.monitor.window,
                    time_windows=list(s.monitor.time_windows),
                )
                await self._until_stopped(self._loop(stop), stop)
            finally:
                await self._bounded(self._final_tick(), "final_flush")
                await self._bounded(self._consumer.stop(), "consumer_stop")
        finally:
            await self._bounded(self._producer.stop(), "producer_stop")
            c = self.counters
            log.info(
                "stopped",
                records=c.records,
                events=c.events,
                invalid=sum(c.invalid.values()),
                summaries=c.summaries,
                dead_letters=c.dead_letters,
                commits=c.commits,
                ticks=c.ticks,
                publish_failures=self.pipeline.outbox.failures,
                publish_dropped=self.pipeline.outbox.dropped,
                before_checkpoint=c.before_checkpoint,
                summaries_reduced=dict(c.reduced),
                runs_tracked=self.monitor.runs_tracked,
                rank_values_dropped=self.monitor.rank_values_dropped,
                early_ticks=c.early_ticks,
                flushed=self._flushed,
            )
        if not self._flushed:
            raise ShutdownIncomplete(
                "the final tick could not publish and commit everything; the next start "
                "re-reads from the last commit"
            )

    async def _until_stopped(self, loop: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
        """Run the main loop; once ``stop`` is set it gets ``shutdown_timeout`` seconds to return
        by itself, then it is cancelled (e.g. stuck behind a rebalance against a broker that is
        gone), so a signal is always honoured."""
        task = asyncio.ensure_future(loop)
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=self.settings.shutdown_timeout)
            if not task.done():
                log.error("loop_stuck_at_stop", timeout=self.settings.shutdown_timeout)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            else:
                task.result()  # re-raise what ended the loop
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()

    async def _bounded(self, step: Coroutine[Any, Any, None], name: str) -> None:
        """A shutdown step that may neither hang the exit when the broker is gone nor stop the
        steps after it when it fails (aiokafka's consumer ``stop`` can raise CancelledError of
        its own fetch task when the broker is unreachable)."""
        try:
            await asyncio.wait_for(step, self.settings.shutdown_timeout)
        except TimeoutError:
            log.error(
                "shutdown_step_timed_out",
                step=name,
                timeout=self.settings.shutdown_timeout,
                unacked=self.pipeline.outbox.pending,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            log.error("shutdown_step_failed", step=name, error="cancelled inside the client")
        except (kafka.KafkaError, OSError) as exc:
            log.error("shutdown_step_failed", step=name, error=repr(exc))

    async def _loop(self, stop: asyncio.Event) -> None:
        s = self.settings
        clock = asyncio.get_running_loop().time
        start = clock()
        next_tick = start + s.interval
        next_profile = start + s.profile_interval
        next_stats = start + s.stats_interval
        stats_mark = (start, 0)
        while not stop.is_set():
            if self.pipeline.fatal is not None:
                raise StateUnavailable(
                    f"cannot continue without the window state: {self.pipeline.fatal!r}"
                ) from self.pipeline.fatal
            wait = max(0.0, min(next_tick - clock(), 0.5))
            batch = await self._consumer.getmany(
                timeout_ms=int(wait * 1000), max_records=s.max_records
            )
            if batch:
                fetched = time.perf_counter()
                await self.pipeline.consume(batch)
                if self.on_batch is not None:
                    self.on_batch(fetched)
            now_mono = clock()
            if now_mono >= next_tick:
                # The snapshot only: publish, acks and commit overlap the next batches.
                await self.pipeline.start_tick()
                # Fixed grid: skip missed ticks rather than drifting or bunching up.
                next_tick += s.interval * (1 + int((now_mono - next_tick) // s.interval))
            if now_mono >= next_profile:
                await self._publish_profile(s.profile_interval)
                next_profile += s.profile_interval * (
                    1 + int((now_mono - next_profile) // s.profile_interval)
                )
            if now_mono >= next_stats:
                stats_mark = self._log_stats(stats_mark, now_mono)
                next_stats += s.stats_interval * (
                    1 + int((now_mono - next_stats) // s.stats_interval)
                )

    async def _final_tick(self) -> None:
        self._flushed = False
        try:
            await self.tick()
            await self._publish_profile(self.settings.profile_interval)
            acked = await self.pipeline.outbox.settle()
            self._flushed = acked and self.pipeline.settled
        except kafka.KafkaError as exc:
            log.error("final_flush_failed", error=str(exc))

    # -- publish ---------------------------------------------------------------------------
    async def tick(self) -> None:
        """A whole tick, returning once committed (the final tick; tests and benchmarks)."""
        await self.pipeline.tick()

    def health(self) -> Health:
        """The state ``/metrics`` and ``/readyz`` show (taken at each scrape)."""
        p, c = self.pipeline, self.counters
        lags, fetched = self._lag()
        lag = {(tp.topic, tp.partition): n for tp, n in lags.items()}
        outbox = p.outbox if self._subscribed else None
        return Health(
            events_by_type=c.by_type,
            dead_letters_by_reason=c.invalid,
            summaries=c.summaries,
            publish_failures=outbox.failures if outbox is not None else 0,
            publish_dropped=outbox.dropped if outbox is not None else 0,
            lag=lag,
            runs_tracked=self.monitor.runs_tracked,
            evictions=self.monitor.runs_evicted,
            restore_pending=p.restoring,
            restore_records=c.restore_records,
            profiler_overhead=self._profiler_overhead,
            started=self._subscribed,
            assigned=len(p.assigned),
            fetched=fetched,
            last_tick_ok=p.settled,
            tick_waiting=p.tick_waiting,
            tick_patience=max(10.0, 3 * self.settings.interval),
            stopping=self._stop is not None and self._stop.is_set(),
        )

    async def _publish_profile(self, interval: float) -> None:
        body = self.profiler.report(interval)
        overhead = body["overhead_fraction"]
        self._profiler_overhead = float("nan") if overhead is None else float(overhead)
        record = profile_record(body, instance=self.instance, emitted_at=time.time())
        log.info(
            "profile",
            ticks=body["ticks"],
            tick_ms=body["tick_ms"],
            overhead_fraction=body["overhead_fraction"],
            tick_overhead_fraction=body["tick_overhead_fraction"],
            operations={
                op["name"]: {
                    "count": op["count"],
                    "mean_us": round(op["mean_us"], 1),
                    "p99_us": round(op["p99_us"], 1),
                }
                for op in body["operations"]
            },
        )
        await self.pipeline.publish(
            self.settings.output_topic, self.instance.encode(), encode(record)
        )
        self.counters.profiles += 1

    def _lag(self) -> tuple[dict[kafka.TopicPartition, int], bool]:
        """Consumer lag (high watermark - consumed position) of each assigned partition where
        both are known, and whether every assigned partition has a high watermark (a fetch
        answered since its assignment; never before the consumer is subscribed)."""
        p = self.pipeline
        consumer = self._consumer if self._subscribed else None
        lag: dict[kafka.TopicPartition, int] = {}
        fetched = bool(p.assigned)
        for tp in p.assigned:
            high = consumer.highwater(tp) if consumer is not None else None
            if high is None:  # no fetch response for it since the assignment
                fetched = False
                continue
            position = p.consumed.get(tp)
            if position is not None:  # else nothing consumed yet: the position is not known here
                lag[tp] = max(0, high - position)
        return lag, fetched

    def _log_stats(self, mark: tuple[float, int], now: float) -> tuple[float, int]:
        since, events_before = mark
        c = self.counters
        lag = sum(self._lag()[0].values())
        log.info(
            "stats",
            events_per_s=round((c.events - events_before) / max(now - since, 1e-9), 1),
            events=c.events,
            invalid=sum(c.invalid.values()),
            invalid_by_reason=dict(c.invalid),
            runs_tracked=self.monitor.runs_tracked,
            runs_evicted=self.monitor.runs_evicted,
            streams_evicted=self.monitor.streams_evicted,
            future_ts_clamped=self.monitor.future_ts_clamped,
            partitions=len(self.pipeline.assigned),
            consumer_lag=lag,
            last_tick_ms=round(self.pipeline.last_tick_ms, 3),
            summaries=c.summaries,
            commits=c.commits,
            publish_failures=self.pipeline.outbox.failures,
            publish_dropped=self.pipeline.outbox.dropped,
            summaries_reduced=dict(c.reduced),
            rank_values_dropped=self.monitor.rank_values_dropped,
            early_ticks=c.early_ticks,
            retire_passes=self.monitor.retire_passes,
        )
        return now, c.events

    # -- rebalance -------------------------------------------------------------------------


async def _unless_stopped(
    work: Coroutine[Any, Any, list[str]], stop: asyncio.Event
) -> tuple[bool, list[str]]:
    """``(True, result)`` of ``work``, or ``(False, [])`` when ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, []


def _tune_gc() -> None:
    """Start-up objects are moved out of the collector's sight and young collections happen
    every 20,000 allocations instead of 700. Every consumed batch creates tens of thousands of
    short-lived record and event objects (no reference cycles among them); with the default
    threshold the cyclic collector runs dozens of times per batch and cost about a third of the
    per-event CPU (bench/README.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(20_000, older, oldest)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run one daemon until ``stop`` is set."""
    await Service(settings).run(stop)
