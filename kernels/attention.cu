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

// Dᵢ = dOᵢ · Oᵢ, a warp per row i = (b·H + h)·T + t of dO [B, H, T, D]; O in the same layout
// or, when merged_heads = H > 0, in the merged one [B, T, H, D].
template <typename T>
__device__ void attn_delta_impl(const T* out, const T* dout, float* delta, size_t rows, unsigned d,
                                unsigned merged_heads, unsigned seq) {
    size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= rows) return;
    size_t out_row = row;
    if (merged_heads > 0) {
        size_t bh = row / seq, t = row % seq;
        out_row = ((bh / merged_heads) * seq + t) * merged_heads + bh % merged_heads;
    }
    float o[ATT_PER_LANE], g[ATT_PER_LANE];
    load_row(out + out_row * d, d, o);
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
// memory by cp.async, double-buffered (the next tile loads while this one is used), row-major
// (P·V's operand, which runs along keys, comes from ldmatrix .trans). S = Q Kᵀ and O += P V are
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

__device__ __forceinline__ unsigned ld_pair(const bf16_t* p) { return *(const unsigned*)p; }

// The A fragments (D/16 of them, 16 rows × 16 columns each) of a lane's two rows of a row-major
// [rows, D] matrix: rows[0] = first + grp and rows[1] = first + grp + 8; rows ≥ limit are zero.
template <int D>
__device__ __forceinline__ void load_a_rows(unsigned (*a)[4], const bf16_t* m, const unsigned* rows,
                                            unsigned limit) {
    unsigned t = threadIdx.x & 3u;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned c0 = kk * 16 + 2 * t;
        a[kk][0] = rows[0] < limit ? ld_pair(m + (size_t)rows[0] * D + c0) : 0u;
        a[kk][1] = rows[1] < limit ? ld_pair(m + (size_t)rows[1] * D + c0) : 0u;
        a[kk][2] = rows[0] < limit ? ld_pair(m + (size_t)rows[0] * D + c0 + 8) : 0u;
        a[kk][3] = rows[1] < limit ? ld_pair(m + (size_t)rows[1] * D + c0 + 8) : 0u;
    }
}

// A row of a [*, D] bf16 tile in shared memory, padded by 8 so that the fragment loads of the
// 8 rows a warp reads at once fall in different banks.
template <int D> using Row = unsigned short[D + 8];

// Rows first.. first + ROWS of a row-major [*, D] bf16 matrix into shared memory, 16 bytes per
// thread and step with cp.async (zeros from `limit` on), by the whole block; the caller commits
// the group and waits for it (double buffering: the next tile loads while this one is used).
template <int D, int ROWS>
__device__ __forceinline__ void stage_rows_async(Row<D>* dst, const bf16_t* src, unsigned first, unsigned limit) {
    for (unsigned idx = threadIdx.x; idx < ROWS * D / 8; idx += blockDim.x) {
        unsigned r = idx / (D / 8), c = (idx % (D / 8)) * 8, j = first + r;
        bool valid = j < limit;
        unsigned to = (unsigned)__cvta_generic_to_shared(&dst[r][c]);
        const bf16_t* from = src + (size_t)(valid ? j : 0) * D + c;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(valid ? 16u : 0u));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most the newest committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::); }

// body(it) over tiles it = 0..n of shared memory that stage(it) fills with cp.async into buffer
// it & 1: tile it + 1 loads while tile it is used (double buffering). Every thread of the block
// calls it with the same n.
template <typename Stage, typename Body>
__device__ __forceinline__ void double_buffered(unsigned n, Stage stage, Body body) {
    if (n > 0) stage(0u);
    cp_async_commit();
    for (unsigned it = 0; it < n; ++it) {
        if (it + 1 < n) stage(it + 1);
        cp_async_commit();
        cp_async_wait_all_but_newest();
        __syncthreads();
        body(it);
        __syncthreads();  // the buffer is refilled two tiles on
    }
}

