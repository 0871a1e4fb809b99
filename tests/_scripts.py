"""Running the project's scripts in a fresh interpreter, with the checkout importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import textenv_gym

REPO_ROOT = Path(textenv_gym.__file__).resolve().parent.parent


def run_python(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, with the checkout on PYTHONPATH and matplotlib headless."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=timeout
    )
