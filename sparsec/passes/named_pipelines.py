"""Named pipelines: short names for the pipelines people run most, expanded to pipeline text."""

from __future__ import annotations

from sparsec.passes.pipeline import register_pipeline


@register_pipeline("sparse-cpu")
def sparse_cpu() -> str:
    """50% magnitude pruning of every linear layer but lm_head, bitmask kernels on the CPU."""
    return "prune-magnitude{sparsity=0.5},lower-cpu"


@register_pipeline("dense-cpu")
def dense_cpu() -> str:
    """No pruning: every layer stays dense (the baseline to compare against)."""
    return "lower-cpu"
