"""The recovery recipe: one-shot pruning, block-wise recovery, global distillation, quantize, compile.

One call takes a dense causal language model to a sparse (and quantized) compiled artifact, each
stage starting from the one before::

    from sparsec.recipe import RecipeConfig, recover
    result = recover("smollm2-135m", RecipeConfig(sparsity=0.7, values="int8"), "out/smollm2-70")
    print(result.table())          # held-out perplexity, wall and CPU seconds after every stage

1. **one-shot**: ``prune-sparsegpt`` (unstructured with OWL's layer-wise sparsity, or N:M) on
   ``calibration`` windows of the train split;
2. **block-wise**: every block trained alone to reproduce the dense block's output
   (``sparsec.finetune.blockwise``) on the same windows;
3. **global**: the whole student distilled from the dense model (``sparsec.finetune``:
   ``ce * CE + kl * KL + squarehead * SquareHead``) on train windows, a share of them
   (``generated``) sampled from the dense model itself, so the student learns the teacher's
   distribution beyond Wikipedia;
4. **quantize and compile**: ``mask-zeros,quantize{...},lower-cpu`` (``values``: fp32, int8 or
   int4), saved as a sparsec artifact.

Each stage is measured on held-out text of two kinds: the held-out Wikipedia articles and a
news corpus (``sparsec.data.other_windows``), so a recipe that only fits its training text shows.

The output directory receives ``model/`` (the recovered weights as a Hugging Face folder, with
``masks.safetensors``), ``artifact/`` (``sparsec.load`` reads it) and ``recipe.json`` (settings
and every stage's figures). While the recipe runs, its state lives in ``OUTPUT/.work``: a run
that stops (killed, interrupted) is continued by the same call, finished stages are not redone,
and block-wise and global training continue from their last checkpoint. Another recipe's state in
that directory, or a finished result, is refused; every setting is checked before anything loads.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: value types the compiled model can store its weights in
VALUE_TYPES = ("fp32", "int8", "int4")
_QUANTIZE = {"fp32": "", "int8": "quantize{bits=8,ignore=*embed*},",
             "int4": "quantize{bits=4,group=128,ignore=*embed*},"}
_STATE = "state.json"


class RecipeError(ValueError):
    """Settings or an output directory the recipe cannot use; the message says what to change."""


@dataclass
class RecipeConfig:
    """Every setting of the recipe (see the module docstring); ``validate()`` checks them all."""

    sparsity: float = 0.5
    #: ``""`` for unstructured sparsity, or ``"N:M"`` (e.g. ``"2:4"``, which fixes the sparsity)
    pattern: str = ""
    values: str = "int8"
    #: OWL's lambda for unstructured one-shot pruning (0: uniform sparsity)
    owl_lambda: float = 0.08
    #: calibration and block-wise windows from the train split
    calibration: int = 64
    seq_len: int = 256
    blockwise_epochs: int = 4
    blockwise_lr: float = 1e-3
    blockwise_inputs: str = "student"
    blockwise_normalize: str = "token"
    blockwise_sinks: str = "none"
    #: global distillation: optimizer steps of ``global_batch`` windows of ``seq_len`` tokens (0: skip)
    global_steps: int = 80
    global_batch: int = 4
    global_lr: float = 3e-4
    ce: float = 1.0
    kl: float = 1.0
    squarehead: float = 0.0
    squarehead_normalize: str = "token"
    squarehead_sinks: str = "none"
    #: share of the global stage's windows sampled from the dense model instead of read from the train split
    generated: float = 0.0
    eval_windows: int = 16
    eval_len: int = 256
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        from sparsec.finetune.blockwise import BlockwiseError
        from sparsec.finetune.trainer import FinetuneError
        from sparsec.passes import PassOptionError, make_pass

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise RecipeError(message)

        need(self.values in VALUE_TYPES, f"values must be one of {', '.join(VALUE_TYPES)}, got {self.values!r}")
        for name in ("calibration", "seq_len", "global_batch", "eval_windows", "eval_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= (2 if name.endswith("len") else 1),
                 f"{name} must be a positive integer{' of at least 2' if name.endswith('len') else ''}, got {value}")
        need(isinstance(self.blockwise_epochs, int) and self.blockwise_epochs >= 0,
             f"blockwise_epochs must be an integer >= 0 (0 skips the stage), got {self.blockwise_epochs}")
        need(isinstance(self.global_steps, int) and self.global_steps >= 0,
             f"global_steps must be an integer >= 0 (0 skips the stage), got {self.global_steps}")
        need(0 <= self.generated <= 1, f"generated must be a share in [0, 1], got {self.generated}")
        need(self.generated == 0 or self.global_steps > 0, "generated data feeds the global stage; give global_steps")
        try:
            make_pass("prune-sparsegpt", **self.prune_options())
        except PassOptionError as e:
            raise RecipeError(str(e)) from None
        try:
            if self.blockwise_epochs:
                self.blockwise_config(None).validate()
            if self.global_steps:
                self.global_config(None).validate()
        except (BlockwiseError, FinetuneError, ValueError) as e:
            raise RecipeError(str(e)) from None

    def prune_options(self) -> dict[str, Any]:
        if self.pattern:
            n, sep, m = self.pattern.partition(":")
            if not (sep and n.isdigit() and m.isdigit()):
                raise RecipeError(f"pattern must be N:M (e.g. 2:4) or empty for unstructured, got {self.pattern!r}")
            return {"n": int(n), "m": int(m)}
        options: dict[str, Any] = {"sparsity": self.sparsity}
        if self.owl_lambda:
            options["owl_lambda"] = self.owl_lambda
        return options

    def prune_text(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.prune_options().items())
        return f"prune-sparsegpt{{{options}}}"

    def blockwise_config(self, checkpoint_dir: str | None):
        from sparsec.finetune.blockwise import BlockwiseConfig

        return BlockwiseConfig(epochs=self.blockwise_epochs, lr=self.blockwise_lr, inputs=self.blockwise_inputs,
                               normalize=self.blockwise_normalize, sinks=self.blockwise_sinks, seed=self.seed,
                               checkpoint_dir=checkpoint_dir, progress=self.progress)

    def global_config(self, checkpoint_dir: str | None):
        from sparsec.finetune.trainer import FinetuneConfig

        return FinetuneConfig(steps=self.global_steps, micro_batch_size=self.global_batch, lr=self.global_lr,
                              warmup_steps=max(1, self.global_steps // 10) if self.global_steps > 1 else 0,
                              ce=self.ce, kl=self.kl, squarehead=self.squarehead,
                              squarehead_normalize=self.squarehead_normalize,
                              squarehead_sinks=self.squarehead_sinks, seed=self.seed, device="cpu",
                              strategy="none", checkpoint_dir=checkpoint_dir,
                              checkpoint_every=16 if checkpoint_dir else 0, progress=self.progress)

    def pipeline(self) -> str:
        """The compile pipeline of the last stage."""
        return f"mask-zeros,{_QUANTIZE[self.values]}lower-cpu"

    def fingerprint(self, model: str) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}
        return hashlib.sha256(json.dumps([model, keep], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    """One stage: held-out perplexities (Wikipedia, news) after it, and what it cost."""

    stage: str
    wiki_ppl: float
    news_ppl: float
    wall_s: float
    cpu_s: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeResult:
    output: str
    stages: list[StageResult] = field(default_factory=list)
    sparsity: float = 0.0

    def table(self) -> str:
        lines = ["| stage | held-out wiki ppl | news ppl | wall s | CPU s |", "|---|---:|---:|---:|---:|"]
        for s in self.stages:
            lines.append(f"| {s.stage} | {s.wiki_ppl:.2f} | {s.news_ppl:.2f} | {s.wall_s:.0f} | {s.cpu_s:.0f} |")
        return "\n".join(lines)


class _Work:
    """The recipe's state directory: which stages are done, and what they measured."""

    def __init__(self, output: Path, fingerprint: str) -> None:
        self.output, self.dir = output, output / ".work"
        self.fingerprint = fingerprint
        if (output / "recipe.json").exists():
            raise RecipeError(f"{output} holds a finished recipe; choose a new output directory")
        if output.exists() and not (self.dir / _STATE).exists():
            raise RecipeError(f"output {output} already exists and holds no unfinished recipe; choose a new directory "
                              f"(nothing is overwritten)")
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "stages": {}}
        if (self.dir / _STATE).exists():
            try:
                self.state = json.loads((self.dir / _STATE).read_text())
            except (OSError, ValueError) as e:
                raise RecipeError(f"cannot read {self.dir / _STATE} ({e}); remove {output} to start over") from None
            if self.state.get("fingerprint") != fingerprint:
                raise RecipeError(f"{output} holds an unfinished recipe with other settings or another model; rerun "
                                  f"it with those, or remove {output} to start over")

    def done(self, stage: str) -> StageResult | None:
        record = self.state["stages"].get(stage)
        return StageResult(**record) if record else None

    def finish(self, result: StageResult, weights: dict[str, torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            path = self.dir / f"{result.stage}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp))
            os.replace(tmp, path)
        self.state["stages"][result.stage] = dataclasses.asdict(result)
        self.state["last_weights"] = result.stage if weights is not None else self.state.get("last_weights")
        tmp = self.dir / f".{_STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.dir / _STATE)

    def last_weights(self) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        stage = self.state.get("last_weights")
        return load_file(str(self.dir / f"{stage}.safetensors")) if stage else None


@dataclass
class _Timer:
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def recover(model: str, config: RecipeConfig | None = None, output: str | os.PathLike | None = None,
            log: Callable[[str], None] = print) -> RecipeResult:
    """Run the recipe on ``model`` (a model spec, see ``sparsec.models.load_spec``) into ``output``.

    See the module docstring. ``output`` None runs every stage and writes nothing.
    """
    from sparsec.capture import capture
    from sparsec.data import heldout_windows, other_windows, token_windows
    from sparsec.models import load_spec
    from sparsec.passes import PassContext, Pipeline, run_passes
    from sparsec.passes.masks import apply_masks, mask_buffer_name, select_layers

    config = config or RecipeConfig()
    config.validate()
    out = Path(output) if output is not None else None
    work = _Work(out, config.fingerprint(model)) if out is not None else None
    if out is not None:
        from sparsec.runtime.artifact import unwritable_reason

        why = unwritable_reason(out, probe=True) if not out.exists() else None
        if why is not None:
            raise RecipeError(f"cannot write output {out}: {why}; choose a writable location")
    loaded = load_spec(model)
    tok = loaded.tokenizer
    if tok is None:
        raise RecipeError(f"{model} has no tokenizer; the recipe needs a causal language model with one")
    torch.manual_seed(config.seed)
    calib = token_windows(tok, "train", seq_len=config.seq_len, count=config.calibration, seed=config.seed + 1)
    evals = heldout_windows(tok, seq_len=config.eval_len, windows=config.eval_windows)
    news = other_windows(tok, seq_len=config.eval_len, windows=config.eval_windows)
    dense = loaded.model.eval()
    student_model = copy.deepcopy(dense)
    example = {"input_ids": calib[:2].clone()}
    scap = capture(student_model, example)
    result = RecipeResult(str(out) if out else "")

    def measure(name: str, timer: _Timer, detail: dict | None = None, evaluate: Any = None) -> StageResult:
        from sparsec.data import perplexity

        wall, cpu = timer.seconds()  # the stage's own cost; evaluation is not part of it
        subject = evaluate if evaluate is not None else student_model
        wiki, other = perplexity(subject, evals), perplexity(subject, news)
        stage = StageResult(name, wiki, other, wall, cpu, detail or {})
        log(f"sparsec recover: {name}: held-out perplexity {wiki:.2f} (news {other:.2f}); {wall:.0f} s wall, "
            f"{cpu:.0f} s CPU")
        return stage

    def trained_weights() -> dict[str, torch.Tensor]:
        weights: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in student_model.state_dict().items():  # a tied weight once (safetensors refuses aliases)
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                weights[k] = v
        masks = {f"{name}.__mask__": buf for name, buf in scap.graph_module.named_buffers() if name.endswith("_mask")}
        return {**weights, **masks}

    # 0. the dense model, for the table's first row
    done = work.done("dense") if work else None
    if done is None:
        done = measure("dense", _Timer())
        if work:
            work.finish(done, None)
    result.stages.append(done)

    # 1. one-shot pruning, then 2. block-wise and 3. global recovery, each resumable
    stages = ["one-shot"] + (["block-wise"] if config.blockwise_epochs else []) + (
        ["global"] if config.global_steps else [])
    first_todo = next((s for s in stages if not (work and work.done(s))), None)
    saved = work.last_weights() if work and first_todo != "one-shot" else None
    if saved is not None:
        masks = {k[: -len(".__mask__")]: v for k, v in saved.items() if k.endswith(".__mask__")}
        student_model.load_state_dict({k: v for k, v in saved.items() if not k.endswith(".__mask__")},
                                      strict=False)
        by_buffer = {mask_buffer_name(layer): layer for layer in select_layers(scap.graph_module)}
        apply_masks(scap.graph_module, [(by_buffer[name], by_buffer[name].as_matrix(mask) != 0)
                                        for name, mask in masks.items()])
        del saved, masks
    tcap = None
    for stage in stages:
        done = work.done(stage) if work else None
        if done is not None:
            result.stages.append(done)
            continue
        timer = _Timer()
        if stage == "one-shot":
            samples = [((), {"input_ids": w[None].clone(), **scap.constant_kwargs}) for w in calib]
            ctx = PassContext(calibration=samples, progress=config.progress)
            run_passes(scap.graph_module, Pipeline.parse(config.prune_text()).passes, ctx)
            from sparsec.passes.prune_report import sparsity_report

            # per layer: OWL's target, the achieved sparsity and the block's outlier ratio
            detail = {"pipeline": config.prune_text(), "layers": sparsity_report(scap.graph_module)}
        elif stage == "block-wise":
            from sparsec.finetune.blockwise import recover_blocks

            tcap = tcap or capture(dense, example)
            ckpt = str(work.dir / "block-wise") if work else None
            report = recover_blocks(scap, tcap, calib, config.blockwise_config(ckpt))
            detail = report.to_dict()
        else:
            from sparsec.finetune import DistillModel, finetune

            tcap = tcap or capture(dense, example)
            data = _global_data(dense, tok, config, log)
            ckpt = str(work.dir / "global") if work else None
            history = finetune(DistillModel(scap.graph_module, scap.constant_kwargs),
                               DistillModel(tcap.graph_module, tcap.constant_kwargs), data,
                               config.global_config(ckpt))
            k = max(1, min(8, len(history) // 4))
            detail = {"first_loss": sum(r["loss"] for r in history[:k]) / k,
                      "last_loss": sum(r["loss"] for r in history[-k:]) / k, "windows": int(data.shape[0]),
                      "generated_windows": int(round(config.generated * data.shape[0]))}
        done = measure(stage, timer, detail)
        if work:
            work.finish(done, trained_weights())
        result.stages.append(done)
    result.sparsity = _sparsity(scap.graph_module)

    # 4. quantize and compile (fast: never checkpointed)
    import sparsec

    timer = _Timer()
    compiled = sparsec.compile(student_model, {"input_ids": evals[:1, :16].clone()}, pipeline=config.pipeline(),
                               progress=config.progress)
    result.stages.append(measure(f"compiled {config.values}", timer,
                                 {"pipeline": config.pipeline(), "bytes": compiled.report.nbytes,
                                  "max_rel_error": compiled.report.max_rel_error}, evaluate=compiled))
    if out is not None:
        _write(out, work, loaded, student_model, scap.graph_module, compiled, config, model, result)
        log(f"sparsec recover: wrote {out} (model/, artifact/, recipe.json)")
    return result


def _sparsity(gm) -> float:
    from sparsec.passes.prune_report import sparsity_report

    rows = [r for r in sparsity_report(gm).values() if r["criterion"] != "dense"]
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return sum(r["achieved"] * r["shape"][0] * r["shape"][1] for r in rows) / max(1, total)


def _global_data(dense: torch.nn.Module, tok: Any, config: RecipeConfig, log: Callable[[str], None]) -> torch.Tensor:
    """``global_steps * global_batch`` windows: train text, with ``generated`` of them sampled from the dense model."""
    from sparsec.data import token_windows

    count = config.global_steps * config.global_batch
    text = token_windows(tok, "train", seq_len=config.seq_len)
    generated = int(round(config.generated * count))
    if generated == 0:
        return text[:count] if text.shape[0] >= count else text
    t0 = time.perf_counter()
    samples = sample_from(dense, text[-generated:, :8], config.seq_len, config.seed)
    log(f"sparsec recover: sampled {generated} windows of {config.seq_len} tokens from the dense model in "
        f"{time.perf_counter() - t0:.0f} s")
    mixed = torch.cat([text[: count - generated], samples])
    return mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(config.seed))]


@torch.no_grad()
def sample_from(model: torch.nn.Module, prompts: torch.Tensor, seq_len: int, seed: int = 0,
                batch: int = 16) -> torch.Tensor:
    """``[len(prompts), seq_len]`` token ids: each prompt continued by ancestral sampling (temperature 1,
    no truncation) from ``model`` with its KV cache; the dense model's own distribution."""
    torch.manual_seed(seed)
    out = []
    for i in range(0, prompts.shape[0], batch):
        p = prompts[i: i + batch]
        ids = model.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=seq_len - p.shape[1],
                             min_new_tokens=seq_len - p.shape[1], pad_token_id=0)
        out.append(ids[:, :seq_len])
    return torch.cat(out)


def _write(out: Path, work: _Work, loaded: Any, student_model: torch.nn.Module, gm: Any, compiled: Any,
           config: RecipeConfig, model: str, result: RecipeResult) -> None:
    from safetensors.torch import save_file

    import sparsec
    from sparsec.finetune.trainer import mask_pairs

    out.mkdir(parents=True, exist_ok=True)
    final = out / ".work" / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    if hasattr(student_model, "save_pretrained"):
        student_model.save_pretrained(final / "model")
        loaded.tokenizer.save_pretrained(final / "model")
    masks = {w: (gm.get_buffer(m) != 0).to(torch.uint8).contiguous() for w, m in mask_pairs(gm)}
    save_file(masks, str(final / "model" / "masks.safetensors"))
    sparsec.save(compiled, str(final / "artifact"), tokenizer=loaded.tokenizer)
    record = {"model": model, "config": dataclasses.asdict(config), "sparsity": result.sparsity,
              "stages": [dataclasses.asdict(s) for s in result.stages],
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    for name in ("model", "artifact"):
        os.replace(final / name, out / name)
    tmp = out / ".recipe.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))  # tuples and paths as text
    os.replace(tmp, out / "recipe.json")
    shutil.rmtree(out / ".work", ignore_errors=True)
