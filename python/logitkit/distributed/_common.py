"""Argument checks and small helpers shared by the modules of logitkit.distributed."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
MERGE_CODES = {"allgather": 0, "allreduce": 1}
RULE_CODES = {"hf": 0, "official": 1, "exact": 2}
_REDUCTIONS = tuple(REDUCTION_CODES)

# Row blocks of the torch-op passes (Top-H, softmax/log-softmax writes) hold
# at most this many bytes of fp32 temporaries each.
BLOCK_BYTES = 4 * 1024 * 1024


def check_logits_arg(x: object, op: str, arg: str) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"logitkit.distributed.{op}: {arg} must be a torch.Tensor, got {type(x).__name__}"
    if x.dtype not in LOGIT_DTYPES:
        return f"logitkit.distributed.{op}: {arg} must be float32, bfloat16 or float16, got {x.dtype}"
    if x.dim() < 1:
        return f"logitkit.distributed.{op}: {arg} must have at least one dimension (the last is the vocabulary shard)"
    return None


def check_temperature_arg(temperature: float, op: str) -> str | None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return f"logitkit.distributed.{op}: temperature must be a finite number > 0, got {temperature}"
    return None


def first_error(*checks: Callable[[], str | None]) -> str | None:
    """The first failing check's message (later checks may assume earlier ones passed)."""
    for check in checks:
        msg = check()
        if msg:
            return msg
    return None


def row_blocks(rows: int, cols: int, bytes_per_element: int = 4, budget: int = BLOCK_BYTES):
    """Yields (start, stop) row ranges whose rows * cols * bytes_per_element fits the budget."""
    step = max(1, budget // max(1, cols * bytes_per_element))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def target_error(op: str, target: object, like: torch.Tensor, like_name: str) -> str | None:
    """The checks of a loss's ``target`` of global class ids against the tensor whose leading
    dims it indexes (``hidden`` or ``logits``), returned as a message (see check_ce_options)."""
    prefix = f"logitkit.distributed.{op}"
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        return f"{prefix}: target must be a torch.int64 tensor of global class ids"
    if target.shape != like.shape[:-1]:
        return (
            f"{prefix}: target must have shape {list(like.shape[:-1])} ({like_name}'s leading dims), "
            f"got {list(target.shape)}"
        )
    if target.device != like.device:
        return f"{prefix}: target is on {target.device} but {like_name} is on {like.device}"
    return None


def check_ce_options(
    op: str, reduction: str, label_smoothing: float, z_loss: float, temperature: float, softcap: float | None
) -> str | None:
    """The single-device argument checks, returned as a message (not raised:
    the caller reports it through the metadata exchange so every rank fails)."""
    prefix = f"logitkit.distributed.{op}"
    if reduction not in _REDUCTIONS:
        return f"{prefix}: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
    if not (0.0 <= label_smoothing <= 1.0):
        return f"{prefix}: label_smoothing must be in [0, 1], got {label_smoothing}"
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        return f"{prefix}: softcap must be None or a finite number > 0, got {softcap}"
    if not (math.isfinite(z_loss) and z_loss >= 0):
        return f"{prefix}: z_loss must be a finite number >= 0, got {z_loss}"
    if not (math.isfinite(temperature) and temperature > 0):
        return f"{prefix}: temperature must be a finite number > 0, got {temperature}"
    return None


def range_error(op: str, target: torch.Tensor, vocab: int, ignore_index: int | None, arg: str = "target") -> str | None:
    """The CPU range check of class indices against [0, V) (or ignore_index),
    evaluated on every rank on the same target (the metadata checksum made
    sure the ranks hold the same one). Skipped on CUDA (no host sync there;
    the loss turns NaN instead) and under torch.compile."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return None
    t = target.reshape(-1)
    bad = (t < 0) | (t >= vocab)
    if ignore_index is not None:
        bad &= t != ignore_index
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        extra = f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""
        return (
            f"logitkit.distributed.{op}: {arg}[{i}] = {int(t[i])} is outside [0, {vocab}), the whole vocabulary "
            f"of the group (no rank's shard holds it){extra}"
        )
    return None
