"""Batch-1 decoding of a Llama-family decoder in one compiled call per token.

:func:`fused_step_for` looks at a Hugging Face decoder whose linear layers sparsec's CPU kernels
host (:func:`sparsec.runtime.generate.host_kernels`, q/k/v and gate/up fused) and, when every
layer can run inside the generated step of :mod:`sparsec.codegen.cpu.decoder`, returns a
:class:`FusedDecodeStep` that keeps its own KV cache and computes a token's logits with one Numba
dispatch for all the decoder layers plus one call of ``lm_head``. When a model cannot (another
architecture, a layer kept dense, kernels of two value types) it says why, and generation keeps
the module-by-module path. The step runs on the kernels' threads, all inside the one call
(:func:`fused_step_for`).

    step = fused_step_for(decoder)            # FusedDecodeStep or a str: why not
    step.load_cache(cache, prompt_length)     # the prompt's keys and values from a prefill
    logits = step(token_id, position)         # float32 [1, vocab]

What is checked (:func:`fused_step_for`): a ``LlamaForCausalLM`` (or a subclass) with SiLU
MLPs, no attention or MLP bias, a rotary embedding that does not depend on the sequence length,
and per layer a fused q/k/v kernel, an o_proj kernel, a fused gate/up kernel and a down_proj
kernel, all bitmask (or dense int8) CPU kernels of one value type that serve batch 1 with the
vector ``rows`` kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sparsec.codegen.cpu.decoder import SLOTS, step_function
from sparsec.codegen.cpu.threads import run_concurrently
from sparsec.errors import first_line

_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


def _kernel_impl(module: nn.Module) -> Any:
    """The bitmask implementation behind a hosted layer (a KernelLinear or a fused part), or None."""
    from sparsec.codegen.cpu.kernel import CpuLinearKernel, _BitmaskImpl
    from sparsec.runtime.compiled import KernelLinear
    from sparsec.runtime.generate import FusedPart

    if isinstance(module, FusedPart):
        module = module.group.fused
    if not isinstance(module, KernelLinear) or not isinstance(module.kernel, CpuLinearKernel):
        return None
    impl = module.kernel._impl
    return impl if isinstance(impl, _BitmaskImpl) else None


def _layer_impls(layer: nn.Module) -> list[Any] | str:
    """The four kernel implementations of one decoder layer in :data:`SLOTS` order, or why not."""
    from sparsec.runtime.compiled import KernelLinear
    from sparsec.runtime.generate import FusedPart

    attn, mlp = layer.self_attn, layer.mlp
    for owner, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
                        (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")):
        module = getattr(owner, name, None)
        if not isinstance(module, (KernelLinear, FusedPart)):
            return f"its {name} is a {type(module).__name__}, not a sparsec kernel"
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if not (isinstance(q, FusedPart) and isinstance(k, FusedPart) and isinstance(v, FusedPart)
            and q.group is k.group is v.group and (q.start, k.start) == (0, q.stop) and v.start == k.stop):
        return "q/k/v do not run as one fused kernel"
    g, u = mlp.gate_proj, mlp.up_proj
    if not (isinstance(g, FusedPart) and isinstance(u, FusedPart) and g.group is u.group
            and g.start == 0 and u.start == g.stop == u.stop - g.stop):
        return "gate/up do not run as one fused kernel of equal halves"
    impls = [_kernel_impl(m) for m in (q, attn.o_proj, g, mlp.down_proj)]
    for slot, impl in zip(SLOTS, impls):
        if impl is None:
            return f"its {slot} layer is not a CPU bitmask kernel"
        if impl.plan(1) != ("rows", 1):
            return f"its {slot} layer has no vector batch-1 kernel on this CPU"
    return impls


def prepare_fused_step(compiled: nn.Module) -> FusedDecodeStep | str | None:
    """Build (and so compile) the fused step of a freshly compiled CPU model of the Llama family,
    so that an artifact saved from it carries the step's machine code. ``None`` for a model of
    another kind (nothing built), else what :func:`fused_step_for` returned."""
    desc = getattr(compiled, "source_model", None) or {}
    if getattr(compiled, "target", None) != "cpu" or not str(desc.get("class", "")).endswith(":LlamaForCausalLM"):
        return None
    from sparsec.runtime.generate import GenerationError, build_decoder

    try:
        decoder = build_decoder(compiled)
    except GenerationError as exc:
        return str(exc)
    return fused_step_for(decoder)


def fused_step_for(decoder: nn.Module, threads: int | None = None) -> FusedDecodeStep | str:
    """A :class:`FusedDecodeStep` for ``decoder`` on ``threads`` threads, or a one-line reason
    why this decoder has to run module by module. By default the step uses the kernels' threads
    (:func:`sparsec.codegen.cpu.threads.cpu_threads`), also for a model of small layers that the
    module path runs on one thread each: there a second thread is woken for every call (about 60 us of wall time),
    here once a token, and meeting at a barrier costs 0.1-0.3 us (``benchmarks/barrier.py`` on 2
    idle Zen 4 cores; ``benchmarks/decode_breakdown.py``: SmolLM2's 30 layers in 3.7 ms on two
    threads against 6.9 ms on one). Kept on the
    decoder while the modules it was built from stay in place (a caller that swaps layers in and
    out, as the benchmarks do, gets a step for what is there)."""
    from sparsec.codegen.cpu.threads import cpu_threads

    threads = cpu_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    key = (_modules_key(decoder), threads)
    cached = decoder.__dict__.get("_sparsec_fused_step")
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _build(decoder, threads)
    decoder.__dict__["_sparsec_fused_step"] = (key, result)
    return result


def _modules_key(decoder: nn.Module) -> tuple[int, ...]:
    """Identity of every module and weight a fused step reads."""
    body = getattr(decoder, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        return (id(decoder),)
    out = [id(decoder.get_output_embeddings()), id(getattr(body, "embed_tokens", None))]
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        out += [id(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [id(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")]
    return tuple(out)


def _build(decoder: nn.Module, threads: int) -> FusedDecodeStep | str:
    from transformers import LlamaForCausalLM

    if not isinstance(decoder, LlamaForCausalLM):
        return f"{type(decoder).__name__} is not a Llama-family causal LM"
    config = decoder.config
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False) \
            or getattr(config, "attention_bias", False):
        return "its MLP activation is not SiLU or its layers carry biases"
    body = decoder.model
    rotary = body.rotary_emb
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        return f"its rotary embedding ({rotary.rope_type}) changes with the sequence length"
    if next(decoder.parameters()).device.type != "cpu":
        return "it does not run on the CPU"
    per_layer = []
    for i, layer in enumerate(body.layers):
        impls = _layer_impls(layer)
        if isinstance(impls, str):
            return f"decoder layer {i}: {impls}"
        per_layer.append(impls)
    if not per_layer:
        return "it has no decoder layers"
    types = {impl.vt for impls in per_layer for impl in impls}
    if len(types) != 1:
        return f"its layers mix value types ({', '.join(sorted(types))})"
    vt = types.pop()
    try:
        # compile (or load from Numba's disk cache) and run once now, so a failure shows here
        step = FusedDecodeStep(decoder, per_layer, vt, threads)
        step.hidden_state(0, 0)
    except Exception as exc:  # noqa: BLE001 - any failure means: decode by module, and say why
        first = first_line(exc)
        return f"the {vt} decode step could not be compiled here ({first})"
    return step


def _float32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


class FusedDecodeStep:
    """Logits of one token at batch 1, every decoder layer in one compiled call.

    Holds references to the decoder's kernel arrays (no copy of the packed weights), float32
    copies of its norms and embedding, and its own KV cache ``[layers, kv_heads, capacity,
    head_dim]``, grown by doubling. The step runs on ``threads`` threads at once, each computing
    its share of every layer's rows (balanced by kept values) and of the key/value head groups;
    they meet at a barrier five times a layer. Not thread-safe: one generation at a time.
    """

    def __init__(self, decoder: nn.Module, per_layer: list[list[Any]], value_type: str, threads: int = 1) -> None:
        from sparsec.codegen.cpu.partition import balanced_row_split
        from sparsec.codegen.cpu.sync import LINE

        config = decoder.config
        body = decoder.model
        self.decoder = decoder
        self.value_type = value_type
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.hidden = int(config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.layers = len(per_layer)
        self.threads = max(1, int(threads))
        T = self.threads
        self.eps = float(body.norm.variance_epsilon)
        self.embed = _float32(body.embed_tokens.weight)
        self.norm1 = _float32(torch.stack([layer.input_layernorm.weight for layer in body.layers]))
        self.norm2 = _float32(torch.stack([layer.post_attention_layernorm.weight for layer in body.layers]))
        self.norm_f = _float32(body.norm.weight)
        self.lm_head = decoder.lm_head
        # the layers' arrays by address (the step views them with numba.carray); self.arrays
        # keeps every one of them alive for as long as the step can run
        self.arrays, ptrs, lens = [], [], []
        meta, bounds = [], []
        for impls in per_layer:
            for impl in impls:
                row = [np.ascontiguousarray(a) for a in (impl.vals, impl.bm, impl.offs, impl.scales,
                                                         impl.k._bias_np, impl.rowsum)]
                self.arrays += row
                ptrs.append([a.ctypes.data for a in row])
                lens.append([a.size for a in row])
                rows, cols = impl.k.rows, impl.k.cols
                meta.append((rows, cols, impl.nbytes, impl.gstride, impl.gs, impl.nfull_w,
                             impl.tail_w, impl.nfull_16, impl.tail_16, impl.cap, impl.actc))
                nnz = rows * cols if impl.dense else int(impl.k.packed.nnz)
                counts = np.diff(np.append(impl.offs[:rows], nnz))
                bounds.append(balanced_row_split(counts, T, row_cost=cols / 64.0))
        self.ptrs = np.array(ptrs, dtype=np.int64)
        self.lens = np.array(lens, dtype=np.int64)
        self.meta = np.array(meta, dtype=np.int64)
        self.bounds = np.array(bounds, dtype=np.int64)
        self.groups = (np.arange(T + 1, dtype=np.int64) * self.kv_heads) // T
        first = per_layer[0]
        if any(tuple(self.meta[i, :2]) != tuple(self.meta[i % 4, :2]) for i in range(len(meta))):
            raise ValueError("the decoder layers differ in shape")
        qkv_rows, gu_rows = first[0].k.rows, first[2].k.rows
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if qkv_rows != qd + 2 * kvd or first[1].k.cols != qd or gu_rows % 2:
            raise ValueError("the fused q/k/v kernel does not match the attention heads of the config")
        inter = gu_rows // 2
        f32 = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
        # shared: the layers' outputs and the attention output; per thread: everything else
        self.y = (f32(1, qkv_rows), f32(1, self.hidden), f32(1, gu_rows), f32(1, self.hidden))
        self.att, self.out = f32(1, qd), f32(self.hidden)
        self.h, self.xn, self.mlp_in = f32(T, self.hidden), f32(T, 1, self.hidden), f32(T, 1, inter)
        # x in chunk order, exactly one padded row per input width (the kernels read its length)
        self.xa = tuple(f32(T, (impl.nfull_w + (1 if impl.tail_w else 0)) * impl.W) for impl in first)
        widest = max(int(self.meta[:, 1].max()), 1)
        self.xq = np.zeros((T, 6 * (widest + 64)), dtype=np.uint8)
        self.sxs = np.zeros((T, 1), dtype=np.float64)
        self.f1, self.n1 = f32(1), np.zeros(1, dtype=np.int32)
        self.f2, self.d2 = f32(1, 1), np.zeros((1, 1), dtype=np.float64)
        self.arrive = np.zeros(T * LINE, dtype=np.int64)
        self.fn = step_function(value_type)
        self.capacity = 0
        self.kc = self.vc = self.cos = self.sin = self.scores = None
        self._grow(64)

    def __repr__(self) -> str:
        return (f"FusedDecodeStep({self.layers} layers, {self.value_type} kernels, "
                f"{self.heads}/{self.kv_heads} heads of {self.head_dim}, {self.threads} threads, "
                f"cache {self.capacity})")

    def _grow(self, need: int) -> None:
        """Make room for positions ``< need``: caches, rotary tables and scores double in size."""
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        shape = (self.layers, self.kv_heads, cap, self.head_dim)
        kc, vc = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        if self.capacity:
            kc[:, :, : self.capacity] = self.kc
            vc[:, :, : self.capacity] = self.vc
        self.kc, self.vc = kc, vc
        rotary = self.decoder.model.rotary_emb
        with torch.no_grad():
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = rotary(probe, torch.arange(cap)[None])
        self.cos, self.sin = _float32(cos[0]), _float32(sin[0])
        self.scores = np.zeros((self.threads, cap), dtype=np.float32)
        self.capacity = cap

    def load_cache(self, cache: Any, length: int) -> None:
        """Copy positions ``0:length`` of batch row 0 of a Hugging Face cache (after a prefill
        through the decoder's modules) into this step's cache."""
        self._grow(length + 1)
        for i in range(self.layers):
            layer = cache.layers[i] if hasattr(cache, "layers") else None
            keys = layer.keys if layer is not None else cache.key_cache[i]
            values = layer.values if layer is not None else cache.value_cache[i]
            self.kc[i, :, :length] = keys[0, :, :length].to(torch.float32).numpy()
            self.vc[i, :, :length] = values[0, :, :length].to(torch.float32).numpy()

    def hidden_state(self, token: int, position: int) -> np.ndarray:
        """The final-normed hidden state (float32 ``[hidden]``, reused by the next call) of
        ``token`` at ``position``; writes its keys and values into the cache at ``position``."""
        self._grow(position + 1)
        y_qkv, y_o, y_gu, y_down = self.y
        self.arrive[:] = 0
        args = (self.threads, self.arrive, token, position, self.embed, self.norm1, self.norm2, self.norm_f,
                self.eps, self.cos, self.sin, self.kc, self.vc, self.heads, self.kv_heads,
                self.ptrs, self.lens, self.meta, self.bounds,
                self.groups, self.h, self.xn, y_qkv, y_o, y_gu, self.mlp_in, y_down, self.att, *self.xa,
                self.xq, self.sxs, self.f1, self.f2, self.d2, self.n1, self.scores, self.out)
        # every thread runs the whole step on its share, all at once (they meet at barriers)
        run_concurrently(self.fn, self.threads, args)
        return self.out

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits (float32 ``[1, vocab]``) of ``token`` at ``position``."""
        h = torch.from_numpy(self.hidden_state(token, position))[None]
        return self.lm_head(h).float()
