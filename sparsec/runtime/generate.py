"""Text generation with a KV cache on top of the compiled kernels.

A compiled graph is captured with ``use_cache=False``: it recomputes the whole sequence on every
call, which is what compiling and checking need but not how one decodes. For generation the
kernels are hosted in the eager Hugging Face model instead: :func:`build_decoder` rebuilds the
model class that was compiled (from the class name and config recorded at compile time), swaps
every compiled linear layer for its :class:`~sparsec.runtime.compiled.KernelLinear` (the same
module object the graph calls, so the graph pipeline still decided formats and kernels), and
fills the remaining weights (embeddings, norms) from the graph's tensors. :func:`generate` then
runs its own short loop over that model with a ``DynamicCache``: one prefill call, then one call
per new token, computing only the last position's logits. The loop does as little Python per
token as it can (no logits processors, no mask rebuilt per step when no prompt is padded):
on a 135M model the cost of a token is mostly overhead, not bytes. For a single prompt on a
Llama-family model whose layers all run sparsec's CPU bitmask kernels, each decode step after
the prefill is one compiled call over every decoder layer (:mod:`sparsec.runtime.decode_step`),
with no Python per layer at all.

    result = sparsec.generate(compiled, tokenizer, "The capital of France is", max_new_tokens=20)
    print(result.text, f"{result.tokens_per_second:.1f} tokens/s")

Works with a :class:`CompiledModule`, an artifact directory, or a plain Hugging Face causal LM
(the eager baseline, through the same loop).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparsec.errors import first_line
from sparsec.runtime.artifact import TOKENIZER_DIR


class GenerationError(ValueError):
    """Generation cannot run with these inputs; the message says what to change."""


# --------------------------------------------------------------------------- the decoder


def model_description(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`build_decoder` needs to rebuild ``model``'s class: ``{"class", "config"}``
    (a JSON-able dict), or ``None`` for a model that is not a Hugging Face causal LM."""
    config = getattr(model, "config", None)
    cls = type(model)
    if config is None or not cls.__module__.startswith("transformers.") or not hasattr(model, "generate"):
        return None
    import json

    return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": json.loads(config.to_json_string())}


def _model_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    if not module.startswith("transformers."):
        raise GenerationError(f"the recorded model class {path!r} is not a transformers class; recompile the model")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise GenerationError(f"this transformers has no {path}; recompile the model with this environment")
    return obj


#: sibling layers that read the same input in the models sparsec decodes (Llama/Mistral/Qwen
#: attention and gated MLPs, BERT attention): one kernel can compute them together.
FUSE_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                            ("query", "key", "value"))


class _SharedInput:
    """Several kernels fused into one (their rows stacked) for layers that read the same input:
    the first part called with an input computes every part's output, the others slice it.
    Fewer, larger kernel calls: at decode the cost of a call is mostly fixed overhead."""

    def __init__(self, fused: nn.Module) -> None:
        self.fused = fused
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def output(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            self._y = self.fused(x)
            self._x = x
        return self._y


class FusedPart(nn.Module):
    """One layer of a fused group: rows ``start:stop`` of the group's output for its input."""

    def __init__(self, group: _SharedInput, start: int, stop: int, original: nn.Module) -> None:
        super().__init__()
        self.group = group
        self.start, self.stop = start, stop
        # the layer's name, not its unfused kernel: holding that would keep two copies of the weights
        self.layer = original.layer
        self.in_features, self.out_features = original.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x)[..., self.start:self.stop].contiguous()

    def extra_repr(self) -> str:
        return f"{self.layer}: rows {self.start}:{self.stop} of {self.group.fused.layer}"


