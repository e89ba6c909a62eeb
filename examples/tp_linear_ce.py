"""Vocabulary-parallel linear cross-entropy with logitkit.distributed.

Run on CPU with gloo (or on GPUs with NCCL, one process per GPU):

    torchrun --nproc-per-node 2 examples/tp_linear_ce.py

Every rank holds the same hidden states and its own rows of the output
projection (here an uneven split of V = 8003). The loss and hidden.grad are
those of the full projection on every rank; each rank's weight gradient is
its shard of the full one. Rank 0 checks both against the single-device loss
and prints the collectives one step used.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import logitkit
import logitkit.distributed as ldist


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)

    n, d, vocab = 256, 128, 8003
    gen = torch.Generator().manual_seed(0)  # the same inputs on every rank
    hidden = torch.randn(n, d, generator=gen).to(device)
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(device)
    target = torch.randint(0, vocab, (n,), generator=gen).to(device)
    target[:8] = -100  # ignored tokens

    # This rank's rows of the projection: an uneven split in rank order.
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    v0 = sum(sizes[:rank])
    h = hidden.clone().requires_grad_()
    w_shard = weight[v0 : v0 + sizes[rank]].clone().requires_grad_()

    with ldist.count_collectives() as log:
        loss = ldist.linear_cross_entropy(h, w_shard, target, label_smoothing=0.1, z_loss=1e-4)
        loss.backward()

    # Single-device reference on the full weight (every rank can compute it here).
    h_ref = hidden.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    ref = logitkit.linear_cross_entropy(h_ref, w_ref, target, label_smoothing=0.1, z_loss=1e-4)
    ref.backward()
    err_loss = (loss - ref).abs().item()
    err_h = (h.grad - h_ref.grad).abs().max().item()
    err_w = (w_shard.grad - w_ref.grad[v0 : v0 + sizes[rank]]).abs().max().item()
    ok = err_loss < 1e-4 and err_h < 1e-4 and err_w < 1e-4
    flags = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"world {world}, shards {sizes}, loss {loss.item():.6f} (single-device {ref.item():.6f})")
        print(f"max |error|: loss {err_loss:.2e}, grad_hidden {err_h:.2e}, grad_weight shard {err_w:.2e}")
        print(f"collectives per step: {log.summary()}")
        print("matches single-device" if flags.item() else "MISMATCH")
    dist.destroy_process_group()
    if not flags.item():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
