"""logitkit.distributed: tensor-parallel (vocabulary-parallel) versions of
logitkit's ops over torch.distributed.

The vocabulary is split into contiguous shards, one per rank of a process
group (default: the world), of any sizes; rank r holds rows [v0_r, v1_r) of
the output projection, or ``logits[..., v0_r:v1_r]``. Every function returns
on every rank what the single-device function returns on the whole
vocabulary (to fp32 rounding; kept sets and sampled tokens exactly), and
communicates O(rows) per-token states, never the logits. Only
torch.distributed collectives are used, so any backend works (NCCL on GPUs,
gloo on CPU). DTensors (``Shard(-1)`` logits, ``Shard(0)`` weights) are
accepted as well. See docs/distributed.md.

Losses on hidden states (the logits are never materialised):
    :func:`linear_cross_entropy`, :func:`linear_log_probs_and_entropy`
On vocabulary-sharded logits:
    :func:`softmax_stats`, :func:`logsumexp`, :func:`entropy`,
    :func:`log_softmax`, :func:`softmax`, :func:`cross_entropy`,
    :func:`top_h_mask`, :func:`top_h`, :func:`sample`
Instrumentation:
    :func:`count_collectives`
"""

from ._comm import CollectiveLog, CollectiveRecord, VocabLayout, count_collectives
from .linear import linear_cross_entropy, linear_log_probs_and_entropy
from .logits import cross_entropy, entropy, log_softmax, logsumexp, softmax, softmax_stats
from .top_h import sample, top_h, top_h_mask

__all__ = [
    "CollectiveLog",
    "CollectiveRecord",
    "VocabLayout",
    "count_collectives",
    "cross_entropy",
    "entropy",
    "linear_cross_entropy",
    "linear_log_probs_and_entropy",
    "log_softmax",
    "logsumexp",
    "sample",
    "softmax",
    "softmax_stats",
    "top_h",
    "top_h_mask",
]
