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

// The dot product of a key row (global memory, D elements of T) with q (f32, shared memory),
// by one lane: 16-byte loads when D is a whole number of packs.
template <typename T>
__device__ __forceinline__ float row_dot(const T* row, const float* q, unsigned d) {
    const unsigned N = Pack<T>::N;
    float acc = 0.0f;
    if (d % N == 0) {
        for (unsigned c = 0; c < d; c += N) {
            float kv[16 / sizeof(T)];
            load_pack(row + c, kv);
#pragma unroll
            for (unsigned e = 0; e < N; ++e) acc += kv[e] * q[c + e];
        }
    } else {
        for (unsigned c = 0; c < d; ++c) acc += to_f32(row[c]) * q[c];
    }
    return acc;
}

// Forward, one warp per (query row, key split). Keys go 32 at a time: lane l scores key
// base + l on its own (so 32 key rows load at once), the warp takes the max and the sum of
// e^(s − m) by shuffles, and then every lane adds the 32 weighted value rows into its head
// dimensions. With one split the warp writes O and L; with several it writes its partial
// (max, sum, unnormalised output) for attn_merge.
template <typename T>
__device__ void attn_forward_impl(const T* q, const T* k, const T* v, const int* pad, T* out, float* lse,
                                  float* part_ml, float* part_o, AttnDims s, unsigned splits,
                                  unsigned split_len, float scale) {
    __shared__ float q_shared[8][ATT_MAX_D];
    unsigned lane = threadIdx.x & 31u, warp_in_block = threadIdx.x / 32;
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
    float* qs = q_shared[warp_in_block];
    for (unsigned c = lane; c < d; c += 32) qs[c] = scale * to_f32(q[row * d + c]);
    __syncwarp();
    float acc[ATT_PER_LANE];
#pragma unroll
    for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] = 0.0f;
    float m = -POS_INF, l = 0.0f;
    const T* kb = k + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    const T* vb = v + ((size_t)b * s.kv_heads + g) * s.kv_stride * d;
    for (unsigned base = lo; base < hi; base += 32) {
        unsigned j = base + lane;
        float sc = j < hi ? row_dot(kb + (size_t)j * d, qs, d) : -POS_INF;
        float new_m = fmaxf(m, warp_max(sc));
        float p = j < hi ? expf(sc - new_m) : 0.0f;
        float rescale = expf(m - new_m);
        l = l * rescale + warp_sum(p);
        m = new_m;
#pragma unroll
        for (unsigned c = 0; c < ATT_PER_LANE; ++c) acc[c] *= rescale;
        unsigned count = min(32u, hi - base);
        for (unsigned jj = 0; jj < count; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const T* vr = vb + (size_t)(base + jj) * d;
#pragma unroll
            for (unsigned c = 0; c < ATT_PER_LANE; ++c)
                if (lane + 32 * c < d) acc[c] += pj * to_f32(vr[lane + 32 * c]);
        }
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

// Tensor-core forward for bf16 and head_dim D ∈ {64, 128} (prefill): a block of 8 warps takes 128
// query rows of one (b, h), each warp 16 of them; K and V tiles of 64 keys are staged in shared
// memory (V transposed, so that P·V's operand runs along keys). S = Q Kᵀ and O += P V are
// mma.sync m16n8k16 bf16 products with f32 accumulators; the online softmax runs on the S
// fragments (each row's 16 values spread over the 4 lanes of a quad), P is rounded to bf16 for
// the second product as FlashAttention-2 does. Fragment layouts: PTX ISA, "Matrix fragments for
// mma.m16n8k16": lane = 4·group + t holds A rows group and group + 8 at columns 2t, 2t + 1 (and
// + 8), B column group at rows 2t, 2t + 1 (and + 8), C rows group and group + 8 at columns 2t,
// 2t + 1.
#define TC_ROWS 128
#define TC_KEYS 64

__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)from_f32<bf16_t>(lo).bits | ((unsigned)from_f32<bf16_t>(hi).bits << 16);
}

