"""The two-process example of docs/distributed.md runs as documented:
``torchrun --nproc-per-node 2 examples/tp_linear_ce.py`` (CPU, gloo)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist

from logitkit.distributed._harness import free_port

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "tp_linear_ce.py"

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ is not part of this checkout"),
]


def test_tp_linear_ce_example_runs_under_torchrun():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(EXAMPLE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches single-device" in proc.stdout, proc.stdout + proc.stderr
    assert "collectives per step: 3 collectives" in proc.stdout, proc.stdout