def _fuse(parts: list[nn.Module]) -> nn.Module | None:
    """One kernel module computing ``parts`` (KernelLinear of one target, same input width, format,
    value type and options, no fused activation) with their rows stacked, or None."""
    from sparsec.formats import pack
    from sparsec.runtime.compiled import KernelLinear, kernel_builder

    first, target = parts[0].packed, parts[0].target
    same = all(isinstance(p, KernelLinear) and p.target == target and p.activation is None
               and p.packed.format_name == first.format_name and p.packed.value_type == first.value_type
               and p.packed.options() == first.options() and p.in_features == parts[0].in_features
               for p in parts)
    if not same or first.format_name not in ("bitmask", "dense"):
        return None
    options = dict(first.options())
    if first.value_type in ("int8", "int4"):
        # impose the layers' own scales: the stacked weight packs back to exactly their levels
        options["scales"] = torch.cat([p.packed.scales for p in parts])
    weight = torch.cat([p.packed.unpack() for p in parts])
    packed = pack(weight, first.format_name, value_type=first.value_type, **options)
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.cpu() if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
    kernel = kernel_builder(target)(packed, bias=bias, activation=None)
    name = "+".join(p.layer for p in parts)
    return KernelLinear(name, packed, kernel, bias, None, target)


def host_kernels(model: nn.Module, kernels: list[nn.Module], fuse: bool = True) -> list[tuple[nn.Module, str, Any]]:
    """Swap each kernel module into ``model`` in place of the layer of the same name (``k.layer``),
    checking shapes; with ``fuse``, sibling layers of :data:`FUSE_GROUPS` that read the same input
    run as one kernel. Returns ``(parent, attribute, previous module)`` for every swap, so a caller
    can put the original layers back."""
    swapped: list[tuple[nn.Module, str, Any]] = []
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for k in kernels:
        parent_name, _, attr = k.layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Module):
            raise GenerationError(f"{type(model).__name__} has no module {k.layer} for the compiled layer of that name")
        features = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if type(old).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is [in, out]
            features = (old.nf, old.weight.shape[0])
        if features != (k.out_features, k.in_features):
            raise GenerationError(f"{k.layer} is {features[0]}x{features[1]} in {type(model).__name__} but the "
                                  f"compiled kernel is {k.out_features}x{k.in_features}")
        setattr(parent, attr, k)
        swapped.append((parent, attr, old))
        by_parent.setdefault(parent_name, {})[attr] = k
    if not fuse:
        return swapped
    for parent_name, children in by_parent.items():
        parent = model.get_submodule(parent_name) if parent_name else model
        for group in FUSE_GROUPS:
            if not all(name in children for name in group):
                continue
            parts = [children[name] for name in group]
            fused = _fuse(parts)
            if fused is None:
                continue
            shared = _SharedInput(fused)
            start = 0
            for name, part in zip(group, parts):
                setattr(parent, name, FusedPart(shared, start, start + part.out_features, part))
                start += part.out_features
    return swapped


def build_decoder(compiled: nn.Module, fuse: bool = True) -> nn.Module:
    """The eager Hugging Face model of ``compiled`` with its kernels swapped in (built once and
    kept on ``compiled``); ``fuse``: sibling layers reading the same input (q/k/v, gate/up) run
    as one kernel (:func:`host_kernels`; the fused weights are a second copy of those layers'
    packed weights beside the compiled graph's). Raises :class:`GenerationError` when ``compiled`` does
    not come from a transformers causal LM, or a weight the decoder needs is not in the compiled
    graph."""
    cache = compiled.__dict__.setdefault("_sparsec_decoders", {})
    if fuse in cache:
        return cache[fuse]
    from transformers.initialization import no_init_weights

    from sparsec.ir.device import graph_device
    from sparsec.runtime.compiled import KernelLinear

    desc = getattr(compiled, "source_model", None)
    if not desc:
        raise GenerationError("this compiled model records no Hugging Face model to decode with; generation needs "
                              "a transformers causal LM compiled (and saved) by this sparsec")
    cls = _model_class(desc["class"])
    config = cls.config_class.from_dict(desc["config"])
    with no_init_weights():
        model = cls(config)
    model.eval()
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # construction under no_init_weights leaves tied weights untied
    # tied weights (embedding and lm_head) are one tensor the graph may read under either name
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    kernels: list[KernelLinear] = compiled.kernels()
    host_kernels(model, kernels, fuse=fuse)
    replaced = {k.layer for k in kernels}
    state = {}
    graph = compiled.graph_module
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            obj = graph
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                state[node.target] = obj.detach()
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in state:
            found = next((a for a in aliases.get(id(p), []) if a in state), None)
            if found is not None:
                state[name] = state[found]
    missing = [n for n in own if n not in state and not any(n.startswith(r + ".") for r in replaced)]
    if missing:
        raise GenerationError(f"the compiled graph does not hold {missing[0]} (and {len(missing) - 1} more weights) "
                              f"that {cls.__name__} needs; generation supports models whose every other weight "
                              f"the graph reads")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, t in state.items():
            target = own.get(name)
            if target is None:
                target = buffers.get(name)
            if target is not None and target.shape == t.shape:
                target.copy_(t)
    # a graph compiled for the GPU holds its other weights there too: run the decoder beside them
    model.to(graph_device(graph))
    cache[fuse] = model
    return model