// 8×8 b16 matrices from shared memory (ldmatrix): lanes 8i … 8i + 7 address the rows of matrix
// i, and each lane receives its fragment of every matrix (row lane/4, columns 2·(lane%4), +1;
// with .trans, of the transposed matrices). Two matrices (lanes 0–15 address) or four.
__device__ __forceinline__ void ldsm_x2(unsigned* b, const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned* b, const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(addr));
}

// C [16, N] = A [16, D] · Mᵀ for M [N, D] row-major in shared memory: B's column n is M's row n,
// so an ldmatrix of rows n·8 … n·8 + 7 at columns 16·kk and 16·kk + 8 hands each lane its pairs.
template <int D, int N>
__device__ __forceinline__ void mma_abt(float (*c)[4], const unsigned (*a)[4], const unsigned short (*m)[D + 8]) {
    unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int n = 0; n < N / 8; ++n) {
        c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned b[2];
            ldsm_x2(b, &m[n * 8 + (lane & 7u)][kk * 16 + ((lane >> 3) & 1u) * 8]);
            mma_bf16(c[n], a[kk], b[0], b[1]);
        }
    }
}

// C [16, D] += A [16, K] · M for M [K, D] row-major in shared memory: ldmatrix .trans hands each
// lane B's pairs along K (lanes 0–15 address the rows of n-block n, 16–31 those of n + 1).
template <int K, int D>
__device__ __forceinline__ void mma_ab(float (*c)[4], const unsigned (*a)[4], const unsigned short (*m)[D + 8]) {
    unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            unsigned b[4];
            ldsm_x4_trans(b, &m[kk * 16 + (lane & 15u)][n * 8 + (lane >> 4) * 8]);
            mma_bf16(c[n], a[kk], b[0], b[1]);
            mma_bf16(c[n + 1], a[kk], b[2], b[3]);
        }
}

// The A fragments [K/16][4] of C fragments [K/8][4] rounded to bf16 (an mma's output as the next
// one's left operand).
template <int K>
__device__ __forceinline__ void pack_a(unsigned (*a)[4], const float (*c)[4]) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// A lane's two rows of C fragments [D/8][4] times `mul[r]`, as bf16 pairs into rows[r] of a
// row-major [*, D] matrix (rows ≥ limit skipped).
template <int D>
__device__ __forceinline__ void store_c_rows(bf16_t* m, const float (*c)[4], const unsigned* rows,
                                             const float* mul, unsigned limit) {
    unsigned t = threadIdx.x & 3u;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= limit) continue;
        bf16_t* row = m + (size_t)rows[r] * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *(unsigned*)(row + n * 8 + 2 * t) = pack_bf16x2(c[n][2 * r] * mul[r], c[n][2 * r + 1] * mul[r]);
    }
}

#define LOG2E 1.4426950408889634f

