"""A deterministic input log for changelog tests: two partitions, every stream kind, a run that
ends, ticks every few records. Shared by the crash-point tests and the format fixture."""

from __future__ import annotations

import numpy as np
import orjson
from metricsd.config import MonitorSettings

SETTINGS = MonitorSettings(window=12, time_windows=(), idle_timeout=0.0)
PARTITIONS = (0, 1)
TICK_EVERY = 7  # records per partition between ticks
CHUNK = 4  # values per changelog chunk: windows of 12 span several, so blocks are written


def input_log(seed: int = 0, records: int = 40) -> dict[int, list[bytes]]:
    """The raw values of each input partition, in offset order (index = offset)."""
    rng = np.random.default_rng(seed)
    log: dict[int, list[bytes]] = {p: [] for p in PARTITIONS}
    runs = {0: ["a", "b"], 1: ["c"]}
    for i in range(records):
        for p in PARTITIONS:
            run = runs[p][i % len(runs[p])]
            if p == 0 and run == "b" and i == 25:
                doc: dict[str, object] = {"type": "run_end", "run_id": "b"}
            else:
                doc = _event(rng, run, i)
            log[p].append(orjson.dumps(doc))
    return log


def _event(rng: np.random.Generator, run: str, i: int) -> dict[str, object]:
    ts = 1_764_000_000.0 + i
    match i % 6:
        case 0 | 3:
            return {"type": "batch_time", "run_id": run, "ts": ts, "step": i,
                    "seconds": float(rng.lognormal(-2.0, 0.3))}  # fmt: skip
        case 1:
            y = rng.integers(0, 2, 5).tolist()
            return {"type": "prediction", "run_id": run, "ts": ts, "task": "binary",
                    "y_true": y, "y_pred": rng.integers(0, 2, 5).tolist()}  # fmt: skip
        case 2:
            return {"type": "prediction", "run_id": run, "ts": ts, "task": "regression",
                    "split": "val", "y_true": rng.normal(size=4).tolist(),
                    "y_pred": rng.normal(size=4).tolist()}  # fmt: skip
        case 4:
            return {"type": "cv_fold", "run_id": run, "ts": ts, "fold": i % 3,
                    "train_loss": float(rng.random()), "val_loss": float(rng.random())}  # fmt: skip
        case _:
            return {"type": "attention", "run_id": run, "ts": ts,
                    "weights": rng.dirichlet(np.ones(3), size=2).tolist()}  # fmt: skip


def ticks(log: dict[int, list[bytes]]) -> int:
    return -(-len(log[PARTITIONS[0]]) // TICK_EVERY)


def now_of(tick: int) -> float:
    return 1_764_000_000.0 + tick * TICK_EVERY