# --------------------------------------------------------------------------- generation

#: how :func:`generate` may run its decode steps
STEPS = ("auto", "fused", "modules")


@dataclass
class GenerationResult:
    """What :func:`generate` produced and how fast.

    ``text``: the generated continuation (a list for a list of prompts); ``tokens``: the new
    token ids ``[batch, steps]`` (finished rows padded with the end token); ``prefill_seconds``
    (prompt, first token), ``decode_seconds`` (every later token, wall clock) and
    ``decode_cpu_seconds`` (the same span in CPU time of the whole process, every thread: on a
    machine shared with other work it counts this process's work only); ``tokens_per_second``:
    batch rows x decode steps / decode seconds, the decode throughput.
    """

    text: str | list[str]
    tokens: torch.Tensor
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    steps: int
    batch: int
    tokens_per_second: float
    finished: list[bool] = field(default_factory=list)
    decode_cpu_seconds: float = 0.0
    #: how the decode steps ran: "fused" (every decoder layer in one compiled call a token,
    #: :mod:`sparsec.runtime.decode_step`) or "modules" (the Hugging Face layers, kernel by kernel)
    step: str = "modules"
    #: why the steps did not run fused (empty when they did, or were asked to run by module)
    step_reason: str = ""


def _resolve_model(model: Any) -> tuple[nn.Module, Any]:
    """``(decoder, tokenizer found with it or None)`` for a compiled model, artifact path or HF model."""
    from sparsec.runtime.compiled import CompiledModule

    tokenizer = None
    if isinstance(model, (str, os.PathLike)):
        from sparsec.runtime.loader import load_artifact

        path = Path(model)
        compiled = load_artifact(path)
        if (path / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        model = compiled
    if isinstance(model, CompiledModule):
        return build_decoder(model), tokenizer
    if isinstance(model, nn.Module) and model_description(model) is not None:
        return model.eval(), tokenizer
    raise GenerationError(f"generate needs a CompiledModule, an artifact directory or a transformers causal LM, "
                          f"got {type(model).__name__}")


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _encode(tokenizer: Any, prompt: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(ids [B, T], attention mask or None when nothing is padded, batched?)``."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
        if ids.dtype != torch.long or ids.numel() == 0:
            raise GenerationError("prompt token ids must be a non-empty LongTensor [T] or [B, T]")
        return ids, None, prompt.dim() == 2
    batched = isinstance(prompt, (list, tuple))
    texts = list(prompt) if batched else [prompt]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise GenerationError("prompt must be a non-empty string, a list of them, or a LongTensor of token ids")
    if tokenizer is None:
        raise GenerationError("a text prompt needs a tokenizer; pass one (or token ids as the prompt)")
    pieces = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
    if any(len(p) == 0 for p in pieces):
        raise GenerationError("the tokenizer turned a prompt into no tokens; give a longer prompt")
    width = max(len(p) for p in pieces)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(pieces), width), pad, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.long)
    for i, p in enumerate(pieces):  # left padding: every row's last token sits in the last column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask), batched


def _picker(temperature: float, top_k: int | None, seed: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]

    return sample


