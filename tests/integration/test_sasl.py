"""SASL end to end, and what the Tansu broker itself does with ``--authentication``.

Tansu 0.6.0 cannot log anyone in (no PLAIN; its memory storage keeps no SCRAM users; details in
``sasl_front.py``), so successful logins are tested through ``SaslFront``, a Kafka SASL listener
(PLAIN, SCRAM-SHA-256/512) in front of the broker, behind the TLS terminator for SASL_SSL:
client -> TlsTerminator (TLS) -> SaslFront (SASL) -> Tansu, which advertises the terminator's
address. The events are produced and the summaries read by librdkafka, whose SCRAM client
verifies the front's server signature. Against Tansu's own ``--authentication`` the failure paths
are tested as they are: every login fails, and the daemon must say so once and stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_process import DaemonProcess
from kafka_tools import produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker, free_port
from sasl_front import SaslFront
from security_tools import Pki, TlsTerminator, expect_auth_failure, make_pki

pytestmark = pytest.mark.integration

USER, PASSWORD = "metricsd", "correct horse battery staple"
PARTITIONS = 2


@pytest.fixture(scope="module")
def sasl_ssl(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pki, TlsTerminator, SaslFront]]:
    """The broker reachable only through the TLS terminator and SaslFront (SASL), one user."""
    directory = tmp_path_factory.mktemp("sasl")
    pki = make_pki(directory / "pki")
    port = free_port()
    with (
        SaslFront(f"127.0.0.1:{port}", {USER: PASSWORD}) as front,
        TlsTerminator(front.address, pki, directory) as terminator,
        DevBroker(port, log_path=directory / "tansu.log", advertised=terminator.address),
    ):
        yield pki, terminator, front


@pytest.fixture(scope="module")
def tansu_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    """Tansu with its own ``--authentication``."""
    log_path = tmp_path_factory.mktemp("tansu-auth") / "tansu.log"
    with DevBroker(log_path=log_path, authentication=True) as broker:
        yield broker


def sasl_args(terminator: TlsTerminator, pki: Pki, mechanism: str, *extra: str) -> list[str]:
    return [
        "--bootstrap-servers", terminator.address,
        "--security-protocol", "SASL_SSL",
        "--ssl-cafile", str(pki.ca),
        "--sasl-mechanism", mechanism,
        "--sasl-username", USER,
        *extra,
    ]  # fmt: skip


def test_daemon_logs_in_with_scram_over_tls_and_summarises(
    sasl_ssl: tuple[Pki, TlsTerminator, SaslFront], topic_name: str, tmp_path: Path
) -> None:
    """With SCRAM-SHA-512 over TLS (password from a file) the daemon summarises events that
    librdkafka produced with SCRAM-SHA-256; the password never appears in its log."""
    pki, terminator, front = sasl_ssl
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    args = sasl_args(
        terminator, pki, "SCRAM-SHA-512",
        "--sasl-password-file", str(secret),
        "--input-topic", topic_name,
        "--output-topic", f"{topic_name}.out",
        "--group-id", f"{topic_name}-group",
        "--partitions", str(PARTITIONS),
        "--interval", "0.5",
        "--time-window", "0",
    )  # fmt: skip
    librdkafka = {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(pki.ca),
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": USER,
        "sasl.password": PASSWORD,
    }
    values = [0.1 * (i % 7 + 1) for i in range(30)]
    records: list[tuple[bytes | None, bytes, int | None]] = [
        (b"run-s", orjson.dumps({"type": "batch_time", "run_id": "run-s", "seconds": v}), None)
        for v in values
    ]
    failed_before = front.logins["failed"]

    def final_total(out: list[Any]) -> int:
        totals = [orjson.loads(value).get("total", 0) for _, value, _, _ in out]
        return max(totals, default=0)

    with DaemonProcess(args, tmp_path / "daemon.log") as daemon:
        daemon.wait_for_log(lambda line: line.get("event") == "started", timeout=30)
        produce_foreign(terminator.address, topic_name, records, config=librdkafka)
        out = read_topic_foreign(
            terminator.address,
            f"{topic_name}.out",
            range(PARTITIONS),
            until=lambda got: final_total(got) == len(values),
            timeout=30,
            config=librdkafka,
        )
        assert final_total(out) == len(values), daemon.tail()
        summary = max((orjson.loads(v) for _, v, _, _ in out), key=lambda r: r.get("total", 0))
        assert summary["metrics"]["mean"] == pytest.approx(sum(values) / len(values))
        assert daemon.terminate() == 0
    assert front.logins["failed"] == failed_before
    assert front.logins["ok"] >= 4  # admin, producer, group consumer, readers and librdkafka
    assert PASSWORD.encode() not in daemon.log_path.read_bytes()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_wrong_password_stops_the_daemon_fast_after_one_login_attempt(
    sasl_ssl: tuple[Pki, TlsTerminator, SaslFront], tmp_path: Path, mechanism: str
) -> None:
    """A wrong password ends the daemon within seconds with one error line, after exactly one
    refused login (no retry storm), and the password appears nowhere in its output."""
    pki, terminator, front = sasl_ssl
    wrong = f"wrong-{mechanism}-Pa55word"
    failed_before = front.logins["failed"]
    error = expect_auth_failure(
        sasl_args(terminator, pki, mechanism, "--sasl-password", wrong),
        tmp_path / "daemon.log",
        kind="sasl",
        server=terminator.address,
        expected="SaslAuthenticationFailed",
        secret=wrong,
    )
    assert error["sasl_mechanism"] == mechanism and error["sasl_username"] == USER
    assert front.logins["failed"] == failed_before + 1


@pytest.mark.parametrize(
    ("case", "security", "kind", "expected"),
    [
        ("no_sasl", [], "sasl_required", "probably requires SASL"),
        (
            "scram",
            ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-256"],
            "sasl",
            "ended the SCRAM exchange with an error",
        ),
        (
            "plain",
            ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN"],
            "sasl",
            "closed the connection during the login",
        ),
    ],
)
def test_tansu_authentication_refusals_stop_the_daemon_fast_with_one_error(
    tansu_auth: DevBroker,
    tmp_path: Path,
    case: str,
    security: list[str],
    kind: str,
    expected: str,
) -> None:
    """Against Tansu's own --authentication, no login, a SCRAM login (Tansu knows no users) and a
    PLAIN login (Tansu offers no PLAIN) each end the daemon fast with one clear error."""
    secret = "tansu-Pa55word"
    if security:
        security = [*security, "--sasl-username", USER, "--sasl-password", secret]
    expect_auth_failure(
        ["--bootstrap-servers", tansu_auth.bootstrap, *security],
        tmp_path / f"{case}.log",
        kind=kind,
        server=tansu_auth.bootstrap,
        expected=expected,
        secret=secret,
    )
