"""TLS/SASL settings: validated once, secrets never shown, mapped onto aiokafka in one place.

The PEM files come from tests/pki.py (the ``cryptography`` package, in the ``dev`` extra).
End-to-end behaviour against real TLS and SASL listeners is in tests/integration/test_tls.py and
test_sasl.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from metricsd import kafka
from metricsd.cli import build_parser, main, settings_from, simulate_settings_from
from metricsd.config import ConfigError, Secret, Security, Settings, SimulateSettings
from metricsd.devbroker import free_port
from pki import issue, key_pem, make_ca, new_key
from structlog.testing import capture_logs

PASSWORD = "hunter2-Zq8v"
MASK = "**********"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a client certificate with its key, an unrelated key, an encrypted key, the
    certificate and key in one file, and a file that is not PEM."""
    d = tmp_path_factory.mktemp("pem")
    ca = make_ca("ca")
    client = issue(ca, "client")
    files = {
        "ca.pem": ca.cert_pem,
        "client.pem": client.cert_pem,
        "client.key": client.key_pem,
        "other.key": key_pem(new_key()),
        "encrypted.key": key_pem(new_key(), password=b"x"),
        "combined.pem": client.cert_pem + client.key_pem,
        "garbage.pem": b"not a certificate\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    assert b"ENCRYPTED PRIVATE KEY" in files["encrypted.key"]
    return {name.replace(".pem", "").replace(".", "_"): d / name for name in files}


# -- Secret ------------------------------------------------------------------------------------


def test_secret_shows_only_the_mask_and_reveals_on_request() -> None:
    """repr, str, format() and f-strings of a Secret are the mask; reveal() is the value."""
    secret = Secret(PASSWORD)
    shown = [repr(secret), str(secret), format(secret), f"{secret}", f"{secret!r}"]
    assert shown == [MASK] * 5
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other")
    assert not Secret("") and Secret("x")


def test_settings_reprs_never_show_the_password() -> None:
    """Security, Settings and SimulateSettings reprs (and asdict) mask the password, which a
    plain string given to Security is wrapped into."""
    security = Security(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=PASSWORD,  # type: ignore[arg-type]
    )
    assert isinstance(security.sasl_password, Secret)
    texts = [
        repr(security),
        str(Settings(security=security)),
        repr(SimulateSettings(security=security)),
        repr(dataclasses.asdict(security)),
    ]
    for text in texts:
        assert PASSWORD not in text and MASK in text


def test_logged_secrets_render_as_the_mask() -> None:
    """An event carrying the Security object or the Secret renders without the password through
    capture_logs, the daemon's orjson JSON renderer and the console renderer."""
    security = Security(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password=Secret(PASSWORD),
    )
    with capture_logs() as captured:
        structlog.get_logger().info(
            "connecting", security=security, password=security.sasl_password
        )
    assert PASSWORD not in repr(captured)
    event = {"event": "connecting", "security": security, "password": security.sasl_password}
    as_json = structlog.processors.JSONRenderer(serializer=orjson.dumps)(None, "info", dict(event))
    as_text = structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event))
    for rendered in (as_json, as_text):
        text = rendered.decode() if isinstance(rendered, bytes) else str(rendered)
        assert PASSWORD not in text and MASK in text


# -- validation ----------------------------------------------------------------------------------

SASL = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": PASSWORD}


