"""The Hugging Face and Keras callbacks on the real broker: tiny models train on CPU, the daemon
summarises what the callbacks sent.

The same approach as ``test_integrations_broker.py`` (Lightning): no mocks — Tansu, the daemon as a
child process, the emitter's own aiokafka producer, confluent-kafka reading back. The oracle is
NumPy/SciPy (and sklearn for predictions) on exactly what each callback handed the emitter,
recorded by an ``Emitter`` subclass at the call, before anything is queued. The daemon's final
count-window summaries (published on the callback's ``run_end``) must equal it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess, daemon_on
from kafka_tools import ReadRecord, create_topics, read_topic_foreign
from metricsd.devbroker import DevBroker
from metricsd.emitter import Emitter
from scipy import stats as sps
from test_integrations import hf_trainer

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported; no TensorFlow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.integration

PARTITIONS = 2
WINDOW = 256  # >= every stream's value count below: the count window holds the whole run
SUMMARY_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "summary.schema.json").read_text()
)


class RecordingEmitter(Emitter):
    """Step times, scalars and predictions exactly as the callback hands them to the emitter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []
        self.scalar_values: dict[str, list[float]] = {}
        self.prediction_calls: list[tuple[str, str | None, np.ndarray, np.ndarray]] = []

    def batch_time(self, seconds: Any, step: int | None = None) -> None:
        self.seconds.append(seconds)
        super().batch_time(seconds, step)

    def scalar(self, name: str, value: Any, step: int | None = None) -> None:
        self.scalar_values.setdefault(name, []).append(value)
        super().scalar(name, value, step)

    def scalars(self, values: Any, step: int | None = None) -> None:
        for name, value in values.items():
            self.scalar_values.setdefault(name, []).append(value)
        super().scalars(values, step)

    def predictions(
        self, y_true: Any, y_pred: Any, *, task: str = "binary", split: str | None = None
    ) -> None:
        self.prediction_calls.append(
            (task, split, np.array(y_true, copy=True), np.array(y_pred, copy=True))
        )
        super().predictions(y_true, y_pred, task=task, split=split)


def start_daemon(broker: DevBroker, topic: str, tmp_path: Path) -> DaemonProcess:
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    return daemon_on(
        broker.bootstrap, topic, tmp_path / "daemon.log", "--window", str(WINDOW), "--interval",
        "1", "--time-window", "0", partitions=PARTITIONS,
    )  # fmt: skip


def final_summaries(records: Iterable[ReadRecord], run: str) -> dict[str, dict[str, Any]]:
    """The final count-window summary of each stream of ``run``, by stream name."""
    out: dict[str, dict[str, Any]] = {}
    for _, value, _, _ in records:
        assert value is not None
        rec = orjson.loads(value)
        if (
            rec["type"] == "summary"
            and rec["run_id"] == run
            and rec["window"]["kind"] == "count"
            and rec["final"]
        ):
            assert rec["stream"] not in out, f"two final summaries for {rec['stream']}"
            out[rec["stream"]] = rec
    return out


def read_finals(
    broker: DevBroker, topic: str, run: str, streams: set[str], daemon: DaemonProcess
) -> dict[str, dict[str, Any]]:
    """Wait (up to 60 s) until the output topic holds a final summary for every one of
    ``streams``; validate each against the summary schema."""
    out = read_topic_foreign(
        broker.bootstrap,
        f"{topic}.out",
        range(PARTITIONS),
        until=lambda got: streams <= set(final_summaries(got, run)),
        timeout=60,
    )
    finals = final_summaries(out, run)
    missing = streams - set(finals)
    assert not missing, f"no final summary for {sorted(missing)}; daemon log:\n{daemon.tail()}"
    validator = jsonschema.Draft202012Validator(SUMMARY_SCHEMA)
    for summary in finals.values():
        validator.validate(summary)
        assert summary["window"] == {"kind": "count", "size": WINDOW}
    return finals


def assert_stats(summary: dict[str, Any], values: list[float]) -> None:
    """The window statistics of ``summary`` equal NumPy/SciPy on ``values`` (all of the run)."""
    window = np.array(values, dtype=np.float64)
    assert len(window) > 2
    m = summary["metrics"]
    assert summary["total"] == summary["count"] == m["count"] == len(window)
    assert m["mean"] == pytest.approx(window.mean(), rel=1e-9)
    assert m["std"] == pytest.approx(window.std(), rel=1e-9)
    assert m["min"] == window.min() and m["max"] == window.max()
    assert m["median"] == pytest.approx(np.median(window), rel=1e-9)
    assert m["p95"] == pytest.approx(np.percentile(window, 95), rel=1e-9)
    assert m["p99"] == pytest.approx(np.percentile(window, 99), rel=1e-9)
    assert m["cv"] == pytest.approx(window.std() / window.mean(), rel=1e-9)
    assert m["skewness"] == pytest.approx(sps.skew(window), rel=1e-9)
    assert m["kurtosis"] == pytest.approx(sps.kurtosis(window), rel=1e-9)


