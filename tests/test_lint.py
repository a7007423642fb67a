"""Lint is part of the test run: ruff over the package, tests, benchmarks and conversion scripts."""

import os
import shutil
import subprocess
import sys

from tests.utils import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    assert os.path.exists(ruff), "ruff is a test dependency (pip install -e '.[test]')"
    proc = subprocess.run([ruff, "check", "esm_dual", "tests", "benchmarks", "conversion"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
