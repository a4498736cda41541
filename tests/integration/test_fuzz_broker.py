"""Fuzz end to end: 10,000 mixed good and bad records through the real broker and daemon process.

The records are those of ``tests/test_fuzz.py``'s seeded generator (random bytes, tombstones,
arbitrary JSON, valid events of all six types and single mutations of them), produced by the
foreign client (confluent-kafka) with and without keys. The oracle of what is bad, and why, is the
decoder with the daemon's limits; the daemon runs with a small ``--max-runs`` and
``--idle-timeout`` so that it evicts runs while it consumes. The daemon must survive all of it,
dead-letter exactly the bad records (by reason), count every record once, and summarise every run
that sent a good data event.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker
from metricsd.events import Decoder, InvalidEvent
from test_fuzz import MAX_ARRAY, MAX_CLASSES, Seeded, case, stream_of
from test_schemas import validator

pytestmark = pytest.mark.integration

PARTITIONS = 4
RECORDS = 10_000


def test_daemon_survives_10000_fuzzed_records_and_accounts_for_each(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """Every fuzzed record is either summarised or dead-lettered with the decoder's reason; the
    process never dies and its stats/stopped counters add up to the records produced."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    src = Seeded(7)
    records = [case(src)[:2] for _ in range(RECORDS)]
    decoder = Decoder(max_array=MAX_ARRAY, max_classes=MAX_CLASSES)
    bad: Counter[str] = Counter()
    good_runs: set[str] = set()
    for key, value in records:
        try:
            event = decoder.decode(key, value)
        except InvalidEvent as exc:
            bad[exc.reason] += 1
        else:
            if stream_of(event) is not None:
                good_runs.add(event.run_id)
    n_bad = sum(bad.values())
    assert len(bad) >= 8 and len(good_runs) > 20  # the mix really is mixed

    daemon = DaemonProcess(
        [
            "--bootstrap-servers", broker.bootstrap,
            "--input-topic", topic,
            "--output-topic", f"{topic}.out",
            "--group-id", f"{topic}-group",
            "--partitions", str(PARTITIONS),
            "--window", "8",
            "--time-window", "0",
            "--interval", "1",
            "--stats-interval", "0.5",
            "--max-array", str(MAX_ARRAY),
            "--max-classes", str(MAX_CLASSES),
            "--max-runs", "12",
            "--idle-timeout", "2",
        ],
        tmp_path / "daemon.log",
    )  # fmt: skip
    with daemon:
        produce_foreign(broker.bootstrap, topic, [(k, v, None) for k, v in records])  # type: ignore[misc]
        stats = daemon.wait_for_log(
            lambda line: (
                line.get("event") == "stats" and line["events"] + line["invalid"] == RECORDS
            ),
            timeout=60,
        )
        dlq = read_topic_foreign(
            broker.bootstrap,
            f"{topic}.dlq",
            range(PARTITIONS),
            until=lambda got: len(got) >= n_bad,
            timeout=30,
        )
        out = read_topic_foreign(
            broker.bootstrap,
            f"{topic}.out",
            range(PARTITIONS),
            until=lambda got: good_runs <= {orjson.loads(v)["run_id"] for _, v, _, _ in got},
            timeout=30,
        )
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
        assert daemon.terminate() == 0

    assert stats["invalid_by_reason"] == dict(bad)
    assert stats["runs_evicted"]["capacity"] > 0 and stats["runs_tracked"] <= 12
    letters = [orjson.loads(value) for _, value, _, _ in dlq]
    assert Counter(d["reason"] for d in letters) == bad
    produced = Counter(v for _, v in records)
    returned = Counter(None if d["value_b64"] is None else base64.b64decode(d["value_b64"])
                       for d in letters)  # fmt: skip
    assert returned <= produced
    summaries = [orjson.loads(value) for _, value, _, _ in out]
    summary_schema = validator("summary")
    for record in summaries:
        if record["type"] == "summary":
            summary_schema.validate(record)
    assert good_runs <= {r["run_id"] for r in summaries if r["type"] == "summary"}
    assert any(r["type"] == "summary" and r["final"] for r in summaries)  # evictions published
    stopped = next(line for line in daemon.logs() if line.get("event") == "stopped")
    assert stopped["records"] == RECORDS
    assert stopped["events"] == RECORDS - n_bad and stopped["invalid"] == n_bad
    assert stopped["dead_letters"] == n_bad
