#!/usr/bin/env python3
"""The llama.cpp peer of `cargo xtask bench`: prefill and greedy decode tokens/s on a GGUF file
through llama-cpp-python, with the same prompt length, generated length, thread count and
best-of-N timing as `fastllama bench`. Prints one JSON object.
Usage: llama_cpp_peer.py MODEL.gguf PROMPT_TOKENS GEN_TOKENS THREADS REPEATS"""
import json
import random
import resource
import sys
import time

import numpy as np
from llama_cpp import Llama, __version__

path, n_prompt, n_gen, threads, repeats = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=n_prompt + n_gen + 16, n_threads=threads, n_threads_batch=threads,
            n_batch=n_prompt, n_ubatch=n_prompt, verbose=False)
rng = random.Random(7)
prompt = [100 + rng.randrange(llm.n_vocab() - 100) for _ in range(n_prompt)]
best_prefill = best_decode = float("inf")
for _ in range(max(repeats, 1)):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    best_prefill = min(best_prefill, time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n_gen):
        # The context's logits of the last token (llama-cpp-python keeps no copy without
        # logits_all).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        llm.eval([token])
    best_decode = min(best_decode, time.perf_counter() - t)
print(json.dumps({
    "engine": f"llama.cpp (llama-cpp-python {__version__})",
    "threads": threads,
    "prompt_tokens": n_prompt,
    "gen_tokens": n_gen,
    "prefill_tokens_per_s": n_prompt / best_prefill,
    "decode_tokens_per_s": n_gen / best_decode,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
