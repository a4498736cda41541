"""docker-compose.yml and Dockerfile: structure, KRaft settings, and agreement with the CLI.

The compose file cannot be run here (no Docker engine), so it is checked statically: the services
exist, Kafka is a single KRaft node whose listeners agree with each other, the apps wait for a
healthy broker, and every subcommand, ``--flag`` and ``METRICSD_*`` variable the file uses exists
in ``metricsd.cli.build_parser()`` and parses. If ``docker-compose`` is installed, its own validator
runs too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from metricsd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APPS = ("metricsd", "simulator")
ENV_PREFIX = "METRICSD_"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict)
    return service


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as strings, from either the mapping or the KEY=VALUE list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no subcommands")


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def _host_ports(listeners: str) -> set[str]:
    """``PLAINTEXT://kafka:9092,X://h:1`` -> ``{"kafka:9092", "h:1"}``."""
    return {item.split("://", 1)[1] for item in listeners.split(",") if "://" in item}


def test_services_are_kafka_metricsd_simulator_and_prometheus() -> None:
    """The compose file defines the broker, the daemon, the simulator and Prometheus."""
    assert {"kafka", "metricsd", "simulator", "prometheus"} <= set(_compose()["services"])


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative to the compose file) of the service's bind mounts."""
    found: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        found[target] = (ROOT / source).resolve()
    return found


def test_prometheus_mounts_the_deploy_config_and_rules() -> None:
    """Prometheus (the official image) reads deploy/prometheus/prometheus.yml through a
    read-only mount; the rule files it names exist in the same mounted directory; its UI is
    published on 9090."""
    service = _service("prometheus")
    assert str(service["image"]).startswith("prom/prometheus:")
    mounts = _mounts(service)
    assert mounts["/etc/prometheus"] == ROOT / "deploy" / "prometheus"
    assert any(str(v).endswith(":ro") for v in service["volumes"])
    config_flag = [c for c in _command(service) if c.startswith("--config.file=")]
    assert config_flag == ["--config.file=/etc/prometheus/prometheus.yml"]
    config_path = mounts["/etc/prometheus"] / "prometheus.yml"
    assert config_path.is_file()
    config = yaml.safe_load(config_path.read_text())
    assert config["rule_files"]
    for rules in config["rule_files"]:
        assert (config_path.parent / rules).is_file(), rules
    assert "9090:9090" in [str(p) for p in service["ports"]]


def test_prometheus_scrapes_the_daemon_service_on_its_http_port() -> None:
    """Every scrape target is host:port of a compose service that exposes that port; the daemon's
    is 9464, the default --http-port of METRICS.md (and of the CLI, once it has the flag)."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "metricsd:9464" in targets
    services = _compose()["services"]
    for target in targets:
        host, port = target.rsplit(":", 1)
        exposed = [str(p).split(":")[-1] for p in services[host].get("expose", [])]
        assert port in exposed, target
    run = _subparsers(build_parser())["run"]
    defaults = {a.dest: a.default for a in run._actions}
    if "http_port" in defaults:  # the setting of the exporter (another branch adds it)
        args = build_parser().parse_args(["run"])
        assert args.http_port == 9464


def test_kafka_is_a_single_kraft_node() -> None:
    """Kafka runs without ZooKeeper as one combined broker/controller with consistent listeners."""
    kafka = _service("kafka")
    assert str(kafka["image"]).startswith("apache/kafka:")
    env = _environment(kafka)
    assert not any(key.startswith("KAFKA_ZOOKEEPER") for key in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1 and voters[0].startswith(f"{node_id}@")
    voter_port = voters[0].rsplit(":", 1)[1]
    listeners = env["KAFKA_LISTENERS"]
    assert f"{controller}://:{voter_port}" in listeners.split(",")
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listener_names = {item.split("://")[0] for item in listeners.split(",")}
    assert listener_names <= set(protocol_map)
    advertised_names = {
        item.split("://")[0] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    assert controller not in advertised_names
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env.get("CLUSTER_ID")


def test_kafka_has_a_protocol_healthcheck() -> None:
    """The broker's healthcheck asks it for API versions, so "healthy" means it speaks Kafka."""
    healthcheck = _service("kafka")["healthcheck"]
    test = healthcheck["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "kafka-broker-api-versions.sh" in text


@pytest.mark.parametrize("name", APPS)
def test_app_waits_for_healthy_kafka_and_uses_the_image(name: str) -> None:
    """Each app starts only after Kafka is healthy and runs the image built from the Dockerfile."""
    service = _service(name)
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert service.get("build") in (".", {"context": "."})


def test_daemon_restarts_unless_stopped() -> None:
    """The daemon service is restarted after a crash or a broker outage."""
    assert _service("metricsd")["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", APPS)
def test_app_bootstrap_is_an_advertised_listener(name: str) -> None:
    """The apps connect to an address Kafka advertises, so metadata sends them back to it."""
    advertised = _host_ports(_environment(_service("kafka"))["KAFKA_ADVERTISED_LISTENERS"])
    servers = _environment(_service(name))["METRICSD_BOOTSTRAP_SERVERS"].split(",")
    assert set(servers) <= advertised


@pytest.mark.parametrize("name", APPS)
def test_command_uses_existing_subcommand_and_flags(name: str) -> None:
    """Every subcommand and --flag in a service's command exists in the CLI's parser."""
    command = _command(_service(name))
    subcommands = _subparsers(build_parser())
    assert command[0] in subcommands
    known = _long_flags(subcommands[command[0]])
    used = {token.split("=", 1)[0] for token in command[1:] if token.startswith("--")}
    assert used <= known, f"unknown flags for {command[0]!r}: {sorted(used - known)}"


@pytest.mark.parametrize("name", APPS)
def test_environment_uses_existing_settings(name: str) -> None:
    """Every METRICSD_* variable of a service is the env form of a flag of its subcommand."""
    service = _service(name)
    subcommand = _command(service)[0]
    known = {_env_name(flag) for flag in _long_flags(_subparsers(build_parser())[subcommand])}
    used = {key for key in _environment(service) if key.startswith(ENV_PREFIX)}
    assert used, f"{name} sets no METRICSD_* variables"
    assert used <= known, f"unknown settings for {subcommand!r}: {sorted(used - known)}"


@pytest.mark.parametrize("name", APPS)
def test_command_and_environment_parse(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI accepts each service's command with its environment (values of the right types)."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    service = _service(name)
    env = _environment(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    command = _command(service)
    args = build_parser().parse_args(command)
    assert args.command == command[0]
    assert args.bootstrap_servers == env["METRICSD_BOOTSTRAP_SERVERS"]


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    """The image installs the package, runs as a non-root user, and enters the metricsd script."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11-slim")
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["metricsd"]' in instructions
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "metricsd" in scripts


def test_docker_compose_validates_the_file() -> None:
    """docker-compose's own validator accepts the file. docker-compose is a system program (no
    Python package provides it), so without it this skips, loudly, naming the install command;
    CI installs it and fails on any skip (METRICSD_NO_SKIPS=1)."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip(
            "docker-compose is not installed, `docker-compose config -q` did not run; install it "
            "with: sudo apt-get install -y --no-install-recommends docker-compose"
        )
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
