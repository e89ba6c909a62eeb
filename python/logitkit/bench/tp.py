"""Measurements of logitkit.distributed on local gloo processes.

    logitkit-bench linear_ce --tp 2 [--rows 1024 --hidden 1024 --vocab 32768 --dtype fp32]
    python -m logitkit.bench.tp linear_ce --tp 2 [...]      (the same)
    python -m logitkit.bench.tp merge --tp 2 3
    python -m logitkit.bench.tp top_h --tp 2 [--rows 64 --vocab 128256] [--per-row]
    python -m logitkit.bench.tp model

``linear_ce``: forward + backward of the vocabulary-parallel linear
cross-entropy on ``--tp`` gloo processes against (a) the single-process
``logitkit.linear_cross_entropy`` with as many threads as the group has
processes, and (b) the tensor-parallel approach that all-gathers the logits
(each rank forms its N x V_r logits, all-gathers them to N x V, runs
F.cross_entropy; backward slices its columns of the logits' gradient and
all-reduces grad_hidden). Time: median over repeats of the slowest rank's
step (each step starts at a barrier; the single-process loss runs on rank 0
with all the group's threads, interleaved with the TP steps, so that load
changes on a shared machine hit all three alike). Memory: per-rank peak RSS above the
inputs and the gradients (Linux VmHWM after malloc_trim and a clear_refs
reset), the same probe as logitkit-bench. Bytes: per-rank payloads of the
collectives counted by count_collectives().

``merge``: time of one state merge (``merge="allgather"`` vs ``"allreduce"``)
at several token counts on 2 and 3 gloo processes.

``model``: a paper model of the collectives at TP = 8 over NVLink on H100 at
a Llama-3-8B shape, as bytes / link bandwidth.

Results are recorded in bench/results/linear_ce_tp.txt and discussed in
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import _comm
from ..distributed._harness import run_group
from ..testing import DTYPES

_DTYPES = DTYPES  # fp32, bf16, fp16


# ---------------------------------------------------------------------------
# Memory probe (per process)
# ---------------------------------------------------------------------------


class _PeakRss:
    """Peak RSS of a call above the RSS before it (Linux only)."""

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._reset()
            self._status()
            self.available = True
        except (OSError, AttributeError, KeyError):
            self.available = False

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status() -> dict[str, int]:
        text = Path("/proc/self/status").read_text()
        out = {}
        for key in ("VmRSS", "VmHWM"):
            match = re.search(key + r":\s+(\d+) kB", text)
            if match is None:
                raise KeyError(key)
            out[key] = int(match.group(1)) * 1024
        return out

    def measure(self, fn) -> tuple[Any, int | None]:
        if not self.available:
            return fn(), None
        gc.collect()
        self._libc.malloc_trim(0)
        self._reset()
        before = self._status()["VmRSS"]
        out = fn()
        return out, self._status()["VmHWM"] - before


# ---------------------------------------------------------------------------
# linear_ce --tp
# ---------------------------------------------------------------------------


def _problem(rows: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=gen)
    return h, w, t


class _GatherLogits(torch.autograd.Function):
    """All-gather of vocabulary-sharded logits; backward keeps this rank's columns
    (every rank computes the same loss from the gathered logits)."""

    @staticmethod
    def forward(ctx, local, group, sizes, v0):
        world = dist.get_world_size(group)
        width = max(sizes)
        padded = torch.nn.functional.pad(local, (0, width - local.shape[1])).contiguous()
        out = _comm.all_gather(padded, group, "logits")
        ctx.v0, ctx.n = v0, local.shape[1]
        return torch.cat([out[r, :, : sizes[r]] for r in range(world)], -1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.v0 : ctx.v0 + ctx.n], None, None, None


class _ReduceGrad(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _comm.all_reduce(grad, ctx.group, "grad_hidden")
        return grad, None


def _tp_worker(rank: int, world: int, cfg: dict) -> dict:
    """Per-rank collectives and peak memory of both TP implementations, and
    interleaved timing: each repeat times the single-process loss (rank 0,
    with ``world`` threads, the other ranks idle at a barrier), then the TP
    step of logitkit.distributed, then the gathered-logits step, so that a
    changing load on a shared machine hits all three alike."""
    import logitkit
    import logitkit.distributed as ldist

    dtype = _DTYPES[cfg["dtype"]]
    h_full, w_full, target = _problem(cfg["rows"], cfg["hidden"], cfg["vocab"], dtype)
    vocab = cfg["vocab"]
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    v0 = sum(sizes[:rank])
    w_shard = w_full[v0 : v0 + sizes[rank]].clone()
    if rank != 0:
        del w_full
    probe = _PeakRss()
    out: dict[str, Any] = {"sizes": sizes}

    def step_single():
        h = h_full.detach().requires_grad_()
        w = w_full.detach().requires_grad_()
        loss = logitkit.linear_cross_entropy(h, w, target)
        assert isinstance(loss, torch.Tensor)  # (no return_lse)
        loss.backward()

    def step_logitkit():
        h = h_full.detach().requires_grad_()
        w = w_shard.detach().requires_grad_()
        loss = ldist.linear_cross_entropy(h, w, target)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def step_gather():
        h = h_full.detach().requires_grad_()
        w = w_shard.detach().requires_grad_()
        group = dist.group.WORLD
        local = _ReduceGrad.apply(h, group) @ w.t()
        logits = _GatherLogits.apply(local, group, sizes, v0)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    impls = (("logitkit", step_logitkit), ("gather_logits", step_gather))
    for name, step in impls:
        with ldist.count_collectives() as log:
            res = step()  # warm-up; counts the collectives
        loss_value = float(res[0])
        grads = sum(t.nbytes for t in res[1:])
        del res
        _, peak = probe.measure(step)
        out[name] = {
            "times": [],
            "peak": None if peak is None else peak - grads,
            "loss": loss_value,
            "collectives": [(r.kind, r.purpose, r.payload_bytes, r.ring_bytes) for r in log.records],
        }
    out["single_times"] = []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        if rank == 0:
            torch.set_num_threads(world)
            t0 = time.perf_counter()
            step_single()
            out["single_times"].append(time.perf_counter() - t0)
            torch.set_num_threads(1)
        for name, step in impls:
            dist.barrier()
            t0 = time.perf_counter()
            step()
            out[name]["times"].append(time.perf_counter() - t0)
    return out


def _single_worker(rank: int, world: int, cfg: dict) -> dict:
    import logitkit

    dtype = _DTYPES[cfg["dtype"]]
    h_full, w_full, target = _problem(cfg["rows"], cfg["hidden"], cfg["vocab"], dtype)
    probe = _PeakRss()

    def step():
        h = h_full.detach().requires_grad_()
        w = w_full.detach().requires_grad_()
        loss = logitkit.linear_cross_entropy(h, w, target)
        assert isinstance(loss, torch.Tensor)  # (no return_lse)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    res = step()
    loss_value = float(res[0])
    grads = sum(t.nbytes for t in res[1:])
    del res
    _, peak = probe.measure(step)  # (its time is taken interleaved, in _tp_worker)
    return {"peak": None if peak is None else peak - grads, "loss": loss_value}


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def bench_linear_ce(args: argparse.Namespace) -> str:
    cfg = {
        "rows": args.rows,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "repeats": args.repeats,
    }
    lines = [
        f"linear_ce fwd+bwd, N = {args.rows}, D = {args.hidden}, V = {args.vocab}, {args.dtype}, "
        f"median of {args.repeats} (slowest rank per step), the three timed interleaved",
        f"torch {torch.__version__}, gloo on 127.0.0.1, {args.tp} processes x 1 thread "
        f"vs 1 process x {args.tp} threads",
        "",
    ]
    single = run_group(1, _single_worker, cfg, threads=args.tp, timeout=3600)[0]
    ranks = run_group(args.tp, _tp_worker, cfg, threads=1, timeout=3600)
    n = args.rows
    t_single = statistics.median(ranks[0]["single_times"])  # interleaved with the TP steps
    lines.append(f"{'impl':<34} {'median s':>9} {'speed-up':>9} {'peak/rank':>11} {'comm B/token':>13} loss")
    lines.append(
        f"{'single process (logitkit)':<34} {t_single:>9.3f} {1.0:>8.2f}x {_mib(single['peak']):>11} {0:>13} "
        f"{single['loss']:.6f}"
    )
    for name, label in (("logitkit", "TP logitkit.distributed"), ("gather_logits", "TP gather-logits + F.ce")):
        steps = list(zip(*[r[name]["times"] for r in ranks]))
        t = statistics.median(max(s) for s in steps)
        peak = max((r[name]["peak"] or 0) for r in ranks)
        payload = sum(p for _, _, p, _ in ranks[0][name]["collectives"])
        lines.append(
            f"{label:<34} {t:>9.3f} {t_single / t:>8.2f}x {_mib(peak):>11} {payload / n:>13.1f} "
            f"{ranks[0][name]['loss']:.6f}"
        )
    lines.append("")
    lines.append(f"shards: {ranks[0]['sizes']}; collectives per step (rank 0):")
    for name in ("logitkit", "gather_logits"):
        for kind, purpose, payload, ring in ranks[0][name]["collectives"]:
            lines.append(f"  {name:<14} {kind:<10} {purpose:<12} payload {payload:>11} B  ring traffic {ring:>11} B")
    size = 2 if args.dtype == "bf16" else 4
    w = args.tp
    ours_fwd = sum(p for _, pur, p, _ in ranks[0]["logitkit"]["collectives"] if pur != "grad_hidden")
    lines.append(
        f"bytes per token, forward, this rank's payload: logitkit {ours_fwd / n:.1f} "
        f"(metadata amortised over N) vs gather-logits {args.vocab * size / w:.0f} (its N x V/{w} logits); "
        f"backward: both all-reduce grad_hidden, {args.hidden * size} B per token"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# top_h --tp
# ---------------------------------------------------------------------------

_TOP_H_CASES = (("hf", 0.4), ("official", 0.4), ("exact", 0.4), (None, None))


def _top_h_worker(rank: int, world: int, cfg: dict) -> dict:
    import logitkit
    import logitkit.distributed as ldist

    gen = torch.Generator().manual_seed(0)
    vocab = cfg["vocab"]
    logits = (2.5 * torch.randn(cfg["rows"], vocab, generator=gen)).to(_DTYPES[cfg["dtype"]])
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    v0 = sum(sizes[:rank])
    shard = logits[:, v0 : v0 + sizes[rank]].contiguous()
    out: dict[tuple[str, str], Any] = {}
    rows = cfg["rows"]
    # --per-row: alpha 0.4 / 0 (off) / 0.6 / 0.2 and T 1 / 0.7 / 1.3 / 1 by row (sample: T 0, greedy, for the last)
    per_row = cfg.get("per_row", False)
    alpha_rows = torch.tensor([0.4, 0.0, 0.6, 0.2]).repeat(rows // 4 + 1)[:rows]
    t_mask = torch.tensor([1.0, 0.7, 1.3, 1.0]).repeat(rows // 4 + 1)[:rows]
    t_sample = torch.tensor([1.0, 0.7, 1.3, 0.0]).repeat(rows // 4 + 1)[:rows]
    for rule, number in _TOP_H_CASES:
        name = rule or "plain"
        for op in ("mask", "sample"):
            if rule is None and op == "mask":
                continue
            alpha: Any = alpha_rows if (per_row and number is not None) else number
            temperature: Any = (t_mask if op == "mask" else t_sample) if per_row else 1.0

            def call(x=shard, rule=rule, alpha=alpha, op=op, t=temperature):
                if op == "mask":
                    return ldist.top_h_mask(x, alpha, temperature=t, rule=rule)
                return ldist.sample(
                    x, temperature=t, top_h=alpha, rule=rule or "hf", generator=torch.Generator().manual_seed(1)
                )

            def single(rule=rule, alpha=alpha, op=op, t=temperature):
                if op == "mask":
                    return logitkit.top_h_mask(logits, alpha, temperature=t, rule=rule)
                return logitkit.sample(
                    logits, temperature=t, top_h=alpha, rule=rule or "hf", generator=torch.Generator().manual_seed(1)
                )

            with ldist.count_collectives() as log:
                res = call()
            same = bool(torch.equal(res, single()[:, v0 : v0 + sizes[rank]] if op == "mask" else single()))
            times, ref_times = [], []
            for _ in range(cfg["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            if rank == 0:
                for _ in range(cfg["repeats"]):
                    t0 = time.perf_counter()
                    single()
                    ref_times.append(time.perf_counter() - t0)
            out[(name, op)] = {
                "times": times,
                "ref_times": ref_times,
                "same": same,
                "collectives": [(r.kind, r.purpose, r.payload_bytes) for r in log.records],
            }
    return out


def bench_top_h(args: argparse.Namespace) -> str:
    cfg = {"rows": args.rows, "vocab": args.vocab, "dtype": args.dtype, "repeats": args.repeats}
    cfg["per_row"] = args.per_row
    ranks = run_group(args.tp, _top_h_worker, cfg, threads=1, timeout=3600)
    params = (
        "per row: alpha 0.4 / 0 / 0.6 / 0.2, T 1 / 0.7 / 1.3 / 1 (sample: 0, greedy) by row"
        if args.per_row
        else "alpha = 0.4, T = 1"
    )
    lines = [
        f"Top-H on vocabulary shards: rows = {args.rows}, V = {args.vocab}, {args.dtype}, {params}, "
        f"{args.tp} gloo processes x 1 thread; single-device = logitkit's CPU kernel on the whole row, 1 thread",
        "(the sharded ops are torch-op implementations; single-device is the fused C++ kernel)",
        "",
        f"{'rule':<9} {'op':<7} {'TP ms':>9} {'1-dev ms':>9} {'equal':>6} {'colls':>6} {'bytes/rank':>11}  collectives",
    ]
    for key, res0 in ranks[0].items():
        steps = list(zip(*[r[key]["times"] for r in ranks]))
        t = statistics.median(max(s) for s in steps) * 1e3
        t_ref = statistics.median(res0["ref_times"]) * 1e3
        same = all(r[key]["same"] for r in ranks)
        colls = res0["collectives"]
        payload = sum(p for _, _, p in colls)
        desc = ", ".join(f"{k.replace('all_', '')}[{p}]" for k, p, _ in colls)
        lines.append(
            f"{key[0]:<9} {key[1]:<7} {t:>9.2f} {t_ref:>9.2f} {same!s:>6} {len(colls):>6} {payload:>11}  {desc}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# merge strategies
# ---------------------------------------------------------------------------


def _merge_worker(rank: int, world: int, cfg: dict) -> dict:
    from ..distributed._merge import merge_states

    group = _comm.resolve_group(None, "bench")
    out = {}
    for n in cfg["tokens"]:
        state = torch.randn(n, 3)
        state[:, 1] = state[:, 1].abs() + 1
        side = torch.randn(n, 1)
        for strategy in ("allgather", "allreduce"):
            for _ in range(3):
                merge_states(state, group, strategy, with_b=True, summed=side)
            times = []
            for _ in range(cfg["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                merge_states(state, group, strategy, with_b=True, summed=side)
                times.append(time.perf_counter() - t0)
            out[(n, strategy)] = times
    return out


def bench_merge(args: argparse.Namespace) -> str:
    tokens = [1, 64, 1024, 16384, 131072]
    lines = [
        "state merge of (m, s, b) + 1 side value per token (4 fp32): one all-gather vs MAX + SUM all-reduces",
        f"gloo on 127.0.0.1, 1 thread per process, median of {args.repeats} (slowest rank), microseconds",
        "",
        f"{'W':>2} {'tokens':>7} {'allgather us':>13} {'allreduce us':>13} {'ratio':>6}",
    ]
    for world in args.tp:
        res = run_group(world, _merge_worker, {"tokens": tokens, "repeats": args.repeats}, timeout=1800)
        for n in tokens:
            med = {}
            for strategy in ("allgather", "allreduce"):
                steps = list(zip(*[r[(n, strategy)] for r in res]))
                med[strategy] = statistics.median(max(s) for s in steps) * 1e6
            lines.append(
                f"{world:>2} {n:>7} {med['allgather']:>13.0f} {med['allreduce']:>13.0f} "
                f"{med['allreduce'] / med['allgather']:>5.2f}x"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# paper model
# ---------------------------------------------------------------------------

# H100 SXM5: NVLink 4, 18 links x 50 GB/s = 900 GB/s total bidirectional per GPU
# (NVIDIA H100 Tensor Core GPU datasheet), i.e. 450 GB/s each way. Ring
# collectives move (W-1)/W of the data through each GPU's outgoing link.
NVLINK_BYTES_PER_S = 450e9
NCCL_LATENCY_S = 15e-6  # order of a small NCCL collective on one NVSwitch node (assumption, not measured here)


def paper_model(tp: int = 8, n: int = 16384, d: int = 4096, v: int = 128256, elem: int = 2) -> str:
    w = tp
    v_r = v / w

    def gather_time(payload_per_rank: float) -> float:  # ring all-gather
        return (w - 1) * payload_per_rank / NVLINK_BYTES_PER_S

    def reduce_time(payload: float) -> float:  # ring all-reduce
        return 2 * (w - 1) / w * payload / NVLINK_BYTES_PER_S

    rows: list[tuple[str, float, float]] = []
    meta = 32 * 8
    state = n * 4 * 4  # m, s, z_y, sum w z (label smoothing on; 3 without)
    grad_h = n * d * elem
    logits = n * v_r * elem
    rows.append(("metadata all-gather", meta, gather_time(meta)))
    rows.append(("state all-gather (4 fp32/token)", state, gather_time(state)))
    rows.append(("grad_hidden all-reduce (bf16)", grad_h, reduce_time(grad_h)))
    rows.append(("[gather-logits] logits all-gather (bf16)", logits, gather_time(logits)))
    flops = 4 * 2 * n * d * v_r  # forward GEMM, recompute, two gradient GEMMs
    lines = [
        f"paper model: TP = {tp}, N = {n}, D = {d}, V = {v} (Llama-3-8B), bf16 weights, H100 SXM NVLink 4 at "
        f"{NVLINK_BYTES_PER_S / 1e9:.0f} GB/s per direction (900 GB/s bidirectional, NVIDIA H100 datasheet)",
        "ring: all-gather moves (W-1) x payload per rank, all-reduce 2 (W-1)/W x payload; plus ~"
        f"{NCCL_LATENCY_S * 1e6:.0f} us latency per collective (assumed)",
        "",
        f"{'collective':<44} {'payload/rank':>14} {'bandwidth time':>15}",
    ]
    for name, payload, t in rows:
        lines.append(f"{name:<44} {payload / 2**20:>11.2f} MiB {t * 1e3:>12.3f} ms")
    ours = sum(t for name, _, t in rows if not name.startswith("[")) + 3 * NCCL_LATENCY_S
    theirs = gather_time(logits) + reduce_time(grad_h) + 2 * NCCL_LATENCY_S
    lines += [
        "",
        f"logitkit.distributed per step: {ours * 1e3:.3f} ms of collectives (of which the grad_hidden all-reduce, "
        f"which any TP output layer pays, {reduce_time(grad_h) * 1e3:.3f} ms); the loss itself adds "
        f"{(gather_time(meta) + gather_time(state) + 2 * NCCL_LATENCY_S) * 1e6:.0f} us",
        f"gather-logits per step: {theirs * 1e3:.3f} ms, and a {n * v * elem / 2**30:.1f} GiB logits tensor per rank",
        f"for scale: the shard's 4 GEMM-equivalents are {flops / 1e12:.2f} TFLOP per rank "
        f"({flops / 989e12 * 1e3:.1f} ms at the 989 TFLOP/s dense bf16 datasheet peak)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m logitkit.bench.tp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="case", required=True)
    p = sub.add_parser("linear_ce")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("merge")
    p.add_argument("--tp", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=30)
    p = sub.add_parser("top_h")
    p.add_argument("--per-row", action="store_true", help="per-row alpha and temperature (with greedy rows)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    sub.add_parser("model")
    args = parser.parse_args(argv)
    if args.case == "linear_ce":
        print(bench_linear_ce(args))
    elif args.case == "merge":
        print(bench_merge(args))
    elif args.case == "top_h":
        print(bench_top_h(args))
    else:
        print(paper_model())


if __name__ == "__main__":
    main()