def assert_scalar_streams(
    finals: dict[str, dict[str, Any]], recorded: dict[str, list[float]]
) -> None:
    """Every scalar the callback sent has a final summary with as many values, their mean, and
    no non-finite value."""
    for name, values in recorded.items():
        summary = finals[f"scalar/{name}"]
        assert summary["total"] == summary["count"] == len(values), name
        assert summary["metrics"]["non_finite"] == 0, name
        assert summary["metrics"]["count"] == len(values), name
        assert summary["metrics"]["mean"] == pytest.approx(np.mean(values), rel=1e-9), name


def assert_input_topic(broker: DevBroker, topic: str, run: str, em: RecordingEmitter) -> None:
    """The input topic holds the step times in call order and ends with run_end "completed"."""
    inputs = read_topic_foreign(
        broker.bootstrap,
        topic,
        range(PARTITIONS),
        until=lambda got: any(
            v is not None and orjson.loads(v)["type"] == "run_end" for _, v, _, _ in got
        ),
        timeout=30,
    )
    docs = [orjson.loads(value) for _, value, _, _ in inputs if value is not None]
    sent: list[float] = []
    for d in docs:
        if d["type"] == "batch_time":
            sent.extend(d["seconds"] if isinstance(d["seconds"], list) else [d["seconds"]])
    assert sent == em.seconds
    assert docs[-1]["type"] == "run_end" and docs[-1]["status"] == "completed"
    assert all(key == run.encode() for key, _, _, _ in inputs)


def assert_delivered(em: RecordingEmitter, callback: Any) -> None:
    stats = em.stats()
    assert stats["closed"] and callback.errors == 0 and callback.non_finite == 0
    assert stats["sent"] == stats["enqueued"], f"not delivered: {stats}"
    assert stats["dropped"] == stats["delivery_errors"] == 0


# ------------------------------------------------------------------ Hugging Face transformers
HF_RUN = "hf-run"
HF_TRAIN, HF_EVAL, HF_BATCH, HF_EPOCHS = 192, 40, 8, 2  # as hf_trainer trains and evaluates
HF_STEPS = HF_EPOCHS * HF_TRAIN // HF_BATCH  # 48


