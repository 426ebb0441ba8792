// Attention (llama-attn, src/cuda.rs): causal grouped-query attention with an optional left-padding
// mask, forward with split-K (flash-decoding) and the FlashAttention-2 backward, f32 math for
// f32/f16/bf16 tensors. Layouts (src/shape.rs): Q, O, dQ, dO [B, H, Tq, D]; K, V, dK, dV
// [B, Hkv, S, D] of which positions 0..Tk are used; L [B, H, Tq]. Query i sits at absolute
// position Tk − Tq + i; it sees keys j with pad[b] ≤ j and, when causal, j ≤ its position.
// One warp owns one row (a query, or a key in the dK/dV kernel); lane l holds the head
// dimensions l, l + 32, … (at most ATT_MAX_D / 32 of them), so a dot product is a per-lane
// partial sum and a warp_sum.

#define ATT_MAX_D 256
#define ATT_PER_LANE (ATT_MAX_D / 32)

struct AttnDims {
    unsigned batch, heads, kv_heads, seq_q, seq_k, kv_stride, head_dim;
    int causal;
};

// Visible keys [*lo, *hi) of query i of sequence b.
__device__ __forceinline__ void visible_keys(const AttnDims& s, const int* pad, unsigned b, unsigned i,
                                             unsigned* lo, unsigned* hi) {
    unsigned start = pad ? min((unsigned)pad[b], s.seq_k) : 0u;
    unsigned end = s.causal ? (s.seq_k - s.seq_q + i + 1) : s.seq_k;
    *lo = start;
    *hi = max(end, start);
}

// This lane's head dimensions of a row, widened to f32 (zeros past head_dim).
template <typename T>
__device__ __forceinline__ void load_row(const T* row, unsigned d, float* out) {
    unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (unsigned k = 0; k < ATT_PER_LANE; ++k) {
        unsigned c = lane + 32 * k;
        out[k] = c < d ? to_f32(row[c]) : 0.0f;
    }
}

__device__ __forceinline__ float lane_dot(const float* a, const float* b) {
    float s = 0.0f;
#pragma unroll
    for (unsigned k = 0; k < ATT_PER_LANE; ++k) s += a[k] * b[k];
    return warp_sum(s);
}

// Forward, one warp per (query row, key split). With one split the warp writes O and L; with
// several it writes its partial (max, sum, unnormalised output) for attn_merge.
template <typename T>
__device__ void attn_forward_impl(const T* q, const T* k, const T* v, const int* pad, T* out, float* lse,
                                  float* part_ml, float* part_o, AttnDims s, unsigned splits,
                                  unsigned split_len, float scale) {
    unsigned lane = threadIdx.x & 31u;
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    size_t rows = (size_t)s.batch * s.heads * s.seq_q;
    if (warp >= rows * splits) return;
    size_t row = warp / splits;
    unsigned split = (unsigned)(warp % splits);
    unsigned i = (unsigned)(row % s.seq_q);
    unsigned h = (unsigned)((row / s.seq_q) % s.heads);
    unsigned b = (unsigned)(row / ((size_t)s.seq_q * s.heads));
    unsigned g = h / (s.heads / s.kv_heads), d = s.head_dim;
    unsigned lo, hi;
    visible_keys(s, pad, b, i, &lo, &hi);
    lo = max(lo, split * split_len);
    hi = min(hi, (split + 1) * split_len);
    float qv[ATT_PER_LANE], acc[ATT_PER_LANE], kv[ATT_PER_LANE];
    load_row(q + row * d, d, qv);
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) {
        qv[c] *= scale;
        acc[c] = 0.0f;
    }
    float m = -POS_INF, l = 0.0f;
    const T* kb = k + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    const T* vb = v + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    for (unsigned j = lo; j < hi; ++j) {
        load_row(kb + (size_t)j * d, d, kv);
        float sc = lane_dot(qv, kv);
        float new_m = fmaxf(m, sc);
        float rescale = expf(m - new_m), p = expf(sc - new_m);
        load_row(vb + (size_t)j * d, d, kv);
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] = acc[c] * rescale + p * kv[c];
        l = l * rescale + p;
        m = new_m;
    }
    if (splits == 1) {
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c)
            if (lane + 32 * c < d) out[row * d + lane + 32 * c] = from_f32<T>(acc[c] * inv);
        if (lane == 0) lse[row] = l > 0.0f ? m + logf(l) : -POS_INF;
    } else {
        size_t slot = row * splits + split;
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c)
            if (lane + 32 * c < d) part_o[slot * d + lane + 32 * c] = acc[c];
        if (lane == 0) {
            part_ml[2 * slot] = m;
            part_ml[2 * slot + 1] = l;
        }
    }
}