// 2^x on the special-function unit alone (ex2.approx.ftz; exp2f adds a range fix-up for
// results below 2^-126, which flush to zero here: no probability that small changes a sum of
// them or its bf16 rounding). 2^-∞ = 0.
__device__ __forceinline__ float exp2_sfu(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// One key tile of the online softmax for a lane's two rows: the scores sc [TC_KEYS/8][4] (raw
// Q·Kᵀ) become p = exp2(s·scale·log₂e − m), the running max m (log2 units) and sum l move on
// and the output accumulators o are rescaled. The max is taken over the raw scores (scale >
// 0), so that each p is one fused multiply-add and an exp2. MASK: keys outside a row's [lo, hi)
// count as −∞ (the caller skips it for tiles every row of the warp sees whole). Rows that have
// seen no key keep m = −∞ and l = 0 (exp2 against 0 gives their p = 0).
template <int D, bool MASK>
__device__ __forceinline__ void softmax_tile(float (*sc)[4], float (*o)[4], float* m, float* l, unsigned kt,
                                             const unsigned* lo, const unsigned* hi, float scale_log2) {
    unsigned t = threadIdx.x & 3u;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -POS_INF;
#pragma unroll
        for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                unsigned j = kt + n * 8 + 2 * t + c;
                if (MASK && !(j >= lo[r] && j < hi[r])) sc[n][2 * r + c] = -POS_INF;
                mx = fmaxf(mx, sc[n][2 * r + c]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float new_m = fmaxf(m[r], mx * scale_log2), base = new_m == -POS_INF ? 0.0f : new_m;
        float rescale = exp2_sfu(m[r] - base), sum = 0.0f;
#pragma unroll
        for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float p = exp2_sfu(fmaf(sc[n][2 * r + c], scale_log2, -base));
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
}

template <int D>
__device__ void attn_forward_tc_impl(const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* pad,
                                     bf16_t* out, float* lse, AttnDims s, float scale) {
    extern __shared__ __align__(16) unsigned char tc_smem[];
    Row<D>* ks = (Row<D>*)tc_smem;  // [2 · TC_KEYS]: two buffers of K, then of V
    Row<D>* vs = ks + 2 * TC_KEYS;
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x & 31u, grp = lane >> 2, t = lane & 3u;
    unsigned tiles = (s.seq_q + TC_ROWS - 1) / TC_ROWS, pairs = s.batch * s.heads;
    // Scores in log2 units, so that the exponentials are exp2: s · scale · log2(e).
    const float scale_log2 = scale * LOG2E;
    // The tiles with the most keys (the last, under a causal mask) first.
    unsigned tile = tiles - 1 - blockIdx.x / pairs, bh = blockIdx.x % pairs;
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
    load_a_rows<D>(qa, qb, rows, s.seq_q);
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-POS_INF, -POS_INF}, l[2] = {0.0f, 0.0f};

    // The keys any row of the block sees.
    unsigned block_lo, block_hi, last_row = min(first_row + TC_ROWS, s.seq_q) - 1;
    visible_keys(s, pad, b, last_row, &block_lo, &block_hi);
    unsigned key_tiles = (block_hi - block_lo + TC_KEYS - 1) / TC_KEYS;
    auto stage = [&](unsigned it) {
        unsigned kt = block_lo + it * TC_KEYS, buf = (it & 1) * TC_KEYS;
        stage_rows_async<D, TC_KEYS>(ks + buf, kb, kt, s.seq_k);
        stage_rows_async<D, TC_KEYS>(vs + buf, vb, kt, s.seq_k);
    };
    double_buffered(key_tiles, stage, [&](unsigned it) {
        unsigned kt = block_lo + it * TC_KEYS, buf = (it & 1) * TC_KEYS;
        float sc[TC_KEYS / 8][4];
        mma_abt<D, TC_KEYS>(sc, qa, ks + buf);
        // Masked entries become p = 0; tiles every row of the warp sees whole need no mask.
        bool whole = true;
        for (int r = 0; r < 2; ++r) whole = whole && kt >= lo[r] && kt + TC_KEYS <= hi[r];
        if (__all_sync(0xffffffffu, whole))
            softmax_tile<D, false>(sc, o, m, l, kt, lo, hi, scale_log2);
        else
            softmax_tile<D, true>(sc, o, m, l, kt, lo, hi, scale_log2);
        unsigned pa[TC_KEYS / 16][4];
        pack_a<TC_KEYS>(pa, sc);
        mma_ab<TC_KEYS, D>(o, pa, vs + buf);
    });
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        // m is in log2 units: L = ln 2 · (m + log2 l).
        if (t == 0 && rows[r] < s.seq_q)
            lse[(size_t)bh * s.seq_q + rows[r]] = l[r] > 0.0f ? 0.6931471805599453f * (m[r] + log2f(l[r])) : -POS_INF;
    }
    store_c_rows<D>(out + (size_t)bh * s.seq_q * D, o, rows, inv, s.seq_q);
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

// FlashAttention-2's backward on the tensor cores (cuda.rs, backward_tc): bf16, D ∈ {64, 128},
// causal self-attention without padding (T queries and keys; query i sees keys j ≤ i). The
// probabilities are recomputed tile by tile from the forward's L, never stored:
//   P = exp(scale·Q Kᵀ − L), dP = dO Vᵀ, dS = scale · P ∘ (dP − Δ)   (Δ = rowsum(dO ∘ O)),
//   dQ = dS K                  attn_dq_tc: a block per 128 query rows of one (b, h), key tiles;
//   dV = Σ Pᵀ dO, dK = Σ dSᵀ Q  attn_dkv_tc: a block per 128 keys of one (b, kv head), query
//                              tiles of every head of the group (so no atomics).
// Each warp owns 16 rows (queries, or keys), as in the forward; P and dS are rounded to bf16
// for the products that take them as operands, as FlashAttention-2 does.

// f(n, r, c) for each of a lane's entries [n][2r + c] of a [16, N] accumulator: row grp + 8r,
// column 8n + 2t + c (the C fragment layout above).
template <int N = TC_KEYS, typename F>
__device__ __forceinline__ void each_entry(F f) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int c = 0; c < 2; ++c) f(n, r, c);
}

