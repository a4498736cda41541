"""Settings are validated once with messages naming the setting; the CLI maps flags and env."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from metricsd.cli import build_parser, settings_from
from metricsd.config import (
    ConfigError,
    MonitorSettings,
    Secret,
    Security,
    Settings,
    SimulateSettings,
    env_name,
    flags,
    parse_bool,
    parse_seconds,
    setting,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window"),
        ({"time_windows": (60.0, -1.0)}, "time windows"),
        ({"time_windows": (60.0, 60.0)}, "distinct"),
        ({"threshold": -0.1}, "threshold"),
        ({"max_array": 0}, "max-array"),
        ({"max_classes": 1}, "max-classes"),
    ],
)
def test_monitor_settings_reject_bad_values(kwargs: dict[str, object], message: str) -> None:
    """Each out-of-range monitor setting fails at construction with its name in the message."""
    with pytest.raises(ConfigError, match=message):
        MonitorSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"bootstrap_servers": " "}, "bootstrap"),
        ({"output_topic": "training.events"}, "differ"),
        ({"partitions": 0}, "partitions"),
        ({"group_id": ""}, "group-id"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, object], message: str) -> None:
    """Each inconsistent daemon setting fails at construction with its name in the message."""
    with pytest.raises(ConfigError, match=message):
        Settings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e-320, 0.0, -1.0, 1e9])
@pytest.mark.parametrize(
    "field",
    ["interval", "profile_interval", "stats_interval", "shutdown_timeout", "restore_timeout"],
)
def test_durations_must_be_finite_and_sane(field: str, value: float) -> None:
    """An interval of inf would never tick or commit, 1e-320 overflows the scheduler: refused."""
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        Settings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e-9, 1e12])
def test_time_windows_must_be_finite_and_sane(value: float) -> None:
    with pytest.raises(ConfigError, match="time windows"):
        MonitorSettings(time_windows=(value,))


def test_dead_letter_topic_defaults_to_input_dot_dlq() -> None:
    """Without an explicit dead-letter topic it is the input topic plus '.dlq'."""
    assert Settings(input_topic="in").dead_letter_topic == "in.dlq"


def test_simulate_settings_reject_bad_values() -> None:
    """A simulator with no runs is refused."""
    with pytest.raises(ConfigError, match="runs"):
        SimulateSettings(runs=0)


def test_flags_become_settings() -> None:
    """Command-line flags, including repeated time windows, end up in the Settings."""
    args = build_parser().parse_args(
        [
            "run",
            "--bootstrap-servers",
            "k:1",
            "--window",
            "50",
            "--time-window",
            "10",
            "--time-window",
            "30",
            "--interval",
            "0.5",
        ]
    )
    settings = settings_from(args)
    assert settings.bootstrap_servers == "k:1"
    assert settings.monitor.window == 50
    assert settings.monitor.time_windows == (10.0, 30.0)
    assert settings.interval == 0.5
    assert settings.dead_letter_topic == "training.events.dlq"


def test_env_vars_are_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """METRICSD_* variables set defaults; an explicit flag overrides them."""
    monkeypatch.setenv("METRICSD_WINDOW", "77")
    monkeypatch.setenv("METRICSD_TIME_WINDOW", "5,15")
    monkeypatch.setenv("METRICSD_OUTPUT_TOPIC", "out")
    args = build_parser().parse_args(["run", "--output-topic", "flag-out"])
    settings = settings_from(args)
    assert settings.monitor.window == 77
    assert settings.monitor.time_windows == (5.0, 15.0)
    assert settings.output_topic == "flag-out"


def test_time_window_zero_disables_time_windows() -> None:
    """`--time-window 0` leaves only the count window."""
    args = build_parser().parse_args(["run", "--time-window", "0"])
    assert settings_from(args).monitor.time_windows == ()


def test_default_time_windows_are_60_and_300() -> None:
    """Without flags or env the time windows are 60 s and 300 s."""
    assert settings_from(build_parser().parse_args(["run"])).monitor.time_windows == (60.0, 300.0)


def test_env_name_mapping() -> None:
    """Flags map to METRICSD_ upper-case names with underscores."""
    assert env_name("--bootstrap-servers") == "METRICSD_BOOTSTRAP_SERVERS"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_runs": 0}, "max-runs"),
        ({"idle_timeout": -1.0}, "idle-timeout"),
        ({"idle_timeout": float("nan")}, "idle-timeout"),
        ({"idle_timeout": float("inf")}, "idle-timeout"),
    ],
)
def test_memory_bounds_reject_bad_values(kwargs: dict[str, object], message: str) -> None:
    """max-runs below 1 and a negative, NaN or infinite idle-timeout fail at construction."""
    with pytest.raises(ConfigError, match=message):
        MonitorSettings(**kwargs)  # type: ignore[arg-type]


def test_memory_bound_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-runs and --idle-timeout (or their METRICSD_* variables) reach MonitorSettings."""
    defaults = settings_from(build_parser().parse_args(["run"])).monitor
    assert (defaults.max_runs, defaults.idle_timeout) == (10_000, 3600.0)
    monkeypatch.setenv("METRICSD_IDLE_TIMEOUT", "0")
    settings = settings_from(build_parser().parse_args(["run", "--max-runs", "123"]))
    assert settings.monitor.max_runs == 123 and settings.monitor.idle_timeout == 0.0


