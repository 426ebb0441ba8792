// Rotary position embedding (llama-rope), rotate-half convention, in place on
// x [batch, heads, seq, head_dim]; cos/sin are [n_positions, half] f32 tables with the attention
// scaling folded in; positions holds seq ids (shared by the batch) or batch*seq ids.
//   forward:  y1 = x1*cos - x2*sin,  y2 = x2*cos + x1*sin    (sign = +1)
//   backward: the same with sin negated                       (sign = -1)
// One thread per (row, i < half). The _rn intrinsics keep NVRTC from fusing the products into
// FMAs, so the result equals the CPU path (llama-rope/src/apply.rs) bit for bit.

template <typename T>
__device__ void rope_impl(T* x, const float* cos, const float* sin, const unsigned int* positions,
                          size_t rows, unsigned int heads, unsigned int seq, unsigned int head_dim,
                          unsigned int half, unsigned int per_sequence, float sign) {
    GRID_STRIDE_LOOP(idx, rows * half) {
        size_t row = idx / half;
        unsigned int i = (unsigned int)(idx % half);
        unsigned int t = (unsigned int)(row % seq);
        size_t b = row / ((size_t)seq * heads);
        unsigned int p = positions[per_sequence ? b * seq + t : t];
        float c = cos[(size_t)p * half + i];
        float s = __fmul_rn(sign, sin[(size_t)p * half + i]);
        T* r = x + row * head_dim;
        float a = to_f32(r[i]);
        float bb = to_f32(r[i + half]);
        r[i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(bb, s)));
        r[i + half] = from_f32<T>(__fadd_rn(__fmul_rn(bb, c), __fmul_rn(a, s)));
    }
}

#define ROPE(name, T)                                                                      \
    extern "C" __global__ void rope_##name(T* x, const float* cos, const float* sin,       \
                                           const unsigned int* positions, size_t rows,     \
                                           unsigned int heads, unsigned int seq,           \
                                           unsigned int head_dim, unsigned int half,       \
                                           unsigned int per_sequence, float sign) {        \
        rope_impl(x, cos, sin, positions, rows, heads, seq, head_dim, half, per_sequence, sign); \
    }

ROPE(f32, float)
ROPE(bf16, bf16_t)
