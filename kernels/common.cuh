// Definitions shared by every kernel in kernels/*.cu. The kernel cache (llama-core,
// cuda/kernels.rs) prepends this file to each source before NVRTC compiles it, so kernels need
// no include paths and no CUDA toolkit headers.
//
// Half-precision values are carried as their bits (bf16_t, f16_t) and converted with the same
// rounding as the `half` crate on the CPU (nearest-even), so CPU and GPU results agree bit for bit.
// Inside formulas and in packed stores, bf16 rounds with the hardware's conversion (round_to,
// pack_bf16x2), which gives the same bits but for a NaN's payload.

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }

__device__ __forceinline__ float to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ T from_f32(float v);

template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// f32 -> bf16, round to nearest-even; NaN stays NaN (quiet bit set), as half::bf16::from_f32.
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    unsigned int u = __float_as_uint(v);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}

// f32 -> f16, IEEE round to nearest-even (subnormals and overflow to inf included). NaN keeps
// its sign and top payload bits with the quiet bit set, as half::f16::from_f32 does (the PTX
// conversion would give the canonical 0x7fff instead).
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
    f16_t r;
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)(((u >> 16) & 0x8000u) | 0x7e00u | ((u & 0x7fffffu) >> 13));
        return r;
    }
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

// v as T holds it, back in f32 (a rounding in the middle of a formula, as the CPU rounds).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// bf16 in one instruction from sm_80 on (cvt.rn: as from_f32 but for a NaN's payload, see
// pack_bf16x2).
template <> __device__ __forceinline__ float round_to<bf16_t>(float v) {
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return __uint_as_float((unsigned)h << 16);
#else
    return to_f32(from_f32<bf16_t>(v));
#endif
}

// A grid-stride loop over n elements: any grid size covers any n.
#define GRID_STRIDE_LOOP(i, n)                                                  \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);    \
         i += (size_t)gridDim.x * blockDim.x)

// +infinity (NVRTC has no math.h).
#define POS_INF __int_as_float(0x7f800000)

// Reductions. warp_*: every lane of a full warp gets the result. block_*: every thread of the
// block gets the result (blockDim.x a multiple of 32, at most 1024); safe to call repeatedly.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float block_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    v = is_max ? warp_max(v) : warp_sum(v);
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    unsigned warps = (blockDim.x + 31u) >> 5;
    float init = is_max ? -POS_INF : 0.0f;
    v = lane < warps ? partial[lane] : init;
    return is_max ? warp_max(v) : warp_sum(v);
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, false); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, true); }

// 16-byte vector access: PACK<T> elements of T move as one uint4 load or store. Kernels take
// the vector path when their pointers are 16-byte aligned and row lengths a multiple of the
// pack (checked in the kernel, uniformly across the grid) and fall back to scalar loops.
template <typename T> struct Pack {
    static const unsigned N = 16 / sizeof(T);
    union {
        uint4 raw;
        T v[16 / sizeof(T)];
    };
};

__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15u) == 0; }

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
    Pack<T> k;
    k.raw = *(const uint4*)p;
#pragma unroll
    for (unsigned i = 0; i < Pack<T>::N; ++i) out[i] = to_f32(k.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float* in) {
    Pack<T> k;
#pragma unroll
    for (unsigned i = 0; i < Pack<T>::N; ++i) k.v[i] = from_f32<T>(in[i]);
    *(uint4*)p = k.raw;
}

// Two values rounded to bf16 in one word (lo in the low half): one instruction from sm_80 on
// (cvt.rn.bf16x2.f32: nearest-even, as from_f32, but a NaN may lose its payload, which the GPU's
// arithmetic does not keep anyway).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned w;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
    return w;
#else
    return (unsigned)from_f32<bf16_t>(lo).bits | ((unsigned)from_f32<bf16_t>(hi).bits << 16);
#endif
}

template <>
__device__ __forceinline__ void store_pack<bf16_t>(bf16_t* p, const float* in) {
    *(uint4*)p = make_uint4(pack_bf16x2(in[0], in[1]), pack_bf16x2(in[2], in[3]), pack_bf16x2(in[4], in[5]),
                            pack_bf16x2(in[6], in[7]));
}
