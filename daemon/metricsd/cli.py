"""Command line: ``metricsd run | simulate | dev | config | tail | report``.

``tail`` and ``report`` (the summary topic on a terminal, a run's report with plots) have their
own parsers in ``metricsd.tail`` and ``metricsd.report``; ``main`` hands them the rest of the
command line.

The flags are generated from the settings classes of ``metricsd.config``, where each setting is
defined once: ``--<setting>``, also given as the environment variable ``METRICSD_<SETTING>`` (upper
case, dashes as underscores; a repeatable flag takes a comma-separated list), e.g.
``METRICSD_BOOTSTRAP_SERVERS``, and also as a key of the TOML file named by ``--config`` (or
``METRICSD_CONFIG``; its layout: ``metricsd.config.file_sections``). A flag on the command line wins
over the environment, which wins over the file, which wins over the default. The environment and
the file are read after the command line is parsed, so ``--help`` works whatever they hold; a bad
value, given any way, exits 2 naming the flag, the variable or the file and key. ``metricsd config``
prints the effective settings of ``run`` and where each came from. Only this module reads the
environment and configures logging; settings are validated once, here, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from metricsd import logs
from metricsd.config import (
    ConfigError,
    FileSettings,
    Flag,
    LogSettings,
    Secret,
    Settings,
    SimulateSettings,
    env_name,
    file_sections,
    flags,
    nested,
    read_config_file,
    toml_value,
)

__all__ = [
    "build_parser",
    "env_name",
    "main",
    "settings_from",
    "show_config",
    "simulate_settings_from",
]

T = TypeVar("T")

# The settings classes of each subcommand, and the settings it leaves out: ``dev`` brings its own
# plaintext broker.
COMMANDS: dict[str, tuple[str, tuple[type, ...], frozenset[str]]] = {
    "run": ("run the daemon against a Kafka cluster", (Settings, LogSettings), frozenset()),
    "simulate": (
        "a synthetic training job producing events",
        (SimulateSettings, LogSettings),
        frozenset(),
    ),
    "dev": (
        "zero-setup demo: embedded broker + daemon + simulated job",
        (Settings, SimulateSettings, LogSettings),
        frozenset({"bootstrap_servers", "security"}),
    ),
    "config": (
        "print the effective settings of `run` (TOML) and where each comes from",
        (Settings, LogSettings),
        frozenset(),
    ),
}

#: The variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = env_name("--config")


# Subcommands with a parser of their own (they read the summary topic; no daemon settings).
VIEWS: dict[str, str] = {
    "tail": "the summary topic as a live table (or de-duplicated JSON lines)",
    "report": "a run's report: PNG figures and one HTML page",
}


def _type_name(parse: Callable[[str], Any]) -> str:
    return getattr(parse, "__name__", "value")


def _for_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: a ConfigError's message is argparse's message, any other
    ValueError argparse's own "invalid <type> value"."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = _type_name(parse)
    return convert


def _help(setting: Flag, default: Any) -> str:
    shown = setting.show(default)
    listed = ", comma-separated" if setting.option.combine else ""
    tail = f"; default: {shown}" if shown else ""
    return f"{setting.option.help} [env {setting.env}{listed}{tail}]".replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose settings, when not on the command line, come from their
    ``METRICSD_*`` variable or else their default (looked up after parsing: ``--help`` never
    reads the environment)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings: list[tuple[Flag, Any]] = []  # (setting, default) in order

    def add_setting(self, setting: Flag, default: Any) -> None:
        option = setting.option
        # A bool setting given bare (``--train``) means true; ``--train false`` still parses.
        bare: dict[str, Any] = {"nargs": "?", "const": True} if type(default) is bool else {}
        self.add_argument(
            setting.flag,
            default=argparse.SUPPRESS,  # absent from the namespace unless given: see below
            type=_for_argparse(option.parse),
            choices=option.choices,
            action="append" if option.combine else "store",
            help=_help(setting, default),
            **bare,
        )
        self._settings.append((setting, default))

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        assert parsed is not None  # argparse makes one when none is given
        if not self._settings:  # the top-level parser: its subcommand's parser did this
            return parsed, extras
        path = getattr(parsed, "config", None) or os.environ.get(CONFIG_ENV) or None
        in_file: FileSettings = {}
        if path is not None:
            try:
                in_file = read_config_file(path)
            except ConfigError as exc:
                self.error(str(exc))
        sources: dict[str, str] = {}
        for setting, default in self._settings:
            combine = setting.option.combine
            given: Any = getattr(parsed, setting.dest, argparse.SUPPRESS)
            raw = os.environ.get(setting.env)
            if given is not argparse.SUPPRESS:  # a list of values when repeatable
                value = combine(given) if combine else given
                sources[setting.dest] = f"flag {setting.flag}"
            elif raw is not None:
                from_env = self._from_env(setting, raw)
                value = combine([from_env]) if combine else from_env
                sources[setting.dest] = f"env {setting.env}"
            elif setting.dest in in_file:
                key, value = in_file[setting.dest]
                sources[setting.dest] = f"file {path} ({key})"
            else:
                value = default
                sources[setting.dest] = "default"
            setattr(parsed, setting.dest, value)
        parsed.config = path
        parsed.sources = sources
        return parsed, extras

    def _from_env(self, setting: Flag, raw: str) -> Any:
        """The parsed value of ``setting``'s environment variable; a bad one exits 2."""
        option = setting.option
        try:
            value = option.parse(raw)
        except ConfigError as exc:
            self.error(f"environment variable {setting.env}: {exc}")
        except (TypeError, ValueError):
            self.error(
                f"environment variable {setting.env}: invalid {_type_name(option.parse)} "
                f"value: {raw!r}"
            )
        if option.choices is not None and value not in option.choices:
            choices = ", ".join(map(repr, option.choices))
            self.error(
                f"environment variable {setting.env}: invalid choice: {value!r} "
                f"(choose from {choices})"
            )
        return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (used by ``main`` and by the docker-compose test)."""
    parser = _Parser(prog="metricsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, summary in VIEWS.items():  # listed in --help; parsed by their own modules
        sub.add_parser(command, help=summary, add_help=False)
    for command, (summary, classes, without) in COMMANDS.items():
        command_parser = sub.add_parser(command, help=summary)
        command_parser.add_argument(
            "--config",
            metavar="FILE",
            help=f"TOML file of settings (below flags and environment) [env {CONFIG_ENV}]",
        )
        if command == "config":
            command_parser.add_argument(
                "--json", action="store_true", help="one JSON object instead of TOML"
            )
        added: dict[str, Flag] = {}
        for cls in classes:
            for setting in _command_flags(cls, without):
                if setting.dest in added:  # shared by two classes (input-topic, partitions)
                    if added[setting.dest].option != setting.option:
                        raise TypeError(f"{setting.flag} is defined twice, differently")
                    continue
                added[setting.dest] = setting
                command_parser.add_setting(setting, setting.default_for(command))
    return parser


def _command_flags(cls: type, without: frozenset[str]) -> list[Flag]:
    """The settings of ``cls`` and of its nested classes, except the fields named in ``without``."""
    found = [setting for setting in flags(cls, recurse=False) if setting.name not in without]
    for name, inner in nested(cls).items():
        if name not in without:
            found += flags(inner)
    return found


def _from_args(cls: type[T], args: argparse.Namespace, overrides: dict[str, Any]) -> T:
    """A ``cls`` of the parsed settings; those the subcommand has not (``dev``'s broker and
    security) take the class default."""
    values = vars(args)
    kwargs: dict[str, Any] = {
        setting.name: values[setting.dest]
        for setting in flags(cls, recurse=False)
        if setting.dest in values
    }
    kwargs.update({name: _from_args(sub, args, {}) for name, sub in nested(cls).items()})
    kwargs.update(overrides)
    return cls(**kwargs)


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The validated :class:`Settings` of a parsed ``run``/``dev`` command line."""
    return _from_args(Settings, args, overrides)