def test_transformers_trainer_steps_losses_and_predictions_reach_the_daemon_and_match(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """48 Trainer steps of a tiny BERT built from a config (random weights, no download),
    logging_steps=1, an eval per epoch through the callback's compute_metrics: the daemon's final
    summaries equal NumPy/SciPy on the step times and the logged losses the callback sent, and
    sklearn on the eval labels/argmax predictions the wrapper sent (prediction/val)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    metrics = pytest.importorskip("sklearn.metrics")
    from metricsd.integrations.transformers import MetricsdCallback

    topic = topic_name
    daemon = start_daemon(broker, topic, tmp_path)
    seen: list[Any] = []

    def accuracy(eval_pred: Any) -> dict[str, float]:
        seen.append(eval_pred)
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    with daemon:
        em = RecordingEmitter(HF_RUN, bootstrap_servers=broker.bootstrap, topic=topic, linger=0.2)
        callback = MetricsdCallback(em, close_timeout=60)
        trainer = hf_trainer(
            transformers, tmp_path, [callback], train=HF_TRAIN,
            compute_metrics=callback.compute_metrics(accuracy),
        )  # fmt: skip
        trainer.train()
        assert trainer.state.global_step == HF_STEPS and len(em.seconds) == HF_STEPS
        assert_delivered(em, callback)
        # what the callback sent is what the Trainer logged
        train_logs = [h for h in trainer.state.log_history if "loss" in h]
        assert em.scalar_values["loss"] == [h["loss"] for h in train_logs]
        assert len(em.scalar_values["loss"]) == HF_STEPS
        assert len(seen) == len(em.prediction_calls) == HF_EPOCHS
        for (task, split, y_true, y_pred), eval_pred in zip(em.prediction_calls, seen, strict=True):
            assert (task, split) == ("multiclass", "val")
            assert y_true.tolist() == eval_pred.label_ids.tolist()
            assert y_pred.tolist() == eval_pred.predictions.argmax(-1).tolist()

        streams = {"batch_time", "prediction/val"} | {f"scalar/{n}" for n in em.scalar_values}
        finals = read_finals(broker, topic, HF_RUN, streams, daemon)
        assert_stats(finals["batch_time"], em.seconds)
        assert_stats(finals["scalar/loss"], em.scalar_values["loss"])
        assert finals["scalar/loss"]["metrics"]["non_finite"] == 0
        assert_scalar_streams(finals, em.scalar_values)

        pred = finals["prediction/val"]
        y_true = np.concatenate([c[2] for c in em.prediction_calls])
        y_pred = np.concatenate([c[3] for c in em.prediction_calls])
        assert pred["task"] == "multiclass"
        assert pred["total"] == pred["count"] == HF_EPOCHS * HF_EVAL == len(y_true)
        m = pred["metrics"]
        labels = np.union1d(y_true, y_pred)
        assert m["labels"] == labels.tolist()
        assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred), rel=1e-12)
        for fn in ("precision", "recall", "f1"):
            score = getattr(metrics, f"{fn}_score")
            want = score(y_true, y_pred, average="macro", zero_division=0)
            assert m[f"{fn}_macro"] == pytest.approx(want, rel=1e-9), f"{fn}_macro"
        for average in ("micro", "weighted"):
            want = metrics.f1_score(y_true, y_pred, average=average, zero_division=0)
            assert m[f"f1_{average}"] == pytest.approx(want, rel=1e-9), f"f1_{average}"
        confusion = metrics.confusion_matrix(y_true, y_pred, labels=labels)
        assert m["confusion_matrix"] == confusion.tolist()
        assert daemon.terminate() == 0

    assert_input_topic(broker, topic, HF_RUN, em)


# ------------------------------------------------------------------ Keras 3 (torch backend)
KERAS_RUN = "keras-run"
KERAS_ROWS, KERAS_BATCH, KERAS_EPOCHS = 150, 10, 3
KERAS_TRAIN = int(KERAS_ROWS * 0.8)  # validation_split=0.2 keeps the last 20% out
KERAS_STEPS = KERAS_EPOCHS * KERAS_TRAIN // KERAS_BATCH  # 36


def test_keras_fit_steps_and_losses_reach_the_daemon_and_match_numpy(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """36 Keras batches (torch backend) with a validation split: the daemon's final summaries
    equal NumPy/SciPy on the step times and batch losses the callback sent; every other scalar it
    sent (epoch/loss, epoch/val_loss) arrives with its count and mean."""
    pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, this test uses the torch backend")
    from metricsd.integrations.keras import MetricsdCallback

    class Recorder(keras.callbacks.Callback):  # type: ignore[misc]
        """The batch losses Keras itself hands to callbacks."""

        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.losses.append(float((logs or {})["loss"]))

    topic = topic_name
    daemon = start_daemon(broker, topic, tmp_path)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(KERAS_ROWS, 5)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("float32")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy(from_logits=True))

    with daemon:
        em = RecordingEmitter(
            KERAS_RUN, bootstrap_servers=broker.bootstrap, topic=topic, linger=0.2
        )
        callback = MetricsdCallback(em, close_timeout=60)
        recorder = Recorder()
        history = model.fit(
            x,
            y,
            batch_size=KERAS_BATCH,
            epochs=KERAS_EPOCHS,
            validation_split=0.2,
            verbose=0,
            callbacks=[callback, recorder],
        )
        assert len(recorder.losses) == len(em.seconds) == KERAS_STEPS
        assert_delivered(em, callback)
        assert em.scalar_values["loss"] == pytest.approx(recorder.losses, rel=1e-6)
        assert em.scalar_values["epoch/val_loss"] == pytest.approx(
            history.history["val_loss"], rel=1e-6
        )
        assert not em.prediction_calls

        streams = {"batch_time"} | {f"scalar/{n}" for n in em.scalar_values}
        finals = read_finals(broker, topic, KERAS_RUN, streams, daemon)
        assert_stats(finals["batch_time"], em.seconds)
        assert_stats(finals["scalar/loss"], em.scalar_values["loss"])
        assert finals["scalar/loss"]["metrics"]["non_finite"] == 0
        assert_scalar_streams(finals, em.scalar_values)
        assert set(em.scalar_values) == {"loss", "epoch/loss", "epoch/val_loss"}
        assert not [s for s in finals if s.startswith("prediction/")]
        assert daemon.terminate() == 0

    assert_input_topic(broker, topic, KERAS_RUN, em)
