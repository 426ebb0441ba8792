// Gated MLP activations (llama-ops, src/cuda/activation.rs): h = T(T(f(gate)) · up) with f
// SiLU (act 0), exact GELU (act 1) or tanh GELU (act 2), and the backward
// dgate = dh · up · f'(gate), dup = dh · f(gate). Element-wise, grid-stride, f32 math; the same
// formulas as src/activation.rs.

__device__ __forceinline__ float act_value(int act, float x) {
    if (act == 0) return x / (1.0f + expf(-x));
    if (act == 1) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    float inner = 0.7978845608f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

// f(x) and f'(x).
__device__ __forceinline__ float2 act_value_and_slope(int act, float x) {
    if (act == 0) {
        float s = 1.0f / (1.0f + expf(-x));
        return make_float2(x * s, s * (1.0f + x * (1.0f - s)));
    }
    if (act == 1) {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.3989422804f * expf(-0.5f * x * x);
        return make_float2(x * cdf, cdf + x * pdf);
    }
    float t = tanhf(0.7978845608f * (x + 0.044715f * x * x * x));
    float dinner = 0.7978845608f * (1.0f + 3.0f * 0.044715f * x * x);
    return make_float2(0.5f * x * (1.0f + t), 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner);
}

// h may alias gate (the in-place forward): each element is read before it is written.
// Threads take one 16-byte pack of each operand at a time where alignment allows.
template <typename T>
__device__ __forceinline__ float gated_value(int act, float g, float u) {
    return round_to<T>(round_to<T>(act_value(act, g)) * u);
}

// One pack per thread per grid step: measured on an H200, a grid of one thread per pack beats
// both a capped grid and unrolled steps of several packs (fewer bytes in flight per SM).
template <typename T>
__device__ void gated_forward_impl(const T* gate, const T* up, T* h, size_t n, int act) {
    const unsigned N = Pack<T>::N;
    size_t packs = aligned16(gate) && aligned16(up) && aligned16(h) ? n / N : 0;
    GRID_STRIDE_LOOP(p, packs) {
        float g[N], u[N];
        load_pack(gate + p * N, g);
        load_pack(up + p * N, u);
#pragma unroll
        for (unsigned i = 0; i < N; ++i) g[i] = gated_value<T>(act, g[i], u[i]);
        store_pack(h + p * N, g);
    }
    GRID_STRIDE_LOOP(j, n - packs * N) {
        size_t i = packs * N + j;
        h[i] = from_f32<T>(gated_value<T>(act, to_f32(gate[i]), to_f32(up[i])));
    }
}

template <typename T>
__device__ __forceinline__ void gated_grads(int act, float g, float u, float d, float* dg, float* du) {
    float2 fs = act_value_and_slope(act, g);
    *dg = d * u * fs.y;
    *du = d * fs.x;
}

// h_out (may be null) gets the forward's h, recomputed with its rounding: the in-place backward
// writes it over dh, which each thread reads first.
template <typename T>
__device__ void gated_backward_impl(const T* gate, const T* up, const T* dh, T* dgate, T* dup,
                                    T* h_out, size_t n, int act) {
    const unsigned N = Pack<T>::N;
    bool vec = aligned16(gate) && aligned16(up) && aligned16(dh) && aligned16(dgate) && aligned16(dup) &&
               aligned16(h_out);
    size_t packs = vec ? n / N : 0;
    GRID_STRIDE_LOOP(p, packs) {
        float g[N], u[N], d[N], dg[N], du[N];
        load_pack(gate + p * N, g);
        load_pack(up + p * N, u);
        load_pack(dh + p * N, d);
#pragma unroll
        for (unsigned i = 0; i < N; ++i) gated_grads<T>(act, g[i], u[i], d[i], &dg[i], &du[i]);
        if (h_out) {
#pragma unroll
            for (unsigned i = 0; i < N; ++i) d[i] = gated_value<T>(act, g[i], u[i]);
            store_pack(h_out + p * N, d);
        }
        store_pack(dgate + p * N, dg);
        store_pack(dup + p * N, du);
    }
    GRID_STRIDE_LOOP(j, n - packs * N) {
        size_t i = packs * N + j;
        float g = to_f32(gate[i]), u = to_f32(up[i]), dg, du;
        gated_grads<T>(act, g, u, to_f32(dh[i]), &dg, &du);
        if (h_out) h_out[i] = from_f32<T>(gated_value<T>(act, g, u));
        dgate[i] = from_f32<T>(dg);
        dup[i] = from_f32<T>(du);
    }
}

// The residual stream: h = T(h + delta), as PyTorch adds two tensors of T; a pack at a time.
template <typename T>
__device__ void add_in_place_impl(T* h, const T* delta, size_t n) {
    const unsigned N = Pack<T>::N;
    size_t packs = aligned16(h) && aligned16(delta) ? n / N : 0;
    GRID_STRIDE_LOOP(p, packs) {
        float a[N], b[N];
        load_pack(h + p * N, a);
        load_pack(delta + p * N, b);
#pragma unroll
        for (unsigned i = 0; i < N; ++i) a[i] += b[i];
        store_pack(h + p * N, a);
    }
    GRID_STRIDE_LOOP(j, n - packs * N) {
        size_t i = packs * N + j;
        h[i] = from_f32<T>(to_f32(h[i]) + to_f32(delta[i]));
    }
}

// Embedding lookup: out row r = table row ids[r] ([rows, cols] from [vocab, cols]); 16-byte
// chunks when rows are whole chunks and aligned, else elements. Ids were checked on the host.
template <typename E>
__device__ void gather_rows_elems(const E* table, const unsigned* ids, E* out, size_t rows, size_t cols) {
    GRID_STRIDE_LOOP(i, rows * cols) { out[i] = table[(size_t)ids[i / cols] * cols + i % cols]; }
}

template <typename T>
__device__ void gather_rows_impl(const T* table, const unsigned* ids, T* out, size_t rows, size_t cols) {
    if ((cols * sizeof(T)) % 16 == 0 && aligned16(table) && aligned16(out))
        gather_rows_elems((const uint4*)table, ids, (uint4*)out, rows, cols * sizeof(T) / 16);
    else
        gather_rows_elems(table, ids, out, rows, cols);
}

// SplitMix64 of seed + i, as a float in [-1, 1).
__device__ __forceinline__ float hash_uniform(unsigned long long seed, size_t i) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

#define GATED_KERNELS(name, T)                                                                    \
    extern "C" __global__ void gated_forward_##name(const T* gate, const T* up, T* h, size_t n,     \
                                                    int act) {                                     \
        gated_forward_impl(gate, up, h, n, act);                                                   \
    }                                                                                              \
    extern "C" __global__ void gated_forward_in_place_##name(T* gate, const T* up, size_t n,        \
                                                             int act) {                            \
        gated_forward_impl(gate, up, gate, n, act);                                                \
    }                                                                                              \
    extern "C" __global__ void gated_backward_##name(const T* gate, const T* up, const T* dh,       \
                                                     T* dgate, T* dup, size_t n, int act) {        \
        gated_backward_impl(gate, up, dh, dgate, dup, (T*)0, n, act);                              \
    }                                                                                              \
    /* The same with dgate over gate, dup over up and the forward's h over dh (each element is   \
       read before it is written). */                                                              \
    extern "C" __global__ void gated_backward_in_place_##name(T* gate, T* up, T* dh, size_t n,     \
                                                              int act) {                           \
        gated_backward_impl(gate, up, dh, gate, up, dh, n, act);                                   \
    }                                                                                              \
    /* Uniform values in [-scale, scale) from a hash of (seed, i): random weights for benches. */ \
    extern "C" __global__ void fill_uniform_##name(T* x, size_t n, unsigned long long seed,        \
                                                   float scale) {                                  \
        GRID_STRIDE_LOOP(i, n) { x[i] = from_f32<T>(scale * hash_uniform(seed, i)); }             \
    }                                                                                              \
    extern "C" __global__ void gather_rows_##name(const T* table, const unsigned* ids, T* out,      \
                                                  size_t rows, size_t cols) {                      \
        gather_rows_impl(table, ids, out, rows, cols);                                             \
    }                                                                                              \
    extern "C" __global__ void add_in_place_##name(T* h, const T* delta, size_t n) {                \
        add_in_place_impl(h, delta, n);                                                            \
    }

GATED_KERNELS(f32, float)
GATED_KERNELS(f16, f16_t)
GATED_KERNELS(bf16, bf16_t)
