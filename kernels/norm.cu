// Norms (llama-ops, src/cuda/norm.rs): RMSNorm (Llama, HF's rounding order), Gemma's RMSNorm,
// LayerNorm, and the backward passes. x, y, dy, dx: [rows, dim]; weight, bias: [dim].
// Forward kernels run one block per row (a block-stride loop over the row's channels) and
// reduce in f32. The backward writes dx and each row's statistics in one kernel; the weight
// gradients are then summed over rows by norm_dw_partial (columns × row slabs) and
// norm_dw_finish (over slabs), a fixed order, so results do not vary from run to run.

// Visits a row of `dim` elements, a 16-byte pack per step when `vec`, else one element:
// f(first_index, values, count).
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* row, unsigned dim, bool vec, F f) {
    const unsigned N = Pack<T>::N;
    if (vec) {
        for (unsigned p = threadIdx.x; p < dim / N; p += blockDim.x) {
            float v[N];
            load_pack(row + p * N, v);
            f(p * N, v, N);
        }
    } else {
        for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
            float v = to_f32(row[i]);
            f(i, &v, 1u);
        }
    }
}

// Writes a row: out[i] = g(i, x_i, w_i) for every element, packed when `vec`.
template <typename T, typename G>
__device__ __forceinline__ void map_row(const T* x, const T* w, T* out, unsigned dim, bool vec, G g) {
    const unsigned N = Pack<T>::N;
    if (vec) {
        for (unsigned p = threadIdx.x; p < dim / N; p += blockDim.x) {
            float v[N], wv[N];
            load_pack(x + p * N, v);
            load_pack(w + p * N, wv);
#pragma unroll
            for (unsigned k = 0; k < N; ++k) v[k] = g(p * N + k, v[k], wv[k]);
            store_pack(out + p * N, v);
        }
    } else {
        for (unsigned i = threadIdx.x; i < dim; i += blockDim.x)
            out[i] = from_f32<T>(g(i, to_f32(x[i]), to_f32(w[i])));
    }
}

// The vector path needs whole packs per row and 16-byte aligned buffers.
template <typename T>
__device__ __forceinline__ bool rows_vectorisable(unsigned dim, const void* a, const void* b, const void* c) {
    return dim % Pack<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

// r = 1 / sqrt(mean(x²) + eps) of one row, every thread gets it.
template <typename T>
__device__ float row_rms_scale(const T* x, unsigned dim, float eps, bool vec) {
    float ss = 0.0f;
    for_row(x, dim, vec, [&](unsigned, const float* v, unsigned count) {
        for (unsigned k = 0; k < count; ++k) ss += v[k] * v[k];
    });
    return 1.0f / sqrtf(block_sum(ss) / (float)dim + eps);
}

// Mean and 1 / sqrt(var + eps) of one row (biased variance, two passes).
template <typename T>
__device__ void row_moments(const T* x, unsigned dim, float eps, bool vec, float* mean, float* rstd) {
    float s = 0.0f;
    for_row(x, dim, vec, [&](unsigned, const float* v, unsigned count) {
        for (unsigned k = 0; k < count; ++k) s += v[k];
    });
    float m = block_sum(s) / (float)dim;
    float sq = 0.0f;
    for_row(x, dim, vec, [&](unsigned, const float* v, unsigned count) {
        for (unsigned k = 0; k < count; ++k) sq += (v[k] - m) * (v[k] - m);
    });
    *mean = m;
    *rstd = 1.0f / sqrtf(block_sum(sq) / (float)dim + eps);
}

// Packs per thread that rms_norm keeps in registers between its passes over a row. The host
// sizes a row's block to hold the row in them (norm.rs, row_blocks: a warp for 2,048 bf16
// channels, two for 4,096), so each thread has ROW_PACKS loads in flight and the block reduces
// across a warp or two (benches/experiments/rms_norm_blocks.cu).
#define ROW_PACKS 8

// y = w · T(x · r)  (gemma = 0)   or   y = T(x · r · (1 + w))  (gemma = 1)
template <typename T>
__device__ __forceinline__ float rms_out(float v, float r, float wi, int gemma) {
    float normed = __fmul_rn(v, r);
    return gemma ? __fmul_rn(normed, __fadd_rn(1.0f, wi)) : __fmul_rn(wi, round_to<T>(normed));
}

// A row of up to ROW_PACKS packs per thread is read once into registers and written; longer or
// unaligned rows are read twice (the second time mostly from L1/L2). The weights are read after
// the reduction: loaded beside x they cost registers and ran slower (rms_norm_blocks.cu).
template <typename T>
__device__ void rms_norm_impl(const T* x, const T* w, T* y, unsigned dim, float eps, int gemma) {
    const unsigned N = Pack<T>::N;
    size_t row = blockIdx.x;
    const T* xr = x + row * dim;
    T* yr = y + row * dim;
    bool vec = rows_vectorisable<T>(dim, x, w, y);
    unsigned packs = dim / N;
    if (vec && packs <= ROW_PACKS * blockDim.x) {
        Pack<T> xv[ROW_PACKS];
#pragma unroll
        for (int k = 0; k < ROW_PACKS; ++k) {
            unsigned p = threadIdx.x + k * blockDim.x;
            if (p < packs) xv[k].raw = *(const uint4*)(xr + p * N);
        }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < ROW_PACKS; ++k) {
            if (threadIdx.x + k * blockDim.x < packs) {
#pragma unroll
                for (unsigned i = 0; i < N; ++i) ss += to_f32(xv[k].v[i]) * to_f32(xv[k].v[i]);
            }
        }
        float r = 1.0f / sqrtf(block_sum(ss) / (float)dim + eps);
#pragma unroll
        for (int k = 0; k < ROW_PACKS; ++k) {
            unsigned p = threadIdx.x + k * blockDim.x;
            if (p < packs) {
                float wv[N], out[N];
                load_pack(w + p * N, wv);
#pragma unroll
                for (unsigned i = 0; i < N; ++i) out[i] = rms_out<T>(to_f32(xv[k].v[i]), r, wv[i], gemma);
                store_pack(yr + p * N, out);
            }
        }
        return;
    }
    float r = row_rms_scale(xr, dim, eps, vec);
    map_row(xr, w, yr, dim, vec, [&](unsigned, float v, float wi) { return rms_out<T>(v, r, wi, gemma); });
}

