// Cross entropy over large vocabularies (llama-ops, src/cuda/loss.rs), as Unsloth's kernels:
// logits [rows, vocab], labels [rows] (i64; ignore_index rows do not count).
//   ce_chunk_lse:  block (row, chunk) → logsumexp of the chunk's transformed logits
//   ce_combine:    per row, logsumexp over chunks → lse[row], loss[row] = lse − z[label]
//   ce_backward:   in place, dx = coef · (exp(z − lse) − [j = label]) · dz/dx
// Transform: z = scale · x (scale 1 when off), then z = cap · tanh(z / cap) when cap > 0.

__device__ __forceinline__ float ce_transform(float x, float scale, float cap) {
    float z = scale * x;
    return cap > 0.0f ? cap * tanhf(z / cap) : z;
}

template <typename T>
__device__ void ce_chunk_lse_impl(const T* logits, const long long* labels, float* chunk_lse,
                                  unsigned vocab, unsigned chunk, long long ignore_index,
                                  float scale, float cap) {
    size_t row = blockIdx.x;
    unsigned c = blockIdx.y, chunks = gridDim.y;
    if (labels[row] == ignore_index) return;
    const T* x = logits + row * vocab;
    unsigned first = c * chunk;
    unsigned last = min(vocab, first + chunk);
    // Each thread keeps a running (max, Σ exp(z − max)), rescaled when the max grows.
    float m = -POS_INF, s = 0.0f;
    auto add = [&](float x) {
        float z = ce_transform(x, scale, cap);
        if (z > m) {
            s = s * expf(m - z) + 1.0f;
            m = z;
        } else {
            s += expf(z - m);
        }
    };
    const unsigned N = Pack<T>::N;
    if (vocab % N == 0 && chunk % N == 0 && aligned16(logits)) {
        for (unsigned p = first / N + threadIdx.x; p < last / N; p += blockDim.x) {
            float v[N];
            load_pack(x + p * N, v);
#pragma unroll
            for (unsigned k = 0; k < N; ++k) add(v[k]);
        }
    } else {
        for (unsigned j = first + threadIdx.x; j < last; j += blockDim.x) add(to_f32(x[j]));
    }
    float block_m = block_max(m);
    float mine = m == -POS_INF ? 0.0f : s * expf(m - block_m);
    float total = block_sum(mine);
    if (threadIdx.x == 0) chunk_lse[row * chunks + c] = block_m + logf(total);
}

template <typename T>
__device__ void ce_combine_impl(const T* logits, const long long* labels, const float* chunk_lse,
                                float* lse, float* loss, size_t rows, unsigned vocab,
                                unsigned chunks, long long ignore_index, float scale, float cap) {
    GRID_STRIDE_LOOP(row, rows) {
        long long label = labels[row];
        if (label == ignore_index) {
            lse[row] = 0.0f;
            loss[row] = 0.0f;
            continue;
        }
        float m = -POS_INF;
        for (unsigned c = 0; c < chunks; ++c) m = fmaxf(m, chunk_lse[row * chunks + c]);
        float s = 0.0f;
        for (unsigned c = 0; c < chunks; ++c) s += expf(chunk_lse[row * chunks + c] - m);
        float l = m + logf(s);
        lse[row] = l;
        loss[row] = l - ce_transform(to_f32(logits[row * vocab + label]), scale, cap);
    }
}

// dx_j for one element of a counted row.
__device__ __forceinline__ float ce_grad(float x, unsigned j, long long label, float lse, float scale,
                                         float cap, float coef) {
    float z = scale * x;
    float slope = scale;
    if (cap > 0.0f) {
        float t = tanhf(z / cap);
        z = cap * t;
        slope *= 1.0f - t * t;
    }
    float target = (long long)j == label ? 1.0f : 0.0f;
    return coef * (expf(z - lse) - target) * slope;
}

// Grid: x over a row's columns (packs when aligned), y strides over rows.
template <typename T>
__device__ void ce_backward_impl(T* logits, const long long* labels, const float* lse, size_t rows,
                                 unsigned vocab, long long ignore_index, float scale, float cap,
                                 float coef) {
    const unsigned N = Pack<T>::N;
    bool vec = vocab % N == 0 && aligned16(logits);
    unsigned step = gridDim.x * blockDim.x;
    for (size_t row = blockIdx.y; row < rows; row += gridDim.y) {
        T* x = logits + row * vocab;
        long long label = labels[row];
        bool ignored = label == ignore_index;
        float l = ignored ? 0.0f : lse[row];
        if (vec) {
            for (unsigned p = blockIdx.x * blockDim.x + threadIdx.x; p < vocab / N; p += step) {
                float v[N];
                load_pack(x + p * N, v);
#pragma unroll
                for (unsigned k = 0; k < N; ++k)
                    v[k] = ignored ? 0.0f : ce_grad(v[k], p * N + k, label, l, scale, cap, coef);
                store_pack(x + p * N, v);
            }
        } else {
            for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < vocab; j += step)
                x[j] = from_f32<T>(ignored ? 0.0f : ce_grad(to_f32(x[j]), j, label, l, scale, cap, coef));
        }
    }
}

#define CE_KERNELS(name, T)                                                                        \
    extern "C" __global__ void ce_chunk_lse_##name(const T* logits, const long long* labels,         \
                                                   float* chunk_lse, unsigned vocab, unsigned chunk, \
                                                   long long ignore_index, float scale, float cap) { \
        ce_chunk_lse_impl(logits, labels, chunk_lse, vocab, chunk, ignore_index, scale, cap);        \
    }                                                                                               \
    extern "C" __global__ void ce_combine_##name(const T* logits, const long long* labels,           \
                                                 const float* chunk_lse, float* lse, float* loss,    \
                                                 size_t rows, unsigned vocab, unsigned chunks,       \
                                                 long long ignore_index, float scale, float cap) {   \
        ce_combine_impl(logits, labels, chunk_lse, lse, loss, rows, vocab, chunks, ignore_index,     \
                        scale, cap);                                                                \
    }                                                                                               \
    extern "C" __global__ void ce_backward_##name(T* logits, const long long* labels,                \
                                                  const float* lse, size_t rows, unsigned vocab,     \
                                                  long long ignore_index, float scale, float cap,    \
                                                  float coef) {                                      \
        ce_backward_impl(logits, labels, lse, rows, vocab, ignore_index, scale, cap, coef);          \
    }

CE_KERNELS(f32, float)
CE_KERNELS(f16, f16_t)
CE_KERNELS(bf16, bf16_t)
