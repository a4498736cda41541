"""The command line is generated from the settings definitions: every setting has a flag and a
``METRICSD_*`` variable that parse to its type and default, the flag beats the variable, ``--help``
lists them all (whatever the environment holds), and bad values exit 2."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import types
import typing
from typing import Any

import pytest
from metricsd import cli, config, dev
from metricsd.config import (
    Flag,
    LogSettings,
    MonitorSettings,
    Secret,
    Security,
    Settings,
    SimulateSettings,
    flags,
    setting,
)

COMMANDS = ("run", "simulate", "dev")
CLASSES = (Settings, MonitorSettings, Security, SimulateSettings, LogSettings)
# Fields that are deliberately not on the command line (tests and internals set them).
NO_FLAG = {("Settings", "max_records"), ("Settings", "instance")}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No METRICSD_* variable of the calling shell leaks into these tests."""
    import os

    for key in list(os.environ):
        if key.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(key)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _command_settings(command: str) -> list[Flag]:
    """The settings the subcommand should have: those of its classes, minus what it leaves out,
    one per flag."""
    _, classes, without = cli.COMMANDS[command]
    seen: dict[str, Flag] = {}
    for cls in classes:
        for name, inner in [(None, cls), *config.nested(cls).items()]:
            if name in without:
                continue
            for item in flags(inner, recurse=False):
                if item.name not in without:
                    seen.setdefault(item.flag, item)
    return list(seen.values())


def _cases() -> list[tuple[str, Flag]]:
    return [(command, item) for command in COMMANDS for item in _command_settings(command)]


def _ids(case: tuple[str, Flag]) -> str:
    return f"{case[0]}{case[1].flag}"


def _annotation(item: Flag) -> Any:
    hint = typing.get_type_hints(item.owner)[item.name]
    return hint.type if isinstance(hint, dataclasses.InitVar) else hint


