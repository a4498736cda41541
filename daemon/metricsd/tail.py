"""``metricsd tail``: the summary topic as a live table (or de-duplicated JSON lines).

On a terminal: one row per run and stream with its key figures (``summaries.key_figures``), the
age of its last summary, and ended runs marked; the table updates in place (``rich.live``). Not
a terminal: one text line per new summary. ``--json``: every new (de-duplicated) summary as one
JSON line, what ``metricsd report --input`` reads back.

The topic is read without a consumer group: every partition is assigned and read from the end
(``--from-beginning``: from the start), so nothing is committed and any number of tails can run.
Ctrl-C (or SIGTERM) stops it with exit code 0.

``read_records`` and the connection flags are shared with ``metricsd.report``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from metricsd import kafka
from metricsd.config import (
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    ConfigError,
    Secret,
    Security,
    Settings,
)
from metricsd.summaries import Summaries, key_figures, parse, window_tag

__all__ = [
    "add_connection_flags",
    "build_parser",
    "main",
    "read_records",
    "render_table",
    "security_from",
]

_ENV = "METRICSD_"


def _env(flag: str, default: str) -> str:
    return os.environ.get(_ENV + flag.lstrip("-").replace("-", "_").upper(), default)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap-servers``, ``--topic`` and the TLS/SASL flags (``METRICSD_*`` defaults)."""
    parser.add_argument(
        "--bootstrap-servers",
        default=_env("--bootstrap-servers", "localhost:9092"),
        help="Kafka bootstrap servers [env METRICSD_BOOTSTRAP_SERVERS; default: %(default)s]",
    )
    parser.add_argument(
        "--topic",
        default=_env("--output-topic", Settings().output_topic),
        help="the daemon's output (summary) topic [env METRICSD_OUTPUT_TOPIC; default: "
        "%(default)s]",
    )
    tls = parser.add_argument_group("TLS and SASL (as for metricsd run)")
    tls.add_argument(
        "--security-protocol",
        default=_env("--security-protocol", "PLAINTEXT").upper(),
        type=str.upper,
        choices=SECURITY_PROTOCOLS,
    )
    tls.add_argument("--ssl-cafile", default=_env("--ssl-cafile", ""))
    tls.add_argument("--ssl-certfile", default=_env("--ssl-certfile", ""))
    tls.add_argument("--ssl-keyfile", default=_env("--ssl-keyfile", ""))
    tls.add_argument(
        "--no-ssl-check-hostname",
        dest="ssl_check_hostname",
        action="store_false",
        default=_env("--ssl-check-hostname", "true").lower() not in ("false", "no", "off", "0"),
        help="do not check that the broker's certificate names the host",
    )
    tls.add_argument(
        "--sasl-mechanism",
        default=_env("--sasl-mechanism", "").upper(),
        type=str.upper,
        help=f"one of {', '.join(SASL_MECHANISMS)}",
    )
    tls.add_argument("--sasl-username", default=_env("--sasl-username", ""))
    tls.add_argument(
        "--sasl-password-file",
        default=_env("--sasl-password-file", ""),
        help="file holding the SASL password (else METRICSD_SASL_PASSWORD)",
    )


