#!/usr/bin/env python3
"""The HF transformers peer of `fastllama bench --random-weights` on a GPU: random-weight bf16
Llama models of the same shapes, prefill of PROMPT tokens (logits of the last position only)
and greedy decoding of GEN tokens one step at a time with a DynamicCache (eager), best of
REPEATS. Prints one JSON line per shape.
Usage: hf_gpu_infer.py PROMPT GEN REPEATS SHAPE..."""
import json
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192),
}


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(name, n_prompt, n_gen, repeats):
    cfg = LlamaConfig(**SHAPES[name], rms_norm_eps=1e-5)
    with torch.device("cuda"):
        m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    m.eval()
    ids = torch.randint(100, cfg.vocab_size, (1, n_prompt), device="cuda")
    best_prefill = best_decode = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up
            cache = DynamicCache(config=m.config)
            out = None

            def prefill():
                nonlocal out
                out = m(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

            tp = timed(prefill)

            def decode():
                nonlocal out
                tok = out.logits[:, -1:].argmax(-1)
                for _ in range(n_gen):
                    out = m(tok, past_key_values=out.past_key_values, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)

            td = timed(decode)
            best_prefill, best_decode = min(best_prefill, tp), min(best_decode, td)
    r = {"engine": f"HF transformers eager (torch {torch.__version__})", "shape": name,
         "device": torch.cuda.get_device_name(0), "prompt_tokens": n_prompt, "gen_tokens": n_gen,
         "prefill_tokens_per_s": n_prompt / best_prefill, "decode_tokens_per_s": n_gen / best_decode,
         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    del m
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return r


if __name__ == "__main__":
    n_prompt, n_gen, repeats = map(int, sys.argv[1:4])
    for shape in sys.argv[4:]:
        print(json.dumps(bench(shape, n_prompt, n_gen, repeats)), flush=True)