__device__ __forceinline__ unsigned ld_pair(const bf16_t* p) { return *(const unsigned*)p; }

template <int D>
__device__ void attn_forward_tc_impl(const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* pad,
                                     bf16_t* out, float* lse, AttnDims s, float scale) {
    __shared__ __align__(16) unsigned short ks[TC_KEYS][D + 8];
    __shared__ unsigned short vt[D][TC_KEYS + 8];
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x & 31u, grp = lane >> 2, t = lane & 3u;
    unsigned tiles = (s.seq_q + TC_ROWS - 1) / TC_ROWS;
    // Scores in log2 units, so that the exponentials are exp2: s · scale · log2(e).
    const float scale_log2 = scale * 1.4426950408889634f;
    unsigned bh = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    unsigned b = bh / s.heads, h = bh % s.heads, g = h / (s.heads / s.kv_heads);
    unsigned first_row = tile * TC_ROWS, row0 = first_row + warp * 16;
    const bf16_t* qb = q + (size_t)bh * s.seq_q * D;
    const bf16_t* kb = k + ((size_t)b * s.kv_heads + g) * s.kv_stride * D;
    const bf16_t* vb = v + ((size_t)b * s.kv_heads + g) * s.kv_stride * D;

    // This lane's two rows: row0 + grp (r = 0) and row0 + grp + 8 (r = 1), and their keys.
    unsigned rows[2] = {row0 + grp, row0 + grp + 8}, lo[2], hi[2];
    for (int r = 0; r < 2; ++r) {
        visible_keys(s, pad, b, min(rows[r], s.seq_q - 1), &lo[r], &hi[r]);
        if (rows[r] >= s.seq_q) hi[r] = lo[r];
    }
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned c0 = kk * 16 + 2 * t;
        qa[kk][0] = rows[0] < s.seq_q ? ld_pair(qb + (size_t)rows[0] * D + c0) : 0u;
        qa[kk][1] = rows[1] < s.seq_q ? ld_pair(qb + (size_t)rows[1] * D + c0) : 0u;
        qa[kk][2] = rows[0] < s.seq_q ? ld_pair(qb + (size_t)rows[0] * D + c0 + 8) : 0u;
        qa[kk][3] = rows[1] < s.seq_q ? ld_pair(qb + (size_t)rows[1] * D + c0 + 8) : 0u;
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-POS_INF, -POS_INF}, l[2] = {0.0f, 0.0f};

    // The keys any row of the block sees.
    unsigned block_lo, block_hi, last_row = min(first_row + TC_ROWS, s.seq_q) - 1;
    visible_keys(s, pad, b, last_row, &block_lo, &block_hi);
    for (unsigned kt = block_lo; kt < block_hi; kt += TC_KEYS) {
        __syncthreads();
        // 8 bf16 (16 bytes) of a key row per thread and step; V lands transposed.
        for (unsigned idx = threadIdx.x; idx < TC_KEYS * D / 8; idx += blockDim.x) {
            unsigned key = idx / (D / 8), c = (idx % (D / 8)) * 8, j = kt + key;
            uint4 kp = make_uint4(0u, 0u, 0u, 0u), vp = kp;
            if (j < s.seq_k) {
                kp = *(const uint4*)(kb + (size_t)j * D + c);
                vp = *(const uint4*)(vb + (size_t)j * D + c);
            }
            *(uint4*)&ks[key][c] = kp;
            const unsigned short* vh = (const unsigned short*)&vp;
#pragma unroll
            for (int e = 0; e < 8; ++e) vt[c + e][key] = vh[e];
        }
        __syncthreads();
        float sc[TC_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < TC_KEYS / 8; ++n) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned short* kr = &ks[n * 8 + grp][kk * 16 + 2 * t];
                mma_bf16(sc[n], qa[kk], *(const unsigned*)kr, *(const unsigned*)(kr + 8));
            }
        }
        // Online softmax per row on the fragments; masked entries become p = 0.
        unsigned pa[TC_KEYS / 16][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -POS_INF;
#pragma unroll
            for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    unsigned j = kt + n * 8 + 2 * t + c;
                    float x = (j >= lo[r] && j < hi[r]) ? sc[n][2 * r + c] * scale_log2 : -POS_INF;
                    sc[n][2 * r + c] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float new_m = fmaxf(m[r], mx);
            float rescale = new_m == -POS_INF ? 1.0f : exp2f(m[r] - new_m);
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float x = sc[n][2 * r + c];
                    float p = x == -POS_INF ? 0.0f : exp2f(x - new_m);
                    sc[n][2 * r + c] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[r] = l[r] * rescale + sum;
            m[r] = new_m;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][2 * r] *= rescale;
                o[n][2 * r + 1] *= rescale;
            }
        }
#pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; ++kk) {
            pa[kk][0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
            pa[kk][1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
            pa[kk][2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int kk = 0; kk < TC_KEYS / 16; ++kk) {
                const unsigned short* vr = &vt[n * 8 + grp][kk * 16 + 2 * t];
                mma_bf16(o[n], pa[kk], *(const unsigned*)vr, *(const unsigned*)(vr + 8));
            }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= s.seq_q) continue;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        bf16_t* orow = out + ((size_t)bh * s.seq_q + rows[r]) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *(unsigned*)(orow + n * 8 + 2 * t) = pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        // m is in log2 units: L = ln 2 · (m + log2 l).
        if (t == 0)
            lse[(size_t)bh * s.seq_q + rows[r]] = l[r] > 0.0f ? 0.6931471805599453f * (m[r] + log2f(l[r])) : -POS_INF;
    }
}

extern "C" __global__ void __launch_bounds__(256) attn_forward_tc64_bf16(
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* pad, bf16_t* out, float* lse, AttnDims s,
    float scale) {
    attn_forward_tc_impl<64>(q, k, v, pad, out, lse, s, scale);
}

extern "C" __global__ void __launch_bounds__(256) attn_forward_tc128_bf16(
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* pad, bf16_t* out, float* lse, AttnDims s,
    float scale) {
    attn_forward_tc_impl<128>(q, k, v, pad, out, lse, s, scale);
}

// KV cache copies (src/cuda.rs, CudaKvCache): `count` positions of every (b, kv head) slab of
// src ([slabs, src_stride, D]) into dst ([slabs, dst_stride, D]) from position `at` on — an
// append of new tokens, or the move into a larger allocation when the cache grows.
template <typename T>
__device__ void kv_copy_impl(const T* src, T* dst, size_t slabs, unsigned count, unsigned src_stride,
                             unsigned dst_stride, unsigned at, unsigned d) {
    size_t per_slab = (size_t)count * d;
    GRID_STRIDE_LOOP(i, slabs * per_slab) {
        size_t slab = i / per_slab, within = i % per_slab;
        dst[(slab * dst_stride + at) * d + within] = src[slab * src_stride * d + within];
    }
}

// [B, T, H, D] ↔ [B, H, T, D] (the attention layer's head split and merge): to_heads = 1 reads
// token-major and writes head-major, 0 the reverse.
template <typename T>
__device__ void swap_axes_impl(const T* src, T* dst, unsigned batch, unsigned seq, unsigned heads, unsigned d,
                               int to_heads) {
    GRID_STRIDE_LOOP(i, (size_t)batch * seq * heads * d) {
        size_t c = i % d, rest = i / d;
        size_t h = rest % heads, t = (rest / heads) % seq, b = rest / ((size_t)heads * seq);
        size_t token_major = i, head_major = (((b * heads + h) * seq + t) * d) + c;
        if (to_heads) dst[head_major] = src[token_major];
        else dst[token_major] = src[head_major];
    }
}

