"""logitkit: kernels for the vocabulary dimension of language models.

Streaming softmax / log-softmax / log-sum-exp, one-pass entropy and the
mergeable softmax state, on CPU (vectorised, multi-threaded) and CUDA. Ops
live under ``torch.ops.logitkit``; this module is the documented Python API.
"""
from ._loader import build_info
from .cross_entropy import cross_entropy
from .linear_ce import DEFAULT_CHUNK_BUDGET, LinearCrossEntropyLoss, linear_cross_entropy, linear_log_probs_and_entropy
from .ops import (
    entropy,
    log_softmax,
    logsumexp,
    merge_stats,
    softmax,
    sample,
    softmax_stats,
    stats_entropy,
    stats_logsumexp,
    top_h,
    top_h_mask,
)
from ._build_config import VERSION as __version__

__all__ = [
    "DEFAULT_CHUNK_BUDGET",
    "LinearCrossEntropyLoss",
    "build_info",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_log_probs_and_entropy",
    "entropy",
    "log_softmax",
    "logsumexp",
    "merge_stats",
    "softmax",
    "sample",
    "softmax_stats",
    "stats_entropy",
    "stats_logsumexp",
    "top_h",
    "top_h_mask",
]
