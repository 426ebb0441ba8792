// LoRA training on the GPU (llama-peft, cuda.rs): the f32 master weights' bf16 copies, the
// gradient norm and clipping, the AdamW update with torch's arithmetic (decoupled weight decay,
// bias correction; see llama-peft/src/optim.rs), each over every trained matrix at once, and a
// trained embedding's gradient.

// dst = bf16(src): the copy of a master weight the products read.
extern "C" __global__ void lora_to_bf16(const float* src, bf16_t* dst, size_t n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = from_f32<bf16_t>(src[i]); }
}

// The trained matrices as one table (llama-peft cuda.rs, TrainableTable): each entry the
// device addresses of a matrix's f32 master, gradient and AdamW moments (null for SGD) and its
// bf16 copy, its length, and the first of its chunks of TABLE_CHUNK values. A block takes a
// chunk at a time, finds its matrix by binary search over the entries, and walks the chunk:
// one launch over every matrix (PyTorch's multi-tensor apply) where one per matrix took
// hundreds a step.
struct Trainable {
    float* master;
    float* grad;
    float* m;
    float* v;
    bf16_t* copy;
    unsigned long long n;
    unsigned long long first_chunk;
};

#define TABLE_CHUNK 4096

template <typename F>
__device__ __forceinline__ void for_each_value(const Trainable* table, unsigned count, size_t chunks, F f) {
    for (size_t c = blockIdx.x; c < chunks; c += gridDim.x) {
        unsigned lo = 0, hi = count;
        while (hi - lo > 1) {
            unsigned mid = (lo + hi) / 2;
            if (table[mid].first_chunk <= c) lo = mid;
            else hi = mid;
        }
        const Trainable t = table[lo];
        size_t begin = (c - t.first_chunk) * TABLE_CHUNK;
        size_t end = min((size_t)t.n, begin + TABLE_CHUNK);
        for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) f(t, i);
    }
}

extern "C" __global__ void lora_zero_grads(const Trainable* table, unsigned count, size_t chunks) {
    for_each_value(table, count, chunks, [](const Trainable& t, size_t i) { t.grad[i] = 0.0f; });
}

// partial[block] = Σ g² over the block's chunks: the host adds the blocks' sums in order, so
// the norm (and a clipped step) is the same from run to run, as atomic adds in the order the
// blocks finish would not make it.
extern "C" __global__ void lora_grad_sumsq(const Trainable* table, unsigned count, size_t chunks, float* partial) {
    float acc = 0.0f;
    for_each_value(table, count, chunks, [&](const Trainable& t, size_t i) { acc += t.grad[i] * t.grad[i]; });
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// g *= s (gradient clipping).
extern "C" __global__ void lora_scale_grads(const Trainable* table, unsigned count, size_t chunks, float s) {
    for_each_value(table, count, chunks, [&](const Trainable& t, size_t i) { t.grad[i] *= s; });
}

// torch.optim.AdamW: p ← p·(1 − lr·wd); m ← m + (1 − β₁)(g − m); v ← β₂v + (1 − β₂)g²;
// p ← p − step_size · m / (√v / bias2_sqrt + eps), step_size = lr / (1 − β₁ᵗ),
// bias2_sqrt = √(1 − β₂ᵗ); then the bf16 copy of p.
extern "C" __global__ void lora_adamw(const Trainable* table, unsigned count, size_t chunks, float lr,
                                      float b1, float b2, float eps, float wd, float step_size,
                                      float bias2_sqrt) {
    for_each_value(table, count, chunks, [&](const Trainable& t, size_t i) {
        float g = t.grad[i];
        float pi = t.master[i] * (1.0f - lr * wd);
        float mi = t.m[i] + (g - t.m[i]) * (1.0f - b1);
        float vi = t.v[i] * b2 + (1.0f - b2) * g * g;
        pi -= step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
        t.master[i] = pi;
        t.m[i] = mi;
        t.v[i] = vi;
        t.copy[i] = from_f32<bf16_t>(pi);
    });
}

// Plain SGD: p ← p − lr·(g + wd·p); then the bf16 copy of p.
extern "C" __global__ void lora_sgd(const Trainable* table, unsigned count, size_t chunks, float lr, float wd) {
    for_each_value(table, count, chunks, [&](const Trainable& t, size_t i) {
        float pi = t.master[i] - lr * (t.grad[i] + wd * t.master[i]);
        t.master[i] = pi;
        t.copy[i] = from_f32<bf16_t>(pi);
    });
}

// The gradient of an embedding lookup (a trained embed_tokens): grad row ids[r] += dh row r,
// f32 atomics (ids repeat). Ids were checked on the host.
extern "C" __global__ void lora_add_rows(float* grad, const unsigned* ids, const bf16_t* dh, size_t rows,
                                         size_t cols) {
    GRID_STRIDE_LOOP(i, rows * cols) { atomicAdd(&grad[(size_t)ids[i / cols] * cols + i % cols], to_f32(dh[i])); }
}
