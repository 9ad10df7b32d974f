"""llama.cpp decode throughput, measured the way ``benchmarks/e2e_decode.py`` measures sparsec.

Runs under a Python that has ``llama-cpp-python`` installed (kept out of sparsec's own
environment: it compiles llama.cpp from source), loads a GGUF model once and then, for each
request, decodes greedily at batch 1 after a given prompt of token ids, exactly like
:func:`sparsec.runtime.generate.generate`: the prompt is evaluated (prefill, not timed), the first
token is taken from its logits, then ``new_tokens - 1`` decode steps each evaluate one token and
pick the next by argmax. Only those decode steps are timed, by the wall clock and by the CPU time
of this process (every thread, llama.cpp's included).

Two modes:

* ``--serve``: used by ``e2e_decode.py --llamacpp-python``. Prints one JSON line when the model
  is loaded, then answers each JSON line read on stdin (``{"ids": [...], "new_tokens": N}``) with
  one JSON line of timings, so that llama.cpp is measured in the same rounds as the other rows.
* otherwise: decodes a random prompt ``--rounds`` times and prints one JSON line per round.

    PY=~/.cache/sparsec/llamacpp-venv/bin/python
    $PY benchmarks/llamacpp_worker.py --model SmolLM2-135M-Instruct.Q4_1.gguf --threads 2

llama-cpp-python 0.3.36 was reported to crash on this project's CPU with ``verbose=False`` and
with multi-token batches. Neither reproduced with 0.3.36 compiled here from its sdist, but the
worker keeps clear of both: it opens the model with ``verbose=True`` (the log goes to stderr)
and evaluates the prompt one token at a time unless ``--prefill batch`` is given. Neither touches
the timed decode steps, which evaluate one token each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def open_model(path: str, threads: int, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=True, seed=0)
    return llama_cpp, llm


def decode(llama_cpp, llm, ids: list[int], new_tokens: int, prefill: str) -> dict:
    import numpy as np

    n_vocab = llm.n_vocab()

    def pick() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    if prefill == "batch":
        llm.eval(ids)
    else:
        for t in ids:
            llm.eval([t])
    tok = pick()
    out = [tok]
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(1, new_tokens):
        llm.eval([tok])
        tok = pick()
        out.append(tok)
    t2, c2 = time.perf_counter(), time.process_time()
    steps = len(out) - 1
    return dict(prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_cpu_seconds=c2 - c1, steps=steps,
                tokens_per_second=steps / (t2 - t1), cpu_tokens_per_second=steps / (c2 - c1), tokens=out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="GGUF file")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (n_threads and n_threads_batch)")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--prefill", choices=("token", "batch"), default="token",
                   help="evaluate the prompt one token at a time (default) or as one batch")
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (see the docstring)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    # The protocol owns the real stdout; anything llama.cpp or Python prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    llama_cpp, llm = open_model(args.model, args.threads, args.n_ctx)
    info = dict(ready=True, llama_cpp_python=llama_cpp.__version__, threads=args.threads, n_vocab=llm.n_vocab(),
                model=os.path.basename(args.model), prefill=args.prefill,
                system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip())
    print(json.dumps(info), file=proto)
    if args.serve:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            if req.get("quit"):
                break
            print(json.dumps(decode(llama_cpp, llm, req["ids"], req["new_tokens"], args.prefill)), file=proto)
        return
    rng = random.Random(0)
    ids = [rng.randrange(llm.n_vocab()) for _ in range(args.prompt_tokens)]
    for _ in range(args.rounds):
        r = decode(llama_cpp, llm, ids, args.new_tokens, args.prefill)
        r.pop("tokens")
        r["load_average"] = os.getloadavg()[0]
        print(json.dumps(r), file=proto)


if __name__ == "__main__":
    main()
