"""``metricsd dev``: embedded broker, daemon, simulated job and a printer of the summary topic.

``metricsd dev --train`` replaces the simulated job by a real one: small torch models trained on
random data through ``metricsd.Emitter`` (``metricsd.simulate.train``); without torch it exits 2
before starting anything, naming the package to install.

The zero-setup demo. The CLI validates its :class:`Settings` and :class:`SimulateSettings` (the
same as ``run`` and ``simulate``, without broker or security options: the broker is embedded and
plaintext) and calls :func:`run`, which replaces their bootstrap servers with the embedded
broker's. The simulator's ``duration`` is the demo's: everything stops after it (0 = until
``stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sys
from collections import OrderedDict
from typing import Any, TextIO

import orjson

from metricsd.config import Settings, SimulateSettings

__all__ = ["run"]


async def run(
    settings: Settings, sim: SimulateSettings, stop: asyncio.Event, out: TextIO | None = None
) -> None:
    """Run the demo until ``stop`` is set or ``sim.duration`` seconds (if not 0) have passed,
    printing to ``out`` (stdout); a task that fails ends the demo with its exception."""
    from metricsd import kafka, service, simulate
    from metricsd.devbroker import DevBroker

    out = sys.stdout if out is None else out
    if sim.train:
        simulate.require_torch()  # fail at once, not after the broker has started
    with DevBroker() as broker:
        print(
            f"metricsd dev: embedded Tansu broker on {broker.bootstrap} (pid {broker.pid})",
            file=out,
        )
        settings = dataclasses.replace(
            settings, bootstrap_servers=broker.bootstrap, http_port=_http_port(settings)
        )
        job = dataclasses.replace(sim, bootstrap_servers=broker.bootstrap, duration=0.0)
        await kafka.ensure_topics(broker.bootstrap, settings.topics(), security=settings.security)
        daemon_stop, sim_stop = asyncio.Event(), asyncio.Event()
        daemon = service.Service(settings)
        tasks = [
            asyncio.create_task(daemon.run(daemon_stop), name="daemon"),
            asyncio.create_task(simulate.produce(job, sim_stop), name="simulator"),
            asyncio.create_task(_print_summaries(broker.bootstrap, settings, out), name="printer"),
        ]
        started = asyncio.create_task(daemon.http_started.wait())
        await asyncio.wait([started, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if daemon.http is not None and daemon.http_started.is_set():
            url = daemon.http.url
            print(f"metricsd dev: {url}/metrics, {url}/livez, {url}/readyz", file=out)
        what = "torch training runs (metricsd.Emitter)" if sim.train else "simulated runs"
        print(
            f"metricsd dev: {sim.runs} {what} at {sim.rate:g} steps/s; summaries every "
            f"{settings.interval:g} s from topic {settings.output_topic!r}; Ctrl-C to stop",
            file=out,
        )
        waiter = asyncio.create_task(stop.wait())
        timeout = sim.duration or None
        done, _ = await asyncio.wait(
            [waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        sim_stop.set()
        await tasks[1]
        daemon_stop.set()
        await tasks[0]
        await asyncio.sleep(1.0)  # let the printer show the final tick
        tasks[2].cancel()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[2]
    print("metricsd dev: stopped", file=out)


def _http_port(settings: Settings) -> int:
    """The configured HTTP port, or a free one when it is taken (a daemon already runs here)."""
    if not settings.http_port:
        return 0
    with socket.socket() as sock:
        try:
            sock.bind((settings.http_host, settings.http_port))
            return settings.http_port
        except OSError:
            sock.bind((settings.http_host, 0))
            return int(sock.getsockname()[1])


_SEEN = 100_000  # summary ids the printer remembers for de-duplication


async def _print_summaries(bootstrap: str, settings: Settings, out: Any) -> None:
    """Print one line per count-window summary (and per profile record) as they arrive.

    The summary topic is at-least-once: like any consumer of it, the printer de-duplicates on
    ``id`` (profiles on instance and time)."""
    from metricsd import kafka

    consumer = kafka.consumer(
        bootstrap, group_id=f"{settings.group_id}-dev-printer", security=settings.security
    )
    await consumer.start()
    # The ids of the newest summaries, bounded: a re-delivery comes within a few ticks of the
    # first copy, and an hour-long demo would otherwise keep every id it ever printed.
    seen: OrderedDict[Any, None] = OrderedDict()
    try:
        consumer.subscribe([settings.output_topic])
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    body = orjson.loads(record.value)
                    identity = body.get("id") or (body.get("instance"), body.get("emitted_at"))
                    if identity in seen:
                        continue
                    seen[identity] = None
                    if len(seen) > _SEEN:
                        seen.popitem(last=False)
                    line = _describe(body)
                    if line:
                        print(line, file=out, flush=True)
    finally:
        await consumer.stop()


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _describe(record: dict[str, Any]) -> str | None:
    """A one-line rendering of a summary (count window only) or profile record."""
    if record.get("type") == "profile":
        ops = sorted(record["operations"], key=lambda op: -op["total_us"])[:4]
        top = ", ".join(f"{op['name']} p50={_fmt(op['p50_us'])}us" for op in ops)
        return (
            f"[profile] ticks={record['ticks']} tick_p50_ms={_fmt(record['tick_ms']['p50'])} "
            f"tick_overhead={_fmt(record['tick_overhead_fraction'])} | {top}"
        )
    if record.get("type") != "summary" or record["window"]["kind"] != "count":
        return None
    m = record["metrics"]
    stream = record["stream"]
    if stream == "batch_time":
        body = " ".join(f"{k}={_fmt(m[k])}" for k in ("mean", "p95", "p99", "cv", "skewness"))
    elif "task" in record:
        keys = {
            "binary": ("accuracy", "precision", "recall", "f1"),
            "multiclass": ("accuracy", "f1_macro", "f1_weighted"),
            "regression": ("rmse", "mae", "r2", "pearson_r"),
        }[record["task"]]
        body = f"{record['task']}: " + " ".join(f"{k}={_fmt(m[k])}" for k in keys)
    elif stream == "cv":
        body = " ".join(
            f"{k}={_fmt(m[k])}"
            for k in ("folds", "mean_val_loss", "train_val_gap", "overfitting_ratio")
        )
    elif stream == "attention":
        body = (
            f"concentration mean={_fmt(m['concentration']['mean'])} entropy mean="
            f"{_fmt(m['entropy']['mean'])} top={m['latest']['top_attention_positions']}"
        )
    elif stream.startswith("scalar/"):
        body = " ".join(f"{k}={_fmt(m[k])}" for k in ("mean", "min", "max", "non_finite"))
    elif stream == "features":
        body = " ".join(f"{k} mean={_fmt(m[k]['mean'])}" for k in ("mean", "sparsity", "l2_norm"))
    else:  # a stream this printer does not know yet: its plain figures
        body = " ".join(f"{k}={_fmt(v)}" for k, v in m.items() if not isinstance(v, dict | list))
    final = " FINAL" if record["final"] else ""
    return f"[{record['run_id']} {stream} n={record['count']} seq={record['seq']}{final}] {body}"
