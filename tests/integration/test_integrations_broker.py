"""The Lightning callback on the real broker: a tiny model trains, the daemon summarises its steps.

No mocks: Tansu, the daemon as a child process, the emitter's own aiokafka producer, and
confluent-kafka reading back. The oracle is NumPy on the step times the callback itself measured
(recorded by an ``Emitter`` subclass at the call, before anything is queued).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from daemon_process import daemon_on
from kafka_tools import create_topics, read_topic_foreign
from metricsd.devbroker import DevBroker
from test_frameworks_broker import RecordingEmitter, assert_stats

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")

from metricsd.integrations.lightning import MetricsdCallback  # noqa: E402  (after the skip)

PARTITIONS = 2
EPOCHS = 5
BATCHES = 40  # per epoch
STEPS = EPOCHS * BATCHES
RUN = "lightning-run"
SUMMARY_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "summary.schema.json").read_text()
)


class Tiny(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def final_batch_time(records: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    for _, value, _, _ in records:
        rec = orjson.loads(value)
        if (
            rec["type"] == "summary"
            and rec["run_id"] == RUN
            and rec["stream"] == "batch_time"
            and rec["window"]["kind"] == "count"
            and rec["final"]
        ):
            return rec
    return None


def test_lightning_step_times_reach_the_daemon_and_match_numpy(
    broker: DevBroker, topic_name: str, tmp_path: Path
) -> None:
    """200 Lightning steps: the daemon's final batch_time summary (sent on the callback's run_end)
    equals NumPy/SciPy on the callback's own measurements; the input topic holds them in order,
    the logged losses, and run_end "completed"."""
    topic = topic_name
    create_topics(broker.bootstrap, {topic: PARTITIONS})
    daemon = daemon_on(
        broker.bootstrap, topic, tmp_path / "daemon.log", "--window", str(STEPS), "--interval",
        "1", "--time-window", "0", partitions=PARTITIONS,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(BATCHES * 16, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen
    )
    with daemon:
        em = RecordingEmitter(RUN, bootstrap_servers=broker.bootstrap, topic=topic, linger=0.2)
        callback = MetricsdCallback(em, log_every_n_steps=1, close_timeout=60)
        model = Tiny()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=EPOCHS,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader)
        assert trainer.global_step == STEPS and len(em.seconds) == STEPS
        stats = em.stats()
        assert stats["closed"] and callback.errors == 0
        assert stats["sent"] == stats["enqueued"], f"not delivered: {stats}"
        assert stats["dropped"] == stats["delivery_errors"] == 0

        out = read_topic_foreign(
            broker.bootstrap,
            f"{topic}.out",
            range(PARTITIONS),
            until=lambda got: final_batch_time(got) is not None,
            timeout=60,
        )
        summary = final_batch_time(out)
        assert summary is not None, daemon.tail()
        jsonschema.Draft202012Validator(SUMMARY_SCHEMA).validate(summary)
        assert_stats(summary, em.seconds)  # every statistic vs NumPy/SciPy, count == STEPS
        assert daemon.terminate() == 0

    inputs = read_topic_foreign(
        broker.bootstrap,
        topic,
        range(PARTITIONS),
        until=lambda got: any(orjson.loads(v)["type"] == "run_end" for _, v, _, _ in got),
        timeout=30,
    )
    docs = [orjson.loads(value) for _, value, _, _ in inputs]
    sent: list[float] = []
    losses: list[float] = []
    for d in docs:
        if d["type"] == "batch_time":
            sent.extend(d["seconds"] if isinstance(d["seconds"], list) else [d["seconds"]])
        elif d["type"] == "scalar" and d["name"] == "train_loss":
            losses.extend(d["value"] if isinstance(d["value"], list) else [d["value"]])
    assert sent == em.seconds
    assert losses[:STEPS] == pytest.approx(model.losses, rel=1e-6)
    assert docs[-1]["type"] == "run_end" and docs[-1]["status"] == "completed"
    assert all(key == RUN.encode() for key, _, _, _ in inputs)
