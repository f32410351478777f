"""scripts/gpu_check.sh parses (bash -n) and is shellcheck-clean; its Python part parses and
answers --help. The --cpu-dry run itself takes minutes on this CPU: run it by hand
(`scripts/gpu_check.sh --cpu-dry`), see README "GPU check"."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gpu_check.sh"


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install -y shellcheck)",
)
def test_shellcheck_clean():
    p = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_help_and_bad_argument():
    p = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "--cpu-dry" in p.stdout
    p = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument '--bogus'" in p.stderr
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "--cpu-dry" in p.stdout
