"""Sequential calibration: run a flat graph over every calibration sample, one op at a time, and
hand each chosen weighted op the statistics of its *actual* inputs before its outputs are computed.

Data-driven compression (SparseGPT, Wanda, GPTQ) needs, for each layer, statistics of the inputs
that layer sees once every layer before it has already been compressed. Captured graphs are flat
(``torch.export`` inlines every module), so instead of hooking modules this engine interprets
the graph node by node for *all* samples together:

* every node's value is a list with one tensor per sample (values that do not depend on the
  inputs, such as parameters, are computed once); a value is freed as soon as its last user ran,
  so memory holds only the activations in flight, not a copy per layer;
* on reaching a chosen weighted op, all its input activations are at hand: the engine
  accumulates :class:`LayerStatistics` (the Hessian ``H = 2 X^T X / n`` and/or the per-input
  column sums of squares), calls ``on_layer(layer, stats)``, and only then computes the op's
  outputs, with the weight the callback left behind. Every later op therefore sees the outputs of
  the already-compressed ops before it;
* ops reading the same input node (q/k/v, gate/up) share one statistics object, computed once;
* interpretation stops after the last chosen op (the output head is never run for nothing).

The callback may change the weight's *values in place* (``weight.copy_(...)`` under
``torch.no_grad()``); it must not change the graph or replace the parameter object. Mask
insertion (``apply_mask``) therefore happens after calibration, once every layer is done.

Example (what ``prune-wanda`` does, minus error handling)::

    def wanda(layer, stats):
        w = layer.matrix(gm)
        keep = rowwise_keep_mask(w.abs() * stats.column_norms().to(w.dtype), 0.5)
        with torch.no_grad():
            w.mul_(keep)

    calibrate_layers(gm, select_layers(gm), ctx.calibration, wanda, statistics=("norms",))

:func:`inverse_hessian_cholesky` is the damped-Hessian code shared with GPTQ;
``sparsec/passes/prune_calibrated.py`` wraps the engine with the all-or-nothing guarantee the
pruning passes give (validate first, restore the saved weights if anything fails midway).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from sparsec.ir import meta
from sparsec.ir.layers import MASK_INPUT, WeightedLayer, find_layers

STATISTICS = ("hessian", "norms")


class CalibrationError(ValueError):
    """Missing or bad calibration data, or a layer the engine cannot gather statistics for."""


@dataclass
class LayerStatistics:
    """Statistics of the inputs of one weighted op over all calibration samples.

    ``rows`` is the number of input vectors seen (tokens, or conv patches), ``samples`` the number
    of calibration samples. ``hessian`` (float64 ``[in, in]``, when asked for) is
    ``2 X^T X / rows`` over the matrix-view input ``X [rows, in]``; ``sq_norms`` (float64
    ``[in]``, when asked for) is ``sum_rows x_j^2``. Statistics are shared by ops that read the
    same input: callbacks must not modify them in place.
    """

    rows: int
    samples: int
    hessian: torch.Tensor | None = None
    sq_norms: torch.Tensor | None = None

    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input column (Wanda's activation norm)."""
        if self.sq_norms is not None:
            return self.sq_norms.sqrt()
        if self.hessian is not None:
            return (torch.diagonal(self.hessian) * (self.rows / 2.0)).clamp_min(0).sqrt()
        raise CalibrationError("these statistics hold neither norms nor a Hessian")


OnLayer = Callable[[WeightedLayer, LayerStatistics], None]


def calibration_from_context(ctx: Any, pass_name: str) -> list[tuple[tuple, dict]]:
    """The context's calibration samples, or an error saying how to provide them."""
    samples = getattr(ctx, "calibration", None)
    if not samples:
        raise CalibrationError(
            f"{pass_name} needs calibration data: pass calibration=[inputs, ...] to sparsec.compile, "
            f"--calibration N to the sparsec command, or a list of (args, kwargs) inputs as "
            f"PassContext.calibration (e.g. 128 windows of 512 tokens from the train split)")
    return list(samples)