template <typename T>
__device__ void layer_norm_impl(const T* x, const T* w, const T* b, T* y, unsigned dim, float eps) {
    size_t row = blockIdx.x;
    const T* xr = x + row * dim;
    T* yr = y + row * dim;
    bool vec = rows_vectorisable<T>(dim, x, w, y) && aligned16(b);
    float mean, rstd;
    row_moments(xr, dim, eps, vec, &mean, &rstd);
    map_row(xr, w, yr, dim, vec, [&](unsigned i, float v, float wi) {
        return (v - mean) * rstd * wi + to_f32(b[i]);
    });
}

// RMSNorm backward, dx part: dx = r·w·dy − x·r³·Σ(w·dy·x)/C (+ res, a residual branch's
// gradient, when not null); saves r per row when rstd_out is not null. One pass over the row
// for both sums, one for dx.
template <typename T>
__device__ void rms_norm_backward_impl(const T* x, const T* w, const T* dy, const T* res, T* dx,
                                       float* rstd_out, unsigned dim, float eps) {
    size_t row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    const T* rr = res ? res + row * dim : nullptr;
    T* dxr = dx + row * dim;
    const unsigned N = Pack<T>::N;
    bool vec = rows_vectorisable<T>(dim, x, dy, dx) && aligned16(w) && (!res || aligned16(res));
    float ss = 0.0f, s = 0.0f;
    if (vec) {
        for (unsigned p = threadIdx.x; p < dim / N; p += blockDim.x) {
            float xv[N], wv[N], gv[N];
            load_pack(xr + p * N, xv);
            load_pack(w + p * N, wv);
            load_pack(dyr + p * N, gv);
#pragma unroll
            for (unsigned k = 0; k < N; ++k) {
                ss += xv[k] * xv[k];
                s += wv[k] * gv[k] * xv[k];
            }
        }
    } else {
        for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
            float xi = to_f32(xr[i]);
            ss += xi * xi;
            s += to_f32(w[i]) * to_f32(dyr[i]) * xi;
        }
    }
    float r = 1.0f / sqrtf(block_sum(ss) / (float)dim + eps);
    float coef = r * r * r * block_sum(s) / (float)dim;
    if (vec) {
        for (unsigned p = threadIdx.x; p < dim / N; p += blockDim.x) {
            float xv[N], wv[N], gv[N], rv[N];
            load_pack(xr + p * N, xv);
            load_pack(w + p * N, wv);
            load_pack(dyr + p * N, gv);
            if (rr) load_pack(rr + p * N, rv);
#pragma unroll
            for (unsigned k = 0; k < N; ++k)
                xv[k] = r * wv[k] * gv[k] - xv[k] * coef + (rr ? rv[k] : 0.0f);
            store_pack(dxr + p * N, xv);
        }
    } else {
        for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
            float v = r * to_f32(w[i]) * to_f32(dyr[i]) - to_f32(xr[i]) * coef;
            dxr[i] = from_f32<T>(rr ? v + to_f32(rr[i]) : v);
        }
    }
    if (rstd_out && threadIdx.x == 0) rstd_out[row] = r;
}