// Merges the splits of each row: O = Σ e^(mₛ − M) oₛ / Σ e^(mₛ − M) lₛ, L = M + ln Σ e^(mₛ − M) lₛ.
template <typename T>
__device__ void attn_merge_impl(const float* part_ml, const float* part_o, T* out, float* lse, size_t rows,
                                unsigned splits, unsigned d) {
    unsigned lane = threadIdx.x & 31u;
    size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= rows) return;
    float m = -POS_INF;
    for (unsigned sp = 0; sp < splits; ++sp) m = fmaxf(m, part_ml[2 * (row * splits + sp)]);
    float l = 0.0f, acc[ATT_PER_LANE];
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] = 0.0f;
    for (unsigned sp = 0; sp < splits; ++sp) {
        size_t slot = row * splits + sp;
        float ms = part_ml[2 * slot], ls = part_ml[2 * slot + 1];
        if (ls == 0.0f) continue;
        float w = expf(ms - m);
        l += w * ls;
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c)
            if (lane + 32 * c < d) acc[c] += w * part_o[slot * d + lane + 32 * c];
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c)
        if (lane + 32 * c < d) out[row * d + lane + 32 * c] = from_f32<T>(acc[c] * inv);
    if (lane == 0) lse[row] = l > 0.0f ? m + logf(l) : -POS_INF;
}

// Dᵢ = dOᵢ · Oᵢ, a warp per row.
template <typename T>
__device__ void attn_delta_impl(const T* out, const T* dout, float* delta, size_t rows, unsigned d) {
    size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= rows) return;
    float o[ATT_PER_LANE], g[ATT_PER_LANE];
    load_row(out + row * d, d, o);
    load_row(dout + row * d, d, g);
    float dot = lane_dot(o, g);
    if ((threadIdx.x & 31u) == 0) delta[row] = dot;
}

// dQᵢ = scale Σⱼ dSᵢⱼ Kⱼ with Pᵢⱼ = e^(scale qᵢ·kⱼ − Lᵢ), dSᵢⱼ = Pᵢⱼ (dOᵢ·Vⱼ − Dᵢ); a warp per query.
template <typename T>
__device__ void attn_dq_impl(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                             const float* delta, const int* pad, T* dq, AttnDims s, float scale) {
    unsigned lane = threadIdx.x & 31u;
    size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= (size_t)s.batch * s.heads * s.seq_q) return;
    unsigned i = (unsigned)(row % s.seq_q), h = (unsigned)((row / s.seq_q) % s.heads);
    unsigned b = (unsigned)(row / ((size_t)s.seq_q * s.heads)), g = h / (s.heads / s.kv_heads), d = s.head_dim;
    unsigned lo, hi;
    visible_keys(s, pad, b, i, &lo, &hi);
    float qv[ATT_PER_LANE], gv[ATT_PER_LANE], kv[ATT_PER_LANE], vv[ATT_PER_LANE], acc[ATT_PER_LANE];
    load_row(q + row * d, d, qv);
    load_row(dout + row * d, d, gv);
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] = 0.0f;
    float l = lse[row], di = delta[row];
    const T* kb = k + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    const T* vb = v + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    for (unsigned j = lo; j < hi; ++j) {
        load_row(kb + (size_t)j * d, d, kv);
        load_row(vb + (size_t)j * d, d, vv);
        float p = expf(scale * lane_dot(qv, kv) - l);
        float ds = p * (lane_dot(gv, vv) - di);
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] += scale * ds * kv[c];
    }
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c)
        if (lane + 32 * c < d) dq[row * d + lane + 32 * c] = from_f32<T>(acc[c]);
}

