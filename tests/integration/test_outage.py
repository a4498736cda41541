"""The broker unreachable for 10 s mid-publish: no crash, no loss, correct summaries afterwards."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker, free_port
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

PARTITIONS = 3
RUNS = 6
PER_PHASE = 60


def test_broker_cut_for_10_seconds_mid_stream(tmp_path: Path) -> None:
    """Cutting every connection to the broker for 10 s while a tick's summaries are in flight
    loses nothing: the daemon keeps running, the failed publish is retried, and every summary
    arrives (de-duplicated by id: the broker had stored the unacknowledged first send), every
    run's final one equal to the reference with all events.

    Deterministic: the proxy forwards the tick's Produce request to the broker and then holds
    the broker's replies on that connection (no ack), and only then is everything cut, so the
    cut always lands between the send and its ack."""
    proxy_port = free_port()
    broker = DevBroker(advertised=f"127.0.0.1:{proxy_port}", log_path=tmp_path / "tansu.log")
    broker.start()
    proxy = TcpProxy(broker.bootstrap, port=proxy_port).start()
    topic, output = "outage", "outage.summaries"
    daemon = DaemonProcess(
        ["--bootstrap-servers", proxy.address, "--input-topic", topic, "--output-topic", output,
         "--group-id", "g", "--interval", "1", "--window", "500", "--time-window", "0",
         "--stats-interval", "0.5", "--partitions", str(PARTITIONS)],
        tmp_path / "daemon.log",
    )  # fmt: skip
    rng = np.random.default_rng(3)
    values = {f"r{i}": rng.normal(1, 0.1, 2 * PER_PHASE).tolist() for i in range(RUNS)}

    def produce(phase: int) -> None:
        produce_foreign(proxy.address, topic, [
            (run.encode(), orjson.dumps({"type": "batch_time", "run_id": run, "seconds": v}), None)
            for run, vs in values.items() for v in vs[phase * PER_PHASE : (phase + 1) * PER_PHASE]
        ])  # fmt: skip

    def covered(n: int) -> Any:
        def predicate(records: list[tuple[Any, ...]]) -> bool:
            done = {
                orjson.loads(v)["run_id"]
                for _, v, _, _ in records
                if orjson.loads(v).get("type") == "summary" and orjson.loads(v)["total"] >= n
            }
            return len(done) == RUNS  # fmt: skip

        return predicate

    try:
        create_topics(proxy.address, {topic: PARTITIONS})
        daemon.start()
        daemon.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
        proxy.hold_after_produce(output)  # the first tick that publishes summaries
        produce(0)
        assert proxy.held.wait(60), f"no summaries were published; log:\n{daemon.tail()}"
        # The broker's answer reached the proxy: the records are stored, their ack never comes.
        deadline = time.monotonic() + 30
        while proxy.held_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.held_bytes > 0, "the broker never answered the held Produce request"
        proxy.cut()
        time.sleep(10)
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
        proxy.restore()
        produce(1)
        out = read_topic_foreign(proxy.address, output, range(PARTITIONS),
                                 until=covered(2 * PER_PHASE), timeout=120)  # fmt: skip
        assert daemon.proc.poll() is None, daemon.tail()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
        proxy.stop()
        broker.stop()

    # The in-flight publish failed and was sent again: within its request timeout (40 s) the
    # producer retries by itself (logged as aiokafka's warning in the daemon's log) and the tick
    # waits for that ack; past it, the daemon's own publish_failed/retry path takes over.
    logs = daemon.logs()
    failed = [
        line
        for line in logs
        if line.get("event") == "publish_failed"
        or str(line.get("event", "")).startswith("Got error produce response")
    ]
    assert failed, f"the cut publish did not fail:\n{daemon.tail()}"
    assert covered(2 * PER_PHASE)(out), daemon.tail()

    # Exactly once after de-duplication by id: a resend is byte-identical to the first send, and
    # the first send was stored (the broker had answered it), so the held tick's ids come twice.
    copies: dict[str, list[bytes]] = defaultdict(list)
    for _, value, _, _ in out:
        if orjson.loads(value).get("type") == "summary":
            copies[orjson.loads(value)["id"]].append(value)
    assert all(len(set(c)) == 1 for c in copies.values()), "an id with differing bodies"
    resent = [i for i, c in copies.items() if len(c) > 1]
    assert resent, "no summary was sent twice: the cut did not hit a publish in flight"
    seen = [orjson.loads(c[0]) for c in copies.values()]
    assert all(r["total"] <= 2 * PER_PHASE for r in seen), "an event was counted twice"
    for run, vs in values.items():
        final = max((r for r in seen if r["run_id"] == run), key=lambda r: r["total"])
        assert final["metrics"]["mean"] == pytest.approx(np.mean(vs), rel=1e-9)
        assert final["metrics"]["p95"] == pytest.approx(np.percentile(vs, 95), rel=1e-9)
        seqs = sorted(r["seq"] for r in seen if r["run_id"] == run)
        assert seqs == list(range(len(seqs))), f"a summary of {run} was lost: seqs {seqs}"


def test_broker_down_at_start_up_is_waited_for(tmp_path: Path) -> None:
    """A daemon started before its broker keeps retrying, then summarises once the broker is up;
    a daemon whose broker never comes exits 0 on SIGTERM."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    waiting = DaemonProcess(
        ["--bootstrap-servers", bootstrap, "--input-topic", "late", "--output-topic", "late.out",
         "--interval", "0.5", "--time-window", "0", "--partitions", "1"],
        tmp_path / "waiting.log",
    ).start()  # fmt: skip
    never = DaemonProcess(
        ["--bootstrap-servers", f"127.0.0.1:{free_port()}", "--input-topic", "x"],
        tmp_path / "never.log",
    ).start()
    broker = DevBroker(port=port, log_path=tmp_path / "tansu.log")
    try:
        warning = waiting.wait_for_log(lambda line: line.get("event") == "broker_unreachable")
        assert warning["bootstrap_servers"] == bootstrap
        time.sleep(3)
        assert waiting.proc is not None and waiting.proc.poll() is None
        broker.start()
        waiting.wait_for_log(lambda line: line.get("event") == "partitions_assigned", timeout=60)
        produce_foreign(bootstrap, "late", [
            (b"r", orjson.dumps({"type": "batch_time", "run_id": "r", "seconds": s}), None)
            for s in (1.0, 2.0, 6.0)
        ])  # fmt: skip
        out = read_topic_foreign(bootstrap, "late.out", [0], until=lambda got: len(got) > 0,
                                 timeout=30)  # fmt: skip
        assert orjson.loads(out[0][1])["metrics"]["mean"] == pytest.approx(3.0)
        assert waiting.terminate() == 0
        never.wait_for_log(lambda line: line.get("event") == "broker_unreachable")
        assert never.terminate(timeout=30) == 0
    finally:
        waiting.kill()
        never.kill()
        broker.stop()
