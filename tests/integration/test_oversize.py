"""One valid record whose summary is larger than the broker accepts must not stop every commit
(issue: a 1,000-label multiclass batch gives a 2 MB confusion matrix), and neither must a record
with an 800 kB key, whose dead letter would be 1.9 MB with the whole key in it. On the real
broker, with an output topic whose ``max.message.bytes`` (40,000) the daemon reads at start-up:
the big summaries ARRIVE, reduced (the confusion matrix as sparse triples, or omitted with its
reason and the labels of most support when even the triples do not fit), with the headline metrics
of sklearn; the dead letter keeps a flagged prefix of the key; the other runs' summaries arrive;
and the offsets are committed to the end, across ticks and at shutdown."""

from __future__ import annotations

import base64
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import committed_offsets, create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

pytestmark = pytest.mark.integration

PARTITIONS = 2
LIMIT = 40_000  # the output topic's max.message.bytes
WINDOW = 5_000


def prediction(run: str, y_true: list[int], y_pred: list[int]) -> bytes:
    return orjson.dumps({"type": "prediction", "run_id": run, "task": "multiclass",
                         "y_true": y_true, "y_pred": y_pred})  # fmt: skip


def test_oversized_output_never_stops_the_commits(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    topic = topic_name
    output = f"{topic}.out"
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    create_topics(
        broker.bootstrap, {output: PARTITIONS}, configs={output: {"max.message.bytes": str(LIMIT)}}
    )
    labels = list(range(1000))
    # "wide": 1,000 labels, 1,000 non-zero cells: a 2 MB dense matrix, about 18 kB as triples.
    wide = (labels, labels[::-1])
    # "wider": 5 x 1,000 random pairs, about 5,000 non-zero cells: even the triples are too big.
    rng = np.random.default_rng(3)
    wider = [(rng.integers(0, 1000, 1000).tolist(), rng.integers(0, 1000, 1000).tolist())
             for _ in range(5)]  # fmt: skip
    small = [
        (f"r{i}".encode(), orjson.dumps({"type": "batch_time", "run_id": f"r{i}", "seconds": 0.5}))
        for i in range(4)
    ]
    # An 800 kB key: its dead letter keeps a flagged prefix of the key and still fits the topic.
    long_key = b"k" * 800_000
    bad_key = orjson.dumps({"type": "batch_time", "run_id": "k", "seconds": 1.0})
    records = [
        (b"wide", prediction("wide", *wide), None),
        *((b"wider", prediction("wider", t, p), None) for t, p in wider),
        (long_key, bad_key, 0),
        *((k, v, None) for k, v in small),
    ]
    args = ["--bootstrap-servers", broker.bootstrap, "--input-topic", topic,
            "--output-topic", output, "--group-id", f"{topic}-group",
            "--partitions", str(PARTITIONS), "--interval", "1", "--window", str(WINDOW),
            "--time-window", "0", "--stats-interval", "0.5"]  # fmt: skip
    events = len(records) - 1
    with DaemonProcess(args, tmp_path / "daemon.log") as daemon:
        limits = daemon.wait_for_log(lambda ln: ln.get("event") == "message_limits", timeout=60)
        positions = produce_foreign(broker.bootstrap, topic, records)
        daemon.wait_for_log(lambda ln: ln.get("event") == "summary_reduced", timeout=60)
        later = [(k, v, None) for k, v in small]  # a second round, ticked after the reduction
        positions += produce_foreign(broker.bootstrap, topic, later)
        daemon.wait_for_log(
            lambda ln: ln.get("event") == "stats" and ln.get("events") == events + len(later),
            timeout=60,
        )
        assert daemon.terminate() == 0
    assert limits["limits"][output] == LIMIT and limits["max_message_bytes"][output] == LIMIT
    stopped = next(ln for ln in daemon.logs() if ln.get("event") == "stopped")
    assert stopped["publish_dropped"] == 0 and stopped["flushed"] is True
    assert stopped["summaries_reduced"]["sparse"] >= 1
    assert stopped["summaries_reduced"]["omitted"] >= 1

    (dlq,) = read_topic_foreign(
        broker.bootstrap, f"{topic}.dlq", range(PARTITIONS), until=lambda recs: len(recs) >= 1,
        timeout=30,
    )  # fmt: skip
    letter = orjson.loads(dlq[1])
    assert letter["key_truncated"] is True and letter["value_truncated"] is False
    assert base64.b64decode(letter["key_b64"]) == long_key[:16_384]
    assert base64.b64decode(letter["value_b64"]) == bad_key
    assert dlq[0] == long_key[:1024]

    wanted = {f"r{i}" for i in range(4)} | {"wide", "wider"}
    out = read_topic_foreign(
        broker.bootstrap, output, range(PARTITIONS),
        until=lambda recs: {orjson.loads(v).get("run_id") for _, v, _, _ in recs} >= wanted,
        timeout=30,
    )  # fmt: skip
    assert all(len(v) <= LIMIT for _, v, _, _ in out)
    summaries = [s for _, v, _, _ in out if (s := orjson.loads(v)).get("type") == "summary"]

    def newest(run: str) -> dict[str, Any]:
        return max((s for s in summaries if s["run_id"] == run), key=lambda s: s["seq"])

    y_true, y_pred = wide
    m = newest("wide")["metrics"]
    assert "confusion_matrix" not in m and "confusion_omitted" not in m
    cells = confusion_matrix(y_true, y_pred, labels=labels)
    t, p = np.nonzero(cells)
    assert m["confusion_sparse"] == np.stack([t, p, cells[t, p]], axis=1).tolist()
    assert m["labels"] == labels and m["accuracy"] == accuracy_score(y_true, y_pred)

    y_true = [y for t, _ in wider for y in t]
    y_pred = [y for _, p in wider for y in p]
    record = newest("wider")
    m = record["metrics"]
    assert record["count"] == 5000 and "confusion_matrix" not in m and "confusion_sparse" not in m
    assert "over the limit" in m["confusion_omitted"]
    present = sorted(set(y_true) | set(y_pred))
    support = np.bincount(y_true, minlength=1000)[present]
    top = np.sort(np.asarray(present)[np.lexsort((present, -support))[:100]])
    assert m["labels"] == top.tolist() and m["support"] == np.bincount(y_true)[top].tolist()
    assert m["labels_total"] == len(present) and m["labels_truncated"] is True
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    f1 = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert m["f1_macro"] == pytest.approx(f1, abs=1e-12)

    ends: dict[int, int] = defaultdict(int)
    for partition, offset in positions:
        ends[partition] = max(ends[partition], offset + 1)

    assert committed_offsets(broker.bootstrap, f"{topic}-group", topic, ends) == dict(ends)
