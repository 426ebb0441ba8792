// cuBLAS GEMM choice at the GPU training step's frozen products (docs/performance.md, LoRA
// training on CUDA): cublasGemmEx's default (what llama-ops' cuda/matmul.rs runs untuned) against
// each of cublasLt's heuristic candidates, bf16 in and out, f32 compute, beta 0 (y = x·Wᵀ) and 1
// (y += x·Wᵀ, a LoRA branch or a residual already in y), on random operands (constant ones run
// the tensor cores cooler and faster); then the rank-16 LoRA branch y (+)= xs·Bᵀ at each width;
// then the branches folded into the frozen product along K: y = [x | xs]·[W | B | 0]ᵀ and
// dx_ext = dy·[W | B | 0] against the branch and the frozen product apart (each product at its
// fastest of the default and the candidates).
//   nvcc -O3 -arch=sm_90 -std=c++17 gemm_algos.cu -o gemm_algos -lcublasLt -lcublas
//   ./gemm_algos TOKENS NAME OUT IN [NAME OUT IN ...]
//   ./gemm_algos 8192 q 2048 2048 kv 512 2048 gate 8192 2048 down 2048 8192    (Llama-3.2-1B, 4 × 2048)
//   ./gemm_algos 4096 q 4096 4096 kv 1024 4096 gate 14336 4096 down 4096 14336 (Llama-3-8B, 2 × 2048)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>
#define CK(x) do { auto e = (x); if ((int)e != 0) { printf("%s:%d error %d\n", __FILE__, __LINE__, (int)e); exit(1); } } while (0)

__global__ void fill(__nv_bfloat16* x, size_t n, unsigned long long seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; z ^= z >> 31;
        x[i] = __float2bfloat16(scale * ((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f));
    }
}

struct Shape { const char* name; int m, n, k; bool ta; };  // col-major C[m,n] = op(A)[m,k] B[k,n]
// Microseconds of cublasGemmEx's default, of cublasLt's first candidate and of its fastest (#bi of got).
struct Timing { float def, first, best; int bi, got; float fastest() const { return best < def ? best : def; } };

