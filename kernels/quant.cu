// Quantised weights (llama-ops, src/cuda/quant.rs): GGUF Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K and
// bitsandbytes NF4 (block layouts in src/quant/blocks.rs). decode_quarter<FMT> decodes 8
// weights of a row with the roundings of the CPU decoder (the _rn intrinsics keep
// NVRTC from fusing them into FMAs), so dequantised values are the same bits on both sides.
//   dequantize_<fmt>:  out [rows, cols] f32, one thread per 8 weights (dequantize_bf16_<fmt>:
//                      the same values rounded to bf16)
//   matvec_<fmt>:      y [rows] = W · x, a warp per row (matvec4_<fmt>: per 4 rows)

#define FMT_Q4_0 0
#define FMT_Q4_1 1
#define FMT_Q8_0 2
#define FMT_Q4_K 3
#define FMT_Q5_K 4
#define FMT_Q6_K 5
#define FMT_NF4 6

__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ float f16_at(const unsigned char* p) {
    f16_t h;
    h.bits = (unsigned short)(p[0] | (p[1] << 8));
    return to_f32(h);
}

// ggml get_scale_min_k4: 6-bit scale and min of sub-block j.
__device__ __forceinline__ void scale_min_k4(unsigned j, const unsigned char* q, float* sc, float* m) {
    unsigned s, n;
    if (j < 4) {
        s = q[j] & 63u;
        n = q[j + 4] & 63u;
    } else {
        s = (q[j + 4] & 0xfu) | ((q[j - 4] >> 6) << 4);
        n = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    *sc = (float)s;
    *m = (float)n;
}

template <int FMT> struct Layout;
template <> struct Layout<FMT_Q4_0> { static const unsigned len = 32, bytes = 18; };
template <> struct Layout<FMT_Q4_1> { static const unsigned len = 32, bytes = 20; };
template <> struct Layout<FMT_Q8_0> { static const unsigned len = 32, bytes = 34; };
template <> struct Layout<FMT_Q4_K> { static const unsigned len = 256, bytes = 144; };
template <> struct Layout<FMT_Q5_K> { static const unsigned len = 256, bytes = 176; };
template <> struct Layout<FMT_Q6_K> { static const unsigned len = 256, bytes = 210; };
template <> struct Layout<FMT_NF4> { static const unsigned len = 64, bytes = 36; };

// Loads of 2 and 4 bytes at offsets the block layouts keep aligned.
__device__ __forceinline__ unsigned ld16(const unsigned char* p) { return *(const unsigned short*)p; }
__device__ __forceinline__ unsigned ld32(const unsigned char* p) { return *(const unsigned int*)p; }

// A group is 32 consecutive weights of a row (one Q4_0/Q4_1/Q8_0 block, half an NF4 block, an
// eighth of a K-quant block) and a quarter is 8 of them: the work of one thread. decode_quarter
// writes quarter `q` of group `g` into w[8] with the CPU decoder's roundings; w[0..4] are the
// weights at x offsets o.x … o.x + 3 within the group and w[4..8] those at o.y … o.y + 3.
template <int FMT>
__device__ __forceinline__ uint2 quarter_offsets(unsigned q) {
    // Q4_0 and Q4_1 keep weight j in the low nibble and j + 16 in the high nibble of byte j.
    if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1) return make_uint2(4 * q, 16 + 4 * q);
    return make_uint2(8 * q, 8 * q + 4);
}

