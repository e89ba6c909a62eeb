"""Tests of the ``logitkit-bench`` CLI (logitkit.bench): end to end on CPU, the bytes-moved
model, the correctness guard and the pure helpers. Kept fast: every run uses --quick."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

import logitkit
from logitkit import bench
from logitkit.bench import top_h_cases
from logitkit.testing import references

ENV_FIELDS = {
    "device",
    "device_name",
    "cpu_model",
    "num_threads",
    "torch_version",
    "cuda_version",
    "logitkit_version",
    "git_commit",
    "git_dirty",
    "build_info",
    "gemm_paths",
    "copy_bandwidth_gbps",
    "copy_buffer_bytes",
    "datasheet_peak_gbps",
    "llc_bytes",
    "rotation_target_bytes",
    "memory_method",
    "python_version",
    "platform",
    "timestamp",
}
RESULT_FIELDS = {
    "op",
    "dtype",
    "rows",
    "vocab",
    "impl",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "pct_copy",
    "gflops",
    "pct_peak",
    "speedup_vs_eager",
    "max_abs_err",
    "max_tol_ratio",
    "atol",
    "rtol",
    "status",
    "error",
    "peak_mem_bytes",
    "bytes_moved",
    "input_bytes",
    "buffers",
    "samples",
    "inner",
}
FAST = ["--quick", "--device", "cpu", "--no-progress", "--repeats", "2", "--warmup", "1"]


def _run(argv, tmp_path):
    """Runs the CLI in-process; returns (exit status, parsed JSON)."""
    out = tmp_path / "run.json"
    rc = bench.main([*argv, "--json", str(out)])
    return rc, json.loads(out.read_text())


# --------------------------------------------------------------------------- end to end


def test_quick_run_writes_documented_json_and_csv(tmp_path, capsys):
    csv_path = tmp_path / "run.csv"
    rc, doc = _run(
        ["--quick", "--device", "cpu", "softmax", "log_softmax", "entropy", "logsumexp", "--csv", str(csv_path)],
        tmp_path,
    )
    assert rc == 0
    assert doc["schema_version"] == 1
    assert set(doc) == {"schema_version", "environment", "config", "results", "summary"}

    env = doc["environment"]
    assert set(env) == ENV_FIELDS
    assert env["device"] == "cpu"
    assert env["torch_version"] == torch.__version__
    assert env["logitkit_version"] == logitkit.__version__
    assert env["num_threads"] == torch.get_num_threads()
    assert isinstance(env["build_info"], dict) and "cpu_capability" in env["build_info"]
    assert env["copy_bandwidth_gbps"] > 0
    assert env["git_commit"] is None or len(env["git_commit"]) == 40

    cfg = doc["config"]
    assert cfg["mode"] == "quick" and cfg["rows"] == [4] and cfg["vocab"] == [1000]
    assert cfg["dtypes"] == ["fp32", "bf16"]

    results = doc["results"]
    # 4 ops x 2 dtypes x (logitkit + eager)
    assert len(results) == 16
    assert {(r["op"], r["dtype"], r["impl"]) for r in results} == {
        (op, dt, impl)
        for op in ("softmax", "log_softmax", "entropy", "logsumexp")
        for dt in ("fp32", "bf16")
        for impl in ("logitkit", "eager")
    }
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert r["status"] == "OK", r
        assert r["error"] is None
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / env["copy_bandwidth_gbps"])
        assert r["bytes_moved"] == bench.bytes_moved(r["op"], r["rows"], r["vocab"], r["dtype"])
        assert r["max_abs_err"] < 0.2 and r["max_tol_ratio"] <= 1
        assert r["samples"] == 5 and r["inner"] >= 1 and r["buffers"] >= 2
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
        else:
            assert r["speedup_vs_eager"] > 0
    assert doc["summary"] == {"cases": 8, "mismatches": 0, "errors": 0, "exit_code": 0}

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results)
    assert set(rows[0]) >= RESULT_FIELDS and set(rows[0]) >= {f"env_{k}" for k in ENV_FIELDS}

    printed = capsys.readouterr().out
    for column in ("median ms", "GB/s", "speed-up", "max abs err", "status"):
        assert column in printed
    assert "MISMATCH" not in printed


def test_plain_table_and_option_overrides(tmp_path, capsys):
    rc, doc = _run(
        [*FAST, "logsumexp", "--dtype", "fp16", "--rows", "1,3", "--vocab", "777", "--plain", "--no-memory"], tmp_path
    )
    assert rc == 0
    assert [(r["rows"], r["vocab"], r["dtype"]) for r in doc["results"]] == [(1, 777, "fp16")] * 2 + [
        (3, 777, "fp16")
    ] * 2
    assert all(r["peak_mem_bytes"] is None and r["samples"] == 2 for r in doc["results"])
    out = capsys.readouterr().out
    assert "logsumexp" in out and "┃" not in out  # plain text, no rich box drawing


def test_unknown_op_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["no_such_op", "--quick"])
    assert exc.value.code == 2
    assert "unknown op" in capsys.readouterr().err


def test_presets():
    cfg, _ = bench.parse_args([])
    assert cfg.ops == ["softmax", "log_softmax", "entropy"]
    assert (cfg.dtypes, cfg.rows, cfg.vocab) == (["fp32", "bf16"], [64], [128256])
    assert cfg.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    full, _ = bench.parse_args(["--full", "--dtype", "bf16"])
    assert full.vocab == [32000, 50257, 128256, 262144] and full.rows == [1, 64]
    assert full.dtypes == ["bf16"] and set(full.ops) == set(bench.CASES)


# --------------------------------------------------------------------------- correctness guard


@pytest.fixture
def broken_softmax(monkeypatch):
    """A registered case whose 'logitkit' implementation is subtly wrong (temperature 1/1.01)."""
    case = dataclasses.replace(bench.CASES["softmax"], name="broken_softmax", fn=lambda x: torch.softmax(x * 1.01, -1))
    monkeypatch.setitem(bench.CASES, case.name, case)
    return case


def test_guard_flags_a_wrong_implementation(broken_softmax, tmp_path, capsys):
    rc, doc = _run([*FAST, "broken_softmax", "softmax", "--dtype", "fp32"], tmp_path)
    assert rc == 1
    status = {(r["op"], r["impl"]): r["status"] for r in doc["results"]}
    assert status == {
        ("broken_softmax", "logitkit"): "MISMATCH",
        ("broken_softmax", "eager"): "OK",
        ("softmax", "logitkit"): "OK",
        ("softmax", "eager"): "OK",
    }
    bad = next(r for r in doc["results"] if r["status"] == "MISMATCH")
    assert bad["max_tol_ratio"] > 1 and bad["median_ms"] is not None  # still timed and reported
    assert doc["summary"]["mismatches"] == 1 and doc["summary"]["exit_code"] == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "FAILED" in captured.err


def test_failing_implementation_is_an_error(monkeypatch, tmp_path):
    def boom(x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(bench.CASES, "boom", dataclasses.replace(bench.CASES["logsumexp"], name="boom", fn=boom))
    rc, doc = _run([*FAST, "boom", "--dtype", "bf16"], tmp_path)
    assert rc == 1
    lk = next(r for r in doc["results"] if r["impl"] == "logitkit")
    assert lk["status"] == "ERROR" and "kernel exploded" in lk["error"] and lk["median_ms"] is None
    assert next(r for r in doc["results"] if r["impl"] == "eager")["status"] == "OK"


def test_top_h_cases_pass_their_guards(tmp_path):
    rc, doc = _run([*FAST, "top_h", "top_h_official", "top_h_exact", "sample", "--dtype", "fp32"], tmp_path)
    assert rc == 0, [(r["op"], r["impl"], r["status"], r["error"]) for r in doc["results"]]
    impls = {(r["op"], r["impl"]) for r in doc["results"]}
    assert ("top_h_official", "official-loop") in impls and ("top_h_exact", "sort-scan") in impls
    expected = "transformers" if top_h_cases._transformers_top_h_warper() else "sort-scan"
    assert ("top_h", expected) in impls and ("sample", expected) in impls


def test_sampling_cases_pass_their_guards(tmp_path):
    rc, doc = _run([*FAST, "sampling", "mirostat", "sample_edt", "--dtype", "fp32,bf16"], tmp_path)
    assert rc == 0, [(r["op"], r["impl"], r["status"], r["error"]) for r in doc["results"]]
    impls = {(r["op"], r["impl"]) for r in doc["results"]}
    assert {("sampling", "sort-based"), ("mirostat", "torch"), ("sample_edt", "torch")} <= impls


def test_top_h_guards_flag_wrong_kept_sets_and_tokens():
    x = torch.randn(8, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    keep = references.top_h_mask(x, 0.4, 1.5, "hf")
    check = top_h_cases._top_h_keep_check(0.4)
    assert check(x.masked_fill(~keep, -math.inf), keep, (x,)) == (0.0, 0.0)
    official = references.top_h_mask(x, 0.4, 1.5, "official")
    assert not torch.equal(official, keep)
    assert check(x.masked_fill(~official, -math.inf), keep, (x,))[1] > 1
    # alpha = 1 allows one differing token per row (the capped rules' equality at the cut), not two
    one_off = keep.clone()
    one_off[0, keep[0].nonzero()[-1]] = False
    assert top_h_cases._top_h_keep_check(1.0)(x.masked_fill(~one_off, -math.inf), keep, (x,))[1] <= 1
    assert check(x.masked_fill(~one_off, -math.inf), keep, (x,))[1] > 1
    first_kept = keep.float().argmax(-1)
    assert top_h_cases._sample_check(first_kept, keep, (x,)) == (0.0, 0.0)
    first_dropped = (~keep).float().argmax(-1)
    assert top_h_cases._sample_check(first_dropped, keep, (x,))[1] > 1
    assert top_h_cases._sample_check(torch.full((8,), -1), keep, (x,))[1] > 1


def test_official_loop_matches_the_reference():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    x[1, :] = x[1, 0]  # not tie-free: skip the row below
    out = top_h_cases.official_top_h_loop(x, 0.4, 1.5)
    keep = references.top_h_mask(x.double(), 0.4, 1.5, "official")
    for r in (0, 2, 3, 4):
        assert torch.equal(out[r].isfinite(), keep[r])
        assert torch.equal(out[r][keep[r]], x[r][keep[r]])


def test_compare_tolerance_and_special_values():
    ref = torch.tensor([1.0, 100.0, float("nan"), float("-inf")], dtype=torch.float64)
    err, ratio = bench.compare(ref.float() + torch.tensor([0.0, 0.5, 0.0, 0.0]), ref, atol=0.0, rtol=1e-2)
    assert err == pytest.approx(0.5) and ratio == pytest.approx(0.5)
    assert bench.compare(ref + torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64), ref, 0.0, 1e-2)[1] > 1
    nan_vs_number = ref.clone()
    nan_vs_number[2] = 0.0
    assert bench.compare(nan_vs_number, ref, 1e-5, 1e-4) == (math.inf, math.inf)
    assert bench.compare(ref[:2], ref, 1e-5, 1e-4) == (math.inf, math.inf)  # wrong shape
    assert bench.compare((ref, ref), (ref, ref), 1e-5, 1e-4) == (0.0, 0.0)  # tuples of outputs


# --------------------------------------------------------------------------- bytes model


@pytest.mark.parametrize(
    "op, dtype, expected",
    [
        ("softmax", "fp32", 2 * 3 * 1000 * 4),
        ("softmax", torch.bfloat16, 2 * 3 * 1000 * 2),
        ("log_softmax", "fp16", 2 * 3 * 1000 * 2),
        ("log_softmax", "fp32", 2 * 3 * 1000 * 4),
        ("entropy", "fp32", 3 * 1000 * 4 + 3 * 4),
        ("entropy", "bf16", 3 * 1000 * 2 + 3 * 4),  # entropy is always written in float32
        ("logsumexp", "fp32", 3 * 1000 * 4 + 3 * 4),
        ("logsumexp", "bf16", 3 * 1000 * 2 + 3 * 2),  # logsumexp keeps the input dtype
        ("top_h", "fp32", 2 * 3 * 1000 * 4),  # read the logits, write the filtered logits
        ("top_h_official", "bf16", 2 * 3 * 1000 * 2),
        ("top_h_exact", "fp16", 2 * 3 * 1000 * 2),
        ("sample", "fp32", 3 * 1000 * 4 + 3 * (4 + 8)),  # + one float32 uniform in, one int64 token out per row
        ("sample", "bf16", 3 * 1000 * 2 + 3 * (4 + 8)),
        # + per-row float32 temperature and min-p, int64 top-k and seed
        ("sampling", "fp32", 3 * 1000 * 4 + 3 * (4 + 8) + 3 * (4 + 4 + 4 + 8 + 8)),
        ("mirostat", "bf16", 3 * 1000 * 2 + 3 * (4 + 8) + 3 * (4 + 4)),  # + mu read and written
        ("sample_edt", "fp16", 3 * 1000 * 2 + 3 * (4 + 8)),
        # read hidden (3 x D) and weight (1000 x D), write their gradients, read 3 int64 targets
        ("linear_ce", "fp32", 2 * (3 + 1000) * bench.LINEAR_CE_HIDDEN * 4 + 3 * 8),
        ("linear_ce", "bf16", 2 * (3 + 1000) * bench.LINEAR_CE_HIDDEN * 2 + 3 * 8),
    ],
)
def test_bytes_moved(op, dtype, expected):
    assert bench.bytes_moved(op, 3, 1000, dtype) == expected


def test_every_registered_op_has_a_bytes_model_test():
    tested = {
        "softmax",
        "log_softmax",
        "entropy",
        "logsumexp",
        "top_h",
        "top_h_official",
        "top_h_exact",
        "sample",
        "sampling",
        "mirostat",
        "sample_edt",
        "linear_ce",
    }
    assert set(bench.CASES) <= tested, "add a test_bytes_moved case for the new op"


def test_linear_ce_flops_model():
    # the three GEMMs of the materialised loss, 2 N D V flops each
    assert bench.CASES["linear_ce"].flops_model(3, 1000, torch.float32) == 6 * 3 * 1000 * bench.LINEAR_CE_HIDDEN


def test_linear_ce_case_runs_and_reports_transient_memory(tmp_path, capsys):
    rc, doc = _run(
        [*FAST, "linear_ce", "--dtype", "fp32", "--rows", "8,16", "--vocab", "300", "--hidden", "64", "--plain"],
        tmp_path,
    )
    assert rc == 0, [(r["impl"], r["status"], r["error"]) for r in doc["results"]]
    assert doc["config"]["hidden"] == 64
    impls = {r["impl"] for r in doc["results"]}
    assert {"logitkit", "materialised", "materialised-fp32-logits", "torch.mm x3"} <= impls
    roofline = next(r for r in doc["results"] if r["impl"] == "torch.mm x3")
    assert roofline["max_abs_err"] is None and roofline["status"] == "OK"  # timed, not checked
    assert set(doc["environment"]["gemm_paths"]) == {"fp32", "bf16", "fp16"}
    for r in doc["results"]:
        assert r["status"] == "OK" and r["gflops"] == pytest.approx(
            6 * r["rows"] * 300 * 64 / (r["median_ms"] * 1e-3) / 1e9
        )
        assert r["samples"] <= 3  # max_repeats of the case
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "linear_ce GEMM path: fp32 fp32" in out


def test_memory_probe_can_exclude_outputs():
    probe = bench.MemoryProbe(torch.device("cpu"))
    if not probe.available:
        pytest.skip(probe.method)
    nbytes = 24 << 20
    assert probe(lambda n: torch.ones(n, dtype=torch.uint8), (nbytes,), exclude_outputs=True) < (4 << 20)


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        bench.register(bench.CASES["softmax"])


# --------------------------------------------------------------------------- helpers


def test_datasheet_peaks():
    assert bench.datasheet_peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert bench.datasheet_peak_gbps("NVIDIA H100 PCIe") == 2000
    assert bench.datasheet_peak_gbps("NVIDIA H200") == 4800
    assert bench.datasheet_peak_gbps("NVIDIA A100-SXM4-80GB") == 2000
    assert bench.datasheet_peak_gbps("NVIDIA A100-SXM4-40GB") == 1555
    assert bench.datasheet_peak_gbps("NVIDIA GeForce RTX 4090") is None


def test_memory_probe_sees_a_known_allocation():
    probe = bench.MemoryProbe(torch.device("cpu"))
    if not probe.available:
        pytest.skip(probe.method)
    nbytes = 24 << 20
    peak = probe(lambda n: torch.ones(n, dtype=torch.uint8), (nbytes,))
    assert nbytes <= peak < nbytes + (4 << 20)
    assert probe(lambda x: x.sum(), (torch.ones(1 << 20),)) < (1 << 20)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    env = {"device_name": "test", "copy_bandwidth_gbps": 10.0, "datasheet_peak_gbps": None}
    results = [
        bench.Result("softmax", "fp32", 1, v, impl, median_ms=v / 1e4, gbps=v / 1e4)
        for v in (1000, 2000)
        for impl in ("logitkit", "eager")
    ]
    paths = bench.write_plots(tmp_path / "sweep.png", env, results)
    assert [p.name for p in paths] == ["sweep_time.png", "sweep_gbps.png"]  # one row count: no memory plot
    assert all(p.stat().st_size > 0 for p in paths)
    swept = [
        bench.Result("linear_ce", "fp32", n, 1000, impl, median_ms=n / 1e3, gbps=1.0, peak_mem_bytes=n << 20)
        for n in (256, 512, 1024)
        for impl in ("logitkit", "materialised")
    ]
    paths = bench.write_plots(tmp_path / "lce.png", env, swept)
    assert [p.name for p in paths] == ["lce_time.png", "lce_gbps.png", "lce_memory.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert bench.plot_paths(tmp_path / "dir")[0] == tmp_path / "dir" / "bench_time.png"
