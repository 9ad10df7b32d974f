"""Read and write Hugging Face model folders in the compressed-tensors checkpoint layout.

A folder holds ``config.json`` (the model config with a ``quantization_config`` entry whose
``quant_method`` is ``"compressed-tensors"``) and ``*.safetensors`` weights. Per layer (the
parameter name minus ``.weight`` is the *prefix*) the layouts read and written are:

* bitmask fp32/bf16/fp16: ``shape``, ``compressed``, ``bitmask``, ``row_offsets``; the config's
  ``sparsity_config.format`` is ``"sparse-bitmask"``.
* bitmask int8: the same with int8 ``compressed`` plus float ``weight_scale [rows, 1]`` (and an
  all-zero ``weight_zero_point``): sparse-bitmask stacked on an ``int-quantized`` 8-bit channel
  scheme, as compressed-tensors stacks them.
* dense int8/int4: ``weight_packed`` int32 ``[rows, ceil(cols*bits/32)]``, ``weight_scale``
  ``[rows, 1]`` (channel) or ``[rows, groups]`` (group), ``weight_shape`` int64 ``[2]``: the
  ``pack-quantized`` format with an 8-bit channel or 4-bit group scheme.
* dense fp32/bf16/fp16: ``weight`` as usual.

``weight_packed`` holds ``32/bits`` values per int32, value ``i`` in bits ``i*bits ..``, each
stored unsigned as ``q + 2**(bits-1)``. Scales are symmetric (zero point 0); a value dequantizes
as ``q * weight_scale[r, c // group_size]``. Other layouts (asymmetric scales, activation
ordering, fp8, 2:4 compressors, bitmask with int4 values) are refused with an error that names
the layer.

Example::

    packed = pack_linear_weights(model.state_dict(), ["model.layers.0.mlp.up_proj.weight"], "bitmask", "fp16")
    write_folder("out/", model.state_dict(), packed, model.config.to_dict())
    ckpt = read_folder("out/")
    model.load_state_dict(ckpt.state_dict)        # dense weights, dequantized to float32
    ckpt.packed["model.layers.0.mlp.up_proj.weight"].bits_per_weight()
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsec.formats.base import FormatError, PackedWeight, pack
from sparsec.formats.bitmask import BitmaskWeight
from sparsec.formats.dense import DenseWeight, pack_int4_rows

QUANT_METHOD = "compressed-tensors"
SPARSE_BITMASK = "sparse-bitmask"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_BITMASK_FIELDS = ("shape", "compressed", "bitmask", "row_offsets")


@dataclass
class Checkpoint:
    """What :func:`read_folder` gives back.

    ``state_dict``: every parameter dense (compressed layers unpacked to float32, others as
    stored), ready for ``model.load_state_dict``. ``packed``: the compressed layers as sparsec
    packed weights, keyed by parameter name (``<prefix>.weight``). ``config``: ``config.json``.
    """

    state_dict: dict[str, torch.Tensor]
    packed: dict[str, PackedWeight]
    config: dict = field(default_factory=dict)


def pack_linear_weights(
    state_dict: Mapping[str, torch.Tensor],
    names: Iterable[str],
    format: str = "bitmask",
    value_type: str = "fp32",
    group_size: int = 128,
) -> dict[str, PackedWeight]:
    """Pack the named 2-D weights of ``state_dict`` (a convenience for :func:`write_folder`)."""
    out: dict[str, PackedWeight] = {}
    for name in names:
        if name not in state_dict:
            raise FormatError(f"no parameter {name!r} in the state dict")
        options = {"group_size": group_size} if value_type == "int4" else {}
        out[name] = pack(state_dict[name].detach().float(), format, value_type, **options)
    return out


# -- writing ----------------------------------------------------------------------------------------


def _prefix(name: str) -> str:
    if not name.endswith(".weight"):
        raise FormatError(f"packed weight {name!r} must be named after its parameter, ending in '.weight'")
    return name[: -len(".weight")]


def _pack_int32(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` signed levels -> int32 ``[rows, ceil(cols / (32/bits))]`` (see module doc)."""
    rows, cols = levels.shape
    per_word = 32 // bits
    words = math.ceil(cols / per_word)
    unsigned = torch.zeros(rows, words * per_word, dtype=torch.int64)
    unsigned[:, :cols] = levels.to(torch.int64) + (1 << (bits - 1))
    lanes = unsigned.view(rows, words, per_word)
    acc = torch.zeros(rows, words, dtype=torch.int64)
    for i in range(per_word):
        acc |= lanes[:, :, i] << (bits * i)
    # Reinterpret the low 32 bits as a signed int32, as numpy's uint32 -> int32 view does.
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def _unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows, words = packed.shape
    per_word = 32 // bits
    raw = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    lanes = (raw.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (lanes.reshape(rows, words * per_word)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def _weight_args(bits: int, group_size: int | None) -> dict:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _layer_tensors(prefix: str, p: PackedWeight) -> tuple[dict[str, torch.Tensor], tuple | None, bool]:
    """(tensors, quantization scheme key or None, sparse?) for one packed layer."""
    if isinstance(p, BitmaskWeight):
        out = {k: v for k, v in p.tensors(prefix).items() if k.rsplit(".", 1)[1] in _BITMASK_FIELDS}
        if p.value_type == "int8":
            out[f"{prefix}.weight_scale"] = p.scales.reshape(p.rows, 1).clone()
            out[f"{prefix}.weight_zero_point"] = torch.zeros(p.rows, 1, dtype=torch.int8)
            return out, (INT_QUANTIZED, 8, None), True
        if p.value_type == "int4":
            raise FormatError(
                f"layer {prefix!r}: compressed-tensors has no sparse-bitmask layout for int4 values; "
                "write it as dense int4 (pack-quantized) or bitmask int8"
            )
        return out, None, True
    if isinstance(p, DenseWeight):
        if p.value_type in ("int8", "int4"):
            bits = 8 if p.value_type == "int8" else 4
            scales = p.scales.reshape(p.rows, -1) if p.rows else p.scales.reshape(0, 1)
            out = {
                f"{prefix}.weight_packed": _pack_int32(p.levels(), bits),
                f"{prefix}.weight_scale": scales.clone(),
                f"{prefix}.weight_shape": torch.tensor(p.shape, dtype=torch.int64),
            }
            return out, (PACK_QUANTIZED, bits, p.group_size if bits == 4 else None), False
        return {f"{prefix}.weight": p.unpack().to(p.weight.dtype)}, None, False
    raise FormatError(
        f"layer {prefix!r} is in the {p.format_name!r} format; compressed-tensors folders hold bitmask or dense"
    )


def write_folder(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    packed: Mapping[str, PackedWeight],
    config: Mapping,
) -> None:
    """Write a compressed-tensors model folder: ``config.json`` and ``model.safetensors``.

    ``state_dict`` is the model's full dense state dict; each entry of ``packed`` (keyed by
    parameter name, e.g. ``model.layers.0.mlp.up_proj.weight``) replaces that parameter with its
    compressed tensors. ``config`` is the model config as a dict (``model.config.to_dict()``);
    its ``quantization_config`` is replaced. Tensors sharing storage with an earlier one (tied
    embeddings) are written once, as ``save_pretrained`` does. Both files are written to temporary
    names and renamed into place, and every check runs before anything is written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FormatError(f"{folder} exists and is not a folder")
    if folder.is_dir():
        stale = sorted(p.name for p in folder.glob("*.safetensors*") if p.name != WEIGHTS_NAME)
        if stale:
            raise FormatError(
                f"{folder} already holds other weight files ({', '.join(stale)}); write to an empty folder"
            )
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        if name in packed:
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            continue  # tied to an earlier tensor
        if ptr is not None:
            seen.add(ptr)
        tensors[name] = t.detach().to("cpu").contiguous()
    schemes: dict[tuple, list[str]] = {}
    sparse_targets: list[str] = []
    kept = total = 0
    for name, p in packed.items():
        if name not in state_dict:
            raise FormatError(f"packed weight {name!r} is not a parameter of the state dict")
        if tuple(state_dict[name].shape) != p.shape:
            raise FormatError(
                f"packed weight {name!r} has shape {p.shape}, the parameter {tuple(state_dict[name].shape)}"
            )
        prefix = _prefix(name)
        layer, scheme, sparse = _layer_tensors(prefix, p)
        tensors.update({k: v.contiguous() for k, v in layer.items()})
        if scheme is not None:
            schemes.setdefault(scheme, []).append(prefix)
        if sparse:
            sparse_targets.append(prefix)
            kept += p.nnz  # type: ignore[attr-defined]
            total += p.rows * p.cols
    qconfig: dict = {"quant_method": QUANT_METHOD}
    if sparse_targets:
        qconfig["sparsity_config"] = {
            "format": SPARSE_BITMASK,
            "targets": sparse_targets,
            "ignore": [],
            "global_sparsity": 1.0 - kept / total if total else 0.0,
            "sparsity_structure": "unstructured",
        }
    if schemes:
        groups = {}
        for i, ((fmt, bits, group_size), targets) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
            groups[f"group_{i}"] = {
                "targets": targets,
                "weights": _weight_args(bits, group_size),
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        formats = {fmt for fmt, _, _ in schemes}
        qconfig.update(
            config_groups=groups,
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed",
            ignore=[],
            kv_cache_scheme=None,
        )
    elif sparse_targets:
        qconfig["format"] = "dense"
    config_out = dict(config)
    config_out.pop("quantization_config", None)
    if sparse_targets or schemes:
        config_out["quantization_config"] = qconfig
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(config_out, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda path: Path(path).write_text(text))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- reading ----------------------------------------------------------------------------------------


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise FormatError(f"{index} is not a safetensors index with a weight_map: {e}") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise FormatError(f"{folder} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise FormatError(f"{path} is listed in the index but missing")
        try:
            part = load_file(path)
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{path} is not a readable safetensors file: {e}") from None
        tensors.update(part)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise FormatError(f"missing tensor {missing[0]!r} (listed in {index.name})")
    return tensors


def _scheme_for(prefix: str, qconfig: Mapping) -> dict | None:
    """The ``weights`` quantization args of the first config group whose targets match ``prefix``."""
    for group in (qconfig.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            if target.startswith("re:"):
                hit = re.match(target[3:], prefix) is not None
            else:
                # A class name (e.g. "Linear") matches every layer: the folder alone has no classes.
                hit = target == prefix or target[:1].isupper()
            if hit:
                return group.get("weights")
    return None


def _check_args(prefix: str, args: Mapping | None, bits: int | None = None) -> tuple[int, int | None]:
    if args is None:
        raise FormatError(f"layer {prefix!r} has quantized tensors but no config_groups entry targets it")
    num_bits = args.get("num_bits")
    if args.get("type", "int") != "int" or num_bits not in (4, 8):
        raise FormatError(f"layer {prefix!r}: only 4- and 8-bit integer weights are supported, got {dict(args)}")
    if not args.get("symmetric", True):
        raise FormatError(f"layer {prefix!r}: asymmetric quantization is not supported (sparsec scales are symmetric)")
    if args.get("actorder") not in (None, False):
        raise FormatError(f"layer {prefix!r}: activation-ordered groups (actorder) are not supported")
    strategy = args.get("strategy")
    if strategy not in ("channel", "group"):
        raise FormatError(f"layer {prefix!r}: weight strategy {strategy!r} is not supported; use channel or group")
    if bits is not None and num_bits != bits:
        raise FormatError(f"layer {prefix!r} stores {bits}-bit values but its scheme says num_bits={num_bits}")
    group_size = args.get("group_size") if strategy == "group" else None
    if strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise FormatError(f"layer {prefix!r}: group strategy needs a positive group_size, got {group_size!r}")
    return num_bits, group_size


def _scale_tensor(tensors: Mapping, prefix: str, rows: int, width: int) -> torch.Tensor:
    name = f"{prefix}.weight_scale"
    if name not in tensors:
        raise FormatError(f"missing tensor {name!r}")
    s = tensors[name]
    if not s.is_floating_point() or tuple(s.shape) != (rows, width):
        raise FormatError(
            f"tensor {name!r} has shape {tuple(s.shape)} and dtype {s.dtype}, expected float {(rows, width)}"
        )
    zp = tensors.get(f"{prefix}.weight_zero_point")
    if zp is not None and zp.numel() and bool((zp != 0).any()):
        raise FormatError(f"tensor '{prefix}.weight_zero_point' is nonzero: asymmetric quantization is not supported")
    return s.to(torch.float32)


def _read_bitmask(prefix: str, tensors: Mapping, qconfig: Mapping) -> BitmaskWeight:
    fields = {f"{prefix}.{k}": tensors[f"{prefix}.{k}"] for k in _BITMASK_FIELDS if f"{prefix}.{k}" in tensors}
    compressed = fields.get(f"{prefix}.compressed")
    if compressed is not None and compressed.dtype == torch.int8:
        _check_args(prefix, _scheme_for(prefix, qconfig), bits=8)
        shape = fields.get(f"{prefix}.shape")
        if shape is None or shape.numel() != 2:
            raise FormatError(f"missing tensor '{prefix}.shape' (or it does not hold two dimensions)")
        rows = int(shape[0])
        fields[f"{prefix}.scales"] = _scale_tensor(tensors, prefix, rows, 1).reshape(rows)
    elif f"{prefix}.weight_scale" in tensors:
        raise FormatError(f"tensor '{prefix}.weight_scale' is present but '{prefix}.compressed' is not int8")
    return BitmaskWeight.from_tensors(prefix, fields)


def _read_packed(prefix: str, tensors: Mapping, qconfig: Mapping) -> DenseWeight:
    bits, group_size = _check_args(prefix, _scheme_for(prefix, qconfig))
    name = f"{prefix}.weight_shape"
    if name not in tensors:
        raise FormatError(f"missing tensor {name!r}")
    shape_t = tensors[name]
    if shape_t.numel() != 2 or shape_t.is_floating_point():
        raise FormatError(f"tensor {name!r} must hold the two integer dimensions, got {shape_t.tolist()}")
    rows, cols = (int(v) for v in shape_t.reshape(2).tolist())
    name = f"{prefix}.weight_packed"
    packed = tensors[name]
    words = math.ceil(cols * bits / 32)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, words):
        raise FormatError(
            f"tensor {name!r} has shape {tuple(packed.shape)} and dtype {packed.dtype}, "
            f"expected int32 {(rows, words)} for {bits}-bit values"
        )
    levels = _unpack_int32(packed, bits, cols)
    if bits == 8:
        if group_size is not None:
            raise FormatError(
                f"layer {prefix!r}: 8-bit weights with group scales are not supported; use channel scales"
            )
        scales = _scale_tensor(tensors, prefix, rows, 1).reshape(rows)
        return DenseWeight((rows, cols), "int8", levels.contiguous(), scales)
    # 4-bit: channel scales are one group spanning the row.
    gs = group_size if group_size is not None else max(cols, 1)
    scales = _scale_tensor(tensors, prefix, rows, math.ceil(cols / gs))
    return DenseWeight((rows, cols), "int4", pack_int4_rows(levels), scales.contiguous(), gs)


def read_folder(folder: str | os.PathLike) -> Checkpoint:
    """Read a compressed-tensors model folder (see module doc) without modifying it.

    Raises :class:`FormatError` naming the file, layer or tensor when the folder is not such a
    checkpoint, a tensor is missing or contradicts another, or a layout is not supported.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder")
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        raise FormatError(f"{config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise FormatError(f"{config_path} is not valid JSON: {e}") from None
    qconfig = config.get("quantization_config") or {}
    if qconfig and qconfig.get("quant_method") != QUANT_METHOD:
        raise FormatError(
            f"{config_path}: quantization_config.quant_method is {qconfig.get('quant_method')!r}, not {QUANT_METHOD!r}"
        )
    sparsity = qconfig.get("sparsity_config") or {}
    sparse_format = sparsity.get("format")
    if sparse_format not in (None, SPARSE_BITMASK, "dense"):
        raise FormatError(
            f"{config_path}: sparsity format {sparse_format!r} is not supported; sparsec reads {SPARSE_BITMASK}"
        )
    quant_format = qconfig.get("format")
    if quant_format not in (None, "dense", PACK_QUANTIZED, INT_QUANTIZED, "mixed-precision"):
        raise FormatError(f"{config_path}: quantization format {quant_format!r} is not supported")
    tensors = _load_tensors(folder)

    packed: dict[str, PackedWeight] = {}
    used: set[str] = set()
    bitmask_prefixes = sorted({k[: -len(".bitmask")] for k in tensors if k.endswith(".bitmask")})
    if bitmask_prefixes and sparse_format != SPARSE_BITMASK:
        raise FormatError(
            f"tensor '{bitmask_prefixes[0]}.bitmask' is present but config.json declares no "
            "sparse-bitmask sparsity_config"
        )
    for prefix in bitmask_prefixes:
        packed[f"{prefix}.weight"] = _read_bitmask(prefix, tensors, qconfig)
        used.update(f"{prefix}.{k}" for k in (*_BITMASK_FIELDS, "weight_scale", "weight_zero_point"))
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        prefix = key[: -len(".weight_packed")]
        packed[f"{prefix}.weight"] = _read_packed(prefix, tensors, qconfig)
        used.update(f"{prefix}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"))
    for key in sorted(k for k in tensors if k.endswith(".weight") and tensors[k].dtype == torch.int8):
        prefix = key[: -len(".weight")]
        _check_args(prefix, _scheme_for(prefix, qconfig), bits=8)
        w = tensors[key]
        if w.dim() != 2:
            raise FormatError(f"tensor {key!r} is an int8 weight of shape {tuple(w.shape)}; expected 2-D")
        scales = _scale_tensor(tensors, prefix, w.shape[0], 1).reshape(w.shape[0])
        packed[key] = DenseWeight(tuple(w.shape), "int8", w.contiguous(), scales)
        used.update({key, f"{prefix}.weight_scale", f"{prefix}.weight_zero_point"})
    for key in tensors:
        if key.endswith((".weight_scale", ".weight_zero_point", ".weight_g_idx")) and key not in used:
            raise FormatError(f"tensor {key!r} belongs to no compressed weight (its layer's weight is missing)")
        for suffix in (".compressed", ".row_offsets"):
            if key.endswith(suffix) and key not in used:
                raise FormatError(f"missing tensor '{key[: -len(suffix)]}.bitmask' (found {key!r})")

    state_dict = {k: v for k, v in tensors.items() if k not in used}
    for name, p in packed.items():
        state_dict[name] = p.unpack()
    return Checkpoint(state_dict=state_dict, packed=packed, config=config)
