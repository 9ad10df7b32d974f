"""``select-format``: pick each linear layer's storage format with a cost model; an analysis pass.

For every linear layer the pass takes the weight as the kernel will see it (``weight * mask``),
its value type (int8/int4 where ``quantize`` ran, else the ``value_type`` option), and estimates
for each candidate format

* the exact bytes the format stores (the same count :meth:`PackedWeight.nbytes` gives, computed
  from nonzero counts without packing), and
* the time of one call at ``batch`` tokens on ``target``:
  ``max(bytes moved / bandwidth, work cycles / (threads * clock))``.

Bytes moved are the stored weight plus the fp32 activations in and out. Work is modelled per
format from how its kernel runs (see :class:`TargetModel`): a dense kernel does one FMA per
weight per token; a bitmask kernel expands the kept values of a chunk of columns into a dense
vector register, so it pays a fixed decode cost per chunk *whatever the sparsity* plus the dense
FMAs; CSR pays a gather per kept value per token; N:M pays a decode per stored value; blocks pay
their kept blocks' FMAs. At batch 1..16 the bytes dominate and sparse formats win once the
layer is sparse enough; at large batch the work dominates and dense wins. The cheapest estimate
is chosen; on a tie, or when nothing beats dense by ``margin``, the layer stays dense.

Formats with no kernel on the target (``TargetModel.kernels``) are only considered when named in
``formats``, and are then costed as what runs them: an fp32 dense matmul on the unpacked weight.

Records ``meta.FORMAT = {"format", "value_type", "options", "estimates", "bytes", "reason"}``
(estimates in seconds, per candidate label such as ``"bitmask"``, ``"nm 2:4"``, ``"block 4x4"``).
The constants are documented defaults, not measurements of the machine at hand; override any of
them with ``ctx.config["cost_model"] = {"cpu": {"bandwidth": 30e9, ...}}``.

Example: ``prune-magnitude{sparsity=0.7},quantize{bits=8},select-format{target=cpu,batch=1},lower-cpu``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from sparsec.formats import VALUE_TYPES
from sparsec.formats.block import parse_block_shape
from sparsec.formats.csr import narrowest_index_dtype
from sparsec.formats.nm import index_bits
from sparsec.ir import meta
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.masks import current_mask, select_layers

CANDIDATE_FORMATS = ("dense", "bitmask", "csr", "nm", "block")
NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (1, 2))
BLOCK_SHAPES = ((1, 16), (4, 4), (16, 1))
_VALUE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


@dataclass
class TargetModel:
    """Cost constants of one target. Cycle counts are per core (CPU) or per SM scheduler (CUDA).

    CPU defaults: a bitmask chunk costs 8 cycles to decode for 16-lane float chunks and 20 for
    64-lane int8/int4 chunks (DESIGN.md: 7-18 cycles per 16-column chunk; an 11008x4096 int8
    layer at 75% in 2.35 ms on 2 cores is ~20 cycles per 64-column chunk); 32 fp32 FMAs a cycle
    (two 16-lane FMA units); a CSR kept value costs a scalar gather and FMA per token; 20 GB/s
    of memory bandwidth for 2 cores. CUDA defaults are rough H100 figures (3 TB/s, 132 SMs x 4
    schedulers at 1.7 GHz, 32-lane warps) and have not been fitted to measurements.
    """

    bandwidth: float  # bytes / s
    threads: int  # cores (CPU) or warp schedulers (CUDA)
    clock: float  # Hz
    fma_lanes: float  # fp32 multiply-adds a thread retires per cycle at full vector width
    chunk_cycles: dict[str, float]  # bitmask decode cycles per chunk, by value type
    chunk_lanes: dict[str, int]  # columns per bitmask chunk, by value type
    dequant_cycles: dict[str, float]  # extra cycles per weight to widen values to fp32 (dense)
    csr_cycles: float  # per kept value: fixed, then per token
    csr_cycles_per_token: float
    nm_cycles: float  # per stored value: decode, then per token
    nm_cycles_per_token: float
    block_cycles: float  # per kept block: mask test and addressing
    kernels: tuple[str, ...] = ("dense", "bitmask", "csr", "nm")

    def cycles_to_seconds(self, cycles: float) -> float:
        return cycles / (self.threads * self.clock)


def default_models(threads: int | None = None) -> dict[str, TargetModel]:
    cpu_threads = threads or max(1, torch.get_num_threads())
    return {
        "cpu": TargetModel(
            bandwidth=20e9,
            threads=cpu_threads,
            clock=3.0e9,
            fma_lanes=32.0,
            chunk_cycles={"fp32": 8.0, "bf16": 8.0, "fp16": 8.0, "int8": 20.0, "int4": 20.0},
            chunk_lanes={"fp32": 16, "bf16": 16, "fp16": 16, "int8": 64, "int4": 64},
            dequant_cycles={"fp32": 0.0, "bf16": 1 / 16, "fp16": 1 / 16, "int8": 1 / 16, "int4": 1 / 8},
            csr_cycles=1.0,
            csr_cycles_per_token=1.0,
            nm_cycles=0.25,
            nm_cycles_per_token=1 / 16,
            block_cycles=2.0,
            kernels=("dense", "bitmask", "csr", "nm"),
        ),
        "cuda": TargetModel(
            bandwidth=3.0e12,
            threads=132 * 4,
            clock=1.7e9,
            fma_lanes=32.0,
            chunk_cycles={vt: 6.0 for vt in VALUE_TYPES},
            chunk_lanes={vt: 32 for vt in VALUE_TYPES},
            dequant_cycles={"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "int8": 1 / 32, "int4": 1 / 16},
            csr_cycles=1.0,
            csr_cycles_per_token=1.0,
            nm_cycles=1 / 16,
            nm_cycles_per_token=1 / 32,
            block_cycles=1.0,
            kernels=("dense", "bitmask", "nm"),
        ),
    }


@dataclass
class WeightStats:
    """What the cost model needs to know about one ``[rows, cols]`` weight."""

    rows: int
    cols: int
    nnz: int
    nm: dict[tuple[int, int], bool] = field(default_factory=dict)  # pattern -> weight fits it
    blocks: dict[tuple[int, int], int] = field(default_factory=dict)  # block shape -> kept blocks

    @classmethod
    def of(
        cls, w: torch.Tensor, patterns: tuple[tuple[int, int], ...], shapes: tuple[tuple[int, int], ...]
    ) -> WeightStats:
        rows, cols = w.shape
        nz = w != 0
        stats = cls(rows, cols, int(nz.sum()))
        counts: dict[int, torch.Tensor] = {}
        for n, m in patterns:
            if cols % m or not rows or not cols or m > 255:
                continue
            if stats.nnz > rows * (cols // m) * n:
                stats.nm[(n, m)] = False  # more nonzeros than the pattern can hold: no need to look
                continue
            if m not in counts:
                # Nonzeros per group from m strided column slices, in uint8 (cheap on big layers).
                c = torch.zeros(rows, cols // m, dtype=torch.uint8)
                for p in range(m):
                    c += nz[:, p::m]
                counts[m] = c
            stats.nm[(n, m)] = bool((counts[m] <= n).all())
        for br, bc in shapes:
            rb, cb = math.ceil(rows / br), math.ceil(cols / bc)
            padded = torch.nn.functional.pad(nz.to(torch.uint8), (0, cb * bc - cols, 0, rb * br - rows))
            stats.blocks[(br, bc)] = int(padded.view(rb, br, cb, bc).amax(dim=(1, 3)).sum()) if rows and cols else 0
        return stats


def value_bytes(value_type: str, count: int) -> int:
    """Bytes of ``count`` stored values (int4: two a byte)."""
    return (count + 1) // 2 if value_type == "int4" else count * _VALUE_BITS[value_type] // 8


def scale_bytes(value_type: str, rows: int, cols: int, group: int) -> int:
    if value_type == "int8":
        return 4 * rows
    if value_type == "int4":
        return 4 * rows * math.ceil(cols / group)
    return 0


def format_nbytes(fmt: str, value_type: str, stats: WeightStats, group: int = 128, **options) -> int:
    """Exact stored bytes of ``fmt`` for a weight with ``stats`` (equals ``pack(...).nbytes()``)."""
    rows, cols, nnz = stats.rows, stats.cols, stats.nnz
    fixed = 16 + scale_bytes(value_type, rows, cols, group)  # the shape tensor, the scales
    if fmt == "dense":
        body = rows * ((cols + 1) // 2) if value_type == "int4" else value_bytes(value_type, rows * cols)
        return fixed + body
    if fmt == "bitmask":
        return fixed + value_bytes(value_type, nnz) + rows * ((cols + 7) // 8) + 8 * rows
    if fmt == "csr":
        ptr = torch.iinfo(narrowest_index_dtype(nnz)).bits // 8
        idx = torch.iinfo(narrowest_index_dtype(max(cols - 1, 0))).bits // 8
        return fixed + ptr * (rows + 1) + idx * nnz + value_bytes(value_type, nnz)
    if fmt == "nm":
        n, m = options["n"], options["m"]
        k = cols // m * n
        return fixed + value_bytes(value_type, rows * k) + rows * ((k * index_bits(m) + 7) // 8)
    if fmt == "block":
        br, bc = options["block_shape"]
        rb, cb = math.ceil(rows / br), math.ceil(cols / bc)
        kept = stats.blocks[(br, bc)]
        return fixed + rb * ((cb + 7) // 8) + 8 * rb + value_bytes(value_type, kept * br * bc)
    raise ValueError(f"no byte model for format {fmt!r}")


def estimate_seconds(
    fmt: str, value_type: str, stats: WeightStats, batch: int, model: TargetModel, nbytes: int, **options
) -> float:
    """One call's estimated time: ``max(memory time, compute time)`` (see module doc)."""
    rows, cols, nnz = stats.rows, stats.cols, stats.nnz
    moved = nbytes + 4 * batch * (rows + cols)
    dense_fma = rows * cols * batch / model.fma_lanes
    if fmt not in model.kernels:
        # No kernel for it on this target: torch runs an fp32 matmul on the unpacked weight.
        moved = 4 * rows * cols + 4 * batch * (rows + cols)
        cycles = dense_fma
    elif fmt == "dense":
        cycles = dense_fma + rows * cols * model.dequant_cycles[value_type]
    elif fmt == "bitmask":
        chunks = rows * math.ceil(cols / model.chunk_lanes[value_type])
        cycles = chunks * model.chunk_cycles[value_type] + dense_fma
    elif fmt == "csr":
        cycles = nnz * (model.csr_cycles + batch * model.csr_cycles_per_token)
    elif fmt == "nm":
        stored = rows * (cols // options["m"]) * options["n"]
        cycles = stored * (model.nm_cycles + batch * model.nm_cycles_per_token)
    elif fmt == "block":
        br, bc = options["block_shape"]
        kept = stats.blocks[(br, bc)]
        cycles = kept * (model.block_cycles + br * bc * batch / model.fma_lanes)
    else:
        raise ValueError(f"no cost model for format {fmt!r}")
    return max(moved / model.bandwidth, model.cycles_to_seconds(cycles))


def candidates(formats: tuple[str, ...], stats: WeightStats) -> list[tuple[str, str, dict]]:
    """``(label, format, options)`` for every format that can store this weight."""
    out: list[tuple[str, str, dict]] = []
    for fmt in formats:
        if fmt == "nm":
            fits = [p for p, ok in stats.nm.items() if ok]
            if fits:
                n, m = min(fits, key=lambda p: (p[0] / p[1], p[1]))  # fewest stored values, then small m
                out.append((f"nm {n}:{m}", "nm", {"n": n, "m": m}))
        elif fmt == "block":
            for br, bc in stats.blocks:
                out.append((f"block {br}x{bc}", "block", {"block_shape": (br, bc)}))
        else:
            out.append((fmt, fmt, {}))
    return out


@register_pass
@dataclass
class SelectFormat(Pass):
    """Choose each linear layer's storage format (dense, bitmask, csr, N:M, block) with a bytes + work cost model.

    Options: ``target`` cpu|cuda|auto (auto = the context's target); ``batch`` tokens per call the
    estimate assumes; ``value_type`` for layers no quantize pass touched (auto = fp32);
    ``formats`` the candidates, comma-separated (empty = those with a kernel on the target);
    ``margin`` how much cheaper than dense (fraction) a sparse format must be to be chosen;
    ``group`` int4 group size when quantize did not set one; ``layers`` / ``ignore`` as in the
    pruning passes (default: every linear layer).
    """

    name: ClassVar[str] = "select-format"
    preserves_numerics: ClassVar[bool] = True
    target: str = "auto"
    batch: int = 1
    value_type: str = "auto"
    formats: str = ""
    margin: float = 0.0
    group: int = 128
    layers: str = ""
    ignore: str = ""

    def validate(self) -> None:
        if self.target not in ("auto", "cpu", "cuda"):
            raise PassOptionError(f"{self.name}: target must be cpu, cuda or auto, got {self.target!r}")
        if self.batch < 1:
            raise PassOptionError(f"{self.name}: batch must be a positive number of tokens, got {self.batch}")
        if self.value_type != "auto" and self.value_type not in VALUE_TYPES:
            raise PassOptionError(
                f"{self.name}: value_type must be auto or one of {', '.join(VALUE_TYPES)}, got {self.value_type!r}"
            )
        unknown = [f for f in self._formats() if f not in CANDIDATE_FORMATS]
        if unknown:
            raise PassOptionError(
                f"{self.name}: unknown format(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATE_FORMATS)}"
            )
        if not (0.0 <= self.margin < 1.0):
            raise PassOptionError(f"{self.name}: margin must be in [0, 1), got {self.margin}")
        if self.group < 1:
            raise PassOptionError(f"{self.name}: group must be positive, got {self.group}")

    def _formats(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.formats.split(",") if f.strip())

    def target_model(self, ctx: PassContext) -> tuple[str, TargetModel]:
        target = ctx.target if self.target == "auto" else self.target
        models = default_models()
        if target not in models:
            raise PassOptionError(f"{self.name}: no cost model for target {target!r}; use cpu or cuda")
        model = models[target]
        overrides = (ctx.config.get("cost_model") or {}).get(target, {})
        known = {f.name for f in dataclasses.fields(TargetModel)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise PassOptionError(f"{self.name}: unknown cost_model setting(s) {bad}; known: {sorted(known)}")
        return target, dataclasses.replace(model, **overrides)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        target, model = self.target_model(ctx)
        formats = self._formats() or tuple(f for f in CANDIDATE_FORMATS if f in model.kernels)
        if "dense" not in formats:
            formats = ("dense", *formats)  # the baseline every choice is judged against
        chosen = select_layers(gm, self.layers, self.ignore, kinds="linear,addmm_t")
        decisions: dict[str, dict] = {}
        by_name = {n.name: n for n in gm.graph.nodes}
        for layer in chosen:
            node = by_name[layer.node_name]
            decisions[layer.weight] = self._decide(gm, layer, node, formats, model, target)
        for node in gm.graph.nodes:
            layer = node.meta.get(meta.LAYER)
            if layer is not None and layer.weight in decisions:
                node.meta[meta.FORMAT] = dict(decisions[layer.weight])
        return PassResult(gm, modified=False)

    def _decide(self, gm, layer, node, formats, model: TargetModel, target: str) -> dict:
        w = layer.matrix(gm).detach()
        keep = current_mask(gm, layer)
        if keep is not None:
            w = w * keep
        quant = node.meta.get(meta.QUANT) or {}
        vt, group = self._value_type(quant)
        prune = node.meta.get(meta.PRUNE) or {}
        patterns = NM_PATTERNS
        if "n" in prune and "m" in prune:
            patterns = ((int(prune["n"]), int(prune["m"])), *NM_PATTERNS)
        shapes = BLOCK_SHAPES
        if "block" in prune:
            shapes = (parse_block_shape(prune["block"]), *BLOCK_SHAPES)
        stats = WeightStats.of(
            w, patterns if "nm" in formats else (), tuple(dict.fromkeys(shapes)) if "block" in formats else ()
        )
        estimates: dict[str, float] = {}
        sizes: dict[str, int] = {}
        options_of: dict[str, tuple[str, dict]] = {}
        for label, fmt, options in candidates(formats, stats):
            nbytes = format_nbytes(fmt, vt, stats, group, **options)
            sizes[label] = nbytes
            estimates[label] = estimate_seconds(fmt, vt, stats, self.batch, model, nbytes, **options)
            options_of[label] = (fmt, options)
        best = min(estimates, key=lambda k: (estimates[k], k != "dense"))
        if best != "dense" and estimates[best] > (1.0 - self.margin) * estimates["dense"]:
            best = "dense"
        fmt, options = options_of[best]
        sparsity = 1.0 - stats.nnz / max(1, stats.rows * stats.cols)
        bits = 8.0 * sizes[best] / max(1, stats.rows * stats.cols)
        dense_bits = 8.0 * sizes["dense"] / max(1, stats.rows * stats.cols)
        reason = (
            f"{best}: {bits:.2f} bits/weight vs dense {dense_bits:.2f} at {sparsity:.0%} sparsity; "
            f"est {estimates[best] * 1e6:.1f} us vs dense {estimates['dense'] * 1e6:.1f} us "
            f"({target}, batch {self.batch}, {vt})"
        )
        record = {
            "format": fmt,
            "value_type": vt,
            "options": dict(options),
            "estimates": estimates,
            "bytes": sizes,
            "reason": reason,
            "target": target,
            "batch": self.batch,
        }
        if vt == "int4":
            record["group"] = group
        return record

    def _value_type(self, quant: dict) -> tuple[str, int]:
        bits = quant.get("bits")
        if bits == 8:
            return "int8", self.group
        if bits == 4:
            return "int4", int(quant.get("group") or self.group)
        if self.value_type == "auto":
            return "fp32", self.group
        return self.value_type, self.group
