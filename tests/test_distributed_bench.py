"""``logitkit-bench linear_ce --tp W`` and the paper model of logitkit.bench.tp."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from logitkit.bench import cli, tp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_paper_model_numbers():
    text = tp.paper_model()
    # 16384 x 4096 bf16 grad_hidden all-reduced over TP = 8 at 450 GB/s: 2 * 7/8 * 128 MiB / 450 GB/s.
    assert "grad_hidden all-reduce (bf16)                     128.00 MiB        0.522 ms" in text
    assert "state all-gather (4 fp32/token)" in text


def test_tp_runs_linear_ce_only(capsys):
    assert cli.main(["softmax", "--tp", "2", "--no-progress"]) == 2
    assert "--tp W >= 1 runs the linear_ce op alone" in capsys.readouterr().err


def test_logitkit_bench_linear_ce_tp(capsys):
    argv = ["linear_ce", "--tp", "2", "--rows", "16", "--vocab", "301", "--hidden", "16", "--dtype", "fp32"]
    assert cli.main([*argv, "--repeats", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "N = 16, D = 16, V = 301, fp32" in out
    for impl in ("single process (logitkit)", "TP logitkit.distributed", "TP gather-logits + F.ce"):
        assert impl in out
    # the state all-gather carries 3 fp32 (m, s, z_y) per token
    assert "logitkit       all_gather state        payload         192 B" in out
