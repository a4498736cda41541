"""The HTTP port's cost: ingest with a scrape every second against no HTTP server, and a scrape
with 10,000 runs tracked.

Plan
----
1. Pre-load a topic (``bench.ingest.preload``) with ``ingest_events`` batch_time events over
   10,000 runs (``bench.ingest.scalar_records``; the daemon's default ``max_runs`` is 10,000).
2. For each repetition, alternating the order, each with a fresh consumer group and its own loop,
   the daemon as ``bench/ingest.py`` runs it (``metricsd.service.Service`` with the default
   settings except ticks, profiles and stats lines an hour apart; timed by the same consume hook,
   first record in hand -> N-th processed):

   - **HTTP off**: ``http_port`` 0.
   - **HTTP on, scraped**: ``http_port`` on a free loopback port, and a separate scraper process
     (urllib, like any scraper: its CPU is not the daemon's) GETting ``/metrics`` every second
     from before the daemon starts. Once N events are in (the timed part is over), the same
     daemon ticks once, which publishes a summary of each of the 10,000 runs and so fills the
     per-run series, and a second scraper process GETs ``/metrics`` ``scrapes`` times, 0.2 s
     apart, each timed from the request to the last byte (the first one after the tick includes
     the page's rebuild). Its median per repetition is the figure; its max is in the note.
3. Figures: events/s of both, the slowdown ``1 - on / off`` per repetition pair (target <= 2%),
   the scrape time with 10,000 runs (target <= 200 ms), the page size and series count.

What it leaves out: the scraper is on the same 2-core machine (its CPU competes with the
daemon's, as a node-local Prometheus agent would); the scrapes during ingest see the health
series and an empty per-run part (no tick happens while ingest is timed).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from metricsd.config import MonitorSettings
from metricsd.devbroker import DevBroker

from bench.common import Figure, Sizes, paired
from bench.ingest import _daemon, _settings, _timed_service, _Timing, preload, scalar_records

__all__ = ["run"]

RUNS = 10_000

# GET the URL every `period` seconds (`count` times, 0: until SIGTERM); print the seconds of
# each successful scrape, the last page's size and series count as JSON on exit.
_SCRAPER = r"""
import json, signal, sys, time, urllib.request
url, count, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
times, size, series = [], 0, 0
try:
    while count == 0 or len(times) < count:
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            times.append(time.perf_counter() - start)
            size = len(body)
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        except OSError:
            pass
        time.sleep(max(0.0, period - (time.perf_counter() - start)))