def calibrate_layers(gm: fx.GraphModule, layers: Iterable[WeightedLayer],
                     calibration: list[tuple[tuple, dict]], on_layer: OnLayer,
                     statistics: Iterable[str] = ("hessian",), progress: bool = False) -> list[str]:
    """Run ``gm`` over ``calibration`` op by op, calling ``on_layer(layer, stats)`` for each of
    ``layers`` in graph order, just before its op runs (see the module docstring).

    ``calibration`` is a list of ``(args, kwargs)`` pairs, each one call of ``gm``.
    ``statistics`` names what to accumulate: ``"hessian"`` and/or ``"norms"``. Returns the names
    of the layers processed, in order. Raises :class:`CalibrationError` for malformed samples,
    NaN/Inf activations (naming the layer and sample) and unsupported layers. The engine itself
    changes nothing: whatever the callback changes is the caller's to undo on error.
    """
    stats_kinds = tuple(statistics)
    unknown = set(stats_kinds) - set(STATISTICS)
    if unknown or not stats_kinds:
        raise CalibrationError(f"statistics must be a non-empty subset of {STATISTICS}, got {stats_kinds}")
    layers = list(layers)
    if not layers:
        return []
    samples = _check_samples(calibration)
    targets = _target_nodes(gm, layers)
    for node, layer in targets.items():
        _input_position(gm, node, layer)  # refuse unsupported ops before running anything
    inputs = [bind_placeholders(gm, args, kwargs, i) for i, (args, kwargs) in enumerate(samples)]
    return _Run(gm, targets, inputs, on_layer, stats_kinds, progress).run()


# -- the interpreter ------------------------------------------------------------------------------


class _PerSample(list):
    """A node value that differs per calibration sample (one entry per sample)."""


