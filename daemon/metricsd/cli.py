"""Command line: ``metricsd run | simulate | dev``.

Every flag can also be given as an environment variable ``METRICSD_<FLAG>`` (upper case, dashes as
underscores; a repeatable flag takes a comma-separated list), e.g. ``METRICSD_BOOTSTRAP_SERVERS``.
A flag on the command line wins over the environment. Only this module reads the environment and
configures logging; settings are validated once, here, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson

from metricsd import logs
from metricsd.config import (
    SECURITY_PROTOCOLS,
    ConfigError,
    MonitorSettings,
    Secret,
    Security,
    Settings,
    SimulateSettings,
)

__all__ = ["build_parser", "main"]

ENV_PREFIX = "METRICSD_"


def env_name(flag: str) -> str:
    """``--bootstrap-servers`` -> ``METRICSD_BOOTSTRAP_SERVERS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _time_windows(text: str) -> list[float]:
    """One or more comma-separated seconds; ``0`` alone disables time windows."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def _flag(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _add(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any,
    type: Callable[[str], Any],
    help: str,
    **kwargs: Any,
) -> None:
    """Add ``flag`` with its default taken from ``METRICSD_<FLAG>`` when that is set."""
    env = os.environ.get(env_name(flag))
    value = type(env) if env is not None else default
    parser.add_argument(
        flag,
        default=value,
        type=type,
        help=f"{help} [env {env_name(flag)}; default: %(default)s]",
        **kwargs,
    )


def _common(
    parser: argparse.ArgumentParser,
    *,
    broker: bool = True,
    partitions: int = 8,
    log_level: str = "INFO",
) -> None:
    """Options every subcommand has; ``broker=False`` for ``dev``, which brings its own."""
    if broker:
        _add(
            parser,
            "--bootstrap-servers",
            default="localhost:9092",
            type=str,
            help="Kafka bootstrap servers, host:port[,host:port]",
        )
    _add(
        parser,
        "--input-topic",
        default="training.events",
        type=str,
        help="topic of training events",
    )
    _add(
        parser,
        "--partitions",
        default=partitions,
        type=int,
        help="partitions of topics created by metricsd",
    )
    _add(parser, "--log-level", default=log_level, type=str, help="DEBUG, INFO, WARNING or ERROR")
    _add(
        parser,
        "--log-format",
        default="auto",
        type=str,
        choices=("auto", "json", "console"),
        help="auto: console on a TTY, JSON lines otherwise",
    )


def _run_options(parser: argparse.ArgumentParser, *, interval: float) -> None:
    _add(
        parser,
        "--output-topic",
        default="training.summaries",
        type=str,
        help="topic of summary and profile records",
    )
    _add(
        parser,
        "--dead-letter-topic",
        default="",
        type=str,
        help="topic of rejected input (default: <input-topic>.dlq)",
    )
    _add(parser, "--group-id", default="metricsd", type=str, help="consumer group")
    _add(parser, "--interval", default=interval, type=float, help="seconds between ticks")
    _add(
        parser,
        "--window",
        default=1000,
        type=int,
        help="count window: the newest N values per stream",
    )
    env = os.environ.get(env_name("--time-window"))
    parser.add_argument(
        "--time-window",
        action="append",
        type=_time_windows,
        default=None,
        help="time window over event time in seconds; repeatable; 0 disables time windows "
        f"[env {env_name('--time-window')} comma-separated; default: 60 and 300]",
    )
    parser.set_defaults(time_window_env=_time_windows(env) if env is not None else None)
    _add(
        parser,
        "--profile-interval",
        default=60.0,
        type=float,
        help="seconds between profile records and log lines",
    )
    _add(
        parser,
        "--shutdown-timeout",
        default=15.0,
        type=float,
        help="seconds each shutdown step (final flush, client stops) may take before giving up",
    )
    _add(
        parser,
        "--changelog",
        default=True,
        type=_flag,
        help="keep window state in a compacted changelog topic so that restarts and rebalances "
        "resume the windows (true/false)",
    )
    _add(
        parser,
        "--state-topic",
        default="",
        type=str,
        help="changelog topic of window state (default: <group-id>.state)",
    )
    _add(
        parser,
        "--restore-timeout",
        default=120.0,
        type=float,
        help="seconds restoring state on a partition assignment may take",
    )
    _add(
        parser, "--stats-interval", default=30.0, type=float, help="seconds between stats log lines"
    )
    _add(
        parser,
        "--threshold",
        default=0.1,
        type=float,
        help="regression: |y_true - y_pred| <= threshold counts as within threshold",
    )
    _add(
        parser,
        "--max-array",
        default=10_000,
        type=int,
        help="longest array accepted in one event (longer: dead-lettered)",
    )
    _add(
        parser,
        "--max-classes",
        default=1000,
        type=int,
        help="multiclass labels must be below this (else dead-lettered)",
    )
    _add(
        parser,
        "--max-runs",
        default=10_000,
        type=int,
        help="runs tracked at once; a new run beyond this evicts the least recently active one "
        "(after its final summaries)",
    )
    _add(
        parser,
        "--idle-timeout",
        default=3600.0,
        type=float,
        help="seconds without events after which a run is evicted (after its final summaries); "
        "0 = never",
    )


def _simulate_options(parser: argparse.ArgumentParser, *, runs: int, rate: float) -> None:
    _add(parser, "--runs", default=runs, type=int, help="concurrent simulated training runs")
    _add(
        parser,
        "--rate",
        default=rate,
        type=float,
        help="training steps per second, all runs together (each step emits a batch_time event, "
        "every 10th a prediction batch, and now and then cv/attention/features)",
    )
    _add(parser, "--seed", default=0, type=int, help="random seed")


def _security_options(parser: argparse.ArgumentParser) -> None:
    """TLS and SASL of every Kafka client (``run`` and ``simulate``)."""
    _add(
        parser,
        "--security-protocol",
        default="PLAINTEXT",
        type=str.upper,
        choices=SECURITY_PROTOCOLS,
        help="how to talk to the brokers",
    )
    _add(
        parser,
        "--ssl-cafile",
        default="",
        type=str,
        help="PEM file of the CA(s) that signed the brokers' certificates (default: system CAs)",
    )
    _add(parser, "--ssl-certfile", default="", type=str, help="PEM client certificate (mutual TLS)")
    _add(parser, "--ssl-keyfile", default="", type=str, help="unencrypted PEM key of the certfile")
    _add(
        parser,
        "--ssl-check-hostname",
        default=True,
        type=_flag,
        help="check that the broker's certificate names the host connected to (true/false)",
    )
    _add(
        parser,
        "--sasl-mechanism",
        default="",
        type=str.upper,
        help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with SASL_*)",
    )
    _add(parser, "--sasl-username", default="", type=str, help="SASL username")
    _add(
        parser,
        "--sasl-password",
        default=None,
        type=Secret,
        help="SASL password; prefer the environment variable or --sasl-password-file, since other "
        "local users can read a command line",
    )
    _add(
        parser,
        "--sasl-password-file",
        default="",
        type=str,
        help="file holding the SASL password (a trailing newline is ignored)",
    )


def _security_from(args: argparse.Namespace) -> Security:
    """The :class:`Security` of a parsed command line (PLAINTEXT for ``dev``: no such flags)."""
    if not hasattr(args, "security_protocol"):
        return Security()
    password: Secret | None = args.sasl_password
    if args.sasl_password_file:
        if password is not None:
            raise ConfigError(
                "give the SASL password once: --sasl-password (METRICSD_SASL_PASSWORD) or "
                "--sasl-password-file, not both"
            )
        path = args.sasl_password_file
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"sasl-password-file {path!r} cannot be read: {reason}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"sasl-password-file {path!r} is not UTF-8 text") from None
        password = Secret(text.removesuffix("\n").removesuffix("\r"))
    return Security(
        security_protocol=args.security_protocol,
        ssl_cafile=args.ssl_cafile or None,
        ssl_certfile=args.ssl_certfile or None,
        ssl_keyfile=args.ssl_keyfile or None,
        ssl_check_hostname=args.ssl_check_hostname,
        sasl_mechanism=args.sasl_mechanism or None,
        sasl_username=args.sasl_username or None,
        sasl_password=password,
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (used by ``main`` and by the docker-compose test)."""
    parser = argparse.ArgumentParser(prog="metricsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon against a Kafka cluster")
    _common(run)
    _security_options(run)
    _run_options(run, interval=5.0)

    sim = sub.add_parser("simulate", help="a synthetic training job producing events")
    _common(sim)
    _security_options(sim)
    _simulate_options(sim, runs=4, rate=200.0)
    _add(sim, "--duration", default=0.0, type=float, help="seconds to run; 0 = until stopped")

    dev = sub.add_parser("dev", help="zero-setup demo: embedded broker + daemon + simulated job")
    _common(dev, broker=False, partitions=4, log_level="WARNING")
    _run_options(dev, interval=2.0)
    _simulate_options(dev, runs=3, rate=100.0)
    _add(dev, "--duration", default=0.0, type=float, help="seconds to run; 0 = until Ctrl-C")
    return parser


