"""``select-format``: pick each linear layer's storage format with a cost model; an analysis pass.

For every linear layer the pass takes the weight as the kernel will see it (``weight * mask``),
its value type (int8/int4 where ``quantize`` ran, else the ``value_type`` option), and estimates
for each candidate format

* the exact bytes the format stores (the same count :meth:`PackedWeight.nbytes` gives, computed
  from nonzero counts without packing), and
* the time of one call at ``batch`` tokens on ``target``:
  ``max(bytes moved / bandwidth, work cycles / (threads * clock))``.

Bytes moved are the stored weight plus the fp32 activations in and out. Work is modelled per
format from how its kernel runs (see :class:`TargetModel`): a bitmask kernel decodes a chunk of
columns at a fixed cost *whatever the sparsity*, plus a little per kept value and token; CSR and
N:M pay a gather per stored value and token; dense runs where torch runs it, an fp32 matmul on
the unpacked weight. The cheapest estimate is chosen; on a tie, or when nothing beats dense by
``margin``, the layer stays dense.

Formats with no kernel on the target (``TargetModel.kernels``) are only considered when named in
``formats``, and are then costed as what runs them: an fp32 dense matmul on the unpacked weight.

Records ``meta.FORMAT = {"format", "value_type", "options", "estimates", "bytes", "reason"}``
(estimates in seconds, per candidate label such as ``"bitmask"``, ``"nm 2:4"``, ``"block 4x4"``).
The CPU constants were fitted to the CPU kernels on this project's machine, the CUDA ones to a
benchmark run on an H200 (see :class:`TargetModel`); override any of them with
``ctx.config["cost_model"] = {"cpu": {"bandwidth": 30e9, ...}}``.

Example: ``prune-magnitude{sparsity=0.7},quantize{bits=8},select-format{target=cpu,batch=1},lower-cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
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
#: what ``sparsec tune`` writes and ``select-format{cost_model=FILE}`` reads
COST_MODEL_FORMAT = "sparsec-cost-model"
COST_MODEL_VERSION = 1
NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (1, 2))
BLOCK_SHAPES = ((1, 16), (4, 4), (16, 1))
_VALUE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


@dataclass
class TargetModel:
    """Cost constants of one target. Cycles are per thread: a CPU core, or a CUDA warp scheduler.

    Work per format, in cycles (``B`` = tokens per call):

    * formats with no kernel here (``kernels``), dense included where it runs through torch, and
      every format from ``dense_min_batch`` tokens on (the CPU kernels hand prefill to torch):
      an fp32 matmul on the unpacked weight, ``rows * cols * B / dense_fma_per_cycle``, moving
      the fp32 weight;
    * dense where the target has its own dense path (``"dense" in kernels``: cuBLAS on CUDA):
      ``rows * cols * (B / dense_fma_per_cycle + dequant_cycles)``, moving ``dense_bits`` per
      weight (what that path keeps on the device) or, without ``dense_bits``, the stored bytes;
    * bitmask: ``chunks * (chunk_cycles + B * chunk_cycles_per_token) + nnz * (nnz_cycles + B *
      nnz_cycles_per_token)`` with ``chunks = rows * ceil(cols / chunk_lanes)``;
    * csr: ``nnz * (csr_cycles + B * csr_cycles_per_token)``;
    * nm: ``stored values * (nm_cycles + B * nm_cycles_per_token)``;
    * block (if a kernel existed): ``kept blocks * block_cycles + kept weights * B / dense_fma_per_cycle``.

    Per-value constants are a number, or a dict by value type where the kernels differ.

    CPU defaults were fitted to ``benchmarks/select_format_check.py`` on this project's 2-core
    AVX-512 machine (4096x4096, 50/75/90%, bf16 and int8, batch 1 and 16, CPU-time clock, while
    other jobs loaded it), where the dense path is torch's fp32 ``F.linear``: it reached 37 GB/s
    at batch 1 and 4.3 FMAs a cycle at batch 16. fp32 bitmask chunks are assumed to cost what bf16
    ones did and int4 what int8 did (not measured).

    CUDA defaults were fitted (non-negative least squares) to the 180 configurations of
    ``benchmarks/results/gpu/gpu_kernels.json``, an H200 (132 SMs x 4 schedulers at 1.98 GHz):
    the bitmask terms per value type to within a median 24-29% (worst 57%) of the measured time,
    N:M to 2-10% (worst 23%); cuBLAS fp16 read weights at 2.4-3.8 TB/s at batch 1, so bandwidth
    is 3.3 TB/s. Those kernels are bound by work per kept value, so the fitted model keeps most
    layers dense on CUDA until they get faster. fp32 and bf16 values are assumed to cost what
    fp16 did (not measured). The default ``lanes`` kernel came later; at 75% and batch 1 or 16
    it is still slower than cuBLAS on every measured shape (``benchmarks/results/gpu-session3``),
    which these constants predict too (a test checks it): refit them when a design beats cuBLAS.
    """

    bandwidth: float  # bytes / s
    threads: int
    clock: float  # Hz
    dense_fma_per_cycle: float
    chunk_lanes: dict[str, int]  # columns per bitmask chunk, by value type
    chunk_cycles: dict[str, float]
    chunk_cycles_per_token: dict[str, float]
    nnz_cycles_per_token: float | dict[str, float]
    dequant_cycles: dict[str, float]  # a dense kernel's extra cycles per weight to widen values
    csr_cycles: float
    csr_cycles_per_token: float
    nm_cycles: float | dict[str, float]
    nm_cycles_per_token: float | dict[str, float]
    block_cycles: float
    kernels: tuple[str, ...] = ("bitmask", "csr", "nm")
    #: from this batch on every kernel hands the call to torch's dense matmul (CPU prefill); None: never
    dense_min_batch: int | None = None
    nnz_cycles: float | dict[str, float] = 0.0
    #: bits per weight the target's own dense path moves, by value type (None: the stored bytes)
    dense_bits: dict[str, int] | None = None

    def cycles_to_seconds(self, cycles: float) -> float:
        return cycles / (self.threads * self.clock)

    @staticmethod
    def per_value_type(constant: float | dict[str, float], value_type: str) -> float:
        """A per-value constant for ``value_type`` (a plain number applies to every type)."""
        return constant[value_type] if isinstance(constant, dict) else constant


def load_cost_model(path: str) -> dict[str, dict]:
    """``{target: {constant: value}}`` from a cost-model file (``sparsec tune``); a missing,
    damaged or foreign file raises :class:`PassOptionError` saying which and what to do."""
    p = Path(path).expanduser()
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise PassOptionError(f"select-format: cost model file {p} does not exist; write one with "
                              f"`sparsec tune -o {p}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PassOptionError(f"select-format: cost model file {p} is not readable JSON ({e}); "
                              f"rerun `sparsec tune`") from None
    if not isinstance(doc, dict) or doc.get("format") != COST_MODEL_FORMAT:
        raise PassOptionError(f"select-format: {p} is not a sparsec cost model "
                              f"(no \"format\": \"{COST_MODEL_FORMAT}\")")
    if doc.get("version") != COST_MODEL_VERSION:
        raise PassOptionError(f"select-format: {p} is cost model version {doc.get('version')!r}; this sparsec "
                              f"reads version {COST_MODEL_VERSION}: rerun `sparsec tune`")
    return {t: dict(doc[t]) for t in ("cpu", "cuda") if isinstance(doc.get(t), dict)}


def default_models(threads: int | None = None) -> dict[str, TargetModel]:
    cpu_threads = threads or max(1, torch.get_num_threads())
    floats, ints = ("fp32", "bf16", "fp16"), ("int8", "int4")
    return {
        "cpu": TargetModel(
            bandwidth=37e9,
            threads=cpu_threads,
            clock=3.0e9,
            dense_fma_per_cycle=4.3,
            chunk_lanes={**{vt: 16 for vt in floats}, **{vt: 64 for vt in ints}},
            chunk_cycles={**{vt: 3.25 for vt in floats}, **{vt: 8.7 for vt in ints}},
            chunk_cycles_per_token={**{vt: 0.15 for vt in floats}, **{vt: 1.65 for vt in ints}},
            nnz_cycles_per_token=0.16,
            dequant_cycles={"fp32": 0.0, "bf16": 1 / 16, "fp16": 1 / 16, "int8": 1 / 16, "int4": 1 / 8},
            csr_cycles=9.4,
            csr_cycles_per_token=1.5,
            nm_cycles=9.0,
            nm_cycles_per_token=2.1,
            block_cycles=2.0,
            kernels=("bitmask", "csr", "nm"),
            dense_min_batch=65,  # sparsec.codegen.cpu's CpuLinearKernel.DENSE_MIN_BATCH
        ),
        "cuda": TargetModel(
            bandwidth=3.3e12,
            threads=132 * 4,
            clock=1.98e9,
            dense_fma_per_cycle=64.0,  # cuBLAS at batch <= 16 stays memory-bound
            chunk_lanes={vt: 64 for vt in VALUE_TYPES},  # one 64-bit mask word a lane
            chunk_cycles={**{vt: 0.0 for vt in floats}, "int8": 0.0, "int4": 49.1},
            chunk_cycles_per_token={**{vt: 17.6 for vt in floats}, "int8": 31.8, "int4": 38.4},
            nnz_cycles={**{vt: 0.78 for vt in floats}, "int8": 0.51, "int4": 0.0},
            nnz_cycles_per_token={**{vt: 0.73 for vt in floats}, "int8": 0.91, "int4": 1.81},
            dequant_cycles={vt: 0.0 for vt in VALUE_TYPES},
            csr_cycles=1.0,
            csr_cycles_per_token=1.0,
            nm_cycles={**{vt: 0.67 for vt in floats}, "int8": 0.53, "int4": 0.0},
            nm_cycles_per_token={**{vt: 0.98 for vt in floats}, "int8": 1.84, "int4": 4.0},
            block_cycles=1.0,
            kernels=("bitmask", "nm", "dense"),
            # sparsec.codegen.cuda.dense keeps fp16/bf16 as they are and integer values widened to fp32
            dense_bits={"fp32": 32, "bf16": 16, "fp16": 16, "int8": 32, "int4": 32},
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
    """One call's estimated time: ``max(memory time, compute time)`` (see :class:`TargetModel`)."""
    rows, cols, nnz = stats.rows, stats.cols, stats.nnz
    moved = nbytes + 4 * batch * (rows + cols)
    fallback = model.dense_min_batch is not None and batch >= model.dense_min_batch
    if fmt not in model.kernels or fallback:
        # No kernel for it on this target (or not at this batch): torch runs an fp32 matmul on
        # the unpacked weight.
        moved = 4 * rows * cols + 4 * batch * (rows + cols)
        cycles = rows * cols * batch / model.dense_fma_per_cycle
    elif fmt == "dense":
        if model.dense_bits is not None:
            moved = rows * cols * model.dense_bits[value_type] // 8 + 4 * batch * (rows + cols)
        cycles = rows * cols * (batch / model.dense_fma_per_cycle + model.dequant_cycles[value_type])
    elif fmt == "bitmask":
        chunks = rows * math.ceil(cols / model.chunk_lanes[value_type])
        per_chunk = model.chunk_cycles[value_type] + batch * model.chunk_cycles_per_token[value_type]
        per_value = (model.per_value_type(model.nnz_cycles, value_type)
                     + batch * model.per_value_type(model.nnz_cycles_per_token, value_type))
        cycles = chunks * per_chunk + nnz * per_value
    elif fmt == "csr":
        cycles = nnz * (model.csr_cycles + batch * model.csr_cycles_per_token)
    elif fmt == "nm":
        stored = rows * (cols // options["m"]) * options["n"]
        cycles = stored * (model.per_value_type(model.nm_cycles, value_type)
                           + batch * model.per_value_type(model.nm_cycles_per_token, value_type))
    elif fmt == "block":
        br, bc = options["block_shape"]
        kept = stats.blocks[(br, bc)]
        cycles = kept * model.block_cycles + kept * br * bc * batch / model.dense_fma_per_cycle
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
    pruning passes (default: every linear layer); ``cost_model`` a file of constants fitted to
    this machine by ``sparsec tune`` (empty = the defaults of :func:`default_models`).
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
    cost_model: str = ""

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
        # the tuned file first, then what the context says on top of it
        from_file = load_cost_model(self.cost_model).get(target, {}) if self.cost_model else {}
        overrides = {**from_file, **((ctx.config.get("cost_model") or {}).get(target, {}))}
        known = {f.name for f in dataclasses.fields(TargetModel)}
        bad = sorted(set(overrides) - known)
        if bad:
            where = f" (in {self.cost_model})" if set(bad) & set(from_file) else ""
            raise PassOptionError(f"{self.name}: unknown cost_model setting(s) {bad}{where}; known: {sorted(known)}")
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