// One key tile's share of dQ for a warp's 16 rows: S = Q Kᵀ, dP = dO Vᵀ, P = exp2(S·scale·log₂e −
// L·log₂e) on the keys j ≤ the row, dS = scale · P ∘ (dP − Δ) = P ∘ (scale·dP − sΔ) with the
// rows' sΔ = scale·Δ, dQ += dS K — in two halves of the tile's keys, one after the other, so
// that S and dP take 32 registers each (the kernel then fits 128 registers: two blocks per SM).
// MASK: some key of the tile is after some row of the warp (the caller skips it for tiles below
// the diagonal).
template <int D, bool MASK>
__device__ __forceinline__ void dq_tile(float (*acc)[4], const unsigned (*qa)[4], const unsigned (*da)[4],
                                        const Row<D>* ks, const Row<D>* vs, unsigned kt, const unsigned* rows,
                                        const float* l2, const float* sdl, float scale) {
    constexpr int H = TC_KEYS / 2;
    unsigned t = threadIdx.x & 3u;
    const float scale_log2 = scale * LOG2E;
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
        const Row<D>*kh = ks + half * H, *vh = vs + half * H;
        float sc[H / 8][4], dp[H / 8][4];
        mma_abt<D, H>(sc, qa, kh);
        mma_abt<D, H>(dp, da, vh);
        each_entry<H>([&](int n, int r, int c) {
            unsigned j = kt + half * H + n * 8 + 2 * t + c;
            float x = sc[n][2 * r + c];
            float p = !MASK || j <= rows[r] ? exp2_sfu(fmaf(x, scale_log2, -l2[r])) : 0.0f;
            sc[n][2 * r + c] = p * fmaf(scale, dp[n][2 * r + c], -sdl[r]);
        });
        unsigned dsa[H / 16][4];
        pack_a<H>(dsa, sc);
        mma_ab<H, D>(acc, dsa, kh);
    }
}

