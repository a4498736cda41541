"""The framework callbacks (``metricsd.integrations``) on real frameworks, on CPU, without Kafka.

Each test trains a tiny model on random data with the callback and an ``Emitter`` whose sender is
in memory, and checks the records against what the framework itself did: one ``batch_time`` per
training step it ran, scalars equal to what it logged, predictions equal to what the model output,
``run_end`` with the right status. A framework that is not installed skips its tests (the extras
``lightning``, ``transformers``, ``keras``; the default dev install has none of them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from metricsd.emitter import Emitter

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported; no TensorFlow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class MemorySender:
    """Keeps every record the emitter's thread produces; the broker stand-in."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.lock = threading.Lock()

    async def start(self) -> None:
        pass

    async def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[BaseException | None]:
        with self.lock:
            self.records.extend(records)
        await asyncio.sleep(0)
        return [None] * len(records)

    async def stop(self) -> None:
        pass

    def docs(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            docs = [orjson.loads(value) for _, value in self.records]
        return [d for d in docs if kind is None or d["type"] == kind]


def emitter(sender: MemorySender, **kwargs: Any) -> Emitter:
    kwargs.setdefault("linger", 0.02)
    kwargs.setdefault("heartbeat_interval", 0)
    return Emitter("cb-run", sender=sender, **kwargs)


def flat(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def values_and_steps(docs: list[dict[str, Any]], field: str) -> tuple[list[float], list[int]]:
    """The values of coalesced records in call order, and for each record (cumulative count - 1,
    its step): a coalesced record carries the step of its last call."""
    values: list[float] = []
    marks: list[int] = []
    for doc in docs:
        values.extend(flat(doc[field]))
        marks.append(len(values) - 1)
    return values, marks


def steps_match(docs: list[dict[str, Any]], field: str, expected: list[int]) -> bool:
    """Every record's step is the expected step of its last call (``expected`` per call)."""
    values, marks = values_and_steps(docs, field)
    assert len(values) == len(expected)
    return [d.get("step") for d in docs] == [expected[i] for i in marks]


def batch_times(sender: MemorySender) -> list[float]:
    return values_and_steps(sender.docs("batch_time"), "seconds")[0]


def scalar_docs(sender: MemorySender, name: str) -> list[dict[str, Any]]:
    return [d for d in sender.docs("scalar") if d["name"] == name]


def scalars(sender: MemorySender, name: str) -> list[float]:
    """Every value sent as scalar ``name``, in order."""
    return values_and_steps(scalar_docs(sender, name), "value")[0]


def run_ends(sender: MemorySender) -> list[str]:
    return [d.get("status", "") for d in sender.docs("run_end")]


def test_importing_metricsd_and_the_subpackage_imports_no_framework() -> None:
    """``import metricsd`` and ``import metricsd.integrations`` import no framework (nor torch)."""
    code = (
        "import sys, metricsd, metricsd.integrations\n"
        "bad = [m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers', 'keras')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_to_float_takes_numbers_and_one_element_arrays_only() -> None:
    from metricsd.integrations._common import to_float

    assert to_float(2) == 2.0 and to_float(np.float32(0.5)) == 0.5
    assert to_float(np.array([[3.0]])) == 3.0
    for bad in (True, None, "1.0", np.array([1.0, 2.0]), np.array(["a"]), object()):
        assert to_float(bad) is None


# ------------------------------------------------------------------ PyTorch Lightning
def lightning_parts() -> tuple[Any, Any, Any]:
    torch = pytest.importorskip("torch")
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from metricsd.integrations.lightning import MetricsdCallback

    return torch, pl, MetricsdCallback


def make_lightning(
    torch: Any, pl: Any, *, fail_at: int | None = None, n: int = 96, batch: int = 8
) -> tuple[Any, Any, Any]:
    """A 4-feature binary classifier; it records the losses it logs and the predictions it makes."""

    class Tiny(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)
            self.train_losses: list[float] = []
            self.val_pairs: list[tuple[np.ndarray, np.ndarray]] = []
            self.steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if fail_at is not None and self.steps == fail_at:
                raise RuntimeError("boom")
            self.steps += 1
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.layer(x), y)
            self.train_losses.append(float(loss.detach()))
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            logits = self.layer(x)
            pred = logits.argmax(-1)
            self.val_pairs.append((y.numpy().copy(), pred.numpy().copy()))
            self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
            return {"pred": pred}

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(data, batch_size=batch * 2)
    return Tiny(), train, val


def lightning_trainer(pl: Any, callback: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_lightning_callback_sends_step_times_logged_metrics_predictions_and_run_end() -> None:
    torch, pl, MetricsdCallback = lightning_parts()
    sender = MemorySender()
    em = emitter(sender, rank=0)
    callback = MetricsdCallback(
        em,
        log_every_n_steps=1,
        predictions=lambda outputs, batch: (batch[1], outputs["pred"]),
        task="binary",
        split="val",
    )
    model, train, val = make_lightning(torch, pl)
    trainer = lightning_trainer(pl, callback, max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(model, train, val)

    assert em.stats()["closed"]
    steps_run = trainer.global_step
    assert steps_run == 3 * len(train) == model.steps == 36
    seconds = batch_times(sender)
    assert len(seconds) == steps_run and all(s > 0 for s in seconds)
    # step = global_step when each batch started
    assert steps_match(sender.docs("batch_time"), "seconds", list(range(steps_run)))
    # train_loss after every batch (cadence 1), at each validation end (after the epoch's last
    # batch: its value again) and at fit end (the last value again)
    per_epoch = len(train)
    want_values: list[float] = []
    want_steps: list[int] = []
    for e in range(3):
        epoch = model.train_losses[e * per_epoch : (e + 1) * per_epoch]
        want_values += [*epoch, epoch[-1]]
        want_steps += [*range(e * per_epoch + 1, (e + 1) * per_epoch + 1), (e + 1) * per_epoch]
    want_values.append(model.train_losses[-1])
    want_steps.append(steps_run)
    assert scalars(sender, "train_loss") == pytest.approx(want_values, rel=1e-6)
    assert steps_match(scalar_docs(sender, "train_loss"), "value", want_steps)
    val_loss = scalars(sender, "val_loss")
    assert len(val_loss) >= 3 and val_loss[-1] == pytest.approx(
        float(trainer.callback_metrics["val_loss"]), rel=1e-6
    )
    # predictions: the three real validation runs, not the 2 sanity-check batches
    preds = sender.docs("prediction")
    sanity = 2
    real = model.val_pairs[sanity:]
    assert len(preds) == len(real) == 3 * len(val)
    for doc, (y_true, y_pred) in zip(preds, real, strict=True):
        assert doc["task"] == "binary" and doc["split"] == "val"
        assert doc["y_true"] == y_true.tolist() and doc["y_pred"] == y_pred.tolist()
    assert run_ends(sender) == ["completed"]
    assert sender.docs()[-1]["type"] == "run_end"
    assert all(d["rank"] == 0 for d in sender.docs())
    assert callback.errors == 0


def test_lightning_cadence_sends_metrics_every_n_batches() -> None:
    torch, pl, MetricsdCallback = lightning_parts()
    sender = MemorySender()
    callback = MetricsdCallback(emitter(sender), log_every_n_steps=5)
    model, train, _ = make_lightning(torch, pl)
    lightning_trainer(pl, callback, max_steps=20).fit(model, train)
    losses = scalars(sender, "train_loss")
    # after batches 5, 10, 15, 20 (global_step 5..20), then fit end repeats the last value
    assert steps_match(scalar_docs(sender, "train_loss"), "value", [5, 10, 15, 20, 20])
    picked = [model.train_losses[i] for i in (4, 9, 14, 19, 19)]
    assert losses == pytest.approx(picked, rel=1e-6)
    assert len(batch_times(sender)) == 20
    assert run_ends(sender) == ["completed"]


def test_lightning_exception_during_fit_sends_run_end_failed() -> None:
    torch, pl, MetricsdCallback = lightning_parts()
    sender = MemorySender()
    callback = MetricsdCallback(emitter(sender), log_every_n_steps=1)
    model, train, _ = make_lightning(torch, pl, fail_at=7)
    trainer = lightning_trainer(pl, callback, max_epochs=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, train)
    assert run_ends(sender) == ["failed"]
    # 7 batches completed; the 8th started and raised in training_step: no time for it
    assert len(batch_times(sender)) == 7
    assert scalars(sender, "train_loss") == pytest.approx(model.train_losses, rel=1e-6)


def test_lightning_callback_survives_a_broken_emitter(caplog: pytest.LogCaptureFixture) -> None:
    """An emitter that raises on every call: training completes, errors are counted, one log."""
    torch, pl, MetricsdCallback = lightning_parts()

    class Broken(Emitter):
        def batch_time(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("emitter bug")

        def scalars(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("emitter bug")

    sender = MemorySender()
    em = Broken("broken", sender=sender, linger=0.02, heartbeat_interval=0)
    callback = MetricsdCallback(em, log_every_n_steps=1)
    model, train, _ = make_lightning(torch, pl)
    with caplog.at_level(logging.WARNING, logger="metricsd.integrations"):
        lightning_trainer(pl, callback, max_steps=10).fit(model, train)
    assert model.steps == 10
    assert callback.errors == 10 + 1  # every batch end, and the fit end's metrics
    warnings = [r for r in caplog.records if r.name == "metricsd.integrations"]
    assert len(warnings) == 1 and "emitter bug" in (warnings[0].exc_text or "")
    assert run_ends(sender) == ["completed"]  # the end is still sent


def test_lightning_creates_its_emitter_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No emitter given: one is made in setup with rank = trainer.global_rank and closed at the
    end (METRICSD_DISABLED here, so it sends nothing)."""
    torch, pl, MetricsdCallback = lightning_parts()
    monkeypatch.setenv("METRICSD_DISABLED", "1")
    monkeypatch.setenv("METRICSD_RUN_ID", "from-env")
    callback = MetricsdCallback()
    model, train, _ = make_lightning(torch, pl)
    lightning_trainer(pl, callback, max_steps=3).fit(model, train)
    em = callback.emitter
    assert isinstance(em, Emitter) and em.run_id == "from-env" and em.rank == 0
    assert em.stats()["closed"] and em.stats()["ignored"] > 3
    assert callback.errors == 0


# ------------------------------------------------------------------ Hugging Face transformers
def hf_parts() -> tuple[Any, Any, Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from metricsd.integrations.transformers import MetricsdCallback

    return torch, transformers, MetricsdCallback


class TokenData:
    """Random token sequences with 3 labels; a map-style dataset of dicts, as the Trainer takes."""

    def __init__(self, torch: Any, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 12), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.ids[i] > 0,
            "labels": self.labels[i],
        }


def hf_trainer(
    transformers: Any, tmp_path: Any, callbacks: list[Any], *, train: int = 64, **kwargs: Any
) -> Any:
    """A tiny BERT (random weights from a config, no download) on ``train`` random rows, 2 epochs
    of batch 8, evaluated on 40 rows each epoch; ``kwargs`` go to the Trainer."""
    torch = sys.modules["torch"]
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)  # random weights, no download
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(torch, train, 1),
        eval_dataset=TokenData(torch, 40, 2),
        callbacks=callbacks,
        **kwargs,
    )


def test_transformers_callback_sends_step_times_logs_eval_metrics_predictions_and_run_end(
    tmp_path: Any,
) -> None:
    torch, transformers, MetricsdCallback = hf_parts()
    sender = MemorySender()
    callback = MetricsdCallback(emitter(sender, rank=0))
    seen: list[Any] = []

    def accuracy(eval_pred: Any) -> dict[str, float]:
        seen.append(eval_pred)
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    trainer = hf_trainer(
        transformers, tmp_path, [callback], compute_metrics=callback.compute_metrics(accuracy)
    )
    trainer.train()

    steps_run = trainer.state.global_step
    assert steps_run == 2 * 64 // 8 == 16
    seconds = batch_times(sender)
    assert len(seconds) == steps_run and all(s > 0 for s in seconds)
    assert steps_match(sender.docs("batch_time"), "seconds", list(range(steps_run)))
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == steps_run
    for name in ("loss", "learning_rate", "grad_norm"):
        assert scalars(sender, name) == pytest.approx([h[name] for h in train_logs], rel=1e-9)
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(eval_logs) == 2
    assert scalars(sender, "eval/loss") == pytest.approx([h["eval_loss"] for h in eval_logs])
    assert scalars(sender, "eval/accuracy") == [h["eval_accuracy"] for h in eval_logs]
    assert not [d for d in sender.docs("scalar") if d["name"].startswith("eval_")]
    final = next(h for h in history if "train_runtime" in h)
    assert scalars(sender, "train_loss") == pytest.approx([final["train_loss"]])
    # predictions: the model's own argmax on the eval set, after each epoch
    preds = sender.docs("prediction")
    assert len(preds) == len(seen) == 2
    for doc, eval_pred in zip(preds, seen, strict=True):
        assert doc["task"] == "multiclass" and doc["split"] == "val"
        assert doc["y_true"] == eval_pred.label_ids.tolist()
        assert doc["y_pred"] == eval_pred.predictions.argmax(-1).tolist()
    model = trainer.model.eval()
    data = trainer.eval_dataset
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=data.ids > 0).logits
    assert preds[-1]["y_pred"] == logits.argmax(-1).tolist()
    assert preds[-1]["y_true"] == data.labels.tolist()
    assert run_ends(sender) == ["completed"] and sender.docs()[-1]["type"] == "run_end"
    assert callback.errors == 0


def test_transformers_exception_during_train_ends_the_run_failed(tmp_path: Any) -> None:
    """The Trainer has no exception hook: ``with emitter:`` closes with "failed", and the callback
    sent no "completed" before."""
    _, transformers, MetricsdCallback = hf_parts()

    class Boom(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 5:
                raise RuntimeError("boom")

    sender = MemorySender()
    em = emitter(sender)
    callback = MetricsdCallback(em)
    trainer = hf_trainer(transformers, tmp_path, [callback, Boom()])
    with pytest.raises(RuntimeError, match="boom"), em:
        trainer.train()
    assert run_ends(sender) == ["failed"]
    assert len(batch_times(sender)) == 5


def test_transformers_compute_metrics_wrapper_binary_single_logit_and_padding() -> None:
    """One logit per item -> ``logit > 0``; labels -100 left out; the wrapped result returned."""
    _, _, MetricsdCallback = hf_parts()
    from transformers import EvalPrediction

    sender = MemorySender()
    em = emitter(sender)
    callback = MetricsdCallback(em)
    compute = callback.compute_metrics(lambda p: {"n": len(p.label_ids)}, task="binary")
    logits = np.array([[-1.0], [2.0], [0.5], [-0.1]])
    labels = np.array([0, 1, -100, 1])
    assert compute(EvalPrediction(predictions=logits, label_ids=labels)) == {"n": 4}
    em.close()
    [doc] = sender.docs("prediction")
    assert doc["y_true"] == [0, 1, 1] and doc["y_pred"] == [0, 1, 0]
    with pytest.raises(ValueError, match="task"):
        callback.compute_metrics(task="ranking")


# ------------------------------------------------------------------ Keras 3 (torch backend)
def keras_parts() -> tuple[Any, Any]:
    pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, these tests use the torch backend")
    from metricsd.integrations.keras import MetricsdCallback

    return keras, MetricsdCallback


def keras_model_and_data(keras: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("float32")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model, x, y


def keras_recorder(keras: Any) -> Any:
    class Recorder(keras.callbacks.Callback):  # type: ignore[misc]
        """What Keras itself hands to callbacks."""

        def __init__(self) -> None:
            super().__init__()
            self.batch_logs: list[dict[str, float]] = []
            self.epoch_logs: list[dict[str, float]] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.batch_logs.append({k: float(v) for k, v in (logs or {}).items()})

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.epoch_logs.append({k: float(v) for k, v in (logs or {}).items()})

    return Recorder()


def test_keras_callback_sends_step_times_logs_and_run_end() -> None:
    keras, MetricsdCallback = keras_parts()
    sender = MemorySender()
    callback = MetricsdCallback(emitter(sender))
    recorder = keras_recorder(keras)
    model, x, y = keras_model_and_data(keras)
    history = model.fit(
        x,
        y,
        batch_size=10,
        epochs=3,
        validation_split=0.2,
        verbose=0,
        callbacks=[callback, recorder],
    )
    steps_run = 3 * 8  # 80 training rows / 10
    assert len(recorder.batch_logs) == steps_run
    seconds = batch_times(sender)
    assert len(seconds) == steps_run and all(s > 0 for s in seconds)
    assert steps_match(sender.docs("batch_time"), "seconds", list(range(steps_run)))
    assert scalars(sender, "loss") == pytest.approx([r["loss"] for r in recorder.batch_logs])
    assert steps_match(scalar_docs(sender, "loss"), "value", list(range(1, steps_run + 1)))
    assert scalars(sender, "epoch/loss") == pytest.approx(history.history["loss"], rel=1e-6)
    assert scalars(sender, "epoch/val_loss") == pytest.approx(history.history["val_loss"], rel=1e-6)
    assert steps_match(scalar_docs(sender, "epoch/val_loss"), "value", [8, 16, 24])
    assert run_ends(sender) == ["completed"] and sender.docs()[-1]["type"] == "run_end"
    assert callback.errors == 0


def test_keras_cadence_and_an_exception_during_fit() -> None:
    """log_every_n_steps=4 sends every 4th batch's logs; an exception in fit: ``with emitter:``
    ends the run "failed", the batches before it were timed."""
    keras, MetricsdCallback = keras_parts()

    class Boom(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 5:
                raise RuntimeError("boom")

    sender = MemorySender()
    em = emitter(sender)
    callback = MetricsdCallback(em, log_every_n_steps=4)
    recorder = keras_recorder(keras)
    model, x, y = keras_model_and_data(keras)
    with pytest.raises(RuntimeError, match="boom"), em:
        model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=[callback, recorder, Boom()])
    assert len(batch_times(sender)) == 6  # batches 0..5; Boom raised after ours ran for 5
    assert scalars(sender, "loss") == pytest.approx([recorder.batch_logs[3]["loss"]])
    assert steps_match(scalar_docs(sender, "loss"), "value", [4])
    assert run_ends(sender) == ["failed"]


DDP_SCRIPT = """
import os, sys
import torch
try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl
from metricsd.emitter import Emitter
from metricsd.integrations.lightning import MetricsdCallback

OUT = os.environ["CB_OUT"]


class FileSender:  # every record's value appended to a file per rank
    def __init__(self, path):
        self.path = path

    async def start(self):
        pass

    async def send(self, records):
        with open(self.path, "ab") as f:
            for _, value in records:
                f.write(value + b"\\n")
        return [None] * len(records)

    async def stop(self):
        pass


class FileCallback(MetricsdCallback):  # the environment-made emitter, with a file as broker
    def _ensure(self, **kwargs):
        if self.emitter is None:
            path = os.path.join(OUT, f"rank{kwargs['rank']}.jsonl")
            kwargs.update(sender=FileSender(path), linger=0.02, heartbeat_interval=0)
            self.emitter = Emitter(**kwargs)
        return self.emitter


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FileCallback(log_every_n_steps=1)],
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
"""


def test_lightning_ddp_two_ranks_share_the_run_id_tag_their_rank_and_rank_0_ends_it(
    tmp_path: Any,
) -> None:
    """Two CPU processes (strategy="ddp", gloo), the callback making its emitters from the
    environment: each rank sends its own step times tagged with its rank; without METRICSD_RUN_ID
    both use rank 0's generated run_id (broadcast); only rank 0 sends run_end."""
    lightning_parts()
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICSD_")}
    env.update(CB_OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    docs = {
        rank: [orjson.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_bytes().split()]
        for rank in (0, 1)
    }
    per_rank_steps = 64 // 8 // 2  # the DistributedSampler gives each rank half of the 8 batches
    for rank, rank_docs in docs.items():
        assert {d["rank"] for d in rank_docs} == {rank}
        seconds = values_and_steps([d for d in rank_docs if d["type"] == "batch_time"], "seconds")
        assert len(seconds[0]) == per_rank_steps
        losses = [d for d in rank_docs if d["type"] == "scalar" and d["name"] == "train_loss"]
        assert len(values_and_steps(losses, "value")[0]) == per_rank_steps + 1  # + fit end
    run_ids = {d["run_id"] for rank_docs in docs.values() for d in rank_docs}
    assert len(run_ids) == 1 and run_ids.pop().startswith("run-")
    assert [d["status"] for d in docs[0] if d["type"] == "run_end"] == ["completed"]
    assert not [d for d in docs[1] if d["type"] == "run_end"]