// The GEMM backward of causal self-attention (cuda.rs, backward_gemm) works on tiles: for
// `count` (sequence, KV head) pairs from `first` on, the rows i0.. i0 + tile of one query head
// of the group (starting `head_row` = j·T rows into the pair's group · T rows), each against
// keys 0..width (width = i0 + tile: later keys are masked for every row of the tile). Tile
// element idx: pair p = idx / (tile·width), row r, key c; its logsumexp row
// (first + p)·pair_rows + head_row + i0 + r, its position i0 + r.
struct TileDims {
    size_t first;
    unsigned count, pair_rows, head_row, i0, tile, width;
};

__device__ __forceinline__ size_t tile_row(const TileDims& t, size_t idx, unsigned* pos, unsigned* key) {
    size_t per_pair = (size_t)t.tile * t.width;
    size_t p = idx / per_pair;
    unsigned r = (unsigned)((idx % per_pair) / t.width);
    *key = (unsigned)(idx % t.width);
    *pos = t.i0 + r;
    return (t.first + p) * t.pair_rows + t.head_row + t.i0 + r;
}

// P = exp(scale·S − L) on the keys j ≤ i, 0 after them.
template <typename T>
__device__ void attn_probs_impl(const float* s, const float* lse, T* p, TileDims t, float scale) {
    GRID_STRIDE_LOOP(idx, (size_t)t.count * t.tile * t.width) {
        unsigned pos, key;
        size_t row = tile_row(t, idx, &pos, &key);
        p[idx] = from_f32<T>(key <= pos ? expf(scale * s[idx] - lse[row]) : 0.0f);
    }
}

// dS = scale · P ∘ (dP − Δ), written over P (Δ = rowsum(dO ∘ O)).
template <typename T>
__device__ void attn_dscores_impl(T* p, const float* dp, const float* delta, TileDims t, float scale) {
    GRID_STRIDE_LOOP(idx, (size_t)t.count * t.tile * t.width) {
        unsigned pos, key;
        size_t row = tile_row(t, idx, &pos, &key);
        p[idx] = from_f32<T>(scale * to_f32(p[idx]) * (dp[idx] - delta[row]));
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
    extern "C" __global__ void swap_axes_##name(const T* src, T* dst, unsigned batch, unsigned seq,      \
                                                unsigned heads, unsigned d, int to_heads) {             \
        swap_axes_impl(src, dst, batch, seq, heads, d, to_heads);                                        \
    }                                                                                                   \
    extern "C" __global__ void kv_copy_##name(const T* src, T* dst, size_t slabs, unsigned count,        \
                                              unsigned src_stride, unsigned dst_stride, unsigned at,     \
                                              unsigned d) {                                             \
        kv_copy_impl(src, dst, slabs, count, src_stride, dst_stride, at, d);                             \
    }                                                                                                   \
    extern "C" __global__ void attn_dkv_##name(const T* q, const T* k, const T* v, const T* dout,        \
                                               const float* lse, const float* delta, const int* pad,     \
                                               T* dk, T* dv, AttnDims s, float scale) {                  \
        attn_dkv_impl(q, k, v, dout, lse, delta, pad, dk, dv, s, scale);                                 \
    }                                                                                                   \
    extern "C" __global__ void attn_probs_##name(const float* s, const float* lse, T* p, TileDims t,     \
                                                 float scale) {                                         \
        attn_probs_impl(s, lse, p, t, scale);                                                            \
    }                                                                                                   \
    extern "C" __global__ void attn_dscores_##name(T* p, const float* dp, const float* delta, TileDims t, \
                                                   float scale) {                                       \
        attn_dscores_impl(p, dp, delta, t, scale);                                                       \
    }

ATTN_KERNELS(f32, float)
ATTN_KERNELS(f16, f16_t)
ATTN_KERNELS(bf16, bf16_t)
