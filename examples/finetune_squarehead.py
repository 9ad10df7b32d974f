"""Prune a causal LM and recover it with SquareHead distillation from its dense self.

    python examples/finetune_squarehead.py                 # SmolLM2-135M, 70% SparseGPT, 50 steps
    python examples/finetune_squarehead.py --tiny          # a random tiny Llama, seconds (what the tests run)

The steps are the whole recipe: capture the model twice (teacher and student share nothing),
prune the student's graph, fine-tune it against the frozen teacher with fixed masks, and
compare held-out perplexity before and after.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (48, 1), generator=g)
    ids = (start + 5 * torch.arange(17)) % 64  # a learnable pattern
    return model, ids[:40], ids[40:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama and synthetic tokens")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)

    from sparsec.capture import capture
    from sparsec.data import perplexity
    from sparsec.finetune import DistillModel, FinetuneConfig, finetune
    from sparsec.passes import PassContext, make_pass, run_passes

    if args.tiny:
        model, train, heldout = tiny_llama()
        prune = make_pass("prune-magnitude", sparsity=args.sparsity)
        calibration = None
    else:
        from sparsec.data import heldout_windows, token_windows
        from sparsec.models import load

        model, tok = load("smollm2-135m")
        train = token_windows(tok, "train", seq_len=args.seq_len)
        heldout = heldout_windows(tok, seq_len=args.seq_len, windows=16)
        prune = make_pass("prune-sparsegpt", sparsity=args.sparsity)
        calibration = [((), {"input_ids": w[None].clone(), "use_cache": False}) for w in train[:32]]

    # 1. capture teacher and student from separate copies: training the student leaves the teacher fixed
    example = {"input_ids": train[:2].clone()}
    teacher_cap = capture(copy.deepcopy(model), example)
    student_cap = capture(model, example)
    # 2. prune the student's graph: masks become buffers multiplied into the weights
    run_passes(student_cap.graph_module, [prune], PassContext(calibration=calibration))
    # 3. tap the block outputs of both (insert-taps) and fine-tune: CE + SquareHead, fixed masks
    teacher = DistillModel(teacher_cap.graph_module, teacher_cap.constant_kwargs)
    student = DistillModel(student_cap.graph_module, student_cap.constant_kwargs)

    def ppl(m: DistillModel) -> float:
        return perplexity(lambda input_ids: m(input_ids)[0], heldout)

    before = ppl(student)
    config = FinetuneConfig(steps=args.steps, micro_batch_size=4, lr=1e-3 if args.tiny else 1e-4,
                            warmup_steps=args.steps // 10, ce=1.0, squarehead=1.0, device="cpu")
    history = finetune(student, teacher, train, config)
    after = ppl(student)
    intact = history.mask_violations == 0
    print(f"teacher {ppl(teacher):.3f}; pruned {args.sparsity:.0%}: one-shot {before:.3f} -> fine-tuned "
          f"{after:.3f} after {len(history)} steps; pruned weights still zero: {intact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
