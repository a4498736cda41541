"""The TOML configuration file (``--config`` / ``METRICSD_CONFIG``): every setting can be given
in it, in the layout of ``config.file_sections``; flag > environment > file > default; unknown
keys, wrong TOML types, bad values, unreadable files and syntax errors exit 2 naming the file and
the key; ``metricsd config`` shows the effective settings with their sources, as TOML that loads
back to the same settings, and never shows a secret."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from metricsd import cli, config
from metricsd.config import Secret, Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No METRICSD_* variable of the calling shell leaks into these tests."""
    for key in list(os.environ):
        if key.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(key)


def _file(tmp_path: Path, text: str, name: str = "metricsd.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _settings(*argv: str, command: str = "run") -> Settings:
    return cli.settings_from(cli.build_parser().parse_args([command, *argv]))


def _exit_message(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_file_sets_values_at_every_level_of_the_layout(tmp_path: Path) -> None:
    """Top level, [monitor], [security] and [log] keys reach their settings."""
    path = _file(
        tmp_path,
        'group_id = "g7"\ninterval = 2\nchangelog = false\n'
        "[monitor]\nwindow = 250\ntime_windows = [30, 90.5]\n"
        '[security]\nsecurity_protocol = "plaintext"\n'
        '[log]\nlog_level = "WARNING"\n',
    )
    args = cli.build_parser().parse_args(["run", "--config", path])
    s = cli.settings_from(args)
    assert (s.group_id, s.interval, s.changelog) == ("g7", 2.0, False)
    assert (s.monitor.window, s.monitor.time_windows) == (250, (30.0, 90.5))
    assert s.security.security_protocol == "PLAINTEXT"  # the flag's own parser (upper) applies
    assert args.log_level == "WARNING"
    assert args.sources["window"] == f"file {path} (monitor.window)"
    assert args.sources["output_topic"] == "default"


@pytest.mark.parametrize(
    ("in_file", "env", "flag", "expected", "source"),
    [
        (None, None, None, 1000, "default"),
        (250, None, None, 250, "file"),
        (250, "300", None, 300, "env METRICSD_WINDOW"),
        (250, None, "400", 400, "flag --window"),
        (None, "300", "400", 400, "flag --window"),
        (250, "300", "400", 400, "flag --window"),
    ],
)
def test_precedence_is_flag_then_environment_then_file_then_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_file: int | None,
    env: str | None,
    flag: str | None,
    expected: int,
    source: str,
) -> None:
    """Each pair of sources, on one setting: the higher one wins and is named as the source."""
    path = _file(tmp_path, f"[monitor]\nwindow = {in_file}\n" if in_file is not None else "")
    if env is not None:
        monkeypatch.setenv("METRICSD_WINDOW", env)
    argv = ["run", "--config", path] + (["--window", flag] if flag is not None else [])
    args = cli.build_parser().parse_args(argv)
    assert cli.settings_from(args).monitor.window == expected
    assert args.sources["window"].startswith(source)


def test_metricsd_config_variable_names_the_file_and_the_flag_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _file(tmp_path, 'group_id = "from-env-file"\n', "a.toml")
    second = _file(tmp_path, 'group_id = "from-flag-file"\n', "b.toml")
    monkeypatch.setenv("METRICSD_CONFIG", first)
    assert _settings().group_id == "from-env-file"
    assert _settings("--config", second).group_id == "from-flag-file"


def test_each_subcommand_takes_its_own_settings_from_one_file(tmp_path: Path) -> None:
    """[simulate] is the simulator's; dev keeps its own embedded broker whatever the file says;
    run ignores the simulator's keys (they are still checked)."""
    path = _file(
        tmp_path,
        'bootstrap_servers = "kafka:9092"\npartitions = 3\n[simulate]\nruns = 7\nrate = 50\n',
    )
    sim = cli.simulate_settings_from(cli.build_parser().parse_args(["simulate", "--config", path]))
    assert (sim.runs, sim.rate, sim.partitions, sim.bootstrap_servers) == (7, 50.0, 3, "kafka:9092")
    dev_args = cli.build_parser().parse_args(["dev", "--config", path])
    assert cli.simulate_settings_from(dev_args).runs == 7
    assert cli.settings_from(dev_args).bootstrap_servers == "localhost:9092"  # not from the file
    assert _settings("--config", path).partitions == 3
    bad = _file(tmp_path, '[simulate]\nruns = "many"\n', "bad.toml")
    with pytest.raises(SystemExit):
        _settings("--config", bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("windoww = 5\n", "unknown key 'windoww'"),
        ("window = 5\n", "unknown key 'window' (did you mean [monitor] 'window'?)"),
        ("[monitor]\nwindows = 5\n", "unknown key 'monitor.windows'"),
        ("[security]\nsasl-username = 'u'\n", "did you mean [security] 'sasl_username'?"),
        ("[nope]\nwindow = 5\n", "unknown key 'nope'"),
        ('[monitor]\nwindow = "1000"\n', "monitor.window must be a TOML integer, got string"),
        ("[monitor]\nwindow = 10.5\n", "monitor.window must be a TOML integer, got float"),
        ("changelog = 1\n", "changelog must be a TOML boolean, got integer 1"),
        ('interval = "5"\n', "interval must be a TOML number, got string"),
        ("interval = true\n", "interval must be a TOML number, got boolean"),
        ("group_id = 5\n", "group_id must be a TOML string, got integer"),
        ('[monitor]\ntime_windows = ["60"]\n', "monitor.time_windows must be a TOML array"),
        ('[log]\nlog_format = "xml"\n', "log.log_format must be one of auto, json, console"),
        ('[security]\nsecurity_protocol = "TLS"\n', "security.security_protocol must be one of"),
        ("x = [\n", "is not valid TOML"),
    ],
)
def test_a_bad_file_exits_2_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = _file(tmp_path, text)
    line = _exit_message(capsys, "run", "--config", path)
    assert f"config file {path!r}" in line
    assert message in line


