#!/usr/bin/env python3
"""The PyTorch peer of `benches/cuda_attention.rs`: F.scaled_dot_product_attention (which picks
FlashAttention-2 or the memory-efficient kernel) at the same Llama-3-8B attention shape
(32 heads, 8 kv heads — expanded with repeat_interleave as HF's eager path does before SDPA —
head_dim 128, bf16, batch 1), timed as criterion times ours: a call and a synchronize per
iteration, median wall time.

    python3 crates/llama-attn/benches/peers/torch_attention.py   # on the GPU machine
"""
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, D = 32, 8, 128
dev, bf16 = torch.device("cuda"), torch.bfloat16


def timed(fn, samples=10, iters=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(walls)


def qkv(tq, tk):
    q = torch.randn(1, HEADS, tq, D, device=dev, dtype=bf16)
    k = torch.randn(1, KV_HEADS, tk, D, device=dev, dtype=bf16).repeat_interleave(HEADS // KV_HEADS, 1)
    v = torch.randn(1, KV_HEADS, tk, D, device=dev, dtype=bf16).repeat_interleave(HEADS // KV_HEADS, 1)
    return q, k, v


results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
for seq in [512, 2048, 8192, 16384]:
    q, k, v = qkv(seq, seq)
    us = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    results[f"prefill/{seq}"] = us
    print(f"prefill/{seq}: {us:.1f} µs, {2 * seq * seq * HEADS * D / us / 1e6:.1f} TFLOP/s")
    if seq <= 2048:
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dout = torch.randn_like(out)
        us = timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        results[f"backward/{seq}"] = us
        print(f"backward/{seq}: {us:.1f} µs")
for context in [1024, 4096, 16384, 32768]:
    q, k, v = qkv(1, context)
    us = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    results[f"decode/{context}"] = us
    print(f"decode/{context}: {us:.1f} µs")
with open(os.path.join(os.environ.get("OUT", "/tmp"), "torch_attention.json"), "w") as f:
    json.dump(results, f, indent=1)
