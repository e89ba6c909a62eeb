"""The scripts in examples/ (and bench/train_step.py, bench/linear_ce_paths.py) run on tiny random
models or shapes, so they never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["finetune_causal_lm.py", "rl_logprobs_step.py", "generate_top_h.py"]


def _run(script: Path, *args: str, timeout: float = 600) -> str:  # generous: shared CI machines
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, f"{script.name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name):
    assert "--tiny" in _run(ROOT / "examples" / name, "--help")


def test_finetune_tiny():
    out = _run(ROOT / "examples" / "finetune_causal_lm.py", "--tiny")
    assert "patched: LinearCrossEntropyPatch(LlamaForCausalLM" in out
    assert "steps: 3" in out


def test_rl_step_tiny():
    out = _run(ROOT / "examples" / "rl_logprobs_step.py", "--tiny", "--check")
    assert "check vs materialised logits" in out


def test_generate_top_h_tiny():
    out = _run(ROOT / "examples" / "generate_top_h.py", "--tiny")
    assert "sample 1:" in out


def test_generate_fused_sampler_chain_tiny():
    out = _run(
        ROOT / "examples" / "generate_top_h.py", "--tiny", "--min-p", "0.05", "--epsilon", "3e-4", "--top-k", "40"
    )
    assert "processor: FusedSamplingLogitsWarper" in out and "sample 1:" in out


def test_generate_mirostat_tiny():
    out = _run(ROOT / "examples" / "generate_top_h.py", "--tiny", "--mirostat-tau", "3.0")
    assert "processor: MirostatLogitsWarper" in out and "sample 1:" in out
    mu = [float(v) for v in out.split("mu after the last step: [")[1].split("]")[0].split(",")]
    assert len(mu) == 2 and all(v != 6.0 for v in mu)  # updated from 2 tau over the steps


def test_train_step_bench_tiny(tmp_path):
    out = _run(ROOT / "bench" / "train_step.py", "--tiny", "--steps", "1", "--json", str(tmp_path / "r.json"))
    assert "patched/unpatched" in out
    assert (tmp_path / "r.json").exists()


def test_gemm_kernels_bench_tiny():
    """bench/linear_ce_paths.py kernels: every bf16 micro-kernel this CPU runs next to torch.mm."""
    out = _run(
        ROOT / "bench" / "linear_ce_paths.py",
        "kernels",
        "--rows",
        "40",
        "--hidden",
        "33",
        "--cols",
        "70",
        "--repeats",
        "1",
    )
    assert "torch.mm bf16" in out and "grad_w" in out