# -- the settings definitions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("YES", True), (" on ", True), ("1", True)],
        *[("false", False), ("No", False), ("off", False), ("0", False)],
    ],
)
def test_parse_bool_accepts_the_usual_words(text: str, value: bool) -> None:
    """true/yes/on/1 and false/no/off/0, in any case and with surrounding blanks."""
    assert parse_bool(text) is value


def test_parse_bool_and_seconds_refuse_other_text() -> None:
    """Anything else is a ConfigError quoting the text."""
    with pytest.raises(ConfigError, match="not a boolean: 'maybe'"):
        parse_bool("maybe")
    with pytest.raises(ConfigError, match="not a number of seconds: '1,x'"):
        parse_seconds("1,x")


def test_parse_seconds_splits_on_commas() -> None:
    """Comma-separated seconds, empty parts ignored; the empty text is no windows."""
    assert parse_seconds("60, 300,") == (60.0, 300.0)
    assert parse_seconds("") == ()


def test_flags_derive_from_field_names_unless_overridden() -> None:
    """A field's flag is its name with dashes, its variable METRICSD_ + the flag in upper case;
    time_windows keeps its historical singular --time-window."""
    by_name = {item.name: item for item in flags(Settings)}
    assert (by_name["group_id"].flag, by_name["group_id"].env) == (
        "--group-id",
        "METRICSD_GROUP_ID",
    )
    windows = by_name["time_windows"]
    assert (windows.flag, windows.env, windows.dest) == (
        "--time-window",
        "METRICSD_TIME_WINDOW",
        "time_window",
    )
    assert by_name["window"].owner is MonitorSettings and by_name["ssl_cafile"].owner is Security


def test_defaults_show_as_text_that_parses_back() -> None:
    """The text --help shows for a default parses back to that default."""
    for item in flags(Settings) + flags(SimulateSettings):
        shown = item.show(item.default)
        if item.default is None or item.default == "":
            assert shown == ""
            continue
        assert item.option.parse(shown) == item.default, item.flag


def test_dev_defaults_differ_only_where_declared() -> None:
    """dev's own defaults: 4 partitions, ticks every 2 s, 3 runs at 100 steps/s; others as run's."""
    changed = {
        item.name: item.default_for("dev")
        for item in flags(Settings) + flags(SimulateSettings)
        if item.default_for("dev") != item.default
    }
    assert changed == {"partitions": 4, "interval": 2.0, "runs": 3, "rate": 100.0}


def test_setting_without_a_parser_for_its_default_is_refused() -> None:
    """A None default gives no type to parse with: the definition must name its parser."""
    with pytest.raises(TypeError, match="needs parse="):
        setting(None, "a path")


def test_password_file_is_read_at_construction(tmp_path: Path) -> None:
    """Security(sasl_password_file=...) holds the file's password (no trailing newline); a copy
    keeps it; a password given as well, or an unreadable file, is a ConfigError."""
    secret = tmp_path / "password"
    secret.write_text("hunter2\r\n")
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"}
    security = Security(**sasl, sasl_password_file=str(secret))
    assert security.sasl_password == Secret("hunter2")
    assert dataclasses.replace(security, sasl_username="v").sasl_password == Secret("hunter2")
    with pytest.raises(ConfigError, match="not both"):
        Security(**sasl, sasl_password="x", sasl_password_file=str(secret))
    with pytest.raises(ConfigError, match="cannot be read"):
        Security(**sasl, sasl_password_file=str(tmp_path / "none"))
    secret.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Security(**sasl, sasl_password_file=str(secret))
