#!/usr/bin/env python3
"""The PyTorch peer of `benches/cuda_ops.rs`: the same ops at the same shapes, computed the way
HF transformers' modules compute them in eager mode (LlamaRMSNorm, act_fn(gate) * up,
CrossEntropyLoss on float logits, nn.Linear), timed the way criterion times ours: one call and a
torch.cuda.synchronize() per iteration, wall clock, median of the samples. Also reports the
kernel-only time by CUDA events over back-to-back calls. bitsandbytes' NF4 matrix-vector
product is measured when bitsandbytes is installed.

    python3 crates/llama-ops/benches/peers/torch_ops.py   # on the GPU machine; JSON to $OUT
"""
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

ROWS, HIDDEN, INTER, VOCAB, CE_ROWS = 4096, 4096, 14336, 128256, 2048
dev = torch.device("cuda")
bf16 = torch.bfloat16


def timed(fn, samples=20, iters=20):
    """(median wall µs per call with a sync after each call, kernel-only µs per call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / iters * 1e6)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return statistics.median(walls), a.elapsed_time(b) * 1e3 / iters


def llama_rms_norm(x, w, eps=1e-5):
    hs = x.float()
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
    return w * hs.to(x.dtype)


results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "ops": {}}


def record(name, fn, bytes_moved=None, flops=None):
    wall, kernel = timed(fn)
    entry = {"wall_us": round(wall, 2), "kernel_us": round(kernel, 2)}
    if bytes_moved:
        entry["GiB_s_wall"] = round(bytes_moved / wall / 1e-6 / 2**30, 1)
    if flops:
        entry["TFLOP_s_wall"] = round(flops / wall / 1e6, 1)
    results["ops"][name] = entry
    print(f"{name:45s} {wall:9.1f} µs wall {kernel:9.1f} µs kernel  {entry}")


src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
record("copy_1GiB", lambda: dst.copy_(src), bytes_moved=2 << 30)
del src, dst

x = torch.randn(ROWS, HIDDEN, device=dev, dtype=bf16)
w = torch.randn(HIDDEN, device=dev, dtype=bf16)
record("rms_norm_bf16_4096x4096 (HF LlamaRMSNorm)", lambda: llama_rms_norm(x, w), 2 * 2 * x.numel())
if hasattr(F, "rms_norm"):
    record("rms_norm_bf16_4096x4096 (F.rms_norm)", lambda: F.rms_norm(x, (HIDDEN,), w, 1e-5), 2 * 2 * x.numel())
xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
y = llama_rms_norm(xg, wg)
dy = torch.randn_like(y)
record("rms_norm_backward_bf16_4096x4096 (autograd)",
       lambda: torch.autograd.grad(y, (xg, wg), dy, retain_graph=True), 3 * 2 * x.numel())
del x, xg, y, dy

n = ROWS * INTER
gate = torch.randn(ROWS, INTER, device=dev, dtype=bf16)
up = torch.randn(ROWS, INTER, device=dev, dtype=bf16)
record("swiglu_bf16_4096x14336 (F.silu(g) * u)", lambda: F.silu(gate) * up, 3 * 2 * n)
gg, ug = gate.clone().requires_grad_(), up.clone().requires_grad_()
h = F.silu(gg) * ug
dh = torch.randn_like(h)
record("swiglu_backward_bf16_4096x14336 (autograd)",
       lambda: torch.autograd.grad(h, (gg, ug), dh, retain_graph=True), 5 * 2 * n)
del gate, up, gg, ug, h, dh

logits = torch.randn(CE_ROWS, VOCAB, device=dev, dtype=bf16)
labels = torch.randint(0, VOCAB, (CE_ROWS,), device=dev)
record("cross_entropy_forward_bf16_2048x128256 (HF: float logits)",
       lambda: F.cross_entropy(logits.float(), labels), 2 * logits.numel())
lg = logits.clone().requires_grad_()
loss = F.cross_entropy(lg.float(), labels)
record("cross_entropy_backward_bf16_2048x128256 (autograd)",
       lambda: torch.autograd.grad(loss, lg, retain_graph=True), 2 * 2 * logits.numel())
del logits, lg, loss

xs = torch.randn(ROWS, HIDDEN, device=dev, dtype=bf16)
ws = torch.randn(INTER, HIDDEN, device=dev, dtype=bf16)
record("linear_bf16_4096x4096x14336 (F.linear)", lambda: F.linear(xs, ws), flops=2 * ROWS * HIDDEN * INTER)
del xs

try:
    import bitsandbytes as bnb

    wq, state = bnb.functional.quantize_4bit(ws, quant_type="nf4", compress_statistics=False)
    xv = torch.randn(1, HIDDEN, device=dev, dtype=bf16)
    record("matvec_NF4_14336x4096 (bitsandbytes gemv)",
           lambda: bnb.matmul_4bit(xv, wq.t(), quant_state=state), bytes_moved=wq.numel() * wq.element_size())
except Exception as e:  # not installed, or no 4-bit support
    results["bitsandbytes"] = f"unavailable: {e}"
    print(f"bitsandbytes unavailable: {e}")

with open(os.path.join(os.environ.get("OUT", "/tmp"), "torch_ops.json"), "w") as f:
    json.dump(results, f, indent=1)