finally:
    print(json.dumps({"times": times, "size": size, "series": series}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _scraper(url: str, count: int, period: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SCRAPER, url, str(count), str(period),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _result(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await proc.communicate()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def _scraped(
    bootstrap: str,
    topic: str,
    group: str,
    target: int,
    partitions: int,
    scrapes: int,
    **overrides: Any,
) -> tuple[_Timing, int, float, dict[str, Any]]:
    """The daemon with its HTTP port scraped every second while timed; then, with every run's
    series filled by a tick, ``scrapes`` timed scrapes. Returns the timing, the number of scrapes
    during ingest, the seconds the loop spent rendering them, and the scrapes after the tick."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    settings = _settings(
        bootstrap, topic, group, partitions, http_port=port, http_host="127.0.0.1", **overrides
    )
    reached, stop = asyncio.Event(), asyncio.Event()
    service, timing = _timed_service(settings, target, reached)  # `reached` at N, not `stop`
    assert service.http is not None
    render, rendering = service.exposition.render, [0.0]

    def timed_render() -> bytes:
        started = time.perf_counter()
        try:
            return render()
        finally:
            if timing.first is not None:  # inside the timed window only
                rendering[0] += time.perf_counter() - started

    service.http.metrics = timed_render
    spent: list[float] = []
    during = await _scraper(url, 0, 1.0)
    after: dict[str, Any] = {}

    async def then() -> int:
        try:
            await reached.wait()
            spent.append(rendering[0])
            during.send_signal(signal.SIGTERM)
            scrapes_during = len((await _result(during))["times"])  # from start-up to N
            await service.tick()  # one summary per run: the per-run series of all of them
            after.update(await _result(await _scraper(url, scrapes, 0.2)))
            return scrapes_during
        finally:
            stop.set()

    follow = asyncio.create_task(then())
    try:
        await service.run(stop)
    finally:
        if during.returncode is None:
            during.kill()
    scrapes_during = await follow
    return timing, scrapes_during, spent[0], after


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """Ingest with and without the HTTP port side by side, and the 10,000-run scrape."""
    label = f"batch_time, {RUNS:,} runs"
    off = Figure("scrape", f"ingest, HTTP off, {label}", "events/s")
    on = Figure("scrape", f"ingest, HTTP on + scrape every 1 s, {label}", "events/s")
    scrape = Figure("scrape", f"scrape /metrics, {RUNS:,} runs tracked", "ms")
    series = Figure("scrape", f"series on the page, {RUNS:,} runs", "series", digits=6)
    size = Figure("scrape", f"page size, {RUNS:,} runs", "MB")
    render_share = Figure(
        "scrape", "loop time rendering /metrics while ingest was timed", "%", digits=2
    )
    during: list[int] = []
    slowest: list[float] = []
    target = max(RUNS, sizes.ingest_events if not sizes.quick else RUNS)
    # Quick (smoke) sizes: one event per run, and neither changelog nor time windows, whose
    # restore and final tick of 10,000 runs would take seconds outside the measurement.
    quick: dict[str, Any] = (
        {"changelog": False, "monitor": MonitorSettings(time_windows=())} if sizes.quick else {}
    )
    topic = "bench.scrape"
    scrapes = 3 if sizes.quick else 5
    with DevBroker() as broker:
        bootstrap = broker.bootstrap
        records = scalar_records(target, RUNS, sizes.partitions)
        seconds = preload(bootstrap, topic, records, sizes.partitions)
        del records
        log(f"scrape: pre-loaded {target:,} events over {RUNS:,} runs in {seconds:.1f} s")

        def measure_off(rep: int) -> None:
            group = f"bench-scrape-off-{rep}-{time.time_ns()}"
            timing = asyncio.run(
                _daemon(bootstrap, topic, group, target, sizes.partitions, **quick)
            )
            off.samples.append(target / timing.seconds)

        def measure_on(rep: int) -> None:
            group = f"bench-scrape-on-{rep}-{time.time_ns()}"
            timing, n, rendered, after = asyncio.run(
                _scraped(bootstrap, topic, group, target, sizes.partitions, scrapes, **quick)
            )
            on.samples.append(target / timing.seconds)
            during.append(n)
            render_share.samples.append(100.0 * rendered / timing.seconds)
            times = sorted(1000.0 * t for t in after["times"])
            scrape.samples.append(times[len(times) // 2])
            slowest.append(times[-1])
            series.samples.append(float(after["series"]))
            size.samples.append(after["size"] / 1e6)

        # Full sizes: an even number of pairs, half of them each order, after one unmeasured
        # run (the first consumer of a freshly loaded topic was 15-30% slower than the next one
        # here, whatever it was).
        repeat = sizes.repeat if sizes.quick else sizes.repeat + sizes.repeat % 2
        if not sizes.quick:
            measure_off(-1)
            off.samples.clear()
            log("scrape: warm-up run done")
        for rep in range(repeat):
            if sizes.quick:
                # Smoke run: both at once (one group join's wait instead of two), so the
                # slowdown figure of a quick run means nothing.
                with ThreadPoolExecutor(2) as pool:
                    for done in [pool.submit(measure_off, rep), pool.submit(measure_on, rep)]:
                        done.result()
            else:
                for who in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                    (measure_off if who == "off" else measure_on)(rep)
            log(f"scrape: repetition {rep + 1}/{repeat} done")
    slowdown = Figure(
        "scrape",
        f"ingest slowdown, HTTP on + scraped vs off, {label}",
        "%",
        [100.0 * (1.0 - r) for r in paired(on.samples, off.samples)],
    )
    on.note = f"scrapes from start-up to N: {during}; N = {target:,}"
    off.note = f"N = {target:,}, first→last record (consume hook)"
    if sizes.quick:
        off.note += "; quick: off and on ran at the same time"
    scrape.note = (
        f"median of {scrapes} GETs after a tick (first rebuilds the page); slowest per rep: "
        f"{', '.join(f'{t:.1f}' for t in slowest)} ms"
    )
    render_share.note = "render() only: the HTTP handling around it is not counted"
    return [off, on, slowdown, render_share, scrape, series, size]