def _is_of(value: Any, hint: Any) -> bool:
    """``value`` is an instance of type hint ``hint`` (unions, ``tuple[float, ...]``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_of(value, arm) for arm in typing.get_args(hint))
    if origin is tuple:
        (member, _) = typing.get_args(hint)
        return isinstance(value, tuple) and all(isinstance(v, member) for v in value)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _sample(item: Flag, default: Any) -> tuple[str, Any]:
    """A valid text for the setting that differs from its default, and its parsed value."""
    option = item.option
    if option.choices is not None:
        choice = next(c for c in option.choices if c != default)
        return choice.lower(), choice
    if option.combine is not None:
        return "7,11", (7.0, 11.0)
    hint = _annotation(item)
    if _is_of(True, hint):
        return item.show(not default), not default
    if hint is int:
        return str(default + 3), default + 3
    if hint is float:
        return str(default + 1.5), default + 1.5
    if _is_of(Secret("x"), hint):
        return "s3cret", Secret("s3cret")
    return "flag-value", option.parse("flag-value")


def _parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_every_settings_field_is_a_setting_or_deliberately_not() -> None:
    """Each field of each settings class is a nested settings class, has an option (and so a
    flag), or is one of the few listed internals: a new field cannot silently lack a flag."""
    for cls in CLASSES:
        inner = config.nested(cls)
        with_option = {item.name for item in flags(cls, recurse=False)}
        for f in cls.__dataclass_fields__.values():
            covered = f.name in inner or f.name in with_option or (cls.__name__, f.name) in NO_FLAG
            assert covered, f"{cls.__name__}.{f.name} has no option"


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_each_setting_has_a_flag_and_env_var_parsing_to_its_type_and_default(
    case: tuple[str, Flag], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per subcommand and setting: the flag exists; with neither flag nor variable the value is
    the default, of the field's type; the default's text parses back to it as a flag and as the
    METRICSD_* variable; another value arrives from either."""
    command, item = case
    flag, env, dest = item.flag, item.env, item.dest
    assert env == "METRICSD_" + flag.removeprefix("--").replace("-", "_").upper()
    options = {o for action in _subparsers()[command]._actions for o in action.option_strings}
    assert flag in options
    default = item.default_for(command)
    hint = _annotation(item)
    value = getattr(_parse([command]), dest)
    assert value == default and _is_of(value, hint), (value, default, hint)
    text, other = _sample(item, default)
    assert other != default
    if item.show(default):
        assert getattr(_parse([command, flag, item.show(default)]), dest) == default
        monkeypatch.setenv(env, item.show(default))
        assert getattr(_parse([command]), dest) == default
    monkeypatch.setenv(env, text)
    from_env = getattr(_parse([command]), dest)
    assert from_env == other and _is_of(from_env, hint)
    monkeypatch.delenv(env)
    from_flag = getattr(_parse([command, flag, text]), dest)
    assert from_flag == other and _is_of(from_flag, hint)


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_flag_beats_env_beats_default(
    case: tuple[str, Flag], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both given, the flag's value wins over the variable's, which wins over the default."""
    command, item = case
    default = item.default_for(command)
    text, other = _sample(item, default)
    monkeypatch.setenv(item.env, text)
    assert getattr(_parse([command]), item.dest) == other
    shown = item.show(default)
    if shown:  # a default with a text: give it as the flag, against the variable
        assert getattr(_parse([command, item.flag, shown]), item.dest) == default


def test_defaults_are_the_documented_ones() -> None:
    """The defaults of run, simulate and dev (README's table) come out of the generated parser."""
    run = cli.settings_from(_parse(["run"]))
    assert (run.bootstrap_servers, run.input_topic, run.output_topic, run.group_id) == (
        "localhost:9092",
        "training.events",
        "training.summaries",
        "metricsd",
    )
    assert (run.dead_letter_topic, run.state_topic) == ("training.events.dlq", "metricsd.state")
    assert (run.interval, run.profile_interval, run.stats_interval) == (5.0, 60.0, 30.0)
    assert (run.partitions, run.shutdown_timeout, run.restore_timeout) == (8, 15.0, 120.0)
    assert run.changelog is True and run.security == Security()
    assert run.monitor == MonitorSettings(
        window=1000,
        time_windows=(60.0, 300.0),
        threshold=0.1,
        max_array=10_000,
        max_classes=1000,
        max_runs=10_000,
        idle_timeout=3600.0,
    )
    sim = cli.simulate_settings_from(_parse(["simulate"]))
    assert (sim.runs, sim.rate, sim.duration, sim.seed, sim.partitions) == (4, 200.0, 0.0, 0, 8)
    args = _parse(["dev"])
    dev_run, dev_sim = cli.settings_from(args), cli.simulate_settings_from(args)
    assert (dev_run.partitions, dev_run.interval, dev_sim.runs, dev_sim.rate) == (4, 2.0, 3, 100.0)
    assert (args.log_level, args.log_format) == ("WARNING", "auto")
    assert (_parse(["run"]).log_level, _parse(["simulate"]).log_level) == ("INFO", "INFO")


def test_subcommands_have_only_their_settings() -> None:
    """dev has no broker or security flags (its broker is embedded); run has no simulator flags;
    simulate has no daemon flags."""
    parsers = _subparsers()
    longs = {
        name: {o for a in p._actions for o in a.option_strings if o.startswith("--")}
        for name, p in parsers.items()
    }
    assert "--bootstrap-servers" not in longs["dev"]
    assert not {f for f in longs["dev"] if f.startswith(("--ssl", "--sasl", "--security"))}
    assert {"--runs", "--rate", "--seed", "--duration"}.isdisjoint(longs["run"])
    assert {"--window", "--interval", "--group-id"}.isdisjoint(longs["simulate"])
    for command in COMMANDS:
        expected = {item.flag for item in _command_settings(command)} | {"--help", "--config"}
        assert longs[command] == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_with_env_var_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`metricsd <command> --help` names every flag, its METRICSD_* variable and its default."""
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for item in _command_settings(command):
        assert item.flag in text
        assert item.env in text
        shown = item.show(item.default_for(command))
        if shown:
            assert (
                f"{item.env}{', comma-separated' if item.option.combine else ''}; default: "
                f"{shown}]" in text
            ), item.flag


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["simulate", "--help"],
                                  ["dev", "--help"]])  # fmt: skip
def test_help_works_whatever_the_environment_holds(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With every METRICSD_* variable set to garbage, --help still prints and exits 0."""
    for command in COMMANDS:
        for item in _command_settings(command):
            monkeypatch.setenv(item.env, "@@not-a-value@@")
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    assert "usage: metricsd" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["run", "--window", "abc"], {}, "argument --window: invalid int value: 'abc'"),
        (["run", "--changelog", "maybe"], {}, "argument --changelog: not a boolean: 'maybe'"),
        (["run", "--log-format", "xml"], {}, "argument --log-format: invalid choice: 'xml'"),
        (["run"], {"METRICSD_WINDOW": "abc"}, "METRICSD_WINDOW: invalid int value: 'abc'"),
        (["run"], {"METRICSD_TIME_WINDOW": "x"}, "METRICSD_TIME_WINDOW: not a number of seconds"),
        (["run"], {"METRICSD_LOG_FORMAT": "xml"}, "METRICSD_LOG_FORMAT: invalid choice: 'xml'"),
        (["simulate"], {"METRICSD_RATE": "fast"}, "METRICSD_RATE: invalid float value: 'fast'"),
        (["run"], {"METRICSD_SECURITY_PROTOCOL": "tls"}, "invalid choice: 'TLS'"),
        (["run", "--window", "0"], {}, "metricsd: error: window must be in 1..1000000, got 0"),
        (["run"], {"METRICSD_MAX_RUNS": "0"}, "metricsd: error: max-runs must be in"),
        (["dev", "--runs", "0"], {}, "metricsd: error: runs must be >= 1, got 0"),
        (["simulate", "--rate", "0"], {}, "metricsd: error: rate must be > 0, got 0.0"),
        (["run", "--log-level", "loud"], {}, "metricsd: error: unknown log level 'loud'"),
    ],
)
def test_bad_values_exit_2_naming_the_setting(
    argv: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A value that does not parse (flag or variable) or is out of range exits 2 with a message
    naming the setting, before anything starts."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_new_setting_needs_no_cli_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settings class added to a subcommand gets its flags, variables, defaults and help from
    its field definitions alone."""

    @dataclasses.dataclass(frozen=True)
    class Extra:
        answer: int = setting(42, "the answer", dev=7)
        ratio: float = setting(0.5, "a ratio", flag="--the-ratio")

    for command in ("run", "dev"):
        summary, classes, without = cli.COMMANDS[command]
        monkeypatch.setitem(cli.COMMANDS, command, (summary, (*classes, Extra), without))
    assert (_parse(["run"]).answer, _parse(["dev"]).answer, _parse(["run"]).the_ratio) == (
        42,
        7,
        0.5,
    )
    monkeypatch.setenv("METRICSD_ANSWER", "1")
    monkeypatch.setenv("METRICSD_THE_RATIO", "0.25")
    args = _parse(["run", "--answer", "2"])
    assert (args.answer, args.the_ratio) == (2, 0.25)
    assert cli._from_args(Extra, args, {}) == Extra(answer=2, ratio=0.25)
    monkeypatch.delenv("METRICSD_ANSWER")
    helps = {c: " ".join(p.format_help().split()) for c, p in _subparsers().items()}
    assert "--answer ANSWER the answer [env METRICSD_ANSWER; default: 42]" in helps["run"]
    assert "the answer [env METRICSD_ANSWER; default: 7]" in helps["dev"]
    assert "--the-ratio" in helps["run"] and "--answer" not in helps["simulate"]


def test_dev_dispatches_to_the_dev_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`metricsd dev` validates both settings and hands them to metricsd.dev.run, the demo's
    duration being the simulator's."""
    seen: dict[str, Any] = {}

    async def fake_run(settings: Settings, sim: SimulateSettings, stop: asyncio.Event) -> None:
        seen.update(settings=settings, sim=sim)

    monkeypatch.setattr(dev, "run", fake_run)
    monkeypatch.setattr(cli.logs, "configure", lambda level, fmt: seen.update(log=(level, fmt)))
    assert cli.main(["dev", "--duration", "60", "--interval", "1"]) == 0
    assert seen["settings"].interval == 1.0 and seen["settings"].partitions == 4
    assert seen["sim"].duration == 60.0 and seen["sim"].runs == 3
    assert seen["log"] == ("WARNING", "auto")


@pytest.mark.parametrize("view", ["tail", "report"])
def test_view_subcommands_reach_their_own_parsers(
    view: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``metricsd tail|report`` hand the rest of the line to their module: its flags, its help."""
    from metricsd import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([view, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"metricsd {view}" in out and "--topic" in out
    assert view in cli.build_parser().format_help()
