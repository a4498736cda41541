"""A synthetic training job: realistic events of every kind for the demo, tests and benchmarks.

``TrainingJob`` is pure (a seeded generator, time passed in); ``produce`` sends its events to Kafka
through ``metricsd.kafka`` at a steady rate.

Each run trains for a number of steps: batch times drift slowly with occasional stragglers (a
data-loader stall), validation prediction batches every few steps get better as training goes on
(binary, multiclass or regression, by run), and now and then a cross-validation fold, an attention
matrix and feature vectors arrive. A run that reaches its step budget sends ``run_end`` and a new
run takes its place.

``train`` (``--train``) is the real thing instead: small torch models (an MLP learning a random
linear rule from random inputs, on CPU) trained step by step through ``metricsd.Emitter``, one
emitter per run: ``with em.step():`` around forward/backward/update (``batch_time``), the loss and
the learning rate as scalars, validation predictions every 20 steps, ``run_end`` when a run has
done its steps (a new one takes its place) or the job stops (status ``"stopped"``). It is what a
user's training script does, and exercises the client end to end. The runs take turns, one step at
a time, at ``rate`` steps/s in all (at most: a step takes what it takes).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import structlog

from metricsd import kafka
from metricsd.config import ConfigError, SimulateSettings

__all__ = ["TorchRun", "TrainingJob", "produce", "require_torch", "train"]

log = structlog.get_logger(__name__)

_TASKS = ("binary", "multiclass", "regression")


class TrainingJob:
    """Events of one simulated training run; ``events(now)`` yields those of the next step."""

    def __init__(
        self,
        run_id: str,
        rng: np.random.Generator,
        *,
        steps: int = 5000,
        ranks: int = 0,
        slow_rank: int | None = None,
    ) -> None:
        """``ranks`` > 0: a distributed run, each step one batch_time per rank (``rank`` set),
        ``slow_rank`` (if given) three times slower than the others. 0: one batch_time, no rank
        (the events and random draws are then exactly those of a job without the option)."""
        self.run_id = run_id
        self.ranks = ranks
        self.slow_rank = slow_rank
        self.rng = rng
        self.steps = steps
        self.step = 0
        self.task = _TASKS[int(rng.integers(len(_TASKS)))]
        self.classes = int(rng.integers(3, 8))
        self.base_seconds = float(rng.uniform(0.05, 0.4))
        self.heads = int(rng.integers(1, 9))
        self.positions = int(rng.integers(8, 65))
        self.dims = int(rng.integers(16, 129))

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def events(self, now: float) -> Iterator[dict[str, Any]]:
        rng, run_id, step = self.rng, self.run_id, self.step
        self.step += 1
        progress = min(1.0, step / max(self.steps, 1))
        seconds = self.base_seconds * (1 + 0.1 * np.sin(step / 50)) * rng.lognormal(0, 0.08)
        if rng.random() < 0.01:  # a straggler: data-loader stall
            seconds *= rng.uniform(3, 10)
        if self.ranks:
            spread = rng.lognormal(0, 0.05, self.ranks) * seconds
            for rank in range(self.ranks):
                slow = 3.0 if rank == self.slow_rank else 1.0
                yield {"type": "batch_time", "run_id": run_id, "ts": now, "step": step,
                       "rank": rank, "seconds": round(float(spread[rank] * slow), 6)}  # fmt: skip
        else:
            yield {
                "type": "batch_time",
                "run_id": run_id,
                "ts": now,
                "step": step,
                "seconds": round(float(seconds), 6),
            }
        if step % 5 == 0:
            loss = float(2.0 * np.exp(-3 * progress) + 0.05 + abs(rng.normal(0, 0.03)))
            yield {"type": "scalar", "run_id": run_id, "ts": now, "step": step,
                   "name": "loss", "value": round(loss, 6)}  # fmt: skip
        if step % 50 == 0:
            yield {"type": "scalar", "run_id": run_id, "ts": now, "step": step,
                   "name": "learning_rate", "value": 1e-3 * (1 - 0.9 * progress)}  # fmt: skip
        if step % 10 == 0:
            yield self._prediction(now, progress)
        if step % 200 == 0:
            fold = (step // 200) % 5
            train = float(1.5 * np.exp(-3 * progress) + rng.normal(0, 0.02))
            yield {
                "type": "cv_fold",
                "run_id": run_id,
                "ts": now,
                "fold": fold,
                "train_loss": round(abs(train), 6),
                "val_loss": round(abs(train * rng.uniform(1.05, 1.4)), 6),
            }
        if step % 25 == 0:
            logits = rng.normal(0, 1 + 3 * progress, size=(self.heads, self.positions))
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            yield {
                "type": "attention",
                "run_id": run_id,
                "ts": now,
                "weights": np.round(weights, 6).tolist(),
            }
        if step % 25 == 5:
            vectors = rng.normal(0, 1, size=(4, self.dims))
            vectors[rng.random(vectors.shape) < 0.3 + 0.4 * progress] = 0.0  # ReLU-like sparsity
            yield {
                "type": "features",
                "run_id": run_id,
                "ts": now,
                "values": np.round(vectors, 6).tolist(),
            }
        if self.done:
            yield {"type": "run_end", "run_id": run_id, "ts": now}

    def _prediction(self, now: float, progress: float) -> dict[str, Any]:
        rng, n = self.rng, 64
        accuracy = 0.55 + 0.4 * progress
        if self.task == "regression":
            y_true = rng.normal(0, 1, n)
            y_pred = y_true + rng.normal(0, 0.8 - 0.6 * progress, n)
            yt, yp = np.round(y_true, 6).tolist(), np.round(y_pred, 6).tolist()
        else:
            k = 2 if self.task == "binary" else self.classes
            labels = rng.integers(0, k, n)
            wrong = rng.random(n) > accuracy
            yt, yp = labels.tolist(), np.where(wrong, rng.integers(0, k, n), labels).tolist()
        return {
            "type": "prediction",
            "run_id": self.run_id,
            "ts": now,
            "task": self.task,
            "split": "val",
            "y_true": yt,
            "y_pred": yp,
        }


# The first run slot of a simulation is a distributed run (the others send no rank): its
# ranks summary shows in ``metricsd dev``, one rank three times slower than the others.
SIMULATED_RANKS = 4
SIMULATED_SLOW_RANK = 2


def _job(
    settings: SimulateSettings, slot: int, number: int, rng: np.random.Generator
) -> TrainingJob:
    """The job of run slot ``slot`` (slot 0: distributed, ``SIMULATED_RANKS`` ranks)."""
    ranks, slow = (SIMULATED_RANKS, SIMULATED_SLOW_RANK) if slot == 0 else (0, None)
    return TrainingJob(f"run-{settings.seed}-{number}", np.random.default_rng(rng.integers(2**32)),
                       ranks=ranks, slow_rank=slow)  # fmt: skip


async def produce(settings: SimulateSettings, stop: asyncio.Event) -> int:
    """Send events at ``settings.rate`` events/s until ``duration`` passes or ``stop`` is set
    (``settings.train``: :func:`train` instead); the number of steps."""
    if settings.train:
        return await train(settings, stop)
    await kafka.ensure_topics(
        settings.bootstrap_servers,
        {settings.input_topic: settings.partitions},
        security=settings.security,
    )
    rng = np.random.default_rng(settings.seed)
    runs = [_job(settings, i, i, rng) for i in range(settings.runs)]
    next_id = settings.runs
    producer = kafka.producer(settings.bootstrap_servers, security=settings.security)
    await producer.start()
    sent = 0
    clock = asyncio.get_running_loop().time
    start = clock()
    period = 0.05  # send in small bursts, 20 per second
    try:
        log.info("simulating", runs=settings.runs, rate=settings.rate, topic=settings.input_topic)
        while not stop.is_set():
            elapsed = clock() - start
            if settings.duration and elapsed >= settings.duration:
                break
            target = int(settings.rate * elapsed)
            now = time.time()
            while sent < target:
                i = sent % len(runs)
                job = runs[i]
                for event in job.events(now):
                    await producer.send(
                        settings.input_topic, orjson.dumps(event), key=job.run_id.encode()
                    )
                sent += 1
                if job.done:
                    runs[i] = _job(settings, i, next_id, rng)
                    next_id += 1
            await asyncio.sleep(period)
        await producer.flush()
    finally:
        await producer.stop()
    log.info("simulation_done", steps=sent)
    return sent


# --------------------------------------------------------------------------- a real training loop
TORCH_MISSING = (
    "--train needs torch, which is not installed: pip install 'metricsd[lightning]' "
    "(or the CPU build alone: pip install torch==2.13.0)"
)


def require_torch() -> Any:
    """The ``torch`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ConfigError(TORCH_MISSING) from None
    return torch


class TorchRun:
    """One real training run on CPU: a 16-32-1 MLP learning the sign of a random linear function
    of random inputs (binary cross-entropy, SGD with momentum, cosine learning-rate decay), every
    call going through ``emitter``. ``step()`` trains one batch of 64."""

    INPUTS, HIDDEN, BATCH, VALIDATE_EVERY = 16, 32, 64, 20

    def __init__(self, torch: Any, emitter: Any, seed: int, *, steps: int = 300) -> None:
        self.torch = torch
        self.emitter = emitter
        self.steps = steps
        self.step_index = 0
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the weights' initialisation
        self.rule = torch.randn(self.INPUTS, generator=self.gen)
        nn = torch.nn
        self.model = nn.Sequential(
            nn.Linear(self.INPUTS, self.HIDDEN), nn.ReLU(), nn.Linear(self.HIDDEN, 1)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.2, momentum=0.9)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=steps)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val_x = torch.randn(256, self.INPUTS, generator=self.gen)
        self.val_y = (self.val_x @ self.rule > 0).long()

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    def step(self) -> None:
        torch, em, step = self.torch, self.emitter, self.step_index
        x = torch.randn(self.BATCH, self.INPUTS, generator=self.gen)
        y = (x @ self.rule > 0).float()
        with em.step(step):  # batch_time: forward, backward, update
            loss = self.loss_fn(self.model(x).squeeze(1), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        em.scalars({"loss": loss.detach(), "learning_rate": self.schedule.get_last_lr()[0]}, step)
        self.schedule.step()
        self.step_index += 1
        if step % self.VALIDATE_EVERY == 0 or self.done:
            with torch.no_grad():
                predicted = (self.model(self.val_x).squeeze(1) > 0).long()
            em.predictions(self.val_y, predicted, task="binary", split="val")


def _train_loop(settings: SimulateSettings, stop: threading.Event) -> int:
    """The training thread: runs take turns until ``stop`` or ``duration``; steps trained."""
    from metricsd.emitter import Emitter

    torch = require_torch()
    torch.set_num_threads(1)  # a demo next to the daemon on a small machine
    rng = np.random.default_rng(settings.seed)
    counter = iter(range(2**62))

    def new_run() -> TorchRun:
        emitter = Emitter(
            f"train-{settings.seed}-{next(counter)}",
            bootstrap_servers=settings.bootstrap_servers,
            topic=settings.input_topic,
            security=settings.security,
            heartbeat_interval=2.0,
        )
        return TorchRun(torch, emitter, int(rng.integers(2**31)))

    runs = [new_run() for _ in range(settings.runs)]
    steps = 0
    start = time.monotonic()
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if settings.duration and elapsed >= settings.duration:
                break
            if steps >= settings.rate * elapsed:  # ahead of the rate: wait for the next step
                stop.wait((steps + 1) / settings.rate - elapsed)
                continue
            i = steps % len(runs)
            runs[i].step()
            steps += 1
            if runs[i].done:
                runs[i].emitter.close("completed")
                runs[i] = new_run()
    finally:
        for run in runs:
            run.emitter.close("stopped")
    return steps


async def train(settings: SimulateSettings, stop: asyncio.Event) -> int:
    """Train at most ``settings.rate`` steps/s (see the module doc) until ``duration`` passes or
    ``stop`` is set; the number of steps trained. Without torch: :class:`ConfigError`."""
    require_torch()
    await kafka.ensure_topics(
        settings.bootstrap_servers,
        {settings.input_topic: settings.partitions},
        security=settings.security,
    )
    halt = threading.Event()
    loop_task = asyncio.create_task(asyncio.to_thread(_train_loop, settings, halt))
    waiter = asyncio.create_task(stop.wait())
    log.info("training", runs=settings.runs, rate=settings.rate, topic=settings.input_topic)
    try:
        await asyncio.wait([loop_task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.set()
        waiter.cancel()
    steps = await loop_task
    log.info("training_done", steps=steps)
    return steps
