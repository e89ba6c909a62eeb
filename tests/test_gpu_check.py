"""bench/gpu_check.sh: on a machine without a GPU it says so and checks nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_no_gpu_message(tmp_path):
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("this machine has nvidia-smi: the no-GPU path cannot be shown here")
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 77, run.stderr
    assert "no NVIDIA GPU available" in run.stderr
    assert "nothing was checked" in run.stderr
    assert not any(tmp_path.iterdir()), "nothing may be built or run without a GPU"


def test_pytest_filters_select_tests():
    """Every pytest -k filter of the script selects real tests of its files
    (a renamed test must not turn a GPU check into a run of nothing)."""
    import re
    import shlex

    text = SCRIPT.read_text()
    subset = re.search(r"subset=\(([^)]*)\)", text).group(1).split()
    memcheck_filter = re.search(r'filter="([^"]+)"', text).group(1)
    checks = []
    for line in text.splitlines():
        match = re.search(r'pytest (\S+(?: \S+)*?) -q -x -k "([^"]+)"', line)
        if match is not None:
            files = subset if match.group(1).startswith('"${subset') else shlex.split(match.group(1))
            checks.append((files, match.group(2).replace("$filter", memcheck_filter)))
    assert len(checks) == 3
    root = SCRIPT.parents[1]
    for files, pattern in checks:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", pattern, *files],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=300,
        )
        collected = [line for line in run.stdout.splitlines() if "::" in line]
        assert collected, f"-k {pattern!r} selects no test in {files}: {run.stdout[-500:]}"