def generate(model: Any, tokenizer: Any, prompt: str | list[str] | torch.Tensor, max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             stream: Callable[[Any], None] | None = None, stop_at_eos: bool = True,
             step: str = "auto") -> GenerationResult:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with a KV cache.

    ``model``: a :class:`~sparsec.runtime.compiled.CompiledModule`, an artifact directory, or a
    transformers causal LM (run eagerly through the same loop). ``tokenizer``: a Hugging Face
    tokenizer, or ``None`` for an artifact saved with one or a prompt of token ids.
    ``prompt``: text, a list of texts (left-padded into one batch), or token ids ``[T]``/``[B, T]``.
    ``temperature`` 0 is greedy; above 0 samples, from the ``top_k`` most likely tokens if given,
    reproducibly for a given ``seed``. ``stream(piece)`` receives each new piece of text as it is
    decoded (a list of pieces for a batch). ``stop_at_eos``: stop a row at the model's end token.
    ``step``: ``"fused"`` runs each decode step of a single prompt as one compiled call over all
    decoder layers (:mod:`sparsec.runtime.decode_step`; an error if the model cannot),
    ``"modules"`` through the Hugging Face layers kernel by kernel, ``"auto"`` fused where the
    model allows (the result's ``step`` and ``step_reason`` say which ran and why). The prompt
    is always prefilled through the modules. Nothing of ``model`` or ``prompt`` is modified.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise GenerationError(f"temperature must be 0 (greedy) or positive, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if step not in STEPS:
        raise GenerationError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    decoder, found = _resolve_model(model)
    tokenizer = tokenizer if tokenizer is not None else found
    if stream is not None and tokenizer is None:
        raise GenerationError("stream needs a tokenizer to turn tokens into text")
    ids, mask, batched = _encode(tokenizer, prompt)
    vocab = decoder.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise GenerationError(f"prompt token ids must lie in [0, {vocab}) for this model")
    fused, step_reason = None, ""
    if step != "modules":
        from sparsec.runtime.decode_step import fused_step_for

        found_step = fused_step_for(decoder) if ids.shape[0] == 1 and mask is None else "a batch of prompts"
        if isinstance(found_step, str):
            step_reason = f"the decode step runs by module: {found_step}"
            if step == "fused":
                raise GenerationError(f"step='fused' is not possible here ({step_reason.split(': ', 1)[1]}); "
                                      f"use step='auto' or 'modules'")
        else:
            fused = found_step
    eos = _eos_ids(decoder, tokenizer) if stop_at_eos else []
    pick = _picker(float(temperature), top_k, seed)
    B = ids.shape[0]
    out = torch.empty(B, max_new_tokens, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
    fill = eos[0] if eos else 0
    texts = [""] * B

    def emit(step: int) -> None:
        if stream is None:
            return
        pieces = []
        for b in range(B):
            text = tokenizer.decode(out[b, : step + 1], skip_special_tokens=True)
            pieces.append(text[len(texts[b]):])
            texts[b] = text
        stream(pieces if batched else pieces[0])

    from transformers import DynamicCache

    from sparsec.ir.device import graph_device

    # The model runs where its weights are; tokens are picked and kept on the CPU (one small copy
    # a step), so sampling and the output do not depend on the device.
    device = graph_device(decoder)
    # transformers 5.2x names the cache argument ``cache``; earlier releases ``past_key_values``
    cache_key = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    with torch.inference_mode():
        cache = DynamicCache(config=decoder.config)
        pos = None if mask is None else (mask.cumsum(-1) - 1).clamp_(min=0)
        t0 = time.perf_counter()
        logits = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_key: cache},
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        tok = pick(logits.float().cpu())
        out[:, 0] = tok
        t1, c1 = time.perf_counter(), time.process_time()
        emit(0)
        steps = 1
        one = None if mask is None else torch.ones(B, 1, dtype=mask.dtype, device=device)
        prompt_length = int(ids.shape[1])
        if fused is not None:
            fused.load_cache(cache, prompt_length)
        for step in range(1, max_new_tokens):
            if eos_t is not None:
                finished |= torch.isin(tok, eos_t)
                if bool(finished.all()):
                    break
            if mask is not None:
                mask = torch.cat([mask, one], -1)
                pos = pos[:, -1:] + 1
            if fused is not None:
                logits = fused(int(tok[0]), prompt_length + step - 1)
            else:
                logits = decoder(input_ids=tok[:, None].to(device), attention_mask=mask, position_ids=pos,
                                 **{cache_key: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
            tok = pick(logits.float().cpu())
            if eos_t is not None:
                tok = torch.where(finished, torch.full_like(tok, fill), tok)
            out[:, step] = tok
            steps += 1
            emit(step)
        t2, c2 = time.perf_counter(), time.process_time()
    if eos_t is not None:
        finished |= torch.isin(out[:, steps - 1], eos_t)
    tokens = out[:, :steps]
    if tokenizer is not None:
        text: str | list[str] = [tokenizer.decode(tokens[b], skip_special_tokens=True) for b in range(B)]
    else:
        text = [""] * B
    decode_seconds = t2 - t1
    return GenerationResult(
        text=text if batched else text[0], tokens=tokens, prompt_tokens=int(ids.shape[1]),
        prefill_seconds=t1 - t0, decode_seconds=decode_seconds, steps=steps, batch=B,
        tokens_per_second=B * (steps - 1) / decode_seconds if steps > 1 and decode_seconds > 0 else 0.0,
        finished=[bool(f) for f in finished], decode_cpu_seconds=c2 - c1,
        step="fused" if fused is not None else "modules", step_reason=step_reason)


# --------------------------------------------------------------------------- command line


def add_generate_command(subparsers: Any) -> None:
    """Register ``sparsec generate ARTIFACT --prompt TEXT`` on the ``sparsec`` command's subparsers."""
    p = subparsers.add_parser("generate", help="generate text from a saved artifact with a KV cache")
    p.add_argument("artifact", help="artifact directory written by `sparsec compile ... -o DIR`")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text (repeat for a batch of prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="bundled model name or Hugging Face folder whose tokenizer to use "
                        "(default: the one saved in the artifact)")
    p.add_argument("--step", choices=STEPS, default="auto",
                   help="decode steps as one compiled call over all layers (fused), through the model's "
                        "modules, or fused where the model allows (auto, the default)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from sparsec.runtime.artifact import is_artifact

    if not is_artifact(args.artifact):
        raise GenerationError(f"{args.artifact} is not a sparsec artifact (no manifest.json); write one with "
                              f"`sparsec compile MODEL -o DIR`")
    tokenizer = None
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer)
    elif not (Path(args.artifact) / TOKENIZER_DIR).is_dir():
        raise GenerationError(f"{args.artifact} holds no tokenizer; pass --tokenizer MODEL")
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    single = isinstance(prompts, str)
    if single:
        print(prompts, end="", flush=True)
    result = generate(args.artifact, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, step=args.step,
                      stream=(lambda piece: print(piece, end="", flush=True)) if single else None)
    if single:
        print()
    else:
        for prompt, text in zip(prompts, result.text):
            print(f"{prompt}{text}")
    print(f"{result.batch} x {result.steps} tokens; prefill {result.prompt_tokens} tokens in "
          f"{result.prefill_seconds * 1e3:.0f} ms, decode {result.tokens_per_second:.1f} tokens/s "
          f"({result.step} step)", file=sys.stderr)
    return 0


def _load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    from sparsec.models import BUNDLED, cache_dir

    if spec in BUNDLED:
        from sparsec.models import load

        folder = cache_dir() / spec
        if not (folder / "config.json").exists():
            load(spec)
        return AutoTokenizer.from_pretrained(folder)
    if Path(spec).is_dir():
        try:
            return AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001 - one line for any folder transformers cannot read
            first = first_line(e).rstrip(": ")
            raise GenerationError(f"--tokenizer {spec}: no tokenizer could be loaded from this folder ({first}); "
                                  f"give a Hugging Face folder with tokenizer files, or a bundled model name") \
                from None
    raise GenerationError(f"--tokenizer {spec}: not a bundled model ({', '.join(BUNDLED)}) nor a folder")


__all__ = ["GenerationError", "GenerationResult", "add_generate_command", "build_decoder", "generate",
           "model_description"]