template <int FMT>
__device__ __forceinline__ void decode_quarter(const unsigned char* row, unsigned g, unsigned q,
                                               const float* nf4, float* w) {
    if (FMT == FMT_Q4_0) {
        const unsigned char* b = row + (size_t)g * 18;
        float d = f16_at(b);
        unsigned bytes = ld16(b + 2 + 4 * q) | (ld16(b + 4 + 4 * q) << 16);
#pragma unroll
        for (unsigned k = 0; k < 4; ++k) {
            w[k] = __fmul_rn((float)((int)((bytes >> (8 * k)) & 0xfu) - 8), d);
            w[4 + k] = __fmul_rn((float)((int)((bytes >> (8 * k + 4)) & 0xfu) - 8), d);
        }
    } else if (FMT == FMT_Q4_1) {
        const unsigned char* b = row + (size_t)g * 20;
        float d = f16_at(b), m = f16_at(b + 2);
        unsigned bytes = ld32(b + 4 + 4 * q);
#pragma unroll
        for (unsigned k = 0; k < 4; ++k) {
            w[k] = __fadd_rn(__fmul_rn((float)((bytes >> (8 * k)) & 0xfu), d), m);
            w[4 + k] = __fadd_rn(__fmul_rn((float)((bytes >> (8 * k + 4)) & 0xfu), d), m);
        }
    } else if (FMT == FMT_Q8_0) {
        const unsigned char* b = row + (size_t)g * 34 + 2 + 8 * q;
        float d = f16_at(row + (size_t)g * 34);
#pragma unroll
        for (unsigned i = 0; i < 4; ++i) {
            unsigned pair = ld16(b + 2 * i);
            w[2 * i] = __fmul_rn((float)(signed char)(pair & 0xffu), d);
            w[2 * i + 1] = __fmul_rn((float)(signed char)(pair >> 8), d);
        }
    } else if (FMT == FMT_NF4) {
        const unsigned char* b = row + (size_t)(g / 2) * 36;
        float absmax = __uint_as_float(ld32(b + 32));
        unsigned codes = ld32(b + 16 * (g % 2) + 4 * q);
#pragma unroll
        for (unsigned k = 0; k < 4; ++k) {
            unsigned byte = (codes >> (8 * k)) & 0xffu;
            w[2 * k] = __fmul_rn(nf4[byte >> 4], absmax);
            w[2 * k + 1] = __fmul_rn(nf4[byte & 0xfu], absmax);
        }
    } else if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) {
        const unsigned char* b = row + (size_t)(g / 8) * (FMT == FMT_Q4_K ? 144 : 176);
        unsigned sub = g % 8, pair = sub / 2, high = sub % 2;
        float sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        float d1 = __fmul_rn(f16_at(b), sc), min1 = __fmul_rn(f16_at(b + 2), m);
        const unsigned char* qs = b + (FMT == FMT_Q4_K ? 16 : 48) + 32 * pair + 8 * q;
#pragma unroll
        for (unsigned i = 0; i < 2; ++i) {
            unsigned bytes = ld32(qs + 4 * i);
            unsigned h = FMT == FMT_Q5_K ? ld32(b + 16 + 8 * q + 4 * i) : 0u;
#pragma unroll
            for (unsigned k = 0; k < 4; ++k) {
                unsigned byte = (bytes >> (8 * k)) & 0xffu;
                unsigned v = high ? (byte >> 4) : (byte & 0xfu);
                if (FMT == FMT_Q5_K && ((h >> (8 * k)) & (1u << sub))) v += 16;
                w[4 * i + k] = __fsub_rn(__fmul_rn(d1, (float)v), min1);
            }
        }
    } else {  // FMT_Q6_K
        const unsigned char* b = row + (size_t)(g / 8) * 210;
        unsigned sub = g % 8, half = sub / 4, quarter = sub % 4, l0 = 8 * q;
        const unsigned char* ql = b + 64 * half + ((quarter & 1u) ? 32 : 0) + l0;
        const unsigned char* qh = b + 128 + 32 * half + l0;
        const signed char* sc = (const signed char*)(b + 192 + 8 * half + 2 * quarter);
        float scale = __fmul_rn(f16_at(b + 208), (float)sc[l0 / 16]);
#pragma unroll
        for (unsigned i = 0; i < 4; ++i) {
            unsigned lo = ld16(ql + 2 * i), hi = ld16(qh + 2 * i);
#pragma unroll
            for (unsigned k = 0; k < 2; ++k) {
                unsigned byte = (lo >> (8 * k)) & 0xffu;
                unsigned nib = quarter < 2 ? (byte & 0xfu) : (byte >> 4);
                unsigned h2 = (((hi >> (8 * k)) & 0xffu) >> (2 * quarter)) & 3u;
                w[2 * i + k] = __fmul_rn(scale, (float)((int)(nib | (h2 << 4)) - 32));
            }
        }
    }
}

// The NF4 table in shared memory (indexing __constant__ memory with per-thread codes would
// serialise); every kernel calls this before its loop.
__device__ __forceinline__ const float* nf4_table() {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = NF4_TABLE[threadIdx.x];
    __syncthreads();
    return table;
}

