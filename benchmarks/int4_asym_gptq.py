"""GPTQ onto an asymmetric int4 grid with an integer zero point per group, on SmolLM2-135M.

    python benchmarks/int4_asym_gptq.py --threads 1 --calibration 32 --windows 16 --groups 128,64

The grid is compressed-tensors' asymmetric one: levels q in [0, 15], ``w_hat = (q - z) * s`` with
a float32 scale ``s`` and an integer zero point ``z`` in [0, 15] per group of ``group`` input
columns (``benchmarks/int4_grids.py``'s ``zero`` grid). Per group ``(s, z)`` come from the
group's range ``[lo, hi]`` (``s = (hi - lo) / 15``, ``z = round(-lo / s)`` clamped to [0, 15]);
"searched" tries ``--steps`` shrinkings ``p`` of the range from 1 down to ``--min-ratio``
(``s = p (hi - lo) / 15``, ``z = round(-p lo / s)``) and keeps the one with the least squared
rounding error, weighted by the Hessian diagonal under GPTQ (unweighted for RTN), as
``sparsec.passes.quantize.search_scales`` does for the symmetric grid.

GPTQ rows run sparsec's own ``quantize{bits=4,method=gptq,actorder=true}`` pass (its sequential
calibration engine: each layer's Hessian from the inputs of the already-quantized layers before
it), with the per-layer quantizer swapped for :func:`asym_gptq_quantize`: the library's GPTQ loop
(act-order, every group's ``(s, z)`` fixed up front from the unupdated weight, lazy block
updates, the same damped inverse-Hessian Cholesky factor) rounding onto the zero-point grid.

Data and evaluation are ``benchmarks/quant_accuracy.py``'s: calibration 32 random train windows
of 512 tokens (seed 0), held-out perplexity on 16 windows of 512 tokens, the captured graph
evaluated eagerly on the dequantized weights; every Linear but ``lm_head`` quantized.
``--control`` adds the library's symmetric GPTQ act-order + searched scales row (docs: 25.424).
Prints a markdown table and writes it, with the command, times and load averages, to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

import sparsec.passes.quantize as quantize_pass
from sparsec.capture import capture
from sparsec.data import heldout_windows, perplexity, token_windows
from sparsec.models import load
from sparsec.passes import PassContext, Pipeline, run_passes
from sparsec.passes.calibration import CalibrationError, inverse_hessian_cholesky
from sparsec.passes.masks import DEFAULT_IGNORE, select_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_accuracy import _Graph, cpu_seconds  # noqa: E402  (the same model wrapper and clock)

QMAX = 15  # levels 0..15


def zero_point_params(w: torch.Tensor, group: int, importance: torch.Tensor | None = None,
                      steps: int = 20, min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(scales float64 [rows, groups] (float32 values), zeros float64 [rows, groups] (integers), clamped)``.

    Tries ``steps`` shrinkings of each group's ``[min, max]`` range from 1 to ``min_ratio`` (one
    step: the full range, plain RTN) and keeps the one minimizing ``sum importance_j (w_hat_j -
    w_j)^2``. ``clamped`` counts the chosen groups whose ``round(-lo / s)`` fell outside [0, 15].
    """
    w = w.detach().to(torch.float64)
    rows, cols = w.shape
    groups = -(-cols // group)
    padded = torch.nn.functional.pad(w, (0, groups * group - cols)).view(rows, groups, group)
    imp = torch.ones(cols, dtype=torch.float64) if importance is None else importance.detach().to(torch.float64)
    imp = torch.nn.functional.pad(imp, (0, groups * group - cols)).view(1, groups, group)
    lo, hi = padded.amin(-1), padded.amax(-1)
    best_s = best_z = best_err = best_raw = None
    for k in range(steps):
        p = 1 - (1 - min_ratio) * k / max(steps - 1, 1)
        s = ((hi - lo) * p / QMAX).clamp_min(1e-12).to(torch.float32).to(torch.float64)
        raw = torch.round(-lo * p / s)
        z = raw.clamp(0, QMAX)
        q = torch.clamp(torch.round(padded / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, QMAX)
        err = (((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - padded) ** 2 * imp).sum(-1)
        if best_err is None:
            best_s, best_z, best_err, best_raw = s, z, err, raw
        else:
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_raw = torch.where(better, raw, best_raw)
            best_err = torch.where(better, err, best_err)
    clamped = int(((best_raw < 0) | (best_raw > QMAX)).sum())
    return best_s, best_z, clamped


def zero_point_round(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto ``(q - z) * s``, q in [0, 15] (elementwise, broadcasting)."""
    return (torch.clamp(torch.round(x / s) + z, 0, QMAX) - z) * s


def rtn_zero_point(w: torch.Tensor, group: int, steps: int, min_ratio: float) -> tuple[torch.Tensor, int]:
    rows, cols = w.shape
    s, z, clamped = zero_point_params(w, group, None, steps, min_ratio)
    groups = s.shape[1]
    padded = torch.nn.functional.pad(w.detach().to(torch.float64), (0, groups * group - cols)).view(rows, groups, group)
    out = zero_point_round(padded, s.unsqueeze(-1), z.unsqueeze(-1)).reshape(rows, -1)[:, :cols]
    return out.to(torch.float32), clamped


STATS = {"clamped": 0, "groups": 0, "layers": 0}


def asym_gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor | None, group: int,
                       blocksize: int = 128, percdamp: float = 0.01, layer: str = "", actorder: bool = True,
                       steps: int = 1, min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ on one ``[out, in]`` weight onto the zero-point int4 grid: ``(w_hat float32, scales, loss)``.

    Every group's ``(s, z)`` is fixed up front from the unupdated weight (``steps > 1``: searched,
    weighted by the Hessian diagonal); ``actorder`` visits columns by decreasing Hessian diagonal.
    The column sweep is the library's (:func:`sparsec.passes.quantize.gptq_sweep`).
    """
    cols = w.shape[1]
    W = w.detach().to(torch.float64).clone()
    K = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.to(torch.bool)
    W = W * K
    diag = torch.diagonal(hessian).detach().to(torch.float64)
    S, Z, clamped = zero_point_params(W, group, diag, steps, min_ratio)
    STATS["clamped"] += clamped
    STATS["groups"] += S.numel()
    STATS["layers"] += 1
    order = torch.argsort(diag, descending=True, stable=True) if actorder else torch.arange(cols)
    col_group = order // group
    if actorder:
        W, K = W[:, order], K[:, order]
        hessian = hessian.detach()[order][:, order]
    U, _dead = inverse_hessian_cholesky(hessian, percdamp, layer)

    def round_column(c: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        g = col_group[c]
        return zero_point_round(W1[:, i], S[:, g], Z[:, g])

    Q, loss = quantize_pass.gptq_sweep(W, K, U, blocksize, round_column)
    if actorder:
        Q = Q[:, torch.argsort(order)]
    if not torch.isfinite(Q).all():
        raise CalibrationError(f"layer {layer!r}: GPTQ produced NaN/Inf weights; increase percdamp")
    return Q.to(torch.float32), S.to(torch.float32).contiguous(), float(loss.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    ap.add_argument("--groups", default="128")
    ap.add_argument("--steps", type=int, default=20, help="range shrinkings tried by the search")
    ap.add_argument("--min-ratio", type=float, default=0.5, help="smallest range fraction tried")
    ap.add_argument("--rows", default="rtn,rtn-mse,gptq,gptq-mse", help="which rows, per group")
    ap.add_argument("--control", action="store_true", help="also the library's symmetric GPTQ act-order mse g128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/int4_asym_gptq.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    loads: list[float] = [os.getloadavg()[0]]
    model, tok = load("smollm2-135m")
    evals = heldout_windows(tok, 512, args.windows)
    calib_ids = token_windows(tok, "train", 512, args.calibration, seed=0)
    base = capture(model, {"input_ids": evals[:1, :16]})
    calibration = [((), {"input_ids": w[None], **base.constant_kwargs}) for w in calib_ids]
    layers = select_layers(base.graph_module, "", DEFAULT_IGNORE, kinds="linear,addmm_t")
    rows: list[tuple[str, float, float, float, str]] = []  # label, ppl, pass s, eval s, note

    def evaluate(label: str, gm, pass_s: float, note: str = "") -> float:
        t0 = time.perf_counter()
        p = perplexity(_Graph(base, gm), evals)
        loads.append(os.getloadavg()[0])
        rows.append((label, p, pass_s, time.perf_counter() - t0, note))
        print(f"{label}: {p:.3f} (pass {pass_s:.0f} s, eval {rows[-1][3]:.0f} s) {note}", flush=True)
        return p

    evaluate("dense fp32", base.graph_module, 0.0)
    original_gptq = quantize_pass.gptq_quantize
    for group in (int(g) for g in args.groups.split(",")):
        for row in args.rows.split(","):
            searched = row.endswith("-mse")
            steps = args.steps if searched else 1
            gm = copy.deepcopy(base.graph_module)
            t0 = time.perf_counter()
            if row.startswith("rtn"):
                clamped = 0
                with torch.no_grad():
                    for layer in layers:
                        w_hat, c = rtn_zero_point(layer.matrix(gm), group, steps, args.min_ratio)
                        clamped += c
                        weight = gm.get_parameter(layer.weight)
                        weight.copy_(layer.to_param_layout(w_hat.to(weight.dtype), weight.shape))
                label = f"zero-point g{group} RTN" + (", searched (s,z)" if searched else "")
                note = f"{len(layers)} layers; z clamped in {clamped} groups"
            elif row.startswith("gptq"):
                def patched(w, hessian, keep, bits, grp, blocksize, percdamp, layer, actorder, scales,
                            _steps=steps):
                    assert bits == 4 and actorder
                    return asym_gptq_quantize(w, hessian, keep, grp, blocksize, percdamp, layer, actorder,
                                              _steps, args.min_ratio)

                STATS.update(clamped=0, groups=0, layers=0)
                quantize_pass.gptq_quantize = patched
                try:
                    text = f"quantize{{bits=4,group={group},method=gptq,actorder=true}}"
                    gm, _ = run_passes(gm, list(Pipeline.parse(text).passes), PassContext(calibration=calibration))
                finally:
                    quantize_pass.gptq_quantize = original_gptq
                label = f"zero-point g{group} GPTQ act-order" + (", searched (s,z)" if searched else "")
                note = f"{STATS['layers']} layers; z clamped in {STATS['clamped']} of {STATS['groups']} groups"
            else:
                raise SystemExit(f"unknown row {row!r}")
            loads.append(os.getloadavg()[0])
            evaluate(label, gm, time.perf_counter() - t0, note)
            del gm
    if args.control:
        gm = copy.deepcopy(base.graph_module)
        t0 = time.perf_counter()
        text = "quantize{bits=4,group=128,method=gptq,actorder=true,scales=mse}"
        gm, _ = run_passes(gm, list(Pipeline.parse(text).passes), PassContext(calibration=calibration))
        loads.append(os.getloadavg()[0])
        evaluate("symmetric g128 GPTQ act-order, searched scales (library, control)", gm,
                 time.perf_counter() - t0, f"`{text}`")

    wall, cpu = time.perf_counter() - t_start, cpu_seconds() - c_start
    dense = rows[0][1]
    lines = [f"| grid, quantizer | held-out perplexity | vs dense ({dense:.3f}) | within 5% | pass s | eval s | note |",
             "|---|---:|---:|---|---:|---:|---|"]
    for label, p, ps, es, note in rows:
        rel = p / dense - 1
        met = "-" if label == "dense fp32" else ("yes" if rel <= 0.05 else "no")
        lines.append(f"| {label} | {p:.3f} | {100 * rel:+.2f}% | {met} | {ps:.0f} | {es:.0f} | {note} |")
    table = "\n".join(lines)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    text = (
        "# int4 GPTQ on the asymmetric zero-point grid, SmolLM2-135M\n\n"
        "Grid `w_hat = (q - z) * s`, q in [0, 15], integer z in [0, 15], float32 s per group of input "
        "columns; every Linear but `lm_head`. Held-out perplexity on "
        f"{args.windows} x 512 tokens (`sparsec.data.heldout_windows`), calibration {args.calibration} x 512 "
        "train tokens (`token_windows(seed=0)`), the captured graph evaluated eagerly on the dequantized "
        "weights, as `benchmarks/quant_accuracy.py`. GPTQ: sparsec's `quantize{bits=4,method=gptq,"
        "actorder=true}` pass (sequential calibration, percdamp 0.01, blocksize 128) with the per-layer "
        "quantizer swapped for the zero-point one; (s, z) fixed up front per group. Searched (s, z): "
        f"{args.steps} range shrinkings from 1.0 to {args.min_ratio}, error weighted by the Hessian "
        "diagonal (GPTQ) or unweighted (RTN).\n\n"
        f"```\n{command}\n```\n\n{table}\n\n"
        f"Wall {wall:.0f} s, CPU {cpu:.0f} s, {torch.get_num_threads()} torch thread(s), peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; 1-minute load average "
        f"{min(loads):.2f}-{max(loads):.2f} (sampled at start and after each pass and evaluation); "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
