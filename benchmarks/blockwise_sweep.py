"""One-shot pruning, then block-wise recovery alone, on the bundled SmolLM2-135M: one setting a run.

    python benchmarks/blockwise_sweep.py --epochs 2 --normalize token --lr 1e-3          # 50%, student inputs
    python benchmarks/blockwise_sweep.py --epochs 2 --normalize token --inputs teacher
    python benchmarks/blockwise_sweep.py --epochs 0 --prune "prune-sparsegpt{sparsity=0.7,owl_lambda=0.08}"

Prunes a copy of the model with ``--prune`` (default ``prune-sparsegpt{sparsity=S}``) on
``--windows`` x ``--seq`` train tokens (the pruned weights are cached under ``--cache`` by pipeline
and calibration size, so a sweep prunes once), then runs ``recover_blocks`` on the same windows
and prints every block's record and one ``RESULT`` line: the settings, held-out perplexity
(``--evalw`` x 256 tokens spread over the 20 held-out articles) of the one-shot and the recovered
model, and the recovery's wall and CPU seconds. ``--epochs 0`` stops after the one-shot model.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import torch

from sparsec.capture import capture
from sparsec.data import heldout_windows, perplexity, token_windows
from sparsec.finetune.blockwise import BlockwiseConfig, recover_blocks
from sparsec.models import cache_dir, load
from sparsec.passes import PassContext, Pipeline, run_passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prune", default="", help="pruning pipeline (default: prune-sparsegpt{sparsity=S})")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--inputs", default="student")
    ap.add_argument("--normalize", default="token")
    ap.add_argument("--sinks", default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--evalw", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=cache_dir() / "blockwise-sweep")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    model, tok = load("smollm2-135m")
    evals = heldout_windows(tok, seq_len=256, windows=a.evalw)
    calib = token_windows(tok, "train", seq_len=a.seq, count=a.windows, seed=1)
    example = {"input_ids": calib[:2].clone()}
    prune = a.prune or f"prune-sparsegpt{{sparsity={a.sparsity}}}"
    key = "".join(c if c.isalnum() or c in ".=" else "_" for c in prune) + f"-{a.windows}x{a.seq}.pt"
    cached = a.cache / key
    student_model = copy.deepcopy(model)
    scap = capture(student_model, example)
    if cached.exists():  # the pruned weights; their zeros are the masks
        student_model.load_state_dict(torch.load(cached))
        run_passes(scap.graph_module, Pipeline.parse("mask-zeros").passes, PassContext())
    else:
        t = time.time()
        samples = [((), {"input_ids": w[None].clone(), **scap.constant_kwargs}) for w in calib]
        run_passes(scap.graph_module, Pipeline.parse(prune).passes, PassContext(calibration=samples))
        print(f"prune {time.time() - t:.0f} s", flush=True)
        a.cache.mkdir(parents=True, exist_ok=True)
        torch.save(student_model.state_dict(), cached)
    teacher = capture(model, example)
    oneshot = perplexity(student_model, evals)
    print(f"dense {perplexity(model, evals):.2f} one-shot {oneshot:.2f}", flush=True)
    if a.epochs == 0:
        print(f"RESULT {vars(a)} oneshot {oneshot:.2f}", flush=True)
        return
    t, c = time.time(), time.process_time()
    recover_blocks(scap, teacher, calib,
                   BlockwiseConfig(epochs=a.epochs, lr=a.lr, batch_size=a.bs, inputs=a.inputs, normalize=a.normalize,
                                   sinks=a.sinks, progress=False),
                   on_block=lambda r: print(r, flush=True))
    wall, cpu = time.time() - t, time.process_time() - c
    print(f"RESULT {vars(a)} oneshot {oneshot:.2f} blockwise {perplexity(student_model, evals):.2f} "
          f"wall {wall:.0f} cpu {cpu:.0f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