// dVⱼ = Σ Pᵢⱼ dOᵢ and dKⱼ = scale Σ dSᵢⱼ Qᵢ over the queries of every head of the group that see
// key j; a warp per key row (b, kv head, j), positions past Tk written as 0.
template <typename T>
__device__ void attn_dkv_impl(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                              const float* delta, const int* pad, T* dk, T* dv, AttnDims s, float scale) {
    unsigned lane = threadIdx.x & 31u;
    size_t key = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (key >= (size_t)s.batch * s.kv_heads * s.kv_stride) return;
    unsigned j = (unsigned)(key % s.kv_stride), g = (unsigned)((key / s.kv_stride) % s.kv_heads);
    unsigned b = (unsigned)(key / ((size_t)s.kv_stride * s.kv_heads)), d = s.head_dim;
    float kv[ATT_PER_LANE], vv[ATT_PER_LANE], dka[ATT_PER_LANE], dva[ATT_PER_LANE], qv[ATT_PER_LANE], gv[ATT_PER_LANE];
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) dka[c] = dva[c] = 0.0f;
    unsigned start = pad ? min((unsigned)pad[b], s.seq_k) : 0u;
    if (j < s.seq_k && j >= start) {
        load_row(k + key * d, d, kv);
        load_row(v + key * d, d, vv);
        unsigned group = s.heads / s.kv_heads, offset = s.seq_k - s.seq_q;
        // Causal: query i sees key j when offset + i ≥ j.
        unsigned first_i = s.causal ? (j > offset ? j - offset : 0u) : 0u;
        for (unsigned h = g * group; h < (g + 1) * group; ++h) {
            for (unsigned i = first_i; i < s.seq_q; ++i) {
                size_t row = ((size_t)b * s.heads + h) * s.seq_q + i;
                load_row(q + row * d, d, qv);
                load_row(dout + row * d, d, gv);
                float p = expf(scale * lane_dot(qv, kv) - lse[row]);
                float ds = p * (lane_dot(gv, vv) - delta[row]);
#pragma unroll
                for (unsigned c = 0; c < ATT_PER_LANE; ++c) {
                    dva[c] += p * gv[c];
                    dka[c] += scale * ds * qv[c];
                }
            }
        }
    }
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) {
        if (lane + 32 * c < d) {
            dk[key * d + lane + 32 * c] = from_f32<T>(dka[c]);
            dv[key * d + lane + 32 * c] = from_f32<T>(dva[c]);
        }
    }
}

#define ATTN_KERNELS(name, T)                                                                          \
    extern "C" __global__ void attn_forward_##name(const T* q, const T* k, const T* v, const int* pad,   \
                                                   T* out, float* lse, float* part_ml, float* part_o,   \
                                                   AttnDims s, unsigned splits, unsigned split_len,     \
                                                   float scale) {                                       \
        attn_forward_impl(q, k, v, pad, out, lse, part_ml, part_o, s, splits, split_len, scale);        \
    }                                                                                                   \
    extern "C" __global__ void attn_merge_##name(const float* part_ml, const float* part_o, T* out,     \
                                                 float* lse, size_t rows, unsigned splits, unsigned d) { \
        attn_merge_impl(part_ml, part_o, out, lse, rows, splits, d);                                    \
    }                                                                                                   \
    extern "C" __global__ void attn_delta_##name(const T* out, const T* dout, float* delta, size_t rows, \
                                                 unsigned d) {                                          \
        attn_delta_impl(out, dout, delta, rows, d);                                                     \
    }                                                                                                   \
    extern "C" __global__ void attn_dq_##name(const T* q, const T* k, const T* v, const T* dout,         \
                                              const float* lse, const float* delta, const int* pad,      \
                                              T* dq, AttnDims s, float scale) {                          \
        attn_dq_impl(q, k, v, dout, lse, delta, pad, dq, s, scale);                                      \
    }                                                                                                   \
    extern "C" __global__ void attn_dkv_##name(const T* q, const T* k, const T* v, const T* dout,        \
                                               const float* lse, const float* delta, const int* pad,     \
                                               T* dk, T* dv, AttnDims s, float scale) {                  \
        attn_dkv_impl(q, k, v, dout, lse, delta, pad, dk, dv, s, scale);                                 \
    }

ATTN_KERNELS(f32, float)
ATTN_KERNELS(f16, f16_t)
ATTN_KERNELS(bf16, bf16_t)