def security_from(args: argparse.Namespace) -> Security:
    """The :class:`Security` of the parsed flags; raises ``ConfigError`` like ``metricsd run``."""
    password: Secret | None = None
    if args.sasl_password_file:
        try:
            text = Path(args.sasl_password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ConfigError(
                f"sasl-password-file {args.sasl_password_file!r} cannot be read"
            ) from None
        password = Secret(text.removesuffix("\n").removesuffix("\r"))
    elif os.environ.get(_ENV + "SASL_PASSWORD"):
        password = Secret(os.environ[_ENV + "SASL_PASSWORD"])
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


async def read_records(
    bootstrap_servers: str,
    topic: str,
    security: Security,
    handle: Callable[[list[bytes | None]], None],
    stop: asyncio.Event,
    *,
    from_beginning: bool,
    idle: float | None = None,
    until_end: bool = False,
    on_waiting: Callable[[str], None] | None = None,
) -> None:
    """Hand every record value of ``topic`` (all partitions, no group) to ``handle``, a batch at
    a time, until ``stop`` is set or, with ``idle``, no record arrived for ``idle`` seconds, or,
    with ``until_end``, every partition is read up to its end when reading began (a topic that
    is still written to never goes quiet). Tansu reports an end offset up to one batch short
    (the last batch's base offset + 1), but a fetch returns that batch whole, so reaching it
    still reads every record written before the start.

    Waits for the topic to exist (``on_waiting`` is told why). Raises ``kafka.KafkaAuthError``
    for a refused login and ``kafka.KafkaConnectionError`` when no broker can be reached.
    """
    await kafka.check_connection(bootstrap_servers, security)
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        # group_id None: no group is joined and nothing is committed (assign() below).
        consumer = kafka.consumer(bootstrap_servers, None, security=security)  # type: ignore[arg-type]
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                # Metadata is loaded at start(): wait for the topic, then start again to see it.
                if on_waiting is not None:
                    on_waiting(f"waiting for topic {topic!r}")
                while topic not in await consumer.topics():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    if stop.is_set():
                        return
                continue
            assigned = [kafka.TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            if from_beginning:
                await consumer.seek_to_beginning()
            else:
                await consumer.seek_to_end()
            ends = await consumer.end_offsets(assigned) if until_end else {}
            if on_waiting is not None:
                on_waiting("")
            last = loop.time()
            while not stop.is_set():
                if ends and all([await consumer.position(tp) >= ends[tp] for tp in assigned]):
                    return
                batch = await consumer.getmany(timeout_ms=250, max_records=5000)
                values = [r.value for records in batch.values() for r in records]
                if values:
                    last = loop.time()
                    handle(values)
                elif idle is not None and loop.time() - last >= idle:
                    return
            return
        finally:
            await consumer.stop()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_table(
    summaries: Summaries, now: float, window: str | None = None, status: str = ""
) -> Any:
    """The live table (a ``rich.table.Table``): one row per run and stream, at wall time ``now``.

    ``window`` (a tag such as ``time:60``) picks the window shown; None: the count window. Ended
    runs (every stream final) say ``ended`` and are dimmed.
    """
    from rich.table import Table

    table = Table(
        title="metricsd summaries",
        caption=_caption(summaries, status),
        expand=False,
        header_style="bold",
    )
    for name, justify in (
        ("run", "left"),
        ("stream", "left"),
        ("window", "left"),
        ("values", "right"),
        ("key figures", "left"),
        ("age", "right"),
        ("state", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "key figures")  # type: ignore[arg-type]
    for run in summaries.runs():
        ended = summaries.is_final(run)
        ranked = summaries.latest(run, "ranks")
        count = (ranked or {}).get("metrics", {}).get("ranks")
        ranks = count if isinstance(count, int) and count > 1 else 1
        for i, stream in enumerate(summaries.streams(run)):
            record = summaries.latest(run, stream, window) or summaries.latest(run, stream)
            if record is None:
                continue
            figures = "  ".join(
                f"{f.label} [bold]{f.text()}[/]" for f in key_figures(record, ranks=ranks)
            )
            state = "ended" if record.get("final") else "live"
            if record.get("window", {}).get("truncated"):
                state += " (truncated)"
            table.add_row(
                run if i == 0 else "",
                stream,
                window_tag(record["window"]),
                f"{record.get('count', 0)}/{record.get('total', 0)}",
                figures,
                _age(None if (t := summaries.last_emitted(run, stream)) is None else now - t),
                state,
                style="dim" if ended else None,
                end_section=i == len(summaries.streams(run)) - 1,
            )
    return table


def _caption(summaries: Summaries, status: str) -> str:
    parts = [status] if status else []
    parts.append(f"{len(summaries)} summaries, {summaries.duplicates} duplicates skipped")
    if summaries.profiles:
        p = summaries.profiles[-1]
        tick = (p.get("tick_ms") or {}).get("p95")
        overhead = p.get("overhead_fraction")
        daemon = f"daemon {p.get('instance', '?')}"
        if isinstance(tick, int | float):
            daemon += f": tick p95 {tick:.1f} ms"
        if isinstance(overhead, int | float):
            daemon += f", profiler overhead {overhead * 100:.2f}%"
        parts.append(daemon)
    parts.append("Ctrl-C to quit")
    return " · ".join(parts)


def _text_line(record: dict[str, Any]) -> str:
    figures = " ".join(f"{f.label}={f.text()}" for f in key_figures(record))
    final = " final" if record.get("final") else ""
    return (
        f"{record['run_id']} {record['stream']} {window_tag(record['window'])} "
        f"seq={record['seq']} total={record.get('total')}{final} {figures}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metricsd tail",
        description="Follow the summary topic: a live table on a terminal, or JSON lines.",
    )
    add_connection_flags(parser)
    parser.add_argument("--run", default=None, help="only this run id")
    parser.add_argument("--stream", default=None, help="only this stream (e.g. prediction/val)")
    parser.add_argument(
        "--window",
        default=None,
        help="window shown in the table, e.g. count:1000 or time:60 (default: the count window)",
    )
    parser.add_argument(
        "--from-beginning", action="store_true", help="read the topic from its start, not its end"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print each new summary as one JSON line (de-duplicated on id), no table",
    )
    return parser


class _Tail:
    """What the reader's batches feed: the store, plus the output of the chosen mode."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.live = not args.json and out.isatty()
        self.summaries = Summaries(run=args.run, stream=args.stream, keep_series=False)
        self.status = "connecting"
        self.changed = True

    def handle(self, values: list[bytes | None]) -> None:
        lines: list[str] = []
        for value in values:
            record = parse(value)
            if record is None or not self.summaries.add(record):
                continue
            self.changed = True
            if record.get("type") != "summary" or self.live:
                continue
            if self.args.json:
                lines.append(orjson.dumps(record).decode())
            elif self.args.window is None or window_tag(record["window"]) == self.args.window:
                lines.append(_text_line(record))
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def waiting(self, why: str) -> None:
        self.status = why
        self.changed = True


async def _run(args: argparse.Namespace, security: Security, tail: _Tail) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reader = read_records(
        args.bootstrap_servers,
        args.topic,
        security,
        tail.handle,
        stop,
        from_beginning=args.from_beginning,
        on_waiting=tail.waiting,
    )
    if not tail.live:
        await reader
        return
    from rich.console import Console
    from rich.live import Live

    console = Console(file=tail.out)

    def table() -> Any:
        return render_table(tail.summaries, time.time(), args.window, tail.status)

    task = asyncio.ensure_future(reader)
    with Live(table(), console=console, auto_refresh=False, transient=False) as live:
        try:
            while not task.done():
                # Redraw twice a second: new summaries, and ages that grow without them.
                await asyncio.wait({task}, timeout=0.5)
                live.update(table(), refresh=True)
        finally:
            stop.set()
            await task  # raises what the reader raised


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metricsd tail``; the exit code (0 also after Ctrl-C)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        security = security_from(args)
    except ConfigError as exc:
        print(f"metricsd tail: {exc}", file=sys.stderr)
        return 2
    tail = _Tail(args, sys.stdout)
    # aiokafka warns through stdlib logging (to stderr) while it retries; over a live table or
    # JSON lines that is noise, and a lasting failure surfaces as an exception below anyway.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        asyncio.run(_run(args, security, tail))
    except KeyboardInterrupt:
        return 0
    except kafka.KafkaAuthError as exc:
        print(f"metricsd tail: {exc}", file=sys.stderr)
        return 2
    except kafka.KafkaConnectionError as exc:
        print(f"metricsd tail: cannot reach {args.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `metricsd tail --json | head`: the reader went away; not an error of ours.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