template <int D>
__device__ void attn_dq_tc_impl(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                const float* lse, const float* delta, bf16_t* dq, AttnDims s, float scale) {
    extern __shared__ __align__(16) unsigned char tc_smem[];
    Row<D>* ks = (Row<D>*)tc_smem;  // two buffers of K, then of V
    Row<D>* vs = ks + 2 * TC_KEYS;
    unsigned warp = threadIdx.x / 32, grp = (threadIdx.x & 31u) >> 2;
    unsigned T = s.seq_q, tiles = (T + TC_ROWS - 1) / TC_ROWS, pairs = s.batch * s.heads;
    // The tiles with the most keys (the last) first.
    unsigned tile = tiles - 1 - blockIdx.x / pairs, bh = blockIdx.x % pairs;
    unsigned b = bh / s.heads, g = (bh % s.heads) / (s.heads / s.kv_heads);
    unsigned first_row = tile * TC_ROWS, row0 = first_row + warp * 16;
    size_t row_base = (size_t)bh * T;
    const bf16_t* kb = k + ((size_t)b * s.kv_heads + g) * s.kv_stride * D;
    const bf16_t* vb = v + ((size_t)b * s.kv_heads + g) * s.kv_stride * D;
    unsigned rows[2] = {row0 + grp, row0 + grp + 8};
    unsigned qa[D / 16][4], da[D / 16][4];
    load_a_rows<D>(qa, q + row_base * D, rows, T);
    load_a_rows<D>(da, dout + row_base * D, rows, T);
    float l2[2], sdl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l2[r] = rows[r] < T ? lse[row_base + rows[r]] * LOG2E : 0.0f;
        sdl[r] = rows[r] < T ? scale * delta[row_base + rows[r]] : 0.0f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    unsigned key_tiles = (min(first_row + TC_ROWS, T) + TC_KEYS - 1) / TC_KEYS;
    auto stage = [&](unsigned it) {
        unsigned buf = (it & 1) * TC_KEYS;
        stage_rows_async<D, TC_KEYS>(ks + buf, kb, it * TC_KEYS, T);
        stage_rows_async<D, TC_KEYS>(vs + buf, vb, it * TC_KEYS, T);
    };
    double_buffered(key_tiles, stage, [&](unsigned it) {
        unsigned kt = it * TC_KEYS, buf = (it & 1) * TC_KEYS;
        // Tiles whose every key is after these rows add nothing; those whose every key is
        // before them need no mask.
        if (row0 >= T || kt > row0 + 15) return;
        if (kt + TC_KEYS <= row0 + 1)
            dq_tile<D, false>(acc, qa, da, ks + buf, vs + buf, kt, rows, l2, sdl, scale);
        else
            dq_tile<D, true>(acc, qa, da, ks + buf, vs + buf, kt, rows, l2, sdl, scale);
    });
    const float one[2] = {1.0f, 1.0f};
    store_c_rows<D>(dq + row_base * D, acc, rows, one, T);
}

// One query tile's share of dK and dV for a warp's 16 keys: Sᵀ [16 keys, 64 queries] = K Qᵀ,
// dPᵀ = V dOᵀ, Pᵀ = exp2(Sᵀ·scale·log₂e − L·log₂e) on the queries i ≥ the key, dSᵀ = scale ·
// Pᵀ ∘ (dPᵀ − Δ), dV += Pᵀ dO, dK += dSᵀ Q (l2 = L·log₂e and sdl = scale·Δ of the tile's
// queries).
// MASK: some query of the tile is before some key of the warp, or past T.
template <int D, bool DV, bool DK, bool MASK>
__device__ __forceinline__ void dkv_tile(float (*dka)[4], float (*dva)[4], const unsigned (*ka)[4],
                                         const unsigned (*va)[4], const Row<D>* qs, const Row<D>* gs,
                                         unsigned i0, const unsigned* keys, const float* l2,
                                         const float* sdl, unsigned T, float scale) {
    unsigned t = threadIdx.x & 3u;
    const float scale_log2 = scale * LOG2E;
    float st[TC_KEYS / 8][4], dpt[TC_KEYS / 8][4];
    mma_abt<D, TC_KEYS>(st, ka, qs);
    if (DK) mma_abt<D, TC_KEYS>(dpt, va, gs);
    each_entry([&](int n, int r, int c) {
        unsigned col = n * 8 + 2 * t + c, i = i0 + col;
        bool seen = !MASK || (i >= keys[r] && i < T);
        float p = seen ? exp2_sfu(fmaf(st[n][2 * r + c], scale_log2, -l2[col])) : 0.0f;
        st[n][2 * r + c] = p;
        if (DK) dpt[n][2 * r + c] = p * fmaf(scale, dpt[n][2 * r + c], -sdl[col]);
    });
    unsigned fa[TC_KEYS / 16][4];
    if (DV) {
        pack_a<TC_KEYS>(fa, st);
        mma_ab<TC_KEYS, D>(dva, fa, gs);
    }
    if (DK) {
        pack_a<TC_KEYS>(fa, dpt);
        mma_ab<TC_KEYS, D>(dka, fa, qs);
    }
}