// LayerNorm backward, dx part: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = w·dy; saves μ, rstd.
template <typename T>
__device__ void layer_norm_backward_impl(const T* x, const T* w, const T* dy, T* dx, float* mean_out,
                                         float* rstd_out, unsigned dim, float eps) {
    size_t row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    T* dxr = dx + row * dim;
    float mean, rstd;
    row_moments(xr, dim, eps, rows_vectorisable<T>(dim, x, dy, dx), &mean, &rstd);
    float gs = 0.0f, gxs = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = to_f32(w[i]) * to_f32(dyr[i]);
        gs += g;
        gxs += g * (to_f32(xr[i]) - mean) * rstd;
    }
    float g_mean = block_sum(gs) / (float)dim;
    float gx_mean = block_sum(gxs) / (float)dim;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = to_f32(w[i]) * to_f32(dyr[i]);
        float xhat = (to_f32(xr[i]) - mean) * rstd;
        dxr[i] = from_f32<T>(rstd * (g - g_mean - xhat * gx_mean));
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// Partial weight gradients: block (x, y) sums columns [x·blockDim, …) over rows
// [y·rows_per_slab, …): dw_part[y][c] = Σ dy·x̂, db_part[y][c] = Σ dy (db_part may be null);
// x̂ = (x − mean)·rstd with mean null for RMSNorm.
template <typename T>
__device__ void norm_dw_partial_impl(const T* x, const T* dy, const float* mean, const float* rstd,
                                     float* dw_part, float* db_part, size_t rows, unsigned dim,
                                     size_t rows_per_slab) {
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    size_t first = (size_t)blockIdx.y * rows_per_slab;
    size_t last = min(rows, first + rows_per_slab);
    float dw = 0.0f, db = 0.0f;
    for (size_t r = first; r < last; ++r) {
        float g = to_f32(dy[r * dim + c]);
        float xhat = (to_f32(x[r * dim + c]) - (mean ? mean[r] : 0.0f)) * rstd[r];
        dw += g * xhat;
        db += g;
    }
    dw_part[(size_t)blockIdx.y * dim + c] = dw;
    if (db_part) db_part[(size_t)blockIdx.y * dim + c] = db;
}

// out[c] = Σ_s part[s][c], in slab order.
extern "C" __global__ void norm_dw_finish(const float* part, float* out, unsigned slabs, unsigned dim) {
    GRID_STRIDE_LOOP(c, dim) {
        float acc = 0.0f;
        for (unsigned s = 0; s < slabs; ++s) acc += part[(size_t)s * dim + c];
        out[c] = acc;
    }
}

#define NORM_KERNELS(name, T)                                                                   \
    extern "C" __global__ void rms_norm_##name(const T* x, const T* w, T* y, unsigned dim,        \
                                               float eps, int gemma) {                           \
        rms_norm_impl(x, w, y, dim, eps, gemma);                                                 \
    }                                                                                            \
    extern "C" __global__ void layer_norm_##name(const T* x, const T* w, const T* b, T* y,        \
                                                 unsigned dim, float eps) {                      \
        layer_norm_impl(x, w, b, y, dim, eps);                                                   \
    }                                                                                            \
    extern "C" __global__ void rms_norm_backward_##name(const T* x, const T* w, const T* dy,      \
                                                        const T* res, T* dx, float* rstd,        \
                                                        unsigned dim, float eps) {               \
        rms_norm_backward_impl(x, w, dy, res, dx, rstd, dim, eps);                               \
    }                                                                                            \
    extern "C" __global__ void layer_norm_backward_##name(const T* x, const T* w, const T* dy,    \
                                                          T* dx, float* mean, float* rstd,       \
                                                          unsigned dim, float eps) {             \
        layer_norm_backward_impl(x, w, dy, dx, mean, rstd, dim, eps);                            \
    }                                                                                            \
    extern "C" __global__ void norm_dw_partial_##name(const T* x, const T* dy, const float* mean, \
                                                      const float* rstd, float* dw_part,          \
                                                      float* db_part, size_t rows, unsigned dim, \
                                                      size_t rows_per_slab) {                    \
        norm_dw_partial_impl(x, dy, mean, rstd, dw_part, db_part, rows, dim, rows_per_slab);     \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(f16, f16_t)
NORM_KERNELS(bf16, bf16_t)