def test_a_value_the_setting_refuses_exits_2_like_a_bad_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, "[monitor]\nwindow = 0\n")
    assert _exit_message(capsys, "run", "--config", path) == (
        "metricsd: error: window must be in 1..1000000, got 0"
    )
    path = _file(tmp_path, "interval = inf\n")
    assert "interval must be between" in _exit_message(capsys, "run", "--config", path)


def test_a_missing_or_unreadable_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "nowhere.toml")
    assert "cannot be read: No such file" in _exit_message(capsys, "run", "--config", missing)
    monkeypatch.setenv("METRICSD_CONFIG", str(tmp_path))  # a directory
    assert "cannot be read" in _exit_message(capsys, "run")


def test_a_file_that_is_not_utf8_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'group_id = "caf\xe9"\n')
    line = _exit_message(capsys, "run", "--config", str(path))
    assert f"config file {str(path)!r} is not UTF-8 text (byte 15" in line


def test_help_works_whatever_the_config_file_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICSD_CONFIG", _file(tmp_path, "x = [\n"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    assert "--config FILE" in capsys.readouterr().out


def test_metricsd_config_prints_toml_that_loads_back_to_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values from all four sources, each line naming its source; saved, the output is a
    configuration file giving exactly the same settings."""
    path = _file(tmp_path, "[monitor]\nwindow = 250\ntime_windows = []\n")
    monkeypatch.setenv("METRICSD_GROUP_ID", "g-env")
    assert cli.main(["config", "--config", path, "--interval", "2.5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 'group_id = "g-env"  # env METRICSD_GROUP_ID' in lines
    assert "interval = 2.5  # flag --interval" in lines
    assert f"window = 250  # file {path} (monitor.window)" in lines
    assert "time_windows = []  # file " + path + " (monitor.time_windows)" in lines
    assert 'output_topic = "training.summaries"  # default' in lines
    assert 'state_topic = "g-env.state"  # default' in lines  # derived defaults resolved
    doc = tomllib.loads(out)
    assert doc["monitor"]["window"] == 250 and doc["log"]["log_level"] == "INFO"
    saved = _file(tmp_path, out, "saved.toml")
    monkeypatch.delenv("METRICSD_GROUP_ID")
    assert _settings("--config", saved) == _settings(
        "--config", path, "--interval", "2.5", "--group-id", "g-env"
    )


def test_metricsd_config_json_lists_every_setting_with_flag_env_and_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, "[monitor]\nmax_runs = 77\n")
    assert cli.main(["config", "--config", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    entries = {e["key"]: e for e in doc["settings"]}
    assert doc["config"] == path
    assert entries["monitor.max_runs"] == {
        "key": "monitor.max_runs",
        "flag": "--max-runs",
        "env": "METRICSD_MAX_RUNS",
        "value": 77,
        "source": f"file {path} (monitor.max_runs)",
    }
    run_flags = {f.flag for f in cli._command_flags(Settings, frozenset())}
    assert {e["flag"] for e in doc["settings"]} >= run_flags


def test_a_secret_is_never_printed_from_any_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hunter2-" + "x" * 8
    path = _file(
        tmp_path,
        '[security]\nsecurity_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\n'
        f'sasl_username = "u"\nsasl_password = "{secret}"\n',
    )
    assert isinstance(_settings("--config", path).security.sasl_password, Secret)
    for argv in (["config", "--config", path], ["config", "--config", path, "--json"]):
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        assert secret not in captured.out + captured.err
        assert Secret.MASK in captured.out
    monkeypatch.setenv("METRICSD_SASL_PASSWORD", secret)
    assert cli.main(["config", "--config", path]) == 0
    out = capsys.readouterr().out
    assert secret not in out
    assert "# sasl_password = ********** " in out  # a comment: the saved file asks for it anew


def test_every_setting_of_every_command_has_a_place_in_the_file() -> None:
    """file_sections covers each flag of run, simulate and dev exactly once."""
    placed = [f.dest for known in config.file_sections().values() for f in known.values()]
    assert len(placed) == len(set(placed))
    parser_dests: set[str] = set()
    for _, classes, without in cli.COMMANDS.values():
        for cls in classes:
            parser_dests |= {f.dest for f in cli._command_flags(cls, without)}
    assert set(placed) == parser_dests


def test_the_shipped_example_file_loads(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(REPO / "deploy" / "metricsd.toml")
    s = _settings("--config", example)
    assert (s.bootstrap_servers, s.monitor.time_windows) == ("kafka:9092", (60.0, 300.0))
    args = cli.build_parser().parse_args(["simulate", "--config", example])
    sim = cli.simulate_settings_from(args)
    assert (sim.runs, sim.rate) == (4, 200.0)
    values: dict[str, Any] = tomllib.loads(Path(example).read_text(encoding="utf-8"))
    assert values["log"]["log_format"] == "json"


def test_the_readme_example_has_only_known_keys_of_the_right_types(tmp_path: Path) -> None:
    """The README's TOML block passes the file checks (its SASL files exist only in a real
    deployment, so the settings themselves are not built)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    found = config.read_config_file(_file(tmp_path, block))
    assert found["window"] == ("monitor.window", 1000)
    assert found["security_protocol"] == ("security.security_protocol", "SASL_SSL")
    assert found["time_window"] == ("monitor.time_windows", (60.0, 300.0))
