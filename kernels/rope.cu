// Rotary position embedding (llama-rope), rotate-half convention, in place on
// x [batch, heads, seq, head_dim]; cos/sin are [n_positions, half] f32 tables with the attention
// scaling folded in; positions holds seq ids (shared by the batch) or batch*seq ids.
//   forward:  y1 = x1*cos - x2*sin,  y2 = x2*cos + x1*sin    (sign = +1)
//   backward: the same with sin negated                       (sign = -1)
// Block layout: threadIdx.x walks the frequency pairs of a row (coalesced), threadIdx.y picks
// the row, so the row's position is looked up once per row rather than once per element.
// The _rn intrinsics keep NVRTC from fusing the products into FMAs, so the result equals the
// CPU path (llama-rope/src/apply.rs) bit for bit.

template <typename T>
__device__ void rope_impl(T* x, const float* cos, const float* sin, const unsigned int* positions,
                          size_t rows, unsigned int heads, unsigned int seq, unsigned int head_dim,
                          unsigned int half, unsigned int per_sequence, float sign) {
    size_t row_step = (size_t)gridDim.x * blockDim.y;
    for (size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += row_step) {
        unsigned int t = (unsigned int)(row % seq);
        size_t b = row / ((size_t)seq * heads);
        unsigned int p = positions[per_sequence ? b * seq + t : t];
        const float* cos_row = cos + (size_t)p * half;
        const float* sin_row = sin + (size_t)p * half;
        T* r = x + row * head_dim;
        for (unsigned int i = threadIdx.x; i < half; i += blockDim.x) {
            float c = cos_row[i];
            float s = __fmul_rn(sign, sin_row[i]);
            float a = to_f32(r[i]);
            float bb = to_f32(r[i + half]);
            r[i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(bb, s)));
            r[i + half] = from_f32<T>(__fadd_rn(__fmul_rn(bb, c), __fmul_rn(a, s)));
        }
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