def _time_window_setting(args: argparse.Namespace) -> tuple[float, ...]:
    chosen = (
        args.time_window
        if args.time_window is not None
        else ([args.time_window_env] if args.time_window_env is not None else [[60.0, 300.0]])
    )
    flat = [t for group in chosen for t in group]
    if flat == [0.0]:
        return ()
    return tuple(flat)


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The validated :class:`Settings` of a parsed ``run``/``dev`` command line."""
    monitor = MonitorSettings(
        window=args.window,
        time_windows=_time_window_setting(args),
        threshold=args.threshold,
        max_array=args.max_array,
        max_classes=args.max_classes,
        max_runs=args.max_runs,
        idle_timeout=args.idle_timeout,
    )
    fields: dict[str, Any] = {
        "bootstrap_servers": getattr(args, "bootstrap_servers", "localhost:9092"),
        "input_topic": args.input_topic,
        "output_topic": args.output_topic,
        "dead_letter_topic": args.dead_letter_topic,
        "group_id": args.group_id,
        "interval": args.interval,
        "profile_interval": args.profile_interval,
        "stats_interval": args.stats_interval,
        "shutdown_timeout": args.shutdown_timeout,
        "changelog": args.changelog,
        "state_topic": args.state_topic,
        "restore_timeout": args.restore_timeout,
        "partitions": args.partitions,
        "monitor": monitor,
        "security": _security_from(args),
    }
    fields.update(overrides)
    return Settings(**fields)


def simulate_settings_from(args: argparse.Namespace, **overrides: Any) -> SimulateSettings:
    fields: dict[str, Any] = {
        "bootstrap_servers": getattr(args, "bootstrap_servers", "localhost:9092"),
        "input_topic": args.input_topic,
        "runs": args.runs,
        "rate": args.rate,
        "duration": args.duration,
        "seed": args.seed,
        "partitions": args.partitions,
        "security": _security_from(args),
    }
    fields.update(overrides)
    return SimulateSettings(**fields)


def _run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> None:
    """``asyncio.run`` with SIGTERM/SIGINT setting the stop event (they do nothing else)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metricsd`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from metricsd.kafka import KafkaAuthError  # imports aiokafka: not needed for --help

    try:
        if args.command == "run":
            settings = settings_from(args)
            logs.configure(args.log_level, args.log_format)
            from metricsd import service

            _run_until_signal(lambda stop: service.run(settings, stop))
        elif args.command == "simulate":
            sim = simulate_settings_from(args)
            logs.configure(args.log_level, args.log_format)
            from metricsd import simulate

            _run_until_signal(lambda stop: simulate.produce(sim, stop))
        else:
            settings_from(
                args, bootstrap_servers="127.0.0.1:1"
            )  # validate before starting anything
            logs.configure(args.log_level, args.log_format)
            _run_until_signal(lambda stop: _dev(args, stop))
    except ConfigError as exc:
        parser.exit(2, f"metricsd: error: {exc}\n")
    except ValueError as exc:  # e.g. an unknown log level
        parser.exit(2, f"metricsd: error: {exc}\n")
    except KafkaAuthError as exc:  # logged once as kafka_auth_failed where it was detected
        parser.exit(1, f"metricsd: error: {exc}\n")
    return 0


async def _dev(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Embedded broker, daemon, simulated job and a printer of the summary topic, until stopped."""
    from metricsd import kafka, service, simulate
    from metricsd.devbroker import DevBroker

    out = sys.stdout
    with DevBroker() as broker:
        print(
            f"metricsd dev: embedded Tansu broker on {broker.bootstrap} (pid {broker.pid})",
            file=out,
        )
        settings = settings_from(args, bootstrap_servers=broker.bootstrap)
        sim = simulate_settings_from(args, bootstrap_servers=broker.bootstrap, duration=0.0)
        await kafka.ensure_topics(broker.bootstrap, settings.topics(), security=settings.security)
        daemon_stop, sim_stop = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(service.run(settings, daemon_stop), name="daemon"),
            asyncio.create_task(simulate.produce(sim, sim_stop), name="simulator"),
            asyncio.create_task(_print_summaries(broker.bootstrap, settings, out), name="printer"),
        ]
        print(
            f"metricsd dev: {args.runs} simulated runs at {args.rate:g} steps/s; summaries every "
            f"{args.interval:g} s from topic {settings.output_topic!r}; Ctrl-C to stop",
            file=out,
        )
        waiter = asyncio.create_task(stop.wait())
        timeout = args.duration or None
        done, _ = await asyncio.wait(
            [waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        sim_stop.set()
        await tasks[1]
        daemon_stop.set()
        await tasks[0]
        await asyncio.sleep(1.0)  # let the printer show the final tick
        tasks[2].cancel()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[2]
    print("metricsd dev: stopped", file=out)


async def _print_summaries(bootstrap: str, settings: Settings, out: Any) -> None:
    """Print one line per count-window summary (and per profile record) as they arrive.

    The summary topic is at-least-once: like any consumer of it, the printer de-duplicates on
    ``id`` (profiles on instance and time)."""
    from metricsd import kafka

    consumer = kafka.consumer(
        bootstrap, group_id=f"{settings.group_id}-dev-printer", security=settings.security
    )
    await consumer.start()
    seen: set[Any] = set()
    try:
        consumer.subscribe([settings.output_topic])
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    body = orjson.loads(record.value)
                    identity = body.get("id") or (body.get("instance"), body.get("emitted_at"))
                    if identity in seen:
                        continue
                    seen.add(identity)
                    line = _describe(body)
                    if line:
                        print(line, file=out, flush=True)
    finally:
        await consumer.stop()


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _describe(record: dict[str, Any]) -> str | None:
    """A one-line rendering of a summary (count window only) or profile record."""
    if record.get("type") == "profile":
        ops = sorted(record["operations"], key=lambda op: -op["total_us"])[:4]
        top = ", ".join(f"{op['name']} p50={_fmt(op['p50_us'])}us" for op in ops)
        return (
            f"[profile] ticks={record['ticks']} tick_p50_ms={_fmt(record['tick_ms']['p50'])} "
            f"tick_overhead={_fmt(record['tick_overhead_fraction'])} | {top}"
        )
    if record.get("type") != "summary" or record["window"]["kind"] != "count":
        return None
    m = record["metrics"]
    stream = record["stream"]
    if stream == "batch_time":
        body = " ".join(f"{k}={_fmt(m[k])}" for k in ("mean", "p95", "p99", "cv", "skewness"))
    elif "task" in record:
        keys = {
            "binary": ("accuracy", "precision", "recall", "f1"),
            "multiclass": ("accuracy", "f1_macro", "f1_weighted"),
            "regression": ("rmse", "mae", "r2", "pearson_r"),
        }[record["task"]]
        body = f"{record['task']}: " + " ".join(f"{k}={_fmt(m[k])}" for k in keys)
    elif stream == "cv":
        body = " ".join(
            f"{k}={_fmt(m[k])}"
            for k in ("folds", "mean_val_loss", "train_val_gap", "overfitting_ratio")
        )
    elif stream == "attention":
        body = (
            f"concentration mean={_fmt(m['concentration']['mean'])} entropy mean="
            f"{_fmt(m['entropy']['mean'])} top={m['latest']['top_attention_positions']}"
        )
    else:
        body = " ".join(f"{k} mean={_fmt(m[k]['mean'])}" for k in ("mean", "sparsity", "l2_norm"))
    final = " FINAL" if record["final"] else ""
    return f"[{record['run_id']} {stream} n={record['count']} seq={record['seq']}{final}] {body}"


if __name__ == "__main__":
    sys.exit(main())
