"""``metricsd dev --train`` / ``simulate --train`` without a broker: the flag, the message without
torch, and one real training run through the emitter (a fake sender in place of Kafka)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from metricsd.cli import build_parser, simulate_settings_from
from metricsd.emitter import Emitter
from metricsd.simulate import TORCH_MISSING, TorchRun
from test_emitter import FakeSender, flat, valid


def test_train_is_a_bare_flag_of_dev_and_simulate() -> None:
    parser = build_parser()
    for command in ("dev", "simulate"):
        assert simulate_settings_from(parser.parse_args([command, "--train"])).train is True
        assert (
            simulate_settings_from(parser.parse_args([command, "--train", "false"])).train is False
        )
        assert simulate_settings_from(parser.parse_args([command])).train is False


def test_without_torch_dev_train_exits_2_naming_the_package_before_starting_anything() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "from metricsd.cli import main\n"
        "sys.exit(main(['dev', '--train', '--duration', '1']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert TORCH_MISSING in proc.stderr
    assert "pip install 'metricsd[lightning]'" in proc.stderr and "torch==2.13.0" in proc.stderr
    assert "embedded Tansu broker" not in proc.stdout  # nothing was started


def test_a_torch_run_trains_for_real_and_every_call_reaches_the_sender() -> None:
    """300 steps of the demo model: 300 step times and losses, validation predictions every 20
    steps and after the last, a learning rate decaying to ~0, and a model that learned (validation
    accuracy from chance to > 90%, loss well down): what the daemon would receive."""
    import torch

    sender = FakeSender()
    em = Emitter("train-x", sender=sender, linger=0.02, heartbeat_interval=0)
    run = TorchRun(torch, em, seed=5)
    while not run.done:
        run.step()
    assert em.close(timeout=10)
    docs = [valid(k, v) for k, v in sender.records]
    seconds = [s for d in docs if d["type"] == "batch_time" for s in flat(d["seconds"])]
    losses = [v for d in sender.user_scalars("loss") for v in flat(d["value"])]
    rates = [v for d in sender.user_scalars("learning_rate") for v in flat(d["value"])]
    predictions = [d for d in docs if d["type"] == "prediction"]
    assert len(seconds) == len(losses) == len(rates) == 300 and min(seconds) > 0
    assert rates[0] == 0.2 and rates[-1] < 1e-3 and rates == sorted(rates, reverse=True)
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:10])
    assert len(predictions) == 16 and all(len(p["y_true"]) == 256 for p in predictions)
    accuracy = [np.mean(np.equal(p["y_true"], p["y_pred"])) for p in predictions]
    assert accuracy[0] < 0.8 and accuracy[-1] > 0.9, accuracy
    assert docs[-1]["type"] == "run_end"
