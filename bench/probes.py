"""Probe harness (issue #14): bad arguments and special values across logitkit's
public functions, each case classified as

    clear error       raises TypeError/ValueError/RuntimeError naming logitkit's function
    unclear error     raises something else (a torch internal, a reshape error, ...)
    silently accepted a bad argument that returns a result
    correct           a special-value case that matches its fp64 reference (NaN where it is NaN)
    silently wrong    a special-value case that returns another number
    crash             the process died (each case runs in a child process; a crash
                      is attributed to the case that was running, and the child
                      restarts after it)

Usage: python bench/probes.py [--backend cpu|emulated-cuda] [--list]
Prints one line per case that is not "clear error" / "correct" and the table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NEG_INF, INF, NAN = -math.inf, math.inf, math.nan


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "bad" or "special"
    call: Callable[[], Any]
    reference: Callable[[], Any] | None = None  # special values: the fp64 expectation


def _logits(rows: int = 2, vocab: int = 37, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + vocab)).to(dtype)


def _special_rows(vocab: int = 5000) -> dict[str, torch.Tensor]:
    rows = {}
    for nan_at in (4, 298, 4000):
        x = _logits(1, vocab)
        x[0, 1], x[0, nan_at] = INF, NAN
        rows[f"+inf@1,nan@{nan_at}"] = x
    x = _logits(1, vocab)
    x[0, :] = NEG_INF
    rows["all -inf"] = x
    x = _logits(1, vocab)
    x[0, 17] = INF
    rows["+inf"] = x
    x = _logits(1, vocab) * 1e-38
    rows["tiny logits"] = x
    x = _logits(1, vocab)
    x[0, ::2] = torch.finfo(torch.float32).max
    rows["float32 max"] = x
    return rows


def _bad_row_op_cases(lk: Any) -> list[Case]:
    cases = []
    ops = {name: getattr(lk, name) for name in ("softmax", "log_softmax", "logsumexp", "entropy", "softmax_stats")}
    bad_inputs: dict[str, Callable[[], Any]] = {
        "int64 x": lambda: torch.ones(2, 3, dtype=torch.int64),
        "bool x": lambda: torch.ones(2, 3, dtype=torch.bool),
        "complex x": lambda: torch.ones(2, 3, dtype=torch.complex64),
        "0-d x": lambda: torch.tensor(1.0),
        "None x": lambda: None,
        "list x": lambda: [[1.0, 2.0]],
    }
    for op_name, fn in ops.items():
        for what, make in bad_inputs.items():
            cases.append(Case(f"{op_name}: {what}", "bad", lambda fn=fn, make=make: fn(make())))
        for t in (0.0, -1.0, NAN, INF, "hot"):
            cases.append(Case(f"{op_name}: temperature={t!r}", "bad", lambda fn=fn, t=t: fn(_logits(), t)))
    ops_ns = torch.ops.logitkit
    y = lambda: torch.softmax(_logits(), -1)
    for op in ("softmax_backward", "log_softmax_backward"):
        fn = getattr(ops_ns, op)
        cases += [
            Case(f"{op}: complex grad", "bad", lambda fn=fn: fn(torch.ones(2, 37, dtype=torch.complex64), y(), 1.0)),
            Case(f"{op}: int grad", "bad", lambda fn=fn: fn(torch.ones(2, 37, dtype=torch.int64), y(), 1.0)),
            Case(f"{op}: grad shape", "bad", lambda fn=fn: fn(torch.ones(2, 36), y(), 1.0)),
            Case(f"{op}: meta grad", "bad", lambda fn=fn: fn(torch.ones(2, 37, device="meta"), y(), 1.0)),
        ]
    for op in ("logsumexp_backward", "entropy_backward"):
        fn = getattr(ops_ns, op)
        cases += [
            Case(f"{op}: complex grad", "bad", lambda fn=fn: fn(torch.ones(2, dtype=torch.complex64), _logits(), 1.0)),
            Case(f"{op}: meta grad", "bad", lambda fn=fn: fn(torch.ones(2, device="meta"), _logits(), 1.0)),
        ]
    stats = lambda: lk.softmax_stats(_logits())
    cases += [
        Case("merge_stats: int states", "bad", lambda: lk.merge_stats([stats().long(), stats().long()])),
        Case("merge_stats: width 2", "bad", lambda: lk.merge_stats([stats()[:, :2]])),
        Case("merge_stats: empty", "bad", lambda: lk.merge_stats([])),
        Case("merge_stats: shapes differ", "bad", lambda: lk.merge_stats([stats(), torch.zeros(3, 3)])),
        Case("merge_stats: no dim", "bad", lambda: lk.merge_stats(stats())),
        Case("stats_entropy: int states", "bad", lambda: lk.stats_entropy(stats().long())),
        Case("stats_logsumexp: int states", "bad", lambda: lk.stats_logsumexp(stats().long())),
    ]
    return cases


def _bad_other_cases(lk: Any) -> list[Case]:
    """A few cases per other family (the issue's list; other engineers own the fixes)."""
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    t = torch.randint(0, 16, (4,))
    lce, lpe = lk.linear_cross_entropy, lk.linear_log_probs_and_entropy
    return [
        Case("linear_cross_entropy: meta weight", "bad", lambda: lce(h, w.to("meta"), t)),
        Case("linear_cross_entropy: meta target", "bad", lambda: lce(h, w, t.to("meta"))),
        Case(
            "linear_cross_entropy: meta class_weight",
            "bad",
            lambda: lce(h, w, t, class_weight=torch.ones(16, device="meta")),
        ),
        Case("linear_cross_entropy: z_loss=nan", "bad", lambda: lce(h, w, t, z_loss=NAN)),
        Case("linear_cross_entropy: chunk_budget=-1", "bad", lambda: lce(h, w, t, chunk_budget=-1)),
        Case("linear_cross_entropy: chunk_budget=2**63", "bad", lambda: lce(h, w, t, chunk_budget=2**63)),
        Case("linear_cross_entropy: ignore_index=2**63", "bad", lambda: lce(h, w, t, ignore_index=2**63)),
        Case(
            "linear_cross_entropy: V=0 with class_weight",
            "bad",
            lambda: lce(h, w[:0], torch.zeros(4, dtype=torch.long), class_weight=torch.ones(0)),
        ),
        Case("linear_cross_entropy: D=0", "bad", lambda: lce(h[:, :0], w[:, :0], t)),
        # target = ignore_index is a masked position (log-prob 0, as TRL/verl mask), not bad input.
        Case(
            "linear_log_probs_and_entropy: target=ignore_index gives log-prob 0",
            "special",
            lambda: lpe(h, w, torch.full((4,), -100))[0],
            lambda: torch.zeros(4, dtype=torch.float64),
        ),
        Case(
            "cross_entropy: complex logits",
            "bad",
            lambda: lk.cross_entropy(torch.ones(4, 16, dtype=torch.complex64), t),
        ),
        Case("cross_entropy: meta target", "bad", lambda: lk.cross_entropy(torch.randn(4, 16), t.to("meta"))),
        Case("top_h_mask: alpha=nan", "bad", lambda: lk.top_h_mask(_logits(), NAN)),
        Case("top_h_mask: cap=0", "bad", lambda: lk.top_h_mask(_logits(), 0.4, cap=0)),
        Case("sample: rule='x'", "bad", lambda: lk.sample(_logits(), top_h=0.4, rule="x")),
        Case(
            "sample: meta uniform",
            "bad",
            lambda: torch.ops.logitkit.sample(_logits(), torch.rand(2, device="meta"), 1.0, 0.4),
        ),
    ]


def _special_cases(lk: Any) -> list[Case]:
    cases = []
    refs: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
        "softmax": lambda x, t: torch.softmax(x.double() / t, -1),
        "log_softmax": lambda x, t: torch.log_softmax(x.double() / t, -1),
        "logsumexp": lambda x, t: torch.logsumexp(x.double() / t, -1),
        "entropy": lambda x, t: torch.special.entr(torch.softmax(x.double() / t, -1)).sum(-1),
    }
    for row_name, x in _special_rows().items():
        for op, ref in refs.items():
            fn = getattr(lk, op)
            for t in (1.0, 1e-39) if row_name == "tiny logits" else (1.0,):
                cases.append(
                    Case(
                        f"{op}: {row_name} T={t:g}",
                        "special",
                        lambda fn=fn, x=x, t=t: fn(x, t),
                        lambda ref=ref, x=x, t=t: ref(
                            x.float().double() if t == 1.0 else (x.double() / t).float(), 1.0
                        ),
                    )
                )
    x = _special_rows()["+inf@1,nan@298"]
    cases.append(
        Case(
            "merge_stats: NaN shard + inf shard",
            "special",
            lambda: lk.stats_logsumexp(lk.merge_stats([lk.softmax_stats(x[:, :200]), lk.softmax_stats(x[:, 200:])])),
            lambda: torch.tensor([NAN], dtype=torch.float64),
        )
    )
    return cases