def with_files(pem: dict[str, Path], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the names of ``pem`` files in ``ssl_*`` values replaced by their paths."""
    return {
        k: str(pem[v]) if k.startswith("ssl_") and isinstance(v, str) and v in pem else v
        for k, v in kwargs.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"security_protocol": "TLS"}, "security-protocol must be one of"),
        ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent.pem"}, "does not exist"),
        ({"security_protocol": "SSL", "ssl_cafile": "/"}, "is not a file"),
        (
            {"security_protocol": "SSL", "ssl_cafile": "garbage"},
            "ssl-cafile .* could not be loaded",
        ),
        (
            {"security_protocol": "SSL", "ssl_keyfile": "client_key"},
            "ssl-keyfile needs ssl-certfile",
        ),
        ({"security_protocol": "SSL", "ssl_certfile": "client"}, "holds no .*private key"),
        (
            {"security_protocol": "SSL", "ssl_certfile": "client", "ssl_keyfile": "other_key"},
            "could not be loaded",
        ),
        (
            {"security_protocol": "SSL", "ssl_certfile": "client", "ssl_keyfile": "encrypted_key"},
            "could not be loaded",
        ),
        ({"ssl_cafile": "ca"}, "ssl-cafile set with security-protocol PLAINTEXT"),
        ({"ssl_check_hostname": False}, "ssl-check-hostname set with"),
        ({"security_protocol": "SASL_SSL", **SASL, "sasl_mechanism": None}, "sasl-mechanism"),
        ({"security_protocol": "SASL_SSL", **SASL, "sasl_mechanism": "GSSAPI"}, "sasl-mechanism"),
        ({"security_protocol": "SASL_SSL", **SASL, "sasl_username": ""}, "sasl-username is requ"),
        ({"security_protocol": "SASL_SSL", **SASL, "sasl_password": ""}, "password is required"),
        ({"security_protocol": "SSL", **SASL}, "sasl-mechanism, sasl-username, sasl-password set"),
        ({"sasl_password": PASSWORD}, "sasl-password set with security-protocol PLAINTEXT"),
    ],
)
def test_security_rejects_inconsistent_settings_without_showing_the_password(
    pem: dict[str, Path], kwargs: dict[str, Any], message: str
) -> None:
    """Each inconsistent TLS/SASL setting fails at construction with a message naming it and
    never containing the password."""
    with pytest.raises(ConfigError, match=message) as raised:
        Security(**with_files(pem, kwargs))
    assert PASSWORD not in str(raised.value) and PASSWORD not in repr(raised.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"security_protocol": "SSL"},
        {"security_protocol": "SSL", "ssl_cafile": "ca", "ssl_check_hostname": False},
        {"security_protocol": "SSL", "ssl_certfile": "client", "ssl_keyfile": "client_key"},
        {"security_protocol": "SSL", "ssl_certfile": "combined"},
        {"security_protocol": "SASL_PLAINTEXT", **SASL, "sasl_mechanism": "PLAIN"},
        {"security_protocol": "SASL_SSL", "ssl_cafile": "ca", **SASL},
    ],
)
def test_security_accepts_consistent_settings(pem: dict[str, Path], kwargs: dict[str, Any]) -> None:
    """Consistent combinations (a key inside the certfile included) construct."""
    assert Security(**with_files(pem, kwargs)).security_protocol == kwargs.get(
        "security_protocol", "PLAINTEXT"
    )


# -- CLI -----------------------------------------------------------------------------------------


def test_flags_and_env_become_security_for_run_and_simulate(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The security flags reach Settings and SimulateSettings (lower case accepted), the password
    from METRICSD_SASL_PASSWORD, and --help shows only the mask."""
    monkeypatch.setenv("METRICSD_SASL_PASSWORD", PASSWORD)
    flags = [
        "--security-protocol", "sasl_ssl",
        "--ssl-cafile", str(pem["ca"]),
        "--ssl-check-hostname", "false",
        "--sasl-mechanism", "scram-sha-256",
        "--sasl-username", "svc",
    ]  # fmt: skip
    run = settings_from(build_parser().parse_args(["run", *flags])).security
    sim = simulate_settings_from(build_parser().parse_args(["simulate", *flags])).security
    assert run == sim
    assert (run.security_protocol, run.ssl_cafile, run.ssl_check_hostname) == (
        "SASL_SSL",
        str(pem["ca"]),
        False,
    )
    assert (run.sasl_mechanism, run.sasl_username) == ("SCRAM-SHA-256", "svc")
    assert run.sasl_password is not None and run.sasl_password.reveal() == PASSWORD
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = capsys.readouterr().out
    assert PASSWORD not in help_text and "--sasl-password-file" in help_text


def test_password_file_is_read_once_and_conflicts_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--sasl-password-file gives the password without its trailing newline; with a password
    also given, or an unreadable file, it is a ConfigError that shows no password."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    base = ["run", "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN",
            "--sasl-username", "u"]  # fmt: skip
    parser = build_parser()
    security = settings_from(parser.parse_args([*base, "--sasl-password-file", str(secret)]))
    assert security.security.sasl_password == Secret(PASSWORD)
    both = [*base, "--sasl-password-file", str(secret), "--sasl-password", PASSWORD]
    with pytest.raises(ConfigError, match="not both") as raised:
        settings_from(parser.parse_args(both))
    assert PASSWORD not in str(raised.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        settings_from(parser.parse_args([*base, "--sasl-password-file", str(tmp_path / "none")]))


def test_dev_runs_plaintext() -> None:
    """The dev command (embedded plaintext broker) has no security flags and uses PLAINTEXT."""
    assert settings_from(build_parser().parse_args(["dev"])).security == Security()


def test_bad_security_setting_exits_2_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """metricsd run with SASL but no mechanism exits 2 naming the setting, not the password."""
    argv = ["run", "--security-protocol", "SASL_SSL", "--sasl-username", "u"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--sasl-password", PASSWORD])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "sasl-mechanism" in err and PASSWORD not in err


# -- mapping onto aiokafka -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_connection_options_map_each_protocol(pem: dict[str, Path], protocol: str) -> None:
    """Each protocol maps to exactly its aiokafka arguments, which every client type accepts."""
    tls = {"ssl_cafile": str(pem["ca"]), "ssl_certfile": str(pem["combined"])}
    sasl = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": PASSWORD}
    security = Security(
        security_protocol=protocol,
        ssl_check_hostname="SSL" not in protocol,
        **(tls if "SSL" in protocol else {}),
        **(sasl if "SASL" in protocol else {}),
    )
    options = kafka.connection_options(security)
    expected = {"security_protocol"}
    if "SSL" in protocol:
        expected.add("ssl_context")
        context = options["ssl_context"]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is False
    if "SASL" in protocol:
        expected |= {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password"}
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_password"] == PASSWORD
    assert set(options) == expected and options["security_protocol"] == protocol

    async def build() -> None:
        for client in (
            AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **options),
            AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **options),
            AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:1", **options),
        ):
            assert client is not None

    asyncio.run(build())


def test_unreachable_broker_is_a_retryable_connection_error() -> None:
    """Nobody listening is a KafkaConnectionError (retried by ensure_topics), not an auth error."""
    with pytest.raises(KafkaConnectionError, match="no bootstrap server reachable"):
        asyncio.run(kafka.check_connection(f"127.0.0.1:{free_port()}", Security(), timeout=2))


SCRAM = Security(
    security_protocol="SASL_PLAINTEXT",
    sasl_mechanism="SCRAM-SHA-256",
    sasl_username="svc",
    sasl_password=Secret(PASSWORD),
)
PLAIN = dataclasses.replace(SCRAM, sasl_mechanism="PLAIN")


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "security", "login", "kind"),
    [
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), Security(), False, "tls"),
        (_caused(KafkaConnectionError("closed"), ssl.SSLError(1, "alert")), SCRAM, False, "tls"),
        (SaslAuthenticationFailed(f"bad password {PASSWORD}"), SCRAM, True, "sasl"),
        (UnsupportedSaslMechanismError("no"), SCRAM, True, "sasl"),
        (KafkaConnectionError("closed"), SCRAM, True, "sasl"),
        (KeyError("v"), SCRAM, True, "sasl"),
        (KeyError("v"), PLAIN, True, None),
        (KafkaConnectionError("closed"), SCRAM, False, None),
        (ConnectionRefusedError(111, "refused"), SCRAM, True, None),
    ],
)
def test_refusals_are_classified_and_logged_once_without_the_password(
    exc: BaseException, security: Security, login: bool, kind: str | None
) -> None:
    """TLS and SASL refusals become one KafkaAuthError and one kafka_auth_failed line with the
    password masked (even when the broker's message quotes it); other failures stay as they are."""
    with capture_logs() as captured:
        if kind is None:
            kafka._raise_if_refused(exc, "h:1", security, login=login)
        else:
            with pytest.raises(kafka.KafkaAuthError) as raised:
                kafka._raise_if_refused(exc, "h:1", security, login=login)
            assert (raised.value.kind, raised.value.server) == (kind, "h:1")
            assert PASSWORD not in str(raised.value)
    assert [e["event"] for e in captured] == ([] if kind is None else ["kafka_auth_failed"])
    assert PASSWORD not in repr(captured)
