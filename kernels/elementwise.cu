// Element-wise kernels of llama-core: add and dtype casts. Each value is widened to f32,
// combined, and rounded back, exactly as the CPU path (llama-core/src/cpu.rs) does.

template <typename T>
__device__ void add_impl(const T* a, const T* b, T* out, size_t n) {
    GRID_STRIDE_LOOP(i, n) { out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i])); }
}

template <typename S, typename D>
__device__ void cast_impl(const S* src, D* dst, size_t n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = from_f32<D>(to_f32(src[i])); }
}

#define ADD(name, T)                                                             \
    extern "C" __global__ void add_##name(const T* a, const T* b, T* out, size_t n) { \
        add_impl(a, b, out, n);                                                  \
    }

#define CAST(sname, S, dname, D)                                                 \
    extern "C" __global__ void cast_##sname##_##dname(const S* src, D* dst, size_t n) { \
        cast_impl(src, dst, n);                                                  \
    }

ADD(f32, float)
ADD(f16, f16_t)
ADD(bf16, bf16_t)

CAST(f32, float, f16, f16_t)
CAST(f32, float, bf16, bf16_t)
CAST(f16, f16_t, f32, float)
CAST(f16, f16_t, bf16, bf16_t)
CAST(bf16, bf16_t, f32, float)
CAST(bf16, bf16_t, f16, f16_t)