int main(int argc, char** argv) {
    if (argc < 5) { printf("usage: %s TOKENS NAME OUT IN [NAME OUT IN ...]\n", argv[0]); return 2; }
    int M = atoi(argv[1]);  // tokens
    std::vector<Shape> shapes;
    for (int i = 2; i + 2 < argc; i += 3) {
        int n = atoi(argv[i + 1]), k = atoi(argv[i + 2]);
        // forward y[M,n] = x[M,k] W^T: col-major C[n,M] = W(T)[n,k] x[k,M]
        shapes.push_back({argv[i], n, M, k, true});
        // backward dx[M,k] = dy[M,n] W: col-major C[k,M] = W[k,n] dy[n,M]
        shapes.push_back({argv[i], k, M, n, false});
    }
    size_t maxe = 0;  // with room for 64 more columns (the concatenated branches)
    for (auto& s : shapes) { maxe = std::max(maxe, (size_t)(s.m + 64) * (s.k + 64)); maxe = std::max(maxe, (size_t)(s.k + 64) * s.n); maxe = std::max(maxe, (size_t)(s.m + 64) * s.n); }
    __nv_bfloat16 *a, *b, *c; void* ws; size_t wss = 64 << 20;
    CK(cudaMalloc(&a, maxe * 2)); CK(cudaMalloc(&b, maxe * 2)); CK(cudaMalloc(&c, maxe * 2)); CK(cudaMalloc(&ws, wss));
    fill<<<4096, 256>>>(a, maxe, 1, 0.02f); fill<<<4096, 256>>>(b, maxe, 2, 1.0f); fill<<<4096, 256>>>(c, maxe, 3, 1.0f);
    CK(cudaDeviceSynchronize());
    cublasHandle_t h; CK(cublasCreate(&h));
    cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    auto timeit = [&](auto f) { for (int i = 0; i < 3; ++i) f(); cudaEventRecord(e0); for (int i = 0; i < 20; ++i) f(); cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); return ms * 1000 / 20; };
    // C = op(A)·B (+ C), A from a, B from b, C in c, bf16, f32 compute.
    auto time_all = [&](int m, int n, int k, bool tra, int lda, int ldb, int ldc, float beta) {
        float alpha = 1.0f;
        cublasOperation_t ta = tra ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
        Timing r{0, 0, 1e9f, -1, 0};
        r.def = timeit([&] { cublasGemmEx(h, ta, tb, m, n, k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &beta, c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
        cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
        cublasLtMatrixLayout_t la, lb, lc;
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, tra ? k : m, tra ? m : k, lda));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, ldb));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, m, n, ldc));
        cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wss, sizeof(wss)));
        cublasLtMatmulHeuristicResult_t res[32];
        CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, res, &r.got));
        for (int i = 0; i < r.got; ++i) {
            float t = timeit([&] { cublasLtMatmul(lt, op, &alpha, a, la, b, lb, &beta, c, lc, c, lc, &res[i].algo, ws, wss, 0); });
            if (i == 0) r.first = t;
            if (t < r.best) { r.best = t; r.bi = i; }
        }
        cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
        return r;
    };
    for (auto& s : shapes) for (float beta : {0.0f, 1.0f}) {
        Timing t = time_all(s.m, s.n, s.k, s.ta, s.ta ? s.k : s.m, s.k, s.m, beta);
        double tf = 2.0 * s.m * s.n * s.k / 1e12;
        printf("%-6s %s m=%5d n=%5d k=%5d beta=%.0f  default %7.1f us (%4.0f TF/s)  lt#0 %7.1f  best lt#%2d/%2d %7.1f us (%4.0f TF/s)  gain %5.1f%%\n",
               s.name, s.ta ? "fwd" : "bwd", s.m, s.n, s.k, beta, t.def, tf / t.def * 1e6, t.first, t.bi, t.got, t.best, tf / t.best * 1e6, 100 * (t.def - t.best) / t.def);
    }
    // The LoRA branch: y [M, out] (+)= xs [M, 16] · B [out, 16]ᵀ, col-major C[out, M] = B(T) xs.
    for (size_t i = 0; i < shapes.size(); i += 2) {
        int out = shapes[i].m, r = 16;
        for (float beta : {0.0f, 1.0f}) {
            float alpha = 1.0f;
            float t = timeit([&] { cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, M, r, &alpha, a, CUDA_R_16BF, r, b, CUDA_R_16BF, r, &beta, c, CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
            double gb = (double)out * M * 2 * (beta ? 2 : 1) / 1e9;
            printf("%-6s lora r=16 out=%5d beta=%.0f  %7.1f us (%5.0f GB/s of y)\n", shapes[i].name, out, beta, t, gb / t * 1e6);
        }
    }
    // The branches folded into the frozen product along K, for a group of g branches reading one
    // x (q, k, v: 3; gate, up: 2; o, down: 1), rank 16: forward y = [x | xs]·[W | B | 0]ᵀ with
    // K = in + 16g against the branch writing y (K = 16, xs a column window of [M, 16g]) and the
    // frozen product adding onto it; backward dx_ext = dy·[W | B | 0] (beta 1: a group's later
    // product; its dy·B lands in the branch's columns) against dy·W (beta 1) and dy·B apart.
    for (size_t i = 0; i < shapes.size(); i += 2) {
        const char* name = shapes[i].name;
        int out = shapes[i].m, in = shapes[i].k, r = 16;
        int g = !strcmp(name, "q") || !strcmp(name, "kv") ? 3 : !strcmp(name, "gate") ? 2 : 1, kx = in + g * r;
        float branch = time_all(out, M, r, true, r, g * r, out, 0.0f).fastest();
        float frozen1 = time_all(out, M, in, true, in, in, out, 1.0f).fastest();
        float frozen0 = time_all(out, M, in, true, in, in, out, 0.0f).fastest();
        float concat = time_all(out, M, kx, true, kx, kx, out, 0.0f).fastest();
        float dx1 = time_all(in, M, out, false, in, out, in, 1.0f).fastest();
        float dxs = time_all(r, M, out, false, r, out, g * r, 0.0f).fastest();
        float dxcat = time_all(kx, M, out, false, kx, out, kx, 1.0f).fastest();
        printf("%-6s concat g=%d  fwd: branch %6.1f + frozen(beta 1) %6.1f = %6.1f us, frozen(beta 0) %6.1f, [x|xs][W|B]^T %6.1f (saves %5.1f)"
               "  bwd: dy.W %6.1f + dy.B %5.1f = %6.1f us, dy.[W|B] %6.1f (saves %5.1f)\n",
               name, g, branch, frozen1, branch + frozen1, frozen0, concat, branch + frozen1 - concat, dx1, dxs, dx1 + dxs, dxcat, dx1 + dxs - dxcat);
    }
    return 0;
}
