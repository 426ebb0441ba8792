// LoRA training on the GPU (llama-peft, cuda.rs): the f32 master weights' bf16 copies, the
// gradient norm and clipping, the AdamW update with torch's arithmetic (decoupled weight decay,
// bias correction; see llama-peft/src/optim.rs) and a trained embedding's gradient.

// dst = bf16(src): the copy of a master weight the products read.
extern "C" __global__ void lora_to_bf16(const float* src, bf16_t* dst, size_t n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = from_f32<bf16_t>(src[i]); }
}

// x *= s in place (f32): gradient clipping.
extern "C" __global__ void lora_scale_f32(float* x, size_t n, float s) {
    GRID_STRIDE_LOOP(i, n) { x[i] *= s; }
}

// *out += Σ x² (one atomic add per block).
extern "C" __global__ void lora_sumsq_f32(const float* x, size_t n, float* out) {
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, n) { acc += x[i] * x[i]; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// torch.optim.AdamW on n values: p ← p·(1 − lr·wd); m ← m + (1 − β₁)(g − m);
// v ← β₂v + (1 − β₂)g²; p ← p − step_size · m / (√v / bias2_sqrt + eps),
// step_size = lr / (1 − β₁ᵗ), bias2_sqrt = √(1 − β₂ᵗ).
extern "C" __global__ void lora_adamw(float* p, const float* g, float* m, float* v, size_t n,
                                      float lr, float b1, float b2, float eps, float wd,
                                      float step_size, float bias2_sqrt) {
    GRID_STRIDE_LOOP(i, n) {
        float pi = p[i] * (1.0f - lr * wd);
        float mi = m[i] + (g[i] - m[i]) * (1.0f - b1);
        float vi = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
        pi -= step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// Plain SGD: p ← p − lr·(g + wd·p).
extern "C" __global__ void lora_sgd(float* p, const float* g, size_t n, float lr, float wd) {
    GRID_STRIDE_LOOP(i, n) { p[i] -= lr * (g[i] + wd * p[i]); }
}

// The gradient of an embedding lookup (a trained embed_tokens): grad row ids[r] += dh row r,
// f32 atomics (ids repeat). Ids were checked on the host.
extern "C" __global__ void lora_add_rows(float* grad, const unsigned* ids, const bf16_t* dh, size_t rows,
                                         size_t cols) {
    GRID_STRIDE_LOOP(i, rows * cols) { atomicAdd(&grad[(size_t)ids[i / cols] * cols + i % cols], to_f32(dh[i])); }
}
