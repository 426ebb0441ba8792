// Rotary position embedding (llama-rope), rotate-half convention, in place on
// x [batch, heads, seq, head_dim]; cos/sin are [n_positions, half] f32 tables with the attention
// scaling folded in; positions holds seq ids (shared by the batch) or batch*seq ids.
//   forward:  y1 = x1*cos - x2*sin,  y2 = x2*cos + x1*sin    (sign = +1)
//   backward: the same with sin negated                       (sign = -1)
// Block layout: threadIdx.x walks the frequency pairs of a row (coalesced; 16-byte packs of
// them where rows align), threadIdx.y picks the row, so the row's position is looked up once
// per row rather than once per element.
// The _rn intrinsics keep NVRTC from fusing the products into FMAs, so the result equals the
// CPU path (llama-rope/src/apply.rs) bit for bit.

// One row's frequency pairs, this thread's share: from and to may be the same row (in place:
// each pair is read before it is written, by the same thread). With `vec`, a thread takes a
// 16-byte pack of pairs at a time (see rope_vec), as the launch sizes threadIdx.x for.
template <typename T>
__device__ __forceinline__ void rotate_row(const T* from, T* to, const float* cos_row, const float* sin_row,
                                           unsigned int half, float sign, bool vec) {
    const unsigned int N = Pack<T>::N;
    if (vec) {
        for (unsigned int i = threadIdx.x * N; i < half; i += blockDim.x * N) {
            float a[N], bb[N], c[N], s[N];
            load_pack(from + i, a);
            load_pack(from + i + half, bb);
#pragma unroll
            for (unsigned int k = 0; k < N; k += 4) {
                *(float4*)(c + k) = *(const float4*)(cos_row + i + k);
                *(float4*)(s + k) = *(const float4*)(sin_row + i + k);
            }
#pragma unroll
            for (unsigned int k = 0; k < N; ++k) {
                float sk = __fmul_rn(sign, s[k]);
                float y1 = __fsub_rn(__fmul_rn(a[k], c[k]), __fmul_rn(bb[k], sk));
                bb[k] = __fadd_rn(__fmul_rn(bb[k], c[k]), __fmul_rn(a[k], sk));
                a[k] = y1;
            }
            store_pack(to + i, a);
            store_pack(to + i + half, bb);
        }
        return;
    }
    for (unsigned int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cos_row[i];
        float s = __fmul_rn(sign, sin_row[i]);
        float a = to_f32(from[i]);
        float bb = to_f32(from[i + half]);
        to[i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(bb, s)));
        to[i + half] = from_f32<T>(__fadd_rn(__fmul_rn(bb, c), __fmul_rn(a, s)));
    }
}

// Packs fit when both halves of every row and every table row start 16-byte aligned: half and
// head_dim whole packs (a pack is at least 4 elements, so the f32 table rows align too).
template <typename T>
__device__ __forceinline__ bool rope_vec(unsigned int half, unsigned int head_dim, const void* a,
                                         const void* b) {
    const unsigned int N = Pack<T>::N;
    return half % N == 0 && head_dim % N == 0 && aligned16(a) && aligned16(b);
}

template <typename T>
__device__ void rope_impl(T* x, const float* cos, const float* sin, const unsigned int* positions,
                          size_t rows, unsigned int heads, unsigned int seq, unsigned int head_dim,
                          unsigned int half, unsigned int per_sequence, float sign) {
    size_t row_step = (size_t)gridDim.x * blockDim.y;
    bool vec = rope_vec<T>(half, head_dim, x, x);
    for (size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += row_step) {
        unsigned int t = (unsigned int)(row % seq);
        size_t b = row / ((size_t)seq * heads);
        unsigned int p = positions[per_sequence ? b * seq + t : t];
        T* r = x + row * head_dim;
        rotate_row(r, r, cos + (size_t)p * half, sin + (size_t)p * half, half, sign, vec);
    }
}

// The same rotation fused with the move between the projections' token-major layout
// [batch, seq, heads, head_dim] and attention's head-major one [batch, heads, seq, head_dim]:
// to_heads reads token-major src and writes head-major dst (the head split of q and k), else
// the reverse (the merge of their gradients, with sign = -1). `row` counts head-major rows;
// dimensions past the rotary width are copied.
template <typename T>
__device__ void rope_moving_impl(const T* src, T* dst, const float* cos, const float* sin,
                                 const unsigned int* positions, size_t rows, unsigned int heads,
                                 unsigned int seq, unsigned int head_dim, unsigned int half,
                                 unsigned int per_sequence, float sign, int to_heads) {
    size_t row_step = (size_t)gridDim.x * blockDim.y;
    bool vec = rope_vec<T>(half, head_dim, src, dst);
    for (size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += row_step) {
        unsigned int t = (unsigned int)(row % seq), h = (unsigned int)((row / seq) % heads);
        size_t b = row / ((size_t)seq * heads);
        size_t token_row = (b * seq + t) * heads + h;
        unsigned int p = positions[per_sequence ? b * seq + t : t];
        const T* from = src + (to_heads ? token_row : row) * head_dim;
        T* to = dst + (to_heads ? row : token_row) * head_dim;
        rotate_row(from, to, cos + (size_t)p * half, sin + (size_t)p * half, half, sign, vec);
        for (unsigned int i = 2 * half + threadIdx.x; i < head_dim; i += blockDim.x) to[i] = from[i];
    }
}

#define ROPE(name, T)                                                                      \
    extern "C" __global__ void rope_##name(T* x, const float* cos, const float* sin,       \
                                           const unsigned int* positions, size_t rows,     \
                                           unsigned int heads, unsigned int seq,           \
                                           unsigned int head_dim, unsigned int half,       \
                                           unsigned int per_sequence, float sign) {        \
        rope_impl(x, cos, sin, positions, rows, heads, seq, head_dim, half, per_sequence, sign); \
    }                                                                                      \
    extern "C" __global__ void rope_moving_##name(const T* src, T* dst, const float* cos,  \
                                                  const float* sin,                        \
                                                  const unsigned int* positions, size_t rows, \
                                                  unsigned int heads, unsigned int seq,    \
                                                  unsigned int head_dim, unsigned int half, \
                                                  unsigned int per_sequence, float sign,   \
                                                  int to_heads) {                          \
        rope_moving_impl(src, dst, cos, sin, positions, rows, heads, seq, head_dim, half,  \
                         per_sequence, sign, to_heads);                                    \
    }

ROPE(f32, float)
ROPE(bf16, bf16_t)
