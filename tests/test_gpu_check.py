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