// Four consecutive values at dst (16-byte aligned for f32, 8-byte for bf16).
__device__ __forceinline__ void store4(float* dst, const float* v) {
    *(float4*)dst = make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store4(bf16_t* dst, const float* v) {
    *(uint2*)dst = make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
}

// One thread per quarter (8 weights), written as two runs of four: f32, or bf16 rounded from
// the same f32 values (the operand of a QLoRA product, without an f32 copy in between).
template <int FMT, typename T>
__device__ void dequantize_impl(const unsigned char* w, T* out, size_t rows, unsigned cols) {
    const float* nf4 = nf4_table();
    size_t row_bytes = (size_t)(cols / Layout<FMT>::len) * Layout<FMT>::bytes;
    size_t quarters = (size_t)cols / 8;
    GRID_STRIDE_LOOP(i, rows * quarters) {
        size_t r = i / quarters;
        unsigned within = (unsigned)(i % quarters), g = within / 4, q = within % 4;
        float v[8];
        decode_quarter<FMT>(w + r * row_bytes, g, q, nf4, v);
        uint2 o = quarter_offsets<FMT>(q);
        T* dst = out + r * cols + (size_t)g * 32;
        store4(dst + o.x, v);
        store4(dst + o.y, v + 4);
    }
}

// ROWS rows per warp; in a warp, 4 lanes share a group (a quarter each) and the warp walks 8
// groups per step, so each step reads 8 consecutive blocks' worth of bytes of every row.
template <int FMT, int ROWS>
__device__ void matvec_impl(const unsigned char* w, const float* x, float* y, size_t rows,
                            unsigned cols) {
    const float* nf4 = nf4_table();
    size_t row_bytes = (size_t)(cols / Layout<FMT>::len) * Layout<FMT>::bytes;
    unsigned groups = cols / 32, lane = threadIdx.x & 31u, q = lane & 3u;
    size_t first = ((size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * ROWS;
    if (first >= rows) return;
    uint2 o = quarter_offsets<FMT>(q);
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    for (unsigned g = lane / 4; g < groups; g += 8) {
        float4 xa = *(const float4*)(x + (size_t)g * 32 + o.x);
        float4 xb = *(const float4*)(x + (size_t)g * 32 + o.y);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (first + r >= rows) break;
            float v[8];
            decode_quarter<FMT>(w + (first + r) * row_bytes, g, q, nf4, v);
            acc[r] += v[0] * xa.x + v[1] * xa.y + v[2] * xa.z + v[3] * xa.w + v[4] * xb.x +
                      v[5] * xb.y + v[6] * xb.z + v[7] * xb.w;
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float total = warp_sum(acc[r]);
        if (lane == 0 && first + r < rows) y[first + r] = total;
    }
}

#define QUANT_KERNELS(name, FMT)                                                                  \
    extern "C" __global__ void dequantize_##name(const unsigned char* w, float* out, size_t rows,  \
                                                 unsigned cols) {                                  \
        dequantize_impl<FMT>(w, out, rows, cols);                                                  \
    }                                                                                              \
    extern "C" __global__ void dequantize_bf16_##name(const unsigned char* w, bf16_t* out,         \
                                                      size_t rows, unsigned cols) {                \
        dequantize_impl<FMT>(w, out, rows, cols);                                                  \
    }                                                                                              \
    extern "C" __global__ void matvec_##name(const unsigned char* w, const float* x, float* y,     \
                                             size_t rows, unsigned cols) {                         \
        matvec_impl<FMT, 1>(w, x, y, rows, cols);                                                  \
    }                                                                                              \
    extern "C" __global__ void matvec4_##name(const unsigned char* w, const float* x, float* y,    \
                                              size_t rows, unsigned cols) {                        \
        matvec_impl<FMT, 4>(w, x, y, rows, cols);                                                  \
    }

QUANT_KERNELS(q4_0, FMT_Q4_0)
QUANT_KERNELS(q4_1, FMT_Q4_1)
QUANT_KERNELS(q8_0, FMT_Q8_0)
QUANT_KERNELS(q4_k, FMT_Q4_K)
QUANT_KERNELS(q5_k, FMT_Q5_K)
QUANT_KERNELS(q6_k, FMT_Q6_K)
QUANT_KERNELS(nf4, FMT_NF4)

// QLoRA's NF4 with double-quantised absmaxes (llama-ops quant/nf4.rs, Nf4DoubleQuant): codes
// [blocks][32 bytes] (rows are whole 64-weight blocks, so the blocks run on across rows), and
// block b's absmax = map[absmax_codes[b]] · scales[b / 256] + offset, rounded as the CPU's
// Nf4DoubleQuant::absmax. One thread per 8 weights, as dequantize_impl's NF4 quarters, written
// as one 16-byte pack (out is 16-byte aligned: a whole buffer); bf16 rounded from the f32 values
// the CPU decodes from the expanded blocks.
extern "C" __global__ void dequantize_bf16_nf4_dq(const unsigned char* codes,
                                                  const unsigned char* absmax_codes,
                                                  const float* scales, const float* map,
                                                  float offset, bf16_t* out, size_t quarters) {
    const float* nf4 = nf4_table();
    __shared__ float dynamic[256];
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) dynamic[i] = map[i];
    __syncthreads();
    GRID_STRIDE_LOOP(i, quarters) {
        size_t block = i / 8;
        unsigned within = (unsigned)(i % 8);
        float absmax = __fadd_rn(__fmul_rn(dynamic[absmax_codes[block]], scales[block / 256]), offset);
        unsigned word = ld32(codes + block * 32 + 4 * within);
        float v[8];
#pragma unroll
        for (unsigned k = 0; k < 4; ++k) {
            unsigned byte = (word >> (8 * k)) & 0xffu;
            v[2 * k] = __fmul_rn(nf4[byte >> 4], absmax);
            v[2 * k + 1] = __fmul_rn(nf4[byte & 0xfu], absmax);
        }
        store_pack(out + block * 64 + within * 8, v);
    }
}
