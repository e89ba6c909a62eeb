"""DTensor adapters: the functions of logitkit.distributed accept the
DTensors torch's tensor-parallel users hold, and work on their local shards.

* logits sharded on the vocabulary (last) dimension: ``Shard(-1)`` on one
  mesh dimension (the TP dimension; its process group is used). Other mesh
  dimensions may shard batch dimensions or replicate.
* ``nn.Linear``-style weights (and biases, class weights) sharded on rows:
  ``Shard(0)`` on the TP mesh dimension.

Results are DTensors again (``Replicate`` on the TP dimension for per-row
results and losses, the input's placements for per-element results).
Uneven shards (as DTensor makes for V not divisible by the mesh size) are
fine: the layout comes from the metadata exchange.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    HAVE_DTENSOR = True
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    HAVE_DTENSOR = False


def is_dtensor(x: Any) -> bool:
    return HAVE_DTENSOR and isinstance(x, DTensor)


@dataclasses.dataclass
class TPInfo:
    """The mesh dimension that shards the vocabulary and how to wrap results."""

    mesh: Any
    tp_dim: int
    placements: tuple  # the input's placements
    group: Any
    global_shape: torch.Size


def _tp_dim(x: Any, tensor_dim: int, op: str, arg: str) -> int:
    dims = [
        i
        for i, p in enumerate(x.placements)
        if isinstance(p, Shard) and (p.dim % x.dim() if p.dim < 0 else p.dim) == tensor_dim
    ]
    if len(dims) != 1:
        raise ValueError(
            f"logitkit.distributed.{op}: {arg} must be a DTensor sharded on dimension {tensor_dim} "
            f"(Shard({tensor_dim})) on exactly one mesh dimension, got placements {x.placements}"
        )
    return dims[0]


def unwrap_vocab_sharded(x: Any, tensor_dim: int, op: str, arg: str, grad: bool = True) -> tuple[torch.Tensor, TPInfo]:
    """The local shard of a DTensor sharded on ``tensor_dim`` (the vocabulary)."""
    tp = _tp_dim(x, tensor_dim % x.dim(), op, arg)
    for i, p in enumerate(x.placements):
        if i != tp and isinstance(p, Partial):
            raise ValueError(f"logitkit.distributed.{op}: {arg} has a Partial placement; redistribute it first")
    info = TPInfo(x.device_mesh, tp, tuple(x.placements), x.device_mesh.get_group(tp), x.shape)
    return x.to_local(), info


def unwrap_replicated(x: Any, info: TPInfo, op: str, arg: str, partial_grad: bool = False) -> torch.Tensor:
    """The local tensor of a DTensor that is replicated on the TP mesh dimension.
    ``partial_grad``: its gradient will be this rank's partial sum (declared
    ``Partial`` on the TP dimension, so DTensor reduces it when needed)."""
    if not is_dtensor(x):
        return x
    if x.device_mesh != info.mesh:
        raise ValueError(f"logitkit.distributed.{op}: {arg} lives on another device mesh than the sharded input")
    if not isinstance(x.placements[info.tp_dim], Replicate):
        raise ValueError(
            f"logitkit.distributed.{op}: {arg} must be replicated on the tensor-parallel mesh dimension, "
            f"got {x.placements}"
        )
    if partial_grad:
        placements = list(x.placements)
        placements[info.tp_dim] = Partial()
        return x.to_local(grad_placements=placements)
    return x.to_local()


def unwrap_class_vector(x: Any, info: TPInfo, op: str, arg: str) -> torch.Tensor:
    """A per-class vector given as a DTensor: Shard(0) gives this rank's slice,
    Replicate the whole vector (sliced later from the layout)."""
    if not is_dtensor(x):
        return x
    if isinstance(x.placements[info.tp_dim], Shard):
        return x.to_local()
    return x.full_tensor()


def wrap_rowwise(local: torch.Tensor, info: TPInfo, out_shape: torch.Size) -> Any:
    """A per-row result (the vocabulary dimension reduced away): Replicate on
    the TP dimension, the input's other placements kept."""
    placements = list(info.placements)
    placements[info.tp_dim] = Replicate()
    return DTensor.from_local(local, info.mesh, placements, run_check=False, shape=out_shape, stride=_contig(out_shape))


def wrap_scalar(local: torch.Tensor, info: TPInfo) -> Any:
    placements = [Replicate() for _ in info.placements]
    return DTensor.from_local(local, info.mesh, placements, run_check=False)


def wrap_like(local: torch.Tensor, info: TPInfo, global_shape: torch.Size) -> Any:
    """A per-element result with the input's placements."""
    return DTensor.from_local(
        local, info.mesh, list(info.placements), run_check=False, shape=global_shape, stride=_contig(global_shape)
    )


def _contig(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))
