"""One valid record whose summary is larger than the broker accepts must not stop every commit
(issue: a 1,000-label multiclass batch gives a 2 MB confusion matrix), and neither must a record
with an 800 kB key, whose dead letter would be 1.9 MB with the whole key in it. On the real
broker: the oversized summary is counted and logged as dropped, the dead letter keeps a flagged
prefix of the key, the other runs' summaries arrive, and the offsets are committed to the end,
across ticks and at shutdown."""

from __future__ import annotations

import base64
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import committed_offsets, create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker

pytestmark = pytest.mark.integration

PARTITIONS = 2


def test_oversized_output_never_stops_the_commits(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    labels = list(range(1000))
    huge = orjson.dumps({"type": "prediction", "run_id": "wide", "task": "multiclass",
                         "y_true": labels, "y_pred": labels[::-1]})  # fmt: skip
    small = [
        (f"r{i}".encode(), orjson.dumps({"type": "batch_time", "run_id": f"r{i}", "seconds": 0.5}))
        for i in range(4)
    ]
    # An 800 kB key: its dead letter keeps a flagged prefix of the key and still fits the topic.
    long_key = b"k" * 800_000
    bad_key = orjson.dumps({"type": "batch_time", "run_id": "k", "seconds": 1.0})
    records = [(b"wide", huge, None), (long_key, bad_key, 0), *((k, v, None) for k, v in small)]
    args = ["--bootstrap-servers", broker.bootstrap, "--input-topic", topic,
            "--output-topic", f"{topic}.out", "--group-id", f"{topic}-group",
            "--partitions", str(PARTITIONS), "--interval", "1",
            "--stats-interval", "0.5"]  # fmt: skip
    with DaemonProcess(args, tmp_path / "daemon.log") as daemon:
        positions = produce_foreign(broker.bootstrap, topic, records)
        daemon.wait_for_log(lambda ln: ln.get("event") == "publish_dropped", timeout=60)
        later = [(k, v, None) for k, v in small]  # a second round, ticked after the drop
        positions += produce_foreign(broker.bootstrap, topic, later)
        daemon.wait_for_log(
            lambda ln: ln.get("event") == "stats" and ln.get("events") == len(records) - 1 + 4,
            timeout=60,
        )
        assert daemon.terminate() == 0
    dropped = next(ln for ln in daemon.logs() if ln.get("event") == "publish_dropped")
    assert dropped["value_bytes"] > 1_000_000 and "MessageSizeTooLarge" in dropped["error"]
    stopped = next(ln for ln in daemon.logs() if ln.get("event") == "stopped")
    assert stopped["publish_dropped"] >= 1 and stopped["flushed"] is True

    (dlq,) = read_topic_foreign(
        broker.bootstrap, f"{topic}.dlq", range(PARTITIONS), until=lambda recs: len(recs) >= 1,
        timeout=30,
    )  # fmt: skip
    letter = orjson.loads(dlq[1])
    assert letter["key_truncated"] is True and letter["value_truncated"] is False
    assert base64.b64decode(letter["key_b64"]) == long_key[:16_384]
    assert base64.b64decode(letter["value_b64"]) == bad_key
    assert dlq[0] == long_key[:1024]

    wanted = {f"r{i}" for i in range(4)}
    out = read_topic_foreign(
        broker.bootstrap, f"{topic}.out", range(PARTITIONS),
        until=lambda recs: {orjson.loads(v).get("run_id") for _, v, _, _ in recs} >= wanted,
        timeout=30,
    )  # fmt: skip
    assert all(len(v) < 1_000_000 for _, v, _, _ in out)

    ends: dict[int, int] = defaultdict(int)
    for partition, offset in positions:
        ends[partition] = max(ends[partition], offset + 1)

    assert committed_offsets(broker.bootstrap, f"{topic}-group", topic, ends) == dict(ends)
