"""logitkit: kernels for the vocabulary dimension of language models.

Streaming softmax / log-softmax / log-sum-exp, one-pass entropy and the
mergeable softmax state, on CPU (vectorised, multi-threaded) and CUDA. Ops
live under ``torch.ops.logitkit``; this module is the documented Python API.

Modules: :mod:`~logitkit.row_ops` (softmax ... merge_stats),
:mod:`~logitkit.sampling` (Top-H truncation and sampling),
:mod:`~logitkit.cross_entropy` (on logits), :mod:`~logitkit.linear_ce`
(from hidden states); each registers its ops' fake kernels and autograd.
:mod:`logitkit.testing` holds the references and the backend switch used by
the tests; :mod:`logitkit.bench` is the ``logitkit-bench`` CLI.
"""

# _loader first: it explains a missing or mismatched compiled part (an import of _build_config
# would fail first with a bare ImportError).
from ._loader import build_info

# isort: split
from ._build_config import VERSION as __version__
from ._loss_math import CrossEntropyOutput
from .cross_entropy import cross_entropy
from .filters import filter_logits, philox_uniform, truncation_mask
from .linear_ce import (
    DEFAULT_CHUNK_BUDGET,
    GemmPath,
    LinearCrossEntropyLoss,
    default_chunk_budget,
    gemm_path,
    linear_cross_entropy,
    linear_log_probs_and_entropy,
)
from .row_ops import (
    entropy,
    log_softmax,
    logsumexp,
    merge_stats,
    softmax,
    softmax_stats,
    stats_entropy,
    stats_logsumexp,
)
from .sampling import MirostatResult, SampleResult, mirostat_sample, sample, top_h, top_h_mask

__all__ = [
    "DEFAULT_CHUNK_BUDGET",
    "CrossEntropyOutput",
    "GemmPath",
    "LinearCrossEntropyLoss",
    "MirostatResult",
    "SampleResult",
    "__version__",
    "build_info",
    "cross_entropy",
    "default_chunk_budget",
    "entropy",
    "filter_logits",
    "gemm_path",
    "linear_cross_entropy",
    "linear_log_probs_and_entropy",
    "log_softmax",
    "logsumexp",
    "merge_stats",
    "mirostat_sample",
    "philox_uniform",
    "sample",
    "softmax",
    "softmax_stats",
    "stats_entropy",
    "stats_logsumexp",
    "top_h",
    "top_h_mask",
    "truncation_mask",
]