// The dK/dV pass; DV and DK choose which of the two it accumulates (at D = 128 one pass each,
// so that the accumulators fit the registers).
template <int D, bool DV, bool DK>
__device__ void attn_dkv_tc_impl(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                 const float* lse, const float* delta, bf16_t* dk, bf16_t* dv, AttnDims s,
                                 float scale) {
    extern __shared__ __align__(16) unsigned char tc_smem[];
    Row<D>* qs = (Row<D>*)tc_smem;  // two buffers of Q, then of dO, then L·log₂e and scale·Δ
    Row<D>* gs = qs + 2 * TC_KEYS;
    float* l2s = (float*)(gs + 2 * TC_KEYS);
    float* sdls = l2s + 2 * TC_KEYS;
    unsigned warp = threadIdx.x / 32, grp = (threadIdx.x & 31u) >> 2;
    unsigned T = s.seq_q, pairs = s.batch * s.kv_heads;
    // The tiles with the most queries (the first) first.
    unsigned tile = blockIdx.x / pairs, bg = blockIdx.x % pairs;
    unsigned b = bg / s.kv_heads, g = bg % s.kv_heads, group = s.heads / s.kv_heads;
    unsigned first_key = tile * TC_ROWS, key0 = first_key + warp * 16;
    size_t kv_base = (size_t)bg * s.kv_stride;
    unsigned keys[2] = {key0 + grp, key0 + grp + 8};
    unsigned ka[D / 16][4], va[D / 16][4];
    load_a_rows<D>(ka, k + kv_base * D, keys, T);
    if (DK) load_a_rows<D>(va, v + kv_base * D, keys, T);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.0f;
    // Query tiles i0 = first_key, first_key + 64, … of each head of the group, one after another.
    unsigned per_head = (T - first_key + TC_KEYS - 1) / TC_KEYS, query_tiles = group * per_head;
    auto row_base = [&](unsigned it) { return ((size_t)b * s.heads + g * group + it / per_head) * T; };
    auto first_query = [&](unsigned it) { return first_key + (it % per_head) * TC_KEYS; };
    auto stage = [&](unsigned it) {
        size_t base = row_base(it);
        unsigned i0 = first_query(it), buf = (it & 1) * TC_KEYS;
        stage_rows_async<D, TC_KEYS>(qs + buf, q + base * D, i0, T);
        stage_rows_async<D, TC_KEYS>(gs + buf, dout + base * D, i0, T);
        for (unsigned r = threadIdx.x; r < TC_KEYS; r += blockDim.x) {
            bool in = i0 + r < T;
            l2s[buf + r] = in ? lse[base + i0 + r] * LOG2E : POS_INF;
            sdls[buf + r] = in ? scale * delta[base + i0 + r] : 0.0f;
        }
    };
    double_buffered(query_tiles, stage, [&](unsigned it) {
        unsigned i0 = first_query(it), buf = (it & 1) * TC_KEYS;
        // Tiles whose every query is before these keys add nothing; those whose every query
        // is at or after them (and before T) need no mask.
        if (key0 >= T || i0 + TC_KEYS - 1 < key0) return;
        const float *l2 = l2s + buf, *sdl = sdls + buf;
        if (i0 >= key0 + 15 && i0 + TC_KEYS <= T)
            dkv_tile<D, DV, DK, false>(dka, dva, ka, va, qs + buf, gs + buf, i0, keys, l2, sdl, T, scale);
        else
            dkv_tile<D, DV, DK, true>(dka, dva, ka, va, qs + buf, gs + buf, i0, keys, l2, sdl, T, scale);
    });
    const float one[2] = {1.0f, 1.0f};
    if (DK) store_c_rows<D>(dk + kv_base * D, dka, keys, one, T);
    if (DV) store_c_rows<D>(dv + kv_base * D, dva, keys, one, T);
}

