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


@register_pipeline("sparsegpt-cpu")
def sparsegpt_cpu() -> str:
    """50% SparseGPT (needs calibration data), formats chosen by the cost model, CPU kernels."""
    return "prune-sparsegpt{sparsity=0.5},fuse-epilogue,select-format{target=cpu},lower-cpu"


@register_pipeline("sparse-int8-cpu")
def sparse_int8_cpu() -> str:
    """50% SparseGPT, then int8 weights (per output channel) on the kept values, CPU kernels."""
    return "prune-sparsegpt{sparsity=0.5},quantize{bits=8},fuse-epilogue,select-format{target=cpu},lower-cpu"


@register_pipeline("sparse-int4-cpu")
def sparse_int4_cpu() -> str:
    """50% SparseGPT, then int4 GPTQ weights in groups of 128, CPU kernels."""
    return ("prune-sparsegpt{sparsity=0.5},quantize{bits=4,group=128,method=gptq},fuse-epilogue,"
            "select-format{target=cpu},lower-cpu")
