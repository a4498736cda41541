"""metricsd and python-daemon installed side by side in a throwaway virtualenv: both import.

The package used to be the top-level ``daemon``, which is python-daemon's import name; now it is
``metricsd`` (daemon/metricsd/). A fresh venv (with pip, no system site-packages) gets this
package with ``--no-deps`` (an editable install: no wheel build, so it stays fast) and
python-daemon from the package index; then ``import metricsd`` must give this repository's
package and ``import daemon`` python-daemon's ``DaemonContext``.
"""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import json
import daemon
import metricsd

print(json.dumps({
    "metricsd": metricsd.__file__,
    "daemon": daemon.__file__,
    "daemon_context": hasattr(daemon, "DaemonContext"),
}))
"""


def test_metricsd_and_python_daemon_import_side_by_side(tmp_path: Path) -> None:
    """pip install -e . --no-deps plus python-daemon into a new venv; both imports work."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", "-e", str(ROOT)], ["python-daemon"]):
        done = subprocess.run(
            [*pip, *args], capture_output=True, text=True, timeout=180, check=False
        )
        assert done.returncode == 0, f"pip install {args} failed:\n{done.stderr[-3000:]}"
    # Run from tmp_path so that the repository's folders are not on sys.path by accident.
    done = subprocess.run(
        [str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert Path(found["metricsd"]).resolve() == (ROOT / "daemon" / "metricsd" / "__init__.py")
    assert Path(found["daemon"]).resolve().is_relative_to(env_dir.resolve())
    assert "site-packages" in found["daemon"] and found["daemon_context"], found
