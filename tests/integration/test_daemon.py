"""End to end on the real broker: a foreign client produces, the daemon process summarises.

No mocks: Tansu (the embedded broker), the daemon as a child process, confluent-kafka as the
producer and reader (a second opinion that the wire format is plain Kafka). Every expectation is
computed by an oracle (numpy/scipy/sklearn) from the same events the test produced.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import committed_offsets, create_topics, produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker
from scipy import stats as sps
from sklearn import metrics as skm

pytestmark = pytest.mark.integration

PARTITIONS = 4
WINDOW = 50
SUMMARY_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "summary.schema.json").read_text()
)


def start_daemon(broker: DevBroker, topic: str, tmp_path: Path, *extra: str) -> DaemonProcess:
    """The daemon for ``topic`` (started by ``with``); same partitions and window in all tests."""
    return DaemonProcess(
        [
            "--bootstrap-servers",
            broker.bootstrap,
            "--input-topic",
            topic,
            "--output-topic",
            f"{topic}.out",
            "--group-id",
            f"{topic}-group",
            "--window",
            str(WINDOW),
            "--partitions",
            str(PARTITIONS),
            *extra,
        ],
        tmp_path / "daemon.log",
    )


def latest_by_stream(records: list[tuple[Any, ...]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest count-window summary per (run, stream), by seq."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for _, value, _, _ in records:
        rec = orjson.loads(value)
        if rec["type"] != "summary" or rec["window"]["kind"] != "count":
            continue
        key = (rec["run_id"], rec["stream"])
        if key not in latest or rec["seq"] > latest[key]["seq"]:
            latest[key] = rec
    return latest


def covers(expected_totals: dict[tuple[str, str], int]) -> Any:
    """A read predicate: every (run, stream) has a summary whose total reached the expected one."""

    def predicate(records: list[tuple[Any, ...]]) -> bool:
        latest = latest_by_stream(records)
        return all(k in latest and latest[k]["total"] >= n for k, n in expected_totals.items())

    return predicate


def test_summaries_match_the_oracle_and_bad_input_is_dead_lettered(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """Several runs' events from a foreign producer come back as oracle-exact summaries; bad
    records land on the dead-letter topic with reasons and original bytes, between good ones."""
    import jsonschema

    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    rng = np.random.default_rng(7)
    batch_times: dict[str, list[float]] = defaultdict(list)
    preds: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    records: list[tuple[bytes | None, bytes, int | None]] = []
    bad: list[tuple[bytes | None, bytes, str]] = [
        (b"run-0", b"{not json", "malformed_json"),
        (b"run-1", b'{"type":"batch_time","run_id":"run-1","seconds":NaN}', "non_finite"),
        (
            b"run-2",
            orjson.dumps({"type": "batch_time", "run_id": "run-2", "seconds": "fast"}),
            "schema",
        ),
        (
            b"run-3",
            orjson.dumps(
                {
                    "type": "prediction",
                    "run_id": "run-3",
                    "task": "binary",
                    "y_true": [0, 1, 1],
                    "y_pred": [0, 1],
                }
            ),
            "length_mismatch",
        ),
        (
            b"run-4",
            orjson.dumps(
                {
                    "type": "prediction",
                    "run_id": "run-4",
                    "task": "binary",
                    "y_true": [0, 2],
                    "y_pred": [0, 1],
                }
            ),
            "label_out_of_range",
        ),
        (
            b"\xff\xfe",
            orjson.dumps({"type": "batch_time", "run_id": "x", "seconds": 1.0}),
            "bad_key",
        ),
        (
            b"run-0",
            orjson.dumps({"type": "batch_time", "run_id": "run-0", "seconds": [0.1] * 20_000}),
            "oversized",
        ),
    ]
    for step in range(120):
        for r in range(5):
            run = f"run-{r}"
            s = float(rng.lognormal(-2 + 0.2 * r, 0.3))
            batch_times[run].append(s)
            records.append(
                (
                    run.encode(),
                    orjson.dumps(
                        {
                            "type": "batch_time",
                            "run_id": run,
                            "ts": 1_764_000_000.0 + step,
                            "step": step,
                            "seconds": s,
                        }
                    ),
                    None,
                )
            )
            if step % 10 == 0:
                yt = rng.integers(0, 2, 16)
                yp = np.where(rng.random(16) < 0.75, yt, 1 - yt)
                preds[run][0].extend(yt.tolist())
                preds[run][1].extend(yp.tolist())
                records.append(
                    (
                        run.encode(),
                        orjson.dumps(
                            {
                                "type": "prediction",
                                "run_id": run,
                                "ts": 1_764_000_000.0 + step,
                                "task": "binary",
                                "y_true": yt.tolist(),
                                "y_pred": yp.tolist(),
                            }
                        ),
                        None,
                    )
                )
        if step == 60:  # bad input in the middle of the stream
            records.extend((key, value, None) for key, value, _ in bad)

    with start_daemon(
        broker, topic, tmp_path, "--interval", "1", "--time-window", "0", "--max-array", "10000"
    ) as daemon:
        produce_foreign(broker.bootstrap, topic, records)
        expected = {(run, "batch_time"): len(v) for run, v in batch_times.items()}
        expected.update({(run, "prediction/val"): len(v[0]) for run, v in preds.items()})
        out = read_topic_foreign(
            broker.bootstrap, f"{topic}.out", range(PARTITIONS), until=covers(expected), timeout=60
        )
        latest = latest_by_stream(out)
        assert covers(expected)(out), f"missing summaries; daemon log:\n{daemon.tail()}"
        dlq = read_topic_foreign(
            broker.bootstrap,
            f"{topic}.dlq",
            range(PARTITIONS),
            until=lambda got: len(got) >= len(bad),
            timeout=30,
        )
        assert daemon.terminate() == 0

    validator = jsonschema.Draft202012Validator(SUMMARY_SCHEMA)
    for (run, stream), rec in latest.items():
        validator.validate(rec)
        m = rec["metrics"]
        if stream == "batch_time":
            window = np.array(batch_times[run][-WINDOW:])
            assert rec["count"] == WINDOW and rec["total"] == len(batch_times[run])
            assert m["mean"] == pytest.approx(window.mean(), rel=1e-9)
            assert m["std"] == pytest.approx(window.std(), rel=1e-9)
            assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-9)
            assert m["median"] == pytest.approx(np.median(window), rel=1e-9)
            assert m["skewness"] == pytest.approx(sps.skew(window), rel=1e-9)
            assert m["kurtosis"] == pytest.approx(sps.kurtosis(window), rel=1e-9)
        else:
            yt = np.array(preds[run][0][-WINDOW:])
            yp = np.array(preds[run][1][-WINDOW:])
            assert rec["task"] == "binary"
            assert m["f1"] == pytest.approx(skm.f1_score(yt, yp, zero_division=0))
            assert m["accuracy"] == pytest.approx(skm.accuracy_score(yt, yp))
            assert m["precision"] == pytest.approx(skm.precision_score(yt, yp, zero_division=0))
            assert m["recall"] == pytest.approx(skm.recall_score(yt, yp, zero_division=0))

    letters = [orjson.loads(value) for _, value, _, _ in dlq]
    got = sorted((d["reason"], base64.b64decode(d["value_b64"])) for d in letters)
    assert got == sorted((reason, value) for _, value, reason in bad)
    for d in letters:
        assert d["topic"] == topic and d["detail"]
    stopped = next(line for line in daemon.logs() if line.get("event") == "stopped")
    assert stopped["invalid"] == len(bad)
    assert stopped["events"] == len(records) - len(bad)


def test_sigterm_flushes_a_final_summary_and_commits(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """With no tick due, SIGTERM still publishes summaries of everything consumed and commits it."""

    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    values = {f"r{i}": [0.1 * (i + 1) + 0.01 * k for k in range(30)] for i in range(3)}
    records = [
        (run.encode(), orjson.dumps({"type": "batch_time", "run_id": run, "seconds": v}), None)
        for run, vs in values.items()
        for v in vs
    ]
    with start_daemon(
        broker, topic, tmp_path, "--interval", "3600", "--stats-interval", "0.3"
    ) as daemon:
        positions = produce_foreign(broker.bootstrap, topic, records)
        daemon.wait_for_log(
            lambda line: line.get("event") == "stats" and line.get("events") == len(records),
            timeout=60,
        )
        assert daemon.terminate() == 0
    out = read_topic_foreign(
        broker.bootstrap,
        f"{topic}.out",
        range(PARTITIONS),
        until=covers({(run, "batch_time"): 30 for run in values}),
        timeout=30,
    )
    latest = latest_by_stream(out)
    for run, vs in values.items():
        assert latest[(run, "batch_time")]["metrics"]["mean"] == pytest.approx(
            np.mean(vs), rel=1e-12
        )
        assert latest[(run, "batch_time")]["total"] == 30

    # Offsets committed for the group: one past the last record of each partition.
    ends: dict[int, int] = defaultdict(int)
    for partition, offset in positions:
        ends[partition] = max(ends[partition], offset + 1)

    assert committed_offsets(broker.bootstrap, f"{topic}-group", topic, ends) == dict(ends)
    stopped = next(line for line in daemon.logs() if line.get("event") == "stopped")
    # One tick (the final one): each run's stream in the count window and 2 default time windows.
    assert stopped["commits"] >= 1 and stopped["summaries"] == 3 * len(values)