class _Run:
    def __init__(self, gm: fx.GraphModule, targets: dict[fx.Node, WeightedLayer], inputs: list[list[Any]],
                 on_layer: OnLayer, stats_kinds: tuple[str, ...], progress: bool) -> None:
        self.gm, self.targets, self.inputs, self.on_layer = gm, targets, inputs, on_layer
        self.stats_kinds, self.progress = stats_kinds, progress
        self.nodes = list(gm.graph.nodes)
        position = {n: i for i, n in enumerate(self.nodes)}
        # index of the last node reading each value, so the value is freed right after it ran
        self.last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in self.nodes}
        self.env: dict[fx.Node, Any] = {}
        # statistics by (input node, how the op reads it): q/k/v or gate/up reuse one computation
        self.shared_stats: dict[tuple, LayerStatistics] = {}

    def run(self) -> list[str]:
        from tqdm.auto import tqdm

        done: list[str] = []
        bar = tqdm(total=len(self.targets), desc="calibrate", disable=not self.progress, leave=False)
        placeholders = 0
        with torch.no_grad():
            for index, node in enumerate(self.nodes):
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    self.env[node] = _PerSample(inp[placeholders] for inp in self.inputs)
                    placeholders += 1
                elif node in self.targets:
                    layer = self.targets[node]
                    self._calibrate(node, layer)
                    done.append(layer.name)
                    bar.update(1)
                    if len(done) == len(self.targets):
                        break
                else:
                    self.env[node] = self._evaluate(node)
                self._free(index)
        bar.close()
        self.env.clear()
        self.shared_stats.clear()
        return done

    def _free(self, index: int) -> None:
        for node in list(self.env):
            if self.last_use[node] <= index:
                del self.env[node]
                for key in [k for k in self.shared_stats if k[0] is node]:
                    del self.shared_stats[key]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return _fetch_attr(self.gm, node.target)
        per_sample = any(isinstance(self.env[n], _PerSample) for n in node.all_input_nodes)
        if not per_sample:
            return self._call(node, lambda n: self.env[n])
        count = len(self.inputs)
        out = _PerSample()
        for i in range(count):
            def value(n: fx.Node, i: int = i) -> Any:
                v = self.env[n]
                return v[i] if isinstance(v, _PerSample) else v
            try:
                out.append(self._call(node, value))
            except Exception as e:  # noqa: BLE001 - re-raised naming the node and the sample
                raise CalibrationError(f"running node {node.name!r} ({node.format_node()[:120]}) on "
                                       f"calibration sample {i} failed: {type(e).__name__}: {e}") from e
        return out

    def _call(self, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
        args = map_aggregate(node.args, lambda a: value(a) if isinstance(a, fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: value(a) if isinstance(a, fx.Node) else a)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise CalibrationError(f"cannot interpret node {node.name!r} of kind {node.op!r}")

    def _calibrate(self, node: fx.Node, layer: WeightedLayer) -> None:
        position = _input_position(self.gm, node, layer)
        x_node = node.args[position]
        key = (x_node, layer.kind, layer.shape[1], repr(node.args[3:]) if layer.kind == "conv" else "")
        stats = self.shared_stats.get(key)
        if stats is None:
            values = self.env[x_node]
            xs = values if isinstance(values, _PerSample) else [values]
            stats = _accumulate(xs, self.gm, node, layer, self.stats_kinds)
            self.shared_stats[key] = stats
        self.on_layer(layer, stats)
        # The callback changed the weight in place; anything computed from it before this op
        # (the get_attr value, a `weight * mask` product) is refreshed so the op uses the new weight.
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                self.env[arg] = _fetch_attr(self.gm, arg.target)
            elif MASK_INPUT in arg.meta:
                for src in arg.all_input_nodes:
                    if src.op == "get_attr":
                        self.env[src] = _fetch_attr(self.gm, src.target)
                self.env[arg] = self._evaluate(arg)
        self.env[node] = self._evaluate(node)


def _accumulate(xs: list[torch.Tensor], gm: fx.GraphModule, node: fx.Node, layer: WeightedLayer,
                kinds: tuple[str, ...]) -> LayerStatistics:
    cols = layer.shape[1]
    hessian = torch.zeros(cols, cols, dtype=torch.float64) if "hessian" in kinds else None
    sq = torch.zeros(cols, dtype=torch.float64) if "norms" in kinds else None
    rows = 0
    for x in xs:
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"layer {layer.name!r}: its input is a {type(x).__name__}, not a tensor")
        x2 = _input_rows(x, gm, node, layer).float()
        rows += x2.shape[0]
        # float32 products per sample (fast), summed in float64 so thousands of samples do not drift
        if hessian is not None:
            hessian += (x2.t() @ x2).to(hessian.device, torch.float64)
        if sq is not None:
            sq += (x2 * x2).sum(0).to(torch.float64)
    if rows == 0:
        raise CalibrationError(f"layer {layer.name!r} saw no input rows; give calibration samples with "
                               f"tokens")
    # NaN/Inf inputs poison the sums, so one check of the sums stands for a check of every sample
    if any(t is not None and not torch.isfinite(t).all() for t in (hessian, sq)):
        _raise_not_finite(xs, gm, node, layer)
    if hessian is not None:
        hessian *= 2.0 / rows
    return LayerStatistics(rows=rows, samples=len(xs), hessian=hessian, sq_norms=sq)


def _raise_not_finite(xs: list[torch.Tensor], gm: fx.GraphModule, node: fx.Node,
                      layer: WeightedLayer) -> None:
    for i, x in enumerate(xs):
        x2 = _input_rows(x, gm, node, layer)
        if not torch.isfinite(x2).all():
            bad = int((~torch.isfinite(x2)).sum())
            raise CalibrationError(f"calibration sample {i} gives {bad} NaN/Inf value(s) at the input of "
                                   f"layer {layer.name!r}; check the calibration data (and the layers before "
                                   f"it)")
    raise CalibrationError(f"the input statistics of layer {layer.name!r} overflow float32 (activations too "
                           f"large); check the calibration data and the layers before it")


def _input_rows(x: torch.Tensor, gm: fx.GraphModule, node: fx.Node, layer: WeightedLayer) -> torch.Tensor:
    """The op's input as matrix-view rows ``[n, in]``, the columns ordered like ``layer.matrix``."""
    cols = layer.shape[1]
    if layer.kind in ("linear", "addmm_t"):
        if x.shape[-1] != cols:
            raise CalibrationError(f"layer {layer.name!r}: input has {x.shape[-1]} features, the weight "
                                   f"expects {cols}")
        return x.reshape(-1, cols)
    stride, padding, dilation, _ = _conv_params(gm, node, layer)
    kernel = tuple(gm.get_parameter(layer.weight).shape[2:])
    if len(kernel) == 1:  # conv1d as a conv2d of height 1
        x = x.unsqueeze(-2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k, L]
    return patches.transpose(1, 2).reshape(-1, cols)


def _conv_params(gm: fx.GraphModule, node: fx.Node, layer: WeightedLayer) -> tuple[tuple, tuple, tuple, int]:
    dims = gm.get_parameter(layer.weight).dim() - 2

    def arg(i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    def tup(v: Any) -> tuple:
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims

    stride, padding, dilation, groups = arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1), arg(
        6, "groups", 1)
    if isinstance(padding, str):
        if padding != "valid":
            raise CalibrationError(f"layer {layer.name!r}: padding={padding!r} convolutions are not "
                                   f"supported by calibration; exclude the layer (ignore=...)")
        padding = 0
    if groups != 1:
        raise CalibrationError(f"layer {layer.name!r}: grouped convolutions (groups={groups}) are not "
                               f"supported by calibration; exclude the layer (ignore=...)")
    return tup(stride), tup(padding), tup(dilation), groups


def _input_position(gm: fx.GraphModule, node: fx.Node, layer: WeightedLayer) -> int:
    if layer.kind == "linear":
        return 0
    if layer.kind == "addmm_t":
        return 1
    if layer.kind == "conv":
        if gm.get_parameter(layer.weight).dim() - 2 not in (1, 2):
            raise CalibrationError(f"layer {layer.name!r}: only 1-D and 2-D convolutions can be calibrated; "
                                   f"exclude it (ignore=...)")
        _conv_params(gm, node, layer)
        return 0
    raise CalibrationError(f"layer {layer.name!r} has unsupported kind {layer.kind!r}")


def _target_nodes(gm: fx.GraphModule, layers: list[WeightedLayer]) -> dict[fx.Node, WeightedLayer]:
    """The op node of each layer: the first op using its weight (a tied weight is calibrated at
    its first use)."""
    found = find_layers(gm)  # refresh node annotations
    wanted = {layer.weight: layer for layer in layers}
    if len(wanted) != len(layers):
        raise CalibrationError("the same weight was given twice; give each layer once")
    targets: dict[fx.Node, WeightedLayer] = {}
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if meta.LAYER not in node.meta:
            continue
        weight = node.meta[meta.LAYER].weight
        if weight in wanted and weight not in seen:
            seen.add(weight)
            targets[node] = wanted[weight]
    missing = [layer.name for layer in layers if layer.weight not in seen]
    if missing:
        names = ", ".join(repr(x.name) for x in found[:3])
        raise CalibrationError(f"layer(s) {missing} are not weighted ops of this graph; its layers look "
                               f"like {names}")
    return targets


def _check_samples(calibration: Any) -> list[tuple[tuple, dict]]:
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise CalibrationError("calibration must be a non-empty list of (args, kwargs) samples")
    samples = []
    for i, sample in enumerate(calibration):
        if (not isinstance(sample, (list, tuple)) or len(sample) != 2
                or not isinstance(sample[0], (list, tuple)) or not isinstance(sample[1], dict)):
            raise CalibrationError(f"calibration sample {i} is a {type(sample).__name__}; give "
                                   f"(args, kwargs) pairs, e.g. ((), {{'input_ids': ids}})")
        samples.append((tuple(sample[0]), dict(sample[1])))
    return samples


def bind_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict, index: int = 0) -> list[Any]:
    """The values of ``gm``'s placeholders for one call ``gm(*args, **kwargs)``."""
    sig = inspect.signature(gm.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CalibrationError(
            f"calibration sample {index} does not fit the graph's inputs ({', '.join(sig.parameters)}): {e}; "
            f"give the inputs the captured graph takes (exported decoders also need use_cache=False)"
        ) from None
    bound.apply_defaults()
    ordered = [bound.arguments[name] for name in sig.parameters]
    try:
        flat = gm.graph.process_inputs(*ordered)
    except Exception as e:  # noqa: BLE001 - a pytree mismatch, reported in one line
        raise CalibrationError(f"calibration sample {index} does not match the graph's input structure: "
                               f"{e}") from None
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    flat = list(flat)
    if len(flat) != n_placeholders:
        raise CalibrationError(f"calibration sample {index} gives {len(flat)} inputs; the graph takes "
                               f"{n_placeholders}")
    return flat


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- the Hessian code shared with GPTQ ------------------------------------------------------------


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01,
                             layer: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the inverse of the damped Hessian, as SparseGPT
    and GPTQ use it, and the bool mask of dead inputs (zero diagonal: never active).

    Dead inputs get a unit diagonal (their weights should be zeroed by the caller: nothing
    observed them), then ``percdamp * mean(diag(H))`` is added to the diagonal so the matrix is
    safely positive definite; ``U`` satisfies ``U^T U = H_damped^{-1}``. Works in float64 and does
    not modify ``hessian``. Raises :class:`CalibrationError` if the damped Hessian still is not
    positive definite (increase ``percdamp``).
    """
    if percdamp < 0:
        raise CalibrationError(f"percdamp must be >= 0, got {percdamp}")
    h = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise CalibrationError(f"layer {layer!r}: the Hessian has NaN/Inf entries; check the calibration "
                               f"data")
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise CalibrationError(f"layer {layer!r}: the damped Hessian is not positive definite "
                               f"(percdamp={percdamp}); increase percdamp or add calibration samples")
    hinv = torch.cholesky_inverse(chol)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise CalibrationError(f"layer {layer!r}: the inverse Hessian is not positive definite "
                               f"(percdamp={percdamp}); increase percdamp")
    return upper, dead
