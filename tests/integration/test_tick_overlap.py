"""A tick waiting for its acknowledgements does not stop consumption, and does not commit before
they come (docs/state.md, "What overlaps with consumption")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_process import DaemonProcess, LogLine
from kafka_tools import create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker, free_port
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

RUNS = 4
PER_PHASE = 50
INTERVAL = 3.0


def test_events_are_consumed_while_a_ticks_acks_are_held(tmp_path: Path) -> None:
    """The proxy holds the broker's replies to the first tick's Produce request: while it waits,
    the daemon keeps ingesting (its stats lines count the second batch of events) and commits
    nothing; once the connection is cut and restored, the publish is retried and every summary
    arrives with every event counted once."""
    proxy_port = free_port()
    broker = DevBroker(advertised=f"127.0.0.1:{proxy_port}", log_path=tmp_path / "tansu.log")
    broker.start()
    proxy = TcpProxy(broker.bootstrap, port=proxy_port).start()
    topic, output = "overlap", "overlap.summaries"
    daemon = DaemonProcess(
        ["--bootstrap-servers", proxy.address, "--input-topic", topic, "--output-topic", output,
         "--group-id", "g", "--interval", str(INTERVAL), "--window", "100", "--time-window", "0",
         "--stats-interval", "0.2", "--partitions", "1"],
        tmp_path / "daemon.log",
    )  # fmt: skip

    def produce(phase: int) -> None:
        produce_foreign(proxy.address, topic, [
            (run.encode(), orjson.dumps({"type": "batch_time", "run_id": run,
                                         "seconds": 1.0 + phase + i / 1000}), None)
            for run in (f"r{r}" for r in range(RUNS)) for i in range(PER_PHASE)
        ])  # fmt: skip

    def stats(lines: list[LogLine]) -> list[LogLine]:
        return [line for line in lines if line.get("event") == "stats"]

    def summaries(records: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        return [r for r in (orjson.loads(v) for _, v, _, _ in records) if r["type"] == "summary"]

    def complete(records: list[tuple[Any, ...]]) -> bool:
        totals: dict[str, int] = {}
        for r in summaries(records):
            totals[r["run_id"]] = max(totals.get(r["run_id"], 0), r["total"])
        return len(totals) == RUNS and all(t >= 2 * PER_PHASE for t in totals.values())

    try:
        create_topics(proxy.address, {topic: 1})
        daemon.start()
        daemon.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
        proxy.hold_after_produce(output)  # the first tick that publishes summaries
        produce(0)
        assert proxy.held.wait(60), f"no summaries were published; log:\n{daemon.tail()}"
        seen = len(daemon.logs())
        # The held tick is the first with data: nothing was committed before it (0).
        committed = max((ln["commits"] for ln in stats(daemon.logs())), default=0)
        produce(1)
        # Before the next tick is due (it waits for the held one, and the loop with it) and long
        # before the producer's request timeout (40 s) gives up on the held ack.
        daemon.wait_for_log(
            lambda ln: ln.get("event") == "stats" and ln["events"] == 2 * RUNS * PER_PHASE,
            timeout=15,
        )
        during = stats(daemon.logs()[seen:])
        assert during and all(ln["commits"] == committed for ln in during), during[-3:]
        assert any(ln["events"] == 2 * RUNS * PER_PHASE for ln in during), during[-3:]
        proxy.cut()
        proxy.restore()
        out = read_topic_foreign(proxy.address, output, [0], until=complete, timeout=90)
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
        proxy.stop()
        broker.stop()
    assert complete(out), daemon.tail()
    assert all(s["total"] <= 2 * PER_PHASE for s in summaries(out)), "an event was counted twice"
    assert any(ln["commits"] > committed for ln in stats(daemon.logs())), "never committed"