// DQ_BLOCKS: the dQ kernel's blocks per SM. At D = 64 two (registers capped at 128: it needed 135,
// which left one block of 8 warps per SM, 12.5% occupancy); at D = 128 one.
#define ATTN_BACKWARD_TC(D, DKV_PASSES, DQ_BLOCKS)                                                     \
    extern "C" __global__ void __launch_bounds__(256, DQ_BLOCKS) attn_dq_tc##D##_bf16(                \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,       \
        const float* delta, bf16_t* dq, AttnDims s, float scale) {                                     \
        attn_dq_tc_impl<D>(q, k, v, dout, lse, delta, dq, s, scale);                                   \
    }                                                                                                  \
    DKV_PASSES(D)

#define DKV_ONE_PASS(D)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) attn_dkv_tc##D##_bf16(                          \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,       \
        const float* delta, bf16_t* dk, bf16_t* dv, AttnDims s, float scale) {                         \
        attn_dkv_tc_impl<D, true, true>(q, k, v, dout, lse, delta, dk, dv, s, scale);                  \
    }
#define DKV_TWO_PASSES(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) attn_dv_tc##D##_bf16(                           \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,       \
        const float* delta, bf16_t* dk, bf16_t* dv, AttnDims s, float scale) {                         \
        attn_dkv_tc_impl<D, true, false>(q, k, v, dout, lse, delta, dk, dv, s, scale);                 \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) attn_dk_tc##D##_bf16(                           \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,       \
        const float* delta, bf16_t* dk, bf16_t* dv, AttnDims s, float scale) {                         \
        attn_dkv_tc_impl<D, false, true>(q, k, v, dout, lse, delta, dk, dv, s, scale);                 \
    }

ATTN_BACKWARD_TC(64, DKV_ONE_PASS, 2)
ATTN_BACKWARD_TC(128, DKV_TWO_PASSES, 1)

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
// token-major and writes head-major, 0 the reverse. E is T, or a 16-byte chunk of a row when
// rows are whole chunks (cuda_layer.rs sizes the grid by the same rule).
template <typename E>
__device__ void swap_axes_elems(const E* src, E* dst, unsigned batch, unsigned seq, unsigned heads, unsigned d,
                                int to_heads) {
    GRID_STRIDE_LOOP(i, (size_t)batch * seq * heads * d) {
        size_t c = i % d, rest = i / d;
        size_t h = rest % heads, t = (rest / heads) % seq, b = rest / ((size_t)heads * seq);
        size_t token_major = i, head_major = (((b * heads + h) * seq + t) * d) + c;
        if (to_heads) dst[head_major] = src[token_major];
        else dst[token_major] = src[head_major];
    }
}

template <typename T>
__device__ void swap_axes_impl(const T* src, T* dst, unsigned batch, unsigned seq, unsigned heads, unsigned d,
                               int to_heads) {
    if ((d * sizeof(T)) % 16 == 0 && aligned16(src) && aligned16(dst))
        swap_axes_elems((const uint4*)src, (uint4*)dst, batch, seq, heads, d * (unsigned)sizeof(T) / 16, to_heads);
    else
        swap_axes_elems(src, dst, batch, seq, heads, d, to_heads);
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
                                                 unsigned d, unsigned merged_heads, unsigned seq) {     \
        attn_delta_impl(out, dout, delta, rows, d, merged_heads, seq);                                  \
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