def all_cases() -> list[Case]:
    import logitkit as lk

    return _bad_row_op_cases(lk) + _bad_other_cases(lk) + _special_cases(lk)


def _close(out: Any, expected: torch.Tensor) -> bool:
    out = out.detach().double().cpu()
    if out.shape != expected.shape:
        return False
    same_nan = torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    return same_nan and torch.allclose(out[finite], expected[finite], rtol=1e-4, atol=1e-6, equal_nan=True)


def classify(case: Case) -> tuple[str, str]:
    try:
        out = case.call()
    except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError) as err:
        message = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        clear = "logitkit" in message or case.name.split(":")[0] in message
        return ("clear error" if clear else "unclear error"), message
    except Exception as err:  # anything else is unclear
        return "unclear error", f"{type(err).__name__}: {str(err)[:160]}"
    if case.kind == "bad":
        return "silently accepted", ""
    assert case.reference is not None
    expected = case.reference()
    return ("correct", "") if _close(out, expected) else ("silently wrong", f"got {out.flatten()[:3].tolist()}")


def _child(start: int, backend: str) -> None:
    """Runs the cases from `start`, one JSON line each, flushing before the next."""
    from logitkit.testing import use_backend

    cases = all_cases()
    with use_backend(backend):
        for index in range(start, len(cases)):
            print(json.dumps({"index": index, "started": True}), flush=True)
            verdict, detail = classify(cases[index])
            print(json.dumps({"index": index, "verdict": verdict, "detail": detail}), flush=True)


def run(backend: str) -> list[tuple[str, str, str, str]]:
    cases = all_cases()
    results: dict[int, tuple[str, str]] = {}
    start = 0
    while start < len(cases):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(start), "--backend", backend], capture_output=True, text=True
        )
        running = start
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "verdict" in record:
                results[record["index"]] = (record["verdict"], record["detail"])
            running = record["index"]
        if proc.returncode == 0:
            break
        results[running] = ("crash", f"exit status {proc.returncode}: {proc.stderr.strip()[-160:]}")
        start = running + 1
    return [(c.kind, c.name, *results.get(i, ("crash", "not reached"))) for i, c in enumerate(cases)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=["cpu", "emulated-cuda"])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="print every case, not only the failing ones")
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.backend)
        return 0
    rows = run(args.backend)
    good = {"clear error", "correct"}
    for kind, name, verdict, detail in rows:
        if args.list or verdict not in good:
            print(f"{kind:8s} {verdict:18s} {name}  {detail}")
    print(f"\nbackend {args.backend}")
    for kind in ("bad", "special"):
        counts = Counter(verdict for k, _, verdict, _ in rows if k == kind)
        print(f"{kind:8s} " + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
