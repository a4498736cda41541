"""The training-side client without Kafka: a fake sender stands in for the broker.

Every record the emitter produces is validated against its schema (``schemas/*.schema.json``; the
``scalar`` format below, which the daemon does not know yet) and, for the known types, decoded by
the daemon's own ``Decoder``: what the client sends is what the daemon accepts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from metricsd.batching import Encoder, Queue
from metricsd.config import ConfigError
from metricsd.emitter import AsyncEmitter, Emitter
from metricsd.events import Decoder
from test_schemas import EVENT_TYPES, validator

VALIDATORS = {name: validator(name) for name in EVENT_TYPES}
DECODER = Decoder()


class FakeSender:
    """Collects records; ``gate`` cleared stalls every send; ``fail`` picks records to refuse."""

    def __init__(self, *, fail: Any = None, start_failures: int = 0) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.start_failures = start_failures
        self.starts = 0
        self.stopped = False
        self.in_send = threading.Event()

    async def start(self) -> None:
        self.starts += 1
        if self.starts <= self.start_failures:
            raise ConnectionError("broker away")

    async def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[BaseException | None]:
        self.in_send.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.005)
        results: list[BaseException | None] = []
        for key, value in records:
            if self.fail is not None and self.fail(orjson.loads(value)):
                results.append(RuntimeError("refused"))
            else:
                self.records.append((key, value))
                results.append(None)
        return results

    async def stop(self) -> None:
        self.stopped = True

    def docs(self, kind: str | None = None) -> list[dict[str, Any]]:
        docs = [orjson.loads(value) for _, value in self.records]
        return [d for d in docs if kind is None or d["type"] == kind]

    def user_scalars(self, name: str) -> list[dict[str, Any]]:
        return [d for d in self.docs("scalar") if d["name"] == name]


def valid(key: bytes, value: bytes) -> dict[str, Any]:
    """``value`` satisfies its schema; the daemon decodes it (known types); key is the run_id."""
    doc = orjson.loads(value)
    VALIDATORS[doc["type"]].validate(doc)
    assert key == doc["run_id"].encode()
    DECODER.decode(key, value)
    return doc


def flat(values: Any) -> list[float]:
    return values if isinstance(values, list) else [values]


def make(sender: FakeSender, **kwargs: Any) -> Emitter:
    kwargs.setdefault("linger", 0.02)
    kwargs.setdefault("heartbeat_interval", 0)
    return Emitter("run-1", sender=sender, **kwargs)


# ------------------------------------------------------------------ wire format
def test_every_call_sends_records_that_validate_and_the_daemon_accepts() -> None:
    """Each call type, in several input forms, yields schema-valid records the Decoder accepts."""
    sender = FakeSender()
    em = make(sender, rank=3, heartbeat_interval=60)
    em.batch_time(0.25, step=1)
    em.batch_time(np.float32(0.5))
    em.batch_time([0.1, 0.2])
    em.scalar("loss", 1.5, step=2)
    em.scalar("grad", np.array([1.0, 2.0], dtype=np.float32))
    em.scalars({"lr": 1e-3, "acc": np.float64(0.9)}, step=np.int64(3))
    em.predictions([0, 1, 1], np.array([True, False, True]), task="binary")
    em.predictions(np.array([0, 5, 999]), [0.0, 5.0, 2.0], task="multiclass", split="test")
    em.predictions(np.arange(4.0), np.arange(4, dtype=np.int32), task="regression", split="train")
    em.cv_fold(2, 0.5, np.float32(0.75))
    em.attention(np.full((2, 3), 1 / 3))
    em.attention([0.5, 0.5])
    em.features(np.eye(3, dtype=np.float32))
    em.features([1, -2, 3])
    assert em.close("failed", run_end=True) is True  # rank 3 would leave run_end to rank 0
    docs = [valid(k, v) for k, v in sender.records]
    assert {d["type"] for d in docs} == set(VALIDATORS)
    assert all(d["rank"] == 3 for d in docs)
    assert all(isinstance(d["ts"], float) for d in docs)
    assert docs[-1] == {**docs[-1], "type": "run_end", "status": "failed"}
    assert docs[-2]["name"] == "emitter/dropped" and docs[-2]["value"] == 0
    by_type = {d["type"]: d for d in docs}
    assert flat(by_type["batch_time"]["seconds"]) == [0.25, 0.5, 0.1, 0.2]
    multiclass = next(d for d in docs if d.get("task") == "multiclass")
    assert multiclass == {**multiclass, "split": "test", "y_true": [0, 5, 999], "y_pred": [0, 5, 2]}
    binary = next(d for d in docs if d.get("task") == "binary")
    assert binary["y_pred"] == [1, 0, 1] and "split" not in binary
    assert next(d for d in docs if d["type"] == "cv_fold")["val_loss"] == 0.75
    assert sender.user_scalars("acc")[0]["step"] == 3


def test_coalesced_batch_times_carry_the_rank_and_ranks_never_share_an_event() -> None:
    """Two ranks' emitters of one run into one sender: every batch_time record (each coalescing
    several calls) decodes to a BatchTime with its emitter's rank, and holds only that emitter's
    values (one Encoder per emitter: different ranks cannot be coalesced together)."""
    sender = FakeSender()
    ems = [make(sender, rank=r) for r in (0, 1)]
    for step in range(50):
        for r, em in enumerate(ems):
            em.batch_time(r + step / 100, step=step)
    for em in ems:
        assert em.close()
    seen: dict[int, list[float]] = {0: [], 1: []}
    coalesced = 0
    for key, value in sender.records:
        doc = valid(key, value)
        if doc["type"] != "batch_time":
            continue
        event = DECODER.decode(key, value)
        assert event.rank == doc["rank"] in (0, 1)
        values = flat(doc["seconds"])
        coalesced += len(values) > 1
        assert all(int(v) == event.rank for v in values)  # rank r sent only r + step/100
        seen[event.rank].extend(values)
    assert coalesced > 0
    assert seen == {r: [r + step / 100 for step in range(50)] for r in (0, 1)}


def test_rank_is_absent_when_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    sender = FakeSender()
    em = make(sender)
    em.scalar("x", 1.0)
    em.close()
    assert all("rank" not in valid(k, v) for k, v in sender.records)


# ------------------------------------------------------------------ the pure core
def test_encoder_coalesces_per_stream_in_order_and_keeps_single_items_scalar() -> None:
    """Interleaved step times and scalars become one event per stream, values in call order,
    step and ts of the last item; a single item keeps its number form."""
    enc = Encoder("r", 0)
    items = []
    for i in range(5):
        items.append(("batch_time", "batch_time", 0.1 * i, i, 100.0 + i))
        items.append(("scalar", "loss", float(i), i, 100.0 + i))
    items.append(("scalar", "lr", 0.5, None, 200.0))
    pairs = ("binary", None, np.array([0, 1]), np.array([1, 1]))
    items.append(("prediction", None, pairs, None, 9.0))
    docs = [orjson.loads(v) for _, v, _ in enc.encode(items)]
    assert [d["type"] for d in docs] == ["batch_time", "scalar", "scalar", "prediction"]
    assert docs[0]["seconds"] == [0.1 * i for i in range(5)] and docs[0]["step"] == 4
    assert docs[0]["ts"] == 104.0
    assert docs[1] == {
        "type": "scalar",
        "run_id": "r",
        "rank": 0,
        "name": "loss",
        "value": [0.0, 1.0, 2.0, 3.0, 4.0],
        "step": 4,
        "ts": 104.0,
    }
    assert docs[2]["value"] == 0.5 and "step" not in docs[2]
    assert [n for _, _, n in enc.encode(items)] == [5, 5, 1, 1]


def test_encoder_caps_arrays_at_max_items_and_run_end_is_a_barrier() -> None:
    """Coalesced arrays never exceed max_items; an array item counts its elements; nothing after
    run_end joins an event before it."""
    enc = Encoder("r", max_items=4)
    items: list[Any] = [("batch_time", "batch_time", float(i), None, 1.0) for i in range(3)]
    items.append(("batch_time", "batch_time", np.array([3.0, 4.0]), None, 1.0))
    items.append(("batch_time", "batch_time", 5.0, None, 1.0))
    items.append(("run_end", None, "completed", None, 2.0))
    items.append(("batch_time", "batch_time", 6.0, None, 3.0))
    docs = [orjson.loads(v) for _, v, _ in enc.encode(items)]
    assert [(d["type"], d.get("seconds")) for d in docs] == [
        ("batch_time", [0.0, 1.0, 2.0]),
        ("batch_time", [3.0, 4.0, 5.0]),
        ("run_end", None),
        ("batch_time", 6.0),
    ]


def test_queue_drop_oldest_counts_and_settles() -> None:
    q = Queue(3)
    for i in range(5):
        q.put(("scalar", "x", float(i), None, 0.0))
    assert [item[2] for item in q.take()] == [2.0, 3.0, 4.0]
    assert (q.accepted, q.dropped, q.settled) == (5, 2, 2)
    q.settle(3)
    assert q.wait_settled(5, 0)
    with pytest.raises(ValueError, match="policy"):
        Queue(3, "drop_newest")


# ------------------------------------------------------------------ through the thread
def test_a_training_loop_is_coalesced_into_few_records_in_order() -> None:
    """1,000 steps of batch_time + 3 scalars arrive complete and in call order in a handful of
    records per stream (linger 0.2 s), not one per call."""
    sender = FakeSender()
    em = make(sender, linger=0.2)
    rng = np.random.default_rng(0)
    seconds = rng.random(1000).tolist()
    for step, s in enumerate(seconds):
        em.batch_time(s, step=step)
        em.scalars({"loss": 1.0 / (step + 1), "lr": 0.01, "grad_norm": s * 2}, step=step)
        if step % 100 == 0:
            time.sleep(0.02)
    assert em.close(timeout=10)
    docs = [valid(k, v) for k, v in sender.records]
    got = [x for d in docs if d["type"] == "batch_time" for x in flat(d["seconds"])]
    assert got == seconds
    loss = [x for d in sender.user_scalars("loss") for x in flat(d["value"])]
    assert loss == [1.0 / (i + 1) for i in range(1000)]
    assert len(sender.docs("batch_time")) < 40
    steps = [d["step"] for d in sender.docs("batch_time")]
    assert steps == sorted(steps) and steps[-1] == 999
    stats = em.stats()
    assert stats["sent"] == stats["enqueued"] == 4001 and stats["dropped"] == 0
    assert stats["records_sent"] == len(sender.records)  # heartbeat_interval=0: none sent


def test_stalled_sender_drops_the_oldest_counts_it_and_calls_stay_fast() -> None:
    """With the sender stuck, calls keep returning at once; the queue keeps the newest items, the
    dropped count is exact and reported by the emitter/dropped heartbeat."""
    sender = FakeSender()
    sender.gate.clear()
    em = make(sender, queue_size=10, heartbeat_interval=60)
    em.scalar("x", -1.0)
    assert sender.in_send.wait(5)  # the thread is now stuck sending the first batch
    start = time.perf_counter()
    for i in range(1000):
        em.scalar("x", float(i))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"1,000 calls took {elapsed:.3f} s with a stalled sender"
    stats = em.stats()
    assert stats["dropped"] == 990 and stats["queue_depth"] == 10
    sender.gate.set()
    assert em.flush(5)  # before close: its run_end would displace the oldest of a full queue
    assert em.close()
    values = [x for d in sender.user_scalars("x") for x in flat(d["value"])]
    assert values == [-1.0] + [float(i) for i in range(990, 1000)]
    stats = em.stats()
    assert stats["dropped"] == 990 and stats["sent"] == 12  # 11 scalars + run_end
    assert stats["enqueued"] == stats["sent"] + stats["dropped"] + stats["delivery_errors"]
    assert sender.user_scalars("emitter/dropped")[-1]["value"] == 990


def test_block_policy_waits_for_room_and_loses_nothing() -> None:
    sender = FakeSender()
    sender.gate.clear()
    em = make(sender, queue_size=5, policy="block")
    em.scalar("x", -1.0)
    assert sender.in_send.wait(5)
    done = threading.Event()

    def produce() -> None:
        for i in range(50):
            em.scalar("x", float(i))
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert not done.wait(0.3), "a full queue under policy='block' did not block"
    assert em.stats()["queue_depth"] == 5
    sender.gate.set()
    assert done.wait(5)
    thread.join()
    assert em.close()
    values = [x for d in sender.user_scalars("x") for x in flat(d["value"])]
    assert values == [-1.0] + [float(i) for i in range(50)]
    assert em.stats()["dropped"] == 0


def test_delivery_errors_and_reconnects_are_counted() -> None:
    """Records the broker refuses count as delivery errors (and in the heartbeat); a sender that
    cannot start at first is retried until it can."""
    sender = FakeSender(
        fail=lambda d: d["type"] == "scalar" and d["name"] == "bad", start_failures=2
    )
    em = make(sender, heartbeat_interval=60)
    for i in range(10):
        em.scalar("bad", float(i))
    assert em.flush(10) is True  # settled: delivered or failed
    em.scalar("good", 1.0)
    assert em.close()
    stats = em.stats()
    assert stats["connect_errors"] == 2 and sender.starts == 3
    assert stats["delivery_errors"] == 10 and stats["sent"] == 2
    assert sender.user_scalars("emitter/dropped")[-1]["value"] == 10
    assert sender.stopped


def test_heartbeat_is_periodic() -> None:
    sender = FakeSender()
    em = make(sender, heartbeat_interval=0.1)
    time.sleep(0.6)
    em.close()
    beats = sender.user_scalars("emitter/dropped")
    assert len(beats) >= 3 and all(b["value"] == 0 for b in beats)
    assert em.stats()["heartbeats"] == len(beats)
    assert all("step" not in b for b in beats)


def test_flush_without_a_broker_returns_false_in_time_and_close_drops_the_rest() -> None:
    sender = FakeSender(start_failures=10**9)
    em = make(sender)
    em.batch_time(0.1)
    start = time.monotonic()
    assert em.flush(0.3) is False
    assert em.close(timeout=0.3) is False
    assert time.monotonic() - start < 3
    stats = em.stats()
    assert stats["dropped"] == 2 and stats["sent"] == 0  # batch_time and run_end
    em.scalar("late", 1.0)  # after close: counted, not raised
    assert em.stats()["dropped"] == 3


def test_step_timer_and_timed_loader_send_durations_and_steps() -> None:
    sender = FakeSender()
    em = make(sender)
    with em.step(step=7):
        time.sleep(0.02)
    batches = []
    for batch in em.timed(iter(range(3)), start=10):
        batches.append(batch)
        time.sleep(0.01 * (batch + 1))
    em.close()
    assert batches == [0, 1, 2]
    seconds = [x for d in sender.docs("batch_time") for x in flat(d["seconds"])]
    assert len(seconds) == 4
    assert seconds[0] >= 0.02 and all(s >= 0.01 * (i + 1) for i, s in enumerate(seconds[1:]))
    assert sender.docs("batch_time")[-1]["step"] == 12


def test_numpy_and_array_like_inputs_are_copied_once_at_the_call() -> None:
    """NumPy arrays (reused by the caller after the call), objects with __array__, and a
    "CUDA tensor" (copied to host once via .detach().cpu()) all send the values of the call."""

    class ArrayLike:
        def __init__(self, values: list[float]) -> None:
            self.values = values

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return np.array(self.values, dtype=dtype)

    class Device:
        type = "cuda"

    class CudaTensor:
        device = Device()
        cpu_calls = 0

        def __init__(self, values: np.ndarray) -> None:
            self.values = values

        def detach(self) -> CudaTensor:
            return self

        def cpu(self) -> ArrayLike:
            CudaTensor.cpu_calls += 1
            return ArrayLike(self.values.tolist())

        def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
            raise AssertionError("a CUDA tensor cannot be read directly")

    sender = FakeSender()
    em = make(sender)
    buffer = np.array([0.5, 0.25, 0.125])
    em.features(buffer)
    buffer[:] = -1.0  # the caller reuses its buffer
    em.attention(ArrayLike([0.2, 0.8]))
    em.predictions(CudaTensor(np.array([0, 1])), CudaTensor(np.array([1, 1])))
    em.scalar("t", ArrayLike([3.0]))
    em.batch_time(np.array(0.5))
    em.features(np.arange(6.0).reshape(2, 3).T)  # not C-contiguous
    em.close()
    docs = [valid(k, v) for k, v in sender.records]
    assert docs[0]["values"] == [0.5, 0.25, 0.125]
    assert docs[1]["weights"] == [0.2, 0.8]
    assert (docs[2]["y_true"], docs[2]["y_pred"]) == ([0, 1], [1, 1])
    assert CudaTensor.cpu_calls == 2
    assert sender.user_scalars("t")[0]["value"] == [3.0]
    assert sender.docs("batch_time")[0]["seconds"] == 0.5
    assert sender.docs("features")[1]["values"] == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda em: em.batch_time(float("nan")), ValueError, "finite"),
        (lambda em: em.batch_time(-0.1), ValueError, ">= 0"),
        (lambda em: em.batch_time("0.1"), TypeError, "numbers"),
        (lambda em: em.batch_time(True), TypeError, "numbers"),
        (lambda em: em.batch_time(0.1, step=-1), ValueError, "step"),
        (lambda em: em.batch_time(0.1, step=1.5), TypeError, "step"),
        (lambda em: em.batch_time([]), ValueError, "empty"),
        (lambda em: em.batch_time([0.1, float("inf")]), ValueError, "finite"),
        (lambda em: em.scalar("", 1.0), ValueError, "name"),
        (lambda em: em.scalar(3, 1.0), TypeError, "name"),
        (lambda em: em.scalar("x", None), TypeError, "numbers"),
        (lambda em: em.scalar("x", 10**400), ValueError, "float64"),
        (lambda em: em.scalar("x", np.ones((2, 2))), ValueError, "1-D"),
        (lambda em: em.scalars({"a": 1.0, "b": "high"}), TypeError, "numbers"),
        (lambda em: em.scalars("loss"), TypeError, "mapping"),
        (lambda em: em.scalar("x", 1 + 2j), TypeError, "complex"),
        (lambda em: em.scalar("x", np.array(["1.0"])), TypeError, "dtype"),
        (lambda em: em.predictions([0, 1], [0]), ValueError, "y_pred has 1"),
        (lambda em: em.predictions([0, 2], [0, 1]), ValueError, r"\[0, 2\)"),
        (lambda em: em.predictions([0, 0.5], [0, 1]), ValueError, "integers"),
        (lambda em: em.predictions([0, 1], [0, 1], task="ranking"), ValueError, "task"),
        (lambda em: em.predictions([0, 1], [0, 1], split="a b"), ValueError, "split"),
        (lambda em: em.predictions(["a"], ["b"]), TypeError, "labels"),
        (lambda em: em.predictions([0, 1000], [0, 1], task="multiclass"), ValueError, "1000"),
        (lambda em: em.predictions([0.0, np.nan], [0.0, 1], task="regression"), ValueError, "fin"),
        (lambda em: em.predictions(np.zeros(10_001), np.zeros(10_001)), ValueError, "10000"),
        (lambda em: em.cv_fold(-1, 0.1, 0.2), ValueError, "fold"),
        (lambda em: em.cv_fold(0, [0.1], 0.2), ValueError, "one number"),
        (lambda em: em.attention([[0.5, 0.5], [1.0]]), ValueError, "ragged"),
        (lambda em: em.attention([0.5, -0.5]), ValueError, ">= 0"),
        (lambda em: em.attention(np.ones((2, 2, 2))), ValueError, "1-D or 2-D"),
        (lambda em: em.features([True, False]), TypeError, "booleans"),
        (lambda em: em.features(object()), TypeError, "array-like"),
        (lambda em: em.close(status=""), ValueError, "status"),
    ],
)
def test_bad_input_raises_at_the_call_and_queues_nothing(call: Any, error: Any, match: str) -> None:
    sender = FakeSender()
    em = make(sender)
    with pytest.raises(error, match=match):
        call(em)
    assert em.stats()["enqueued"] == 0
    em.close()
    assert [d["type"] for d in sender.docs()] == ["run_end"]


@pytest.mark.parametrize(
    ("rank", "run_end", "sent"),
    [(None, None, True), (0, None, True), (1, None, False), (7, True, True), (0, False, False)],
)
def test_only_rank_0_ends_a_distributed_run_unless_told(
    rank: int | None, run_end: bool | None, sent: bool
) -> None:
    """The daemon ends a run on its first run_end: a rank closing early must not end it for the
    ranks still training, so only rank 0 (or an emitter without rank) sends it by default."""
    sender = FakeSender()
    em = make(sender, rank=rank)
    em.batch_time(0.1)
    assert em.close(run_end=run_end)
    types = [d["type"] for d in sender.docs()]
    assert types[0] == "batch_time" and ("run_end" in types) is sent


def test_a_non_finite_scalar_is_sent_as_null_and_reaches_the_daemon_as_nan() -> None:
    """A NaN or infinite loss is a training fault to surface, not bad input: it is queued, sent as
    null (JSON has no NaN) and decoded by the daemon as NaN, to be counted as non_finite."""
    sender = FakeSender()
    em = make(sender)
    em.scalar("loss", float("nan"), step=1)
    em.scalar("loss", float("inf"), step=2)
    em.scalar("loss", np.array([0.5, np.nan]), step=3)
    em.close()
    (doc,) = sender.user_scalars("loss")
    assert doc["value"] == [None, None, 0.5, None]
    key, value = next((k, v) for k, v in sender.records if b'"loss"' in v)
    event = DECODER.decode(key, value)
    assert np.array_equal(event.value, [np.nan, np.nan, 0.5, np.nan], equal_nan=True)  # type: ignore[union-attr]


# ------------------------------------------------------------------ configuration, modes
def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICSD_RUN_ID", "from-env")
    monkeypatch.setenv("METRICSD_BOOTSTRAP_SERVERS", "kafka:9093")
    monkeypatch.setenv("METRICSD_INPUT_TOPIC", "my.events")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    em = Emitter(enabled=False)
    assert (em.run_id, em.bootstrap_servers, em.topic) == ("from-env", "kafka:9093", "my.events")
    assert (em.rank, em.world_size) == (5, 8)
    em = Emitter("arg", bootstrap_servers="b:1", topic="t", rank=0, world_size=1, enabled=False)
    assert (em.run_id, em.bootstrap_servers, em.topic, em.rank, em.world_size) == (
        "arg",
        "b:1",
        "t",
        0,
        1,
    )
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert Emitter(enabled=False).rank == 2
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK"):
        Emitter(enabled=False)


def test_security_from_the_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICSD_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="sasl-mechanism"):
        Emitter("r")


def test_disabled_is_a_no_op_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    before = threading.active_count()
    monkeypatch.setenv("METRICSD_DISABLED", "1")
    for em in (Emitter("r"), Emitter("r", enabled=False)):
        em.batch_time(float("nan"))  # not even validated
        em.scalar("x", 1.0)
        em.predictions([0], [1])
        assert em.flush(0) and em.close()
        assert em.stats()["enqueued"] == 0 and not em.stats()["enabled"]
    assert threading.active_count() == before


def test_async_emitter_shares_the_core() -> None:
    sender = FakeSender()

    async def main() -> dict[str, Any]:
        async with AsyncEmitter("run-1", sender=sender, linger=0.02) as em:
            for i in range(100):
                em.batch_time(0.001 * i, step=i)
                em.scalar("loss", 1.0)
            assert await em.flush(5)
        return em.stats()

    stats = asyncio.run(main())
    assert stats["sent"] == 201 and stats["closed"]
    assert [valid(k, v)["type"] for k, v in sender.records][-1] == "run_end"
    with pytest.raises(ConfigError, match="block"):
        AsyncEmitter("r", policy="block", enabled=False)


def test_import_metricsd_imports_no_kafka_and_starts_no_thread() -> None:
    code = (
        "import sys, threading, metricsd\n"
        "assert 'aiokafka' not in sys.modules and 'metricsd.emitter' not in sys.modules\n"
        "E = metricsd.Emitter\n"
        "assert E.__module__ == 'metricsd.emitter' and metricsd.AsyncEmitter\n"
        "assert 'aiokafka' not in sys.modules and threading.active_count() == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ fork and exit
def test_a_forked_child_gets_a_disabled_emitter_and_the_parent_keeps_working() -> None:
    sender = FakeSender()
    em = make(sender)
    em.scalar("before", 1.0)
    pid = os.fork()
    if pid == 0:  # the child: no pytest reporting from here, only the exit status
        status = 1
        try:
            em.scalar("child", 2.0)
            em.batch_time(float("nan"))  # disabled: a no-op
            start = time.monotonic()
            ok = em.flush(5) is not None and em.close() is not None
            stats = em.stats()
            if ok and time.monotonic() - start < 1 and stats["forked"] and stats["ignored"] == 2:
                status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    em.scalar("after", 3.0)
    assert em.close()
    assert [d["name"] for d in sender.docs("scalar")] == ["before", "after"]
    assert not em.stats()["forked"]


def test_atexit_flushes_an_emitter_that_was_not_closed(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    script = textwrap.dedent(
        f"""
        from metricsd.emitter import Emitter

        class FileSender:
            async def start(self):
                pass
            async def send(self, records):
                with open({str(out)!r}, "ab") as f:
                    for _, value in records:
                        f.write(value + b"\\n")
                return [None] * len(records)
            async def stop(self):
                pass

        em = Emitter("exit-run", sender=FileSender(), linger=3600, heartbeat_interval=0)
        for i in range(5):
            em.batch_time(0.1 * i, step=i)
        em.scalar("loss", 0.5)
        # no close(): the atexit hook must deliver, within atexit_timeout
        """
    )
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert time.monotonic() - start < 30
    docs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [d["type"] for d in docs] == ["batch_time", "scalar"]
    assert docs[0]["seconds"] == [0.1 * i for i in range(5)]


# ------------------------------------------------------------------ real torch
def test_real_torch_tensors_are_read_once_at_the_call() -> None:
    """A loss with autograd history, a 0-d tensor, float32 and int64 tensors: sent with the values
    they had at the call (a tensor changed in place afterwards does not change what is sent)."""
    import torch

    sender = FakeSender()
    em = make(sender)
    w = torch.tensor([1.5, -2.0], requires_grad=True)
    loss = (w**2).sum()  # 6.25, requires grad
    em.scalar("loss", loss, step=torch.tensor(3).item())
    em.scalar("lr", torch.tensor(1e-3, dtype=torch.float64))
    logits = torch.tensor([0.1, 0.9, 0.4], dtype=torch.float32)
    em.features(logits)
    logits.fill_(-1.0)  # reused by the caller
    labels = torch.tensor([0, 1, 1])
    em.predictions(labels, torch.tensor([0, 1, 0]), task="binary")
    labels[:] = 0
    em.batch_time(torch.tensor([0.25, 0.5]))
    em.close()
    docs = [valid(k, v) for k, v in sender.records]
    assert sender.user_scalars("loss")[0]["value"] == 6.25
    assert sender.user_scalars("loss")[0]["step"] == 3
    assert sender.user_scalars("lr")[0]["value"] == 1e-3
    features = next(d for d in docs if d["type"] == "features")
    assert features["values"] == pytest.approx([0.1, 0.9, 0.4], rel=1e-7)
    prediction = next(d for d in docs if d["type"] == "prediction")
    assert (prediction["y_true"], prediction["y_pred"]) == ([0, 1, 1], [0, 1, 0])
    assert sender.docs("batch_time")[0]["seconds"] == [0.25, 0.5]
    assert w.grad is None  # the emitter did not touch autograd


class _Numbers:
    """A map-style dataset whose items are their index; its workers are forked processes."""

    def __init__(self, em: Emitter, n: int) -> None:
        self.em, self.n = em, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> float:
        self.em.scalar("from_worker", float(i))  # in a forked worker: disabled, ignored
        return float(i)


def test_dataloader_workers_forked_from_a_live_emitter_neither_hang_nor_send() -> None:
    """A real torch DataLoader with 2 forked workers iterated through ``em.timed`` while the
    emitter's thread runs: every batch arrives, every batch's time is sent by the parent, the
    workers' calls (their emitter copies are disabled) send nothing and hang nothing."""
    import multiprocessing

    import torch

    sender = FakeSender()
    em = make(sender)
    loader = torch.utils.data.DataLoader(
        _Numbers(em, 64),
        batch_size=8,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    start = time.monotonic()
    seen = [float(x) for batch in em.timed(loader, start=0) for x in batch]
    assert time.monotonic() - start < 30
    assert seen == [float(i) for i in range(64)]
    assert em.close(timeout=10)
    docs = sender.docs("batch_time")
    assert sum(len(flat(d["seconds"])) for d in docs) == 8 and docs[-1]["step"] == 7
    assert sender.user_scalars("from_worker") == []


def test_atexit_flush_is_bounded_when_the_broker_never_answers(tmp_path: Path) -> None:
    """An emitter left open whose sends never complete: the interpreter still exits, after about
    ``atexit_timeout`` (1 s here), not never."""
    script = textwrap.dedent(
        """
        import asyncio
        from metricsd.emitter import Emitter

        class Stuck:
            async def start(self):
                pass
            async def send(self, records):
                await asyncio.sleep(3600)
            async def stop(self):
                pass

        em = Emitter("stuck", sender=Stuck(), linger=0.01, heartbeat_interval=0, atexit_timeout=1)
        em.scalar("loss", 0.5)
        print("queued", flush=True)
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0 and proc.stdout == "queued\n", proc.stderr
    assert 1.0 <= elapsed < 10, elapsed
