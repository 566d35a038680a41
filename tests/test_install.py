"""`pip install .` into a fresh virtual environment with constraints.txt gives a working `cmg` (bench/install_check.sh,
quick mode: the new venv sees this environment's installed dependencies, the package itself is built and installed
non-editable, and `cmg train` / `cmg predict` run from outside the source tree)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_a_working_cmg():
    deps = Path(sys.prefix)
    if not list(deps.glob("lib/python3*/site-packages/torch")):
        pytest.skip(f"no installed dependencies to reuse in {deps}")
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "DEPS_FROM": str(deps), "PYTHON": str(base)}
    env.pop("VIRTUAL_ENV", None)
    res = subprocess.run(["bash", str(REPO / "bench" / "install_check.sh")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "OK: fresh venv" in res.stdout and "cmg_core imported from the new venv" in res.stdout
