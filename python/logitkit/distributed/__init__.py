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

Common keyword arguments: ``group`` (default: the world group);
``vocab_start`` (this rank's first vocabulary index; default: shards tile
[0, V) in group-rank order); ``merge`` ("allgather" or "allreduce", how the
per-row states are merged). Every call starts with one fixed-size metadata
all-gather that derives the layout and checks that the ranks agree
(shapes, dtypes, options, targets), so that a disagreement raises
``ValueError`` on every rank instead of hanging. ``validate=False`` together
with ``vocab_start`` and ``vocab_size`` (the whole V) on every rank skips it
(one collective and one host sync fewer per call, e.g. in a decoding loop);
the caller then guarantees agreement, and shards must tile [0, V) in
group-rank order for Top-H and sampling.

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