def simulate_settings_from(args: argparse.Namespace, **overrides: Any) -> SimulateSettings:
    """The validated :class:`SimulateSettings` of a parsed ``simulate``/``dev`` command line."""
    return _from_args(SimulateSettings, args, overrides)


def show_config(args: argparse.Namespace) -> str:
    """``metricsd config``: the effective settings of ``run`` as TOML in the configuration file's
    layout (so the output, saved, is a configuration file giving the same settings), each with
    its source as a comment; a secret is never shown (its line is a comment), a setting without
    a value is a comment too. With ``--json``: ``{"config": path, "settings": [{"key", "flag",
    "env", "value", "source"}...]}``."""
    settings = settings_from(args)  # validated: a bad value exits 2 before anything is printed
    values = vars(args)
    entries: list[tuple[str, str, Flag, Any]] = []  # (table, name, setting, value)
    for table, known in file_sections().items():
        for name, setting in known.items():
            if setting.dest not in values:
                continue  # the simulator's own settings: not run's
            # The validated value where the settings keep it (a derived default resolved: the
            # dead-letter topic), else as parsed (logging; the password file, read at start-up).
            owner: Any = settings if table == "" else getattr(settings, table, None)
            kept = {f.name for f in dataclasses.fields(owner)} if owner is not None else set()
            value = getattr(owner, name) if name in kept else values[setting.dest]
            entries.append((table, name, setting, value))
    if values.get("json"):
        return json.dumps(
            {
                "config": args.config,
                "settings": [
                    {
                        "key": f"{table}.{name}" if table else name,
                        "flag": setting.flag,
                        "env": setting.env,
                        "value": Secret.MASK if isinstance(value, Secret) else _jsonable(value),
                        "source": args.sources[setting.dest],
                    }
                    for table, name, setting, value in entries
                ],
            },
            indent=1,
        )
    lines = [
        "# metricsd run: effective settings; precedence flag > environment > "
        + (f"file {args.config}" if args.config else "file (none given)")
        + " > default"
    ]
    table_now = ""
    for table, name, setting, value in entries:
        if table != table_now:
            lines += ["", f"[{table}]"]
            table_now = table
        source = args.sources[setting.dest]
        if isinstance(value, Secret):
            lines.append(f"# {name} = {Secret.MASK}  # {source} (secret, not shown)")
        elif value is None:
            lines.append(f"# {name} = (not set)  # {source}")
        else:
            lines.append(f"{name} = {toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> None:
    """``asyncio.run`` with SIGTERM/SIGINT/SIGHUP setting the stop event (they do nothing else):
    a hang-up (the terminal closed, or a supervisor's reload signal) shuts down cleanly, with the
    final tick and commit, like SIGTERM; there is no reload."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metricsd`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VIEWS:
        from importlib import import_module

        view: Callable[[list[str]], int] = import_module(f"metricsd.{argv[0]}").main
        return view(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from metricsd.kafka import KafkaAuthError  # imports aiokafka: not needed for --help
    from metricsd.service import ServiceFailed

    try:
        log = _from_args(LogSettings, args, {})
        start: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]
        if args.command == "config":
            sys.stdout.write(show_config(args))
            return 0
        if args.command == "run":
            settings = settings_from(args)
            from metricsd import service

            start = partial(service.run, settings)
        elif args.command == "simulate":
            sim = simulate_settings_from(args)
            from metricsd import simulate

            start = partial(simulate.produce, sim)
        else:
            settings, sim = settings_from(args), simulate_settings_from(args)
            from metricsd import dev

            start = partial(dev.run, settings, sim)
        logs.configure(log.log_level, cast("logs.LogFormat", log.log_format))
        _run_until_signal(start)
    except ConfigError as exc:
        parser.exit(2, f"metricsd: error: {exc}\n")
    except ValueError as exc:  # e.g. an unknown log level
        parser.exit(2, f"metricsd: error: {exc}\n")
    except KafkaAuthError as exc:  # logged once as kafka_auth_failed where it was detected
        parser.exit(1, f"metricsd: error: {exc}\n")
    except ServiceFailed as exc:  # logged where it happened; the exit status says so
        parser.exit(1, f"metricsd: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
